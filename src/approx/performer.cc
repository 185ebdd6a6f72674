// SPDX-License-Identifier: Apache-2.0
// Performer FAVOR+ (Choromanski et al., "Rethinking Attention with Performers").
//
// What it approximates: softmax attention, out_t = sum_s exp(c^2 q_t . k_s) v_s / sum_s exp(...)
// with c^2 = scale. exp(x . y) = E_w[exp(w . x - |x|^2 / 2) exp(w . y - |y|^2 / 2)] for
// w ~ N(0, I_D), so with m draws w_1..w_m (the rows of W [m, D]) and x' = c x,
//   phi(x)_i = exp(w_i . x' - |x'|^2 / 2 - stab) / sqrt(m)
// gives phi(q) . phi(k) = exp(q' . k') e^(-stab_q - stab_k) up to the Monte Carlo error. Positive
// features keep every weight > 0, so the normalizer never cancels (the trigonometric features of
// the older random-features methods do). Rows of W come in blocks of D orthogonal directions with
// chi-distributed norms (DrawOrthogonalGaussian), which keeps the estimate unbiased and lowers its
// variance against i.i.d. rows; or the caller gives W (performer.projection).
// The stabilizers keep exp in range and cancel in the normalized output: per query row the
// largest exponent of that row (so phi(q)_i = exp(y_i - max_j y_j) / sqrt(m), the |q'|^2 / 2
// cancels with it), for keys one constant per (batch, KV head), the largest exponent over every
// key and feature (a constant factor on every key's weight).
// Then normalized linear attention on (phi(q), phi(k), v) through the chunked linear engine,
// causal or not (random_features.h: FeatureAttention).
//
// Error: the relative error of each kernel estimate falls like 1/sqrt(m); it grows with
// exp(|q'|^2 + |k'|^2) (the variance of the estimator), so peaked inputs with large norms or a
// large scale need more features. The output error follows the estimate's error weighted by the
// attention.
//
// Cost: features 2 D m FLOPs per row of q and of k (a GEMM) plus m exps; the engine about
// 4 m D per token and head plus its chunk term; memory: phi(q), phi(k) in f32, m floats per row,
// computed for a slab of KV heads at a time (KvHeadsPerSlab) so that m = 1024 at 64K tokens does
// not hold every head at once. Linear in the sequence length.
//
// Backward: the engine's gradients with respect to phi(q), phi(k) and v, then the chain rule
// through phi: d phi_i / d x' = phi_i (w_i - x') with the stabilizers held constant, which is
// exact because they cancel in the normalized output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "approx/random_features.h"
#include "core/check.h"
#include "core/parallel.h"
#include "ref/approx_features_ref.h"

