// SPDX-License-Identifier: Apache-2.0
// End-to-end training check: a tiny two-layer attention model trained with plain SGD, once with
// tessera's kernels (Path::kAuto for the forward and the backward) and once with the fp64
// reference path (Path::kReference for both), from the same initialization and data. The loss
// curves must agree step by step and the loss must fall: the forward, its LSE and the backward
// fit together as a training step needs them to.
//
// Model, per layer l (x: [B*S, M] with M = H*D, all linear maps M x M, y = x W):
//   q, k, v = x Wq, x Wk, x Wv    (reshaped to [B, S, H, D], rounded to f32)
//   a = causal attention(q, k, v)
//   x <- x + a Wo
// loss = mean over elements of (x_L - target)^2. The linear layers, their gradients and the SGD
// updates are written out here in double; only the attention runs in tessera.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/types.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

constexpr int64_t kBatch = 2;
constexpr int64_t kSeq = 24;
constexpr int64_t kHeads = 2;
constexpr int64_t kHeadDim = 16;
constexpr int64_t kModel = kHeads * kHeadDim;
constexpr int64_t kRows = kBatch * kSeq;
constexpr int kLayers = 2;
constexpr int kSteps = 20;
constexpr double kLearningRate = 0.2;

using Matrix = std::vector<double>;  // row-major

size_t At(int64_t i) { return static_cast<size_t>(i); }

// y[rows, out] = x[rows, in] * w[in, out]
Matrix MatMul(const Matrix& x, const Matrix& w, int64_t rows, int64_t in, int64_t out) {
  Matrix y(At(rows * out), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      const double xv = x[At(r * in + i)];
      for (int64_t c = 0; c < out; ++c) y[At(r * out + c)] += xv * w[At(i * out + c)];
    }
  }
  return y;
}

// dx[rows, in] += dy[rows, out] * w[in, out]^T
void AddMatMulWT(const Matrix& dy, const Matrix& w, int64_t rows, int64_t in, int64_t out,
                 Matrix* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      double acc = 0.0;
      for (int64_t c = 0; c < out; ++c) acc += dy[At(r * out + c)] * w[At(i * out + c)];
      (*dx)[At(r * in + i)] += acc;
    }
  }
}

// dw[in, out] = x[rows, in]^T * dy[rows, out]
Matrix MatMulXT(const Matrix& x, const Matrix& dy, int64_t rows, int64_t in, int64_t out) {
  Matrix dw(At(in * out), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      const double xv = x[At(r * in + i)];
      for (int64_t c = 0; c < out; ++c) dw[At(i * out + c)] += xv * dy[At(r * out + c)];
    }
  }
  return dw;
}

std::vector<float> ToFloat(const Matrix& m) { return std::vector<float>(m.begin(), m.end()); }
Matrix ToDouble(const std::vector<float>& v) { return Matrix(v.begin(), v.end()); }

struct Layer {
  Matrix wq, wk, wv, wo;
};

// What a layer's forward keeps for its backward.
struct LayerCache {
  Matrix x;                    // layer input [kRows, kModel]
  std::vector<float> q, k, v;  // [B, S, H, D] = [kRows, kModel]
  std::vector<float> out, lse;
};

Matrix RandomMatrix(test::Rng& rng, int64_t n, double stddev) {
  Matrix m(At(n));
  for (double& x : m) x = static_cast<double>(rng.Normal()) * stddev;
  return m;
}

class TinyModel {
 public:
  explicit TinyModel(uint64_t seed) {
    test::Rng rng(seed);
    const double w_std = 1.0 / std::sqrt(static_cast<double>(kModel));
    for (int l = 0; l < kLayers; ++l) {
      Layer layer;
      layer.wq = RandomMatrix(rng, kModel * kModel, w_std);
      layer.wk = RandomMatrix(rng, kModel * kModel, w_std);
      layer.wv = RandomMatrix(rng, kModel * kModel, w_std);
      layer.wo = RandomMatrix(rng, kModel * kModel, 0.5 * w_std);
      layers_.push_back(layer);
    }
  }

  // One SGD step on (x, target) with attention on `path`; returns the loss before the update.
  double Step(const Matrix& input, const Matrix& target, Path path) {
    Context ctx;
    ctx.path = path;
    std::vector<LayerCache> caches(kLayers);
    Matrix x = input;
    for (int l = 0; l < kLayers; ++l) {
      const Layer& w = layers_[At(l)];
      LayerCache& c = caches[At(l)];
      c.x = x;
      c.q = ToFloat(MatMul(x, w.wq, kRows, kModel, kModel));
      c.k = ToFloat(MatMul(x, w.wk, kRows, kModel, kModel));
      c.v = ToFloat(MatMul(x, w.wv, kRows, kModel, kModel));
      c.out.assign(At(kRows * kModel), 0.0f);
      c.lse.assign(At(kBatch * kHeads * kSeq), 0.0f);
      const AttentionParams p = Params(&c);
      const Status st = AttentionForward(p, ctx);
      EXPECT_TRUE(st.ok()) << st.ToString();
      if (!st.ok()) return std::nan("");
      const Matrix y = MatMul(ToDouble(c.out), w.wo, kRows, kModel, kModel);
      for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    }

    const double n = static_cast<double>(x.size());
    double loss = 0.0;
    Matrix dx(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double e = x[i] - target[i];
      loss += e * e / n;
      dx[i] = 2.0 * e / n;
    }

    for (int l = kLayers - 1; l >= 0; --l) {
      Layer& w = layers_[At(l)];
      LayerCache& c = caches[At(l)];
      // x_out = x_in + a Wo: the residual passes dx through unchanged.
      const Matrix dwo = MatMulXT(ToDouble(c.out), dx, kRows, kModel, kModel);
      Matrix da(dx.size(), 0.0);
      AddMatMulWT(dx, w.wo, kRows, kModel, kModel, &da);
      std::vector<float> dout = ToFloat(da);
      std::vector<float> dq(dout.size()), dk(dout.size()), dv(dout.size());
      AttentionBackwardParams bp;
      bp.forward = Params(&c);
      bp.dout = MakeView4(dout.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
      bp.dq = MakeView4(dq.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
      bp.dk = MakeView4(dk.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
      bp.dv = MakeView4(dv.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
      const Status st = AttentionBackward(bp, ctx);
      EXPECT_TRUE(st.ok()) << st.ToString();
      if (!st.ok()) return std::nan("");
      const Matrix dqd = ToDouble(dq), dkd = ToDouble(dk), dvd = ToDouble(dv);
      const Matrix dwq = MatMulXT(c.x, dqd, kRows, kModel, kModel);
      const Matrix dwk = MatMulXT(c.x, dkd, kRows, kModel, kModel);
      const Matrix dwv = MatMulXT(c.x, dvd, kRows, kModel, kModel);
      AddMatMulWT(dqd, w.wq, kRows, kModel, kModel, &dx);
      AddMatMulWT(dkd, w.wk, kRows, kModel, kModel, &dx);
      AddMatMulWT(dvd, w.wv, kRows, kModel, kModel, &dx);
      for (const auto& [param, grad] : {std::pair<Matrix*, const Matrix*>{&w.wq, &dwq},
                                        {&w.wk, &dwk},
                                        {&w.wv, &dwv},
                                        {&w.wo, &dwo}}) {
        for (size_t i = 0; i < param->size(); ++i) (*param)[i] -= kLearningRate * (*grad)[i];
      }
    }
    return loss;
  }

 private:
  static AttentionParams Params(LayerCache* c) {
    AttentionParams p;
    p.q = MakeView4(c->q.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
    p.k = MakeView4(c->k.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
    p.v = MakeView4(c->v.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
    p.out = MakeView4(c->out.data(), DType::kF32, kBatch, kSeq, kHeads, kHeadDim);
    int64_t lse_shape[3] = {kBatch, kHeads, kSeq};
    p.lse = MakeContiguousView(c->lse.data(), DType::kF32, 3, lse_shape);
    p.causal = true;
    return p;
  }

  std::vector<Layer> layers_;
};

std::vector<double> TrainLosses(Path path) {
  const uint64_t seed = test::SeedFor("TinyAttentionModel");
  TinyModel model(seed);
  test::Rng rng(seed ^ 0x5eedull);
  const Matrix input = RandomMatrix(rng, kRows * kModel, 1.0);
  const Matrix target = RandomMatrix(rng, kRows * kModel, 1.0);
  std::vector<double> losses;
  for (int step = 0; step < kSteps; ++step) losses.push_back(model.Step(input, target, path));
  return losses;
}

TEST(Training, KernelLossCurveMatchesReferencePath) {
  SCOPED_TRACE(test::Repro("TinyAttentionModel"));
  const std::vector<double> reference = TrainLosses(Path::kReference);
  const std::vector<double> kernel = TrainLosses(Path::kAuto);
  ASSERT_EQ(reference.size(), kernel.size());
  for (size_t step = 0; step < reference.size(); ++step) {
    ASSERT_TRUE(std::isfinite(reference[step])) << "step " << step;
    ASSERT_TRUE(std::isfinite(kernel[step])) << "step " << step;
    EXPECT_LE(std::fabs(kernel[step] - reference[step]),
              test::kTrainingLossRelTol * std::fabs(reference[step]))
        << "step " << step << ": kernel loss " << kernel[step] << ", reference " << reference[step];
    if (step > 0) {
      EXPECT_LT(reference[step], reference[step - 1]) << "the loss rose at step " << step;
      EXPECT_LT(kernel[step], kernel[step - 1]) << "the loss rose at step " << step;
    }
  }
  double worst = 0.0;
  for (size_t step = 0; step < reference.size(); ++step) {
    worst = std::max(worst, std::fabs(kernel[step] - reference[step]) / std::fabs(reference[step]));
  }
  std::printf(
      "training loss (reference path): %.6f -> %.6f over %d steps; kernel vs reference: "
      "largest relative difference %.3g\n",
      reference.front(), reference.back(), kSteps, worst);
}

}  // namespace
}  // namespace tessera