namespace tessera {
namespace approx {

namespace {

constexpr int64_t kRowsPerTask = 128;

struct Projection {
  int64_t m = 0, mp = 0, d = 0, dp = 0;
  std::vector<float> w;   // [m, D]
  std::vector<float> wt;  // [D, mp]: W^T, zero padded
  std::vector<float> wp;  // [m, dp]: W, zero padded (backward)
};

Projection MakeProjection(const ApproxParams& p, int64_t d, bool backward) {
  Projection pr;
  pr.m = p.performer.features;
  pr.mp = PadFeatures(pr.m);
  pr.d = d;
  pr.dp = PadFeatures(d);
  pr.w.resize(static_cast<size_t>(pr.m * d));
  if (p.performer.projection.data != nullptr) {
    CopyMatrix(p.performer.projection, pr.w.data());
  } else {
    DrawOrthogonalGaussian(p.seed, pr.m, d, pr.w.data());
  }
  pr.wt.assign(static_cast<size_t>(d * pr.mp), 0.0f);
  for (int64_t i = 0; i < pr.m; ++i) {
    for (int64_t c = 0; c < d; ++c) pr.wt[static_cast<size_t>(c * pr.mp + i)] = pr.w[i * d + c];
  }
  if (backward) {
    pr.wp.assign(static_cast<size_t>(pr.m * pr.dp), 0.0f);
    for (int64_t i = 0; i < pr.m; ++i) {
      for (int64_t c = 0; c < d; ++c) pr.wp[static_cast<size_t>(i * pr.dp + c)] = pr.w[i * d + c];
    }
  }
  return pr;
}

Status Validate(const ApproxParams& p, const ApproxShape& shape) {
  const PerformerOptions& o = p.performer;
  Status s = CheckFeatureCount("performer.features", o.features, shape.dim);
  if (!s.ok()) return s;
  if (o.projection.data != nullptr || o.projection.rank != 0) {
    s = CheckMatrixOption("performer.projection", o.projection, o.features, shape.dim);
    if (!s.ok()) return s;
  }
  if (!(shape.scale > 0.0f)) {
    return Status::InvalidArgument(Expected(
        "scale", "a value > 0 (FAVOR+ estimates exp(scale q.k) with features of sqrt(scale) q)",
        std::to_string(shape.scale)));
  }
  if (p.lse.data != nullptr) {
    return Status::InvalidArgument(
        Expected("lse", "unset (performer's weights are not a softmax: it has no LSE)", "a view"));
  }
  return Status::Ok();
}

// Scratch rows of one task.
struct Rows {
  std::vector<float> x;    // [T, D] x' = c x
  std::vector<float> sub;  // [T] |x'|^2 / 2
};

// Gathers rows [t0, t0 + n) of head h of x (times c) into rows.x; |x'|^2 / 2 into rows.sub.
void Gather(const TensorView& x, int64_t b, int64_t h, int64_t t0, int64_t n, float c, Rows* rows) {
  const int64_t D = x.shape[3];
  for (int64_t r = 0; r < n; ++r) {
    float* dst = rows->x.data() + r * D;
    const float* src = static_cast<const float*>(x.data) + b * x.strides[0] +
                       (t0 + r) * x.strides[1] + h * x.strides[2];
    if (x.strides[3] == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * c;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d * x.strides[3]] * c;
    }
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) sq += dst[d] * dst[d];
    rows->sub[static_cast<size_t>(r)] = 0.5f * sq;
  }
}

// phi of heads [h0, h0 + nh) of x into buf [B, S, nh, mp]. Queries: per-row stabilizer; keys:
// one per (batch, head), the largest exponent over its rows (a max: exact in any order).
void Features(const TensorView& x, int64_t h0, int64_t nh, bool keys, const Projection& pr, float c,
              float* buf, int32_t threads) {
  const int64_t B = x.shape[0], S = x.shape[1], D = x.shape[3];
  const int64_t chunks = (S + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = B * nh * chunks;
  const int64_t ld = nh * pr.mp;
  const float mul = 1.0f / std::sqrt(static_cast<float>(pr.m));
  std::vector<Rows> scratch(static_cast<size_t>(std::max(threads, 1)));
  for (Rows& r : scratch) {
    r.x.resize(static_cast<size_t>(kRowsPerTask * D));
    r.sub.resize(kRowsPerTask);
  }
  std::vector<float> task_max(static_cast<size_t>(tasks));
  auto rows_of = [&](int64_t task, int64_t* b, int64_t* h, int64_t* t0) {
    const int64_t chunk = task % chunks, bh = task / chunks;
    *b = bh / nh, *h = bh % nh, *t0 = chunk * kRowsPerTask;
    return std::min(kRowsPerTask, S - *t0);
  };
  ParallelFor(threads, tasks, [&](int64_t task, int32_t worker) {
    int64_t b, h, t0;
    const int64_t n = rows_of(task, &b, &h, &t0);
    Rows& rows = scratch[static_cast<size_t>(worker)];
    Gather(x, b, h0 + h, t0, n, c, &rows);
    float* y = buf + (b * S + t0) * ld + h * pr.mp;
    FeatureGemm(n, pr.mp, D, rows.x.data(), D, pr.wt.data(), pr.mp, y, ld);
    if (keys) {
      task_max[static_cast<size_t>(task)] = SubtractRowsMax(n, pr.m, y, ld, rows.sub.data());
    } else {
      ExpRowsOwnMax(n, pr.m, y, ld, mul);
    }
  });
  if (!keys) return;
  std::vector<float> head_max(static_cast<size_t>(B * nh), -std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < tasks; ++t) {
    float& hm = head_max[static_cast<size_t>(t / chunks)];
    hm = std::max(hm, task_max[static_cast<size_t>(t)]);
  }
  ParallelFor(threads, tasks, [&](int64_t task, int32_t) {
    int64_t b, h, t0;
    const int64_t n = rows_of(task, &b, &h, &t0);
    float* y = buf + (b * S + t0) * ld + h * pr.mp;
    ExpRowsShift(n, pr.m, y, ld, head_max[static_cast<size_t>(task / chunks)], mul);
  });
}

// dx = c * (sum_i g_i (w_i - x')) with g = dphi o phi, for heads [h0, h0 + nh) of x; dphi is
// overwritten by g.
void ChainRule(const TensorView& x, int64_t h0, int64_t nh, const Projection& pr, float c,
               const float* phi, float* dphi, const TensorView& dx, int32_t threads) {
  const int64_t B = x.shape[0], S = x.shape[1], D = x.shape[3];
  const int64_t chunks = (S + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = B * nh * chunks;
  const int64_t ld = nh * pr.mp;
  struct Scratch {
    Rows rows;
    std::vector<float> out;  // [T, dp]
  };
  std::vector<Scratch> scratch(static_cast<size_t>(std::max(threads, 1)));
  for (Scratch& s : scratch) {
    s.rows.x.resize(static_cast<size_t>(kRowsPerTask * D));
    s.rows.sub.resize(kRowsPerTask);
    s.out.resize(static_cast<size_t>(kRowsPerTask * pr.dp));
  }
  ParallelFor(threads, tasks, [&](int64_t task, int32_t worker) {
    const int64_t chunk = task % chunks, bh = task / chunks;
    const int64_t b = bh / nh, h = bh % nh, t0 = chunk * kRowsPerTask;
    const int64_t n = std::min(kRowsPerTask, S - t0);
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    Gather(x, b, h0 + h, t0, n, c, &sc.rows);
    const int64_t off = (b * S + t0) * ld + h * pr.mp;
    std::vector<float> gsum(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      float* g = dphi + off + r * ld;
      const float* f = phi + off + r * ld;
      float sum = 0.0f;
      for (int64_t i = 0; i < pr.m; ++i) {
        g[i] *= f[i];
        sum += g[i];
      }
      gsum[static_cast<size_t>(r)] = sum;
    }
    FeatureGemm(n, pr.dp, pr.m, dphi + off, ld, pr.wp.data(), pr.dp, sc.out.data(), pr.dp);
    for (int64_t r = 0; r < n; ++r) {
      const float* o = sc.out.data() + r * pr.dp;
      const float* xr = sc.rows.x.data() + r * D;
      const float gs = gsum[static_cast<size_t>(r)];
      float* dst = AtMut(dx, b, t0 + r, h0 + h, 0);
      for (int64_t d = 0; d < D; ++d) dst[d * dx.strides[3]] = c * (o[d] - gs * xr[d]);
    }
  });
}

}  // namespace

Status PerformerForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  Status s = Validate(params, shape);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("out", params.out)},
                    {ViewRegion("performer.projection", params.performer.projection)});
  if (!s.ok()) return s;
  if (params.out.numel() == 0) return Status::Ok();
  const int64_t B = shape.batch, S = shape.seq, Hkv = shape.heads_kv, D = shape.dim;
  const int64_t G = shape.group();
  const Projection pr = MakeProjection(params, D, /*backward=*/false);
  if (ctx.path == Path::kReference) {
    std::vector<double> out(static_cast<size_t>(B * S * shape.heads_q * D));
    ref::PerformerForwardF64(params, pr.w.data(), out.data());
    WriteF64(out, params.out);
    return Status::Ok();
  }
  const int32_t threads = ResolveThreads(ctx);
  const float c = std::sqrt(shape.scale);
  const int64_t slab = KvHeadsPerSlab(Hkv, G, B, B * S * pr.mp * (G + 1), threads);
  auto fq = Floats(B * S * slab * G * pr.mp), fk = Floats(B * S * slab * pr.mp);
  for (int64_t hk0 = 0; hk0 < Hkv; hk0 += slab) {
    const int64_t nk = std::min(slab, Hkv - hk0), nq = nk * G;
    Features(params.q, hk0 * G, nq, /*keys=*/false, pr, c, fq.get(), threads);
    Features(params.k, hk0, nk, /*keys=*/true, pr, c, fk.get(), threads);
    s = FeatureAttention(FeatureView(fq.get(), B, S, nq, pr.m, pr.mp),
                         FeatureView(fk.get(), B, S, nk, pr.m, pr.mp), HeadSlice(params.v, hk0, nk),
                         HeadSlice(params.out, hk0 * G, nq), params.causal, ctx);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status PerformerBackward(const ApproxBackwardParams& params, const ApproxShape& shape,
                         const Context& ctx) {
  const ApproxParams& f = params.forward;
  Status s = Validate(f, shape);
  if (!s.ok()) return s;
  s = CheckDisjoint(
      {ViewRegion("dq", params.dq), ViewRegion("dk", params.dk), ViewRegion("dv", params.dv)},
      {ViewRegion("performer.projection", f.performer.projection)});
  if (!s.ok()) return s;
  if (params.dq.numel() == 0 && params.dk.numel() == 0) return Status::Ok();
  const int64_t B = shape.batch, S = shape.seq, Hkv = shape.heads_kv, D = shape.dim;
  const int64_t G = shape.group();
  const Projection pr = MakeProjection(f, D, /*backward=*/true);
  if (ctx.path == Path::kReference) {
    std::vector<double> dq(static_cast<size_t>(B * S * shape.heads_q * D));
    std::vector<double> dk(static_cast<size_t>(B * S * Hkv * D)), dv(dk.size());
    ref::PerformerBackwardF64(params, pr.w.data(), dq.data(), dk.data(), dv.data());
    WriteF64(dq, params.dq);
    WriteF64(dk, params.dk);
    WriteF64(dv, params.dv);
    return Status::Ok();
  }
  const int32_t threads = ResolveThreads(ctx);
  const float c = std::sqrt(shape.scale);
  const int64_t slab = KvHeadsPerSlab(Hkv, G, B, 2 * B * S * pr.mp * (G + 1), threads);
  auto fq = Floats(B * S * slab * G * pr.mp), fk = Floats(B * S * slab * pr.mp);
  auto gq = Floats(B * S * slab * G * pr.mp), gk = Floats(B * S * slab * pr.mp);
  for (int64_t hk0 = 0; hk0 < Hkv; hk0 += slab) {
    const int64_t nk = std::min(slab, Hkv - hk0), nq = nk * G;
    Features(f.q, hk0 * G, nq, /*keys=*/false, pr, c, fq.get(), threads);
    Features(f.k, hk0, nk, /*keys=*/true, pr, c, fk.get(), threads);
    s = FeatureAttentionBackward(
        FeatureView(fq.get(), B, S, nq, pr.m, pr.mp), FeatureView(fk.get(), B, S, nk, pr.m, pr.mp),
        HeadSlice(f.v, hk0, nk), HeadSlice(params.dout, hk0 * G, nq),
        FeatureView(gq.get(), B, S, nq, pr.m, pr.mp), FeatureView(gk.get(), B, S, nk, pr.m, pr.mp),
        HeadSlice(params.dv, hk0, nk), f.causal, ctx);
    if (!s.ok()) return s;
    ChainRule(f.q, hk0 * G, nq, pr, c, fq.get(), gq.get(), params.dq, threads);
    ChainRule(f.k, hk0, nk, pr, c, fk.get(), gk.get(), params.dk, threads);
  }
  return Status::Ok();
}

}  // namespace approx
}  // namespace tessera
