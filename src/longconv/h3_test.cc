// SPDX-License-Identifier: Apache-2.0
// LongConv1DBackward, H3Layer and H3LayerBackward against the fp64 references
// (src/ref/longconv_ref.h), and the references themselves: H3 reduced to a long convolution
// where the two must agree, and every backward reference against central finite differences of
// its forward reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ref/longconv_ref.h"
#include "tessera/longconv.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Index;
using test::Rng;
using test::Tensor;

// Multiples of 2^-12 of moderate size: x +- 2^-8 and x +- 2^-9 (the finite-difference steps)
// stay exact in f32.
double OnGrid(double x) { return std::nearbyint(x * 4096.0) / 4096.0; }

void Fill(Tensor* t, Rng& rng, double mult, bool grid) {
  t->ForEach([&](const Index& i) {
    const double x = static_cast<double>(rng.Normal()) * mult;
    t->Set(i, grid ? OnGrid(x) : x);
  });
}

// max |got - ref| / max |ref|: the error relative to the output's scale.
double RelError(const std::vector<double>& got, const std::vector<double>& ref) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(got[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return scale > 0.0 ? err / scale : err;
}

// sum a * b over two equally long vectors.
double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// LongConv1DBackward problems.

struct ConvShape {
  int64_t B = 1, N = 1, C = 1, L = 1;
  bool bias = false;
  int64_t cstride = 1;  // channel stride of u, dy and du (> 1: every cstride-th float)
  LongConvPath path = LongConvPath::kAuto;

  std::string Name() const {
    return "B=" + std::to_string(B) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
           " L=" + std::to_string(L) + " bias=" + std::to_string(bias) +
           " cstride=" + std::to_string(cstride) +
           " path=" + std::to_string(static_cast<int>(path));
  }
};

struct ConvTensors {
  Tensor u, filter, bias, dy;  // inputs (bias only with s.bias)
  Tensor du, dfilter, dbias;   // outputs (dbias only with s.bias)
};

ConvTensors MakeConv(const ConvShape& s, uint64_t seed, bool grid) {
  const std::vector<int64_t> shape = {s.B, s.N, s.C};
  const std::vector<int64_t> strides = {s.N * s.C * s.cstride, s.C * s.cstride, s.cstride};
  Rng rng(seed);
  ConvTensors t;
  t.u = Tensor(DType::kF32, shape, strides);
  t.dy = Tensor(DType::kF32, shape, strides);
  t.filter = Tensor(DType::kF32, {s.L, s.C});
  Fill(&t.u, rng, 1.0, grid);
  Fill(&t.dy, rng, 1.0, grid);
  Fill(&t.filter, rng, 1.0 / std::sqrt(static_cast<double>(s.L)), grid);
  t.du = Tensor(DType::kF32, shape, strides);
  t.dfilter = Tensor(DType::kF32, {s.L, s.C});
  if (s.bias) {
    t.bias = Tensor(DType::kF32, {s.C});
    Fill(&t.bias, rng, 1.0, grid);
    t.dbias = Tensor(DType::kF32, {s.C});
  }
  return t;
}

LongConvBackwardParams ConvView(ConvTensors& t, const ConvShape& s) {
  LongConvBackwardParams p;
  p.forward.u = t.u.view();
  p.forward.filter = t.filter.view();
  if (s.bias) p.forward.bias = t.bias.view();
  p.forward.path = s.path;
  p.dy = t.dy.view();
  p.du = t.du.view();
  p.dfilter = t.dfilter.view();
  if (s.bias) p.dbias = t.dbias.view();
  return p;
}

// ---------------------------------------------------------------------------------------------
// H3 problems.

enum class Layout {
  kContiguous,  // [B, N, H, d]
  kEveryOther,  // every other channel of a [B, N, H, 2d] buffer
  kHeadMajor,   // [B, H, N, d] in memory, seen as [B, N, H, d] through the strides
};

struct H3Shape {
  int64_t B = 1, N = 1, H = 1, d = 1, Ls = 1, L = 1;
  bool shift_bias = false, ssm_bias = false;
  Layout layout = Layout::kContiguous;

  std::string Name() const {
    return "B=" + std::to_string(B) + " N=" + std::to_string(N) + " H=" + std::to_string(H) +
           " d=" + std::to_string(d) + " Ls=" + std::to_string(Ls) + " L=" + std::to_string(L) +
           " shift_bias=" + std::to_string(shift_bias) + " ssm_bias=" + std::to_string(ssm_bias) +
           " layout=" + std::to_string(static_cast<int>(layout));
  }
};

struct H3Tensors {
  Tensor q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, dout;        // inputs
  Tensor out, dq, dk, dv, dshift_filter, dshift_bias, dssm_filter, dssm_bias;  // outputs
};

// Strides of a [B, N, H, d] tensor in the layout of `s`.
std::vector<int64_t> HeadStrides(const H3Shape& s) {
  switch (s.layout) {
    case Layout::kContiguous:
      break;
    case Layout::kEveryOther:
      return {s.N * s.H * 2 * s.d, s.H * 2 * s.d, 2 * s.d, 2};
    case Layout::kHeadMajor:
      return {s.H * s.N * s.d, s.d, s.N * s.d, 1};
  }
  return {s.N * s.H * s.d, s.H * s.d, s.d, 1};
}

// Every tensor of an H3 problem; the biases (and their gradients) only when `s` has them.
H3Tensors MakeH3(const H3Shape& s, uint64_t seed, bool grid) {
  const std::vector<int64_t> shape = {s.B, s.N, s.H, s.d};
  const std::vector<int64_t> strides = HeadStrides(s);
  Rng rng(seed);
  H3Tensors t;
  for (Tensor* x : {&t.q, &t.k, &t.v, &t.dout}) {
    *x = Tensor(DType::kF32, shape, strides);
    Fill(x, rng, 1.0, grid);
  }
  t.shift_filter = Tensor(DType::kF32, {s.Ls, s.H * s.d});
  Fill(&t.shift_filter, rng, 1.0 / std::sqrt(static_cast<double>(s.Ls)), grid);
  t.ssm_filter = Tensor(DType::kF32, {s.L, s.H});
  Fill(&t.ssm_filter, rng, 1.0 / std::sqrt(static_cast<double>(s.L)), grid);
  for (Tensor* x : {&t.out, &t.dq, &t.dk, &t.dv}) *x = Tensor(DType::kF32, shape, strides);
  t.dshift_filter = Tensor(DType::kF32, {s.Ls, s.H * s.d});
  t.dssm_filter = Tensor(DType::kF32, {s.L, s.H});
  if (s.shift_bias) {
    t.shift_bias = Tensor(DType::kF32, {s.H * s.d});
    Fill(&t.shift_bias, rng, 1.0, grid);
    t.dshift_bias = Tensor(DType::kF32, {s.H * s.d});
  }
  if (s.ssm_bias) {
    t.ssm_bias = Tensor(DType::kF32, {s.H});
    Fill(&t.ssm_bias, rng, 1.0, grid);
    t.dssm_bias = Tensor(DType::kF32, {s.H});
  }
  return t;
}

H3Params H3View(H3Tensors& t, const H3Shape& s) {
  H3Params p;
  p.q = t.q.view();
  p.k = t.k.view();
  p.v = t.v.view();
  p.shift_filter = t.shift_filter.view();
  if (s.shift_bias) p.shift_bias = t.shift_bias.view();
  p.ssm_filter = t.ssm_filter.view();
  if (s.ssm_bias) p.ssm_bias = t.ssm_bias.view();
  p.out = t.out.view();
  return p;
}

H3BackwardParams H3BackwardView(H3Tensors& t, const H3Shape& s) {
  H3BackwardParams p;
  p.forward = H3View(t, s);
  p.forward.out = TensorView();
  p.dout = t.dout.view();
  p.dq = t.dq.view();
  p.dk = t.dk.view();
  p.dv = t.dv.view();
  p.dshift_filter = t.dshift_filter.view();
  if (s.shift_bias) p.dshift_bias = t.dshift_bias.view();
  p.dssm_filter = t.dssm_filter.view();
  if (s.ssm_bias) p.dssm_bias = t.dssm_bias.view();
  return p;
}

// ---------------------------------------------------------------------------------------------
// The references alone.

// With d = 1, Ls = 1, shift_filter = 1 and no shift bias, K = k and the state is the scalar long
// convolution of k * v with the SSM filter (and its bias as the skip term): out = q * that.
TEST(H3Ref, OneChannelIsALongConvolutionOfKTimesV) {
  for (const bool ssm_bias : {false, true}) {
    for (const int64_t L : {int64_t{29}, int64_t{5}}) {
      H3Shape s;
      s.B = 2, s.N = 29, s.H = 3, s.d = 1, s.Ls = 1, s.L = L;
      s.ssm_bias = ssm_bias;
      s.layout = Layout::kHeadMajor;
      SCOPED_TRACE(s.Name());
      H3Tensors t = MakeH3(s, test::SeedFor("H3Ref.OneChannel" + s.Name()), /*grid=*/false);
      t.shift_filter.FromVector(std::vector<double>(static_cast<size_t>(s.H), 1.0));
      // k and v on a grid of 2^-6 below 8 in magnitude: k * v is exact in f32.
      Rng rng(7);
      for (Tensor* x : {&t.k, &t.v}) {
        x->ForEach([&](const Index& i) {
          x->Set(i, std::clamp(std::nearbyint(rng.Normal() * 64.0), -511.0, 511.0) / 64.0);
        });
      }
      Tensor kv(DType::kF32, {s.B, s.N, s.H});
      kv.ForEach([&](const Index& i) {
        kv.Set(i, t.k.Get({i[0], i[1], i[2], 0}) * t.v.Get({i[0], i[1], i[2], 0}));
      });
      LongConvParams conv;
      conv.u = kv.view();
      conv.filter = t.ssm_filter.view();
      if (ssm_bias) conv.bias = t.ssm_bias.view();
      std::vector<double> expected = ref::LongConvF64(conv);
      const std::vector<double> q = t.q.ToVector();
      for (size_t i = 0; i < expected.size(); ++i) expected[i] *= q[i];
      EXPECT_LE(RelError(ref::H3F64(H3View(t, s)), expected), 1e-13);
    }
  }
}

// With L = 1, ssm_filter = 1, no SSM bias, v = 1 and q the one-hot vector of channel i0, every
// output channel of head h is the shifted key K[.., h, i0]: the shift convolution of channel
// h d + i0 of k (seen as [B, N, H d]) with the shift filter and bias.
TEST(H3Ref, OneHotReadOutIsTheShiftConvolution) {
  for (const int64_t d : {int64_t{1}, int64_t{3}}) {
    for (const int64_t Ls : {int64_t{1}, int64_t{4}}) {
      for (const bool shift_bias : {false, true}) {
        H3Shape s;
        s.B = 2, s.N = 13, s.H = 2, s.d = d, s.Ls = Ls, s.L = 1;
        s.shift_bias = shift_bias;
        SCOPED_TRACE(s.Name());
        H3Tensors t = MakeH3(s, test::SeedFor("H3Ref.OneHot" + s.Name()), /*grid=*/false);
        const int64_t i0 = d - 1;
        t.ssm_filter.FromVector(std::vector<double>(static_cast<size_t>(s.H), 1.0));
        t.q.ForEach([&](const Index& i) { t.q.Set(i, i[3] == i0 ? 1.0 : 0.0); });
        t.v.ForEach([&](const Index& i) { t.v.Set(i, 1.0); });
        LongConvParams conv;
        conv.u = MakeView3(t.k.data(), DType::kF32, s.B, s.N, s.H * d);  // contiguous k
        conv.filter = t.shift_filter.view();
        if (shift_bias) conv.bias = t.shift_bias.view();
        const std::vector<double> shifted = ref::LongConvF64(conv);
        std::vector<double> expected(shifted.size());
        for (size_t row = 0; row < shifted.size() / static_cast<size_t>(d); ++row) {
          for (int64_t j = 0; j < d; ++j) {
            expected[row * static_cast<size_t>(d) + static_cast<size_t>(j)] =
                shifted[row * static_cast<size_t>(d) + static_cast<size_t>(i0)];
          }
        }
        EXPECT_LE(RelError(ref::H3F64(H3View(t, s)), expected), 1e-13);
      }
    }
  }
}

TEST(LongConvRef, BackwardMatchesFiniteDifferences) {
  for (const int64_t L : {int64_t{1}, int64_t{5}, int64_t{7}}) {
    for (const bool bias : {false, true}) {
      ConvShape s;
      s.B = 2, s.N = 7, s.C = 3, s.L = L;
      s.bias = bias;
      s.cstride = 2;
      SCOPED_TRACE(s.Name());
      ConvTensors t = MakeConv(s, test::SeedFor("LongConvRef.Fd" + s.Name()), /*grid=*/true);
      const LongConvBackwardParams p = ConvView(t, s);
      const std::vector<double> dy = t.dy.ToVector();
      const auto loss = [&] { return Dot(dy, ref::LongConvF64(p.forward)); };
      const ref::LongConvGradsF64 g = ref::LongConvBackwardF64(p);
      EXPECT_TRUE(test::CheckClose(g.du, test::FiniteDifferenceGradient(&t.u, loss),
                                   test::kFiniteDifferenceCeiling, "du"));
      EXPECT_TRUE(test::CheckClose(g.dfilter, test::FiniteDifferenceGradient(&t.filter, loss),
                                   test::kFiniteDifferenceCeiling, "dfilter"));
      if (bias) {
        EXPECT_TRUE(test::CheckClose(g.dbias, test::FiniteDifferenceGradient(&t.bias, loss),
                                     test::kFiniteDifferenceCeiling, "dbias"));
      } else {
        EXPECT_TRUE(g.dbias.empty());
      }
    }
  }
}

TEST(H3Ref, BackwardMatchesFiniteDifferences) {
  std::vector<H3Shape> shapes;
  H3Shape s;
  s.B = 2, s.N = 7, s.H = 2, s.d = 2, s.Ls = 3, s.L = 5;
  s.layout = Layout::kEveryOther;
  shapes.push_back(s);
  s.shift_bias = s.ssm_bias = true;
  shapes.push_back(s);
  s.layout = Layout::kHeadMajor;
  s.d = 3, s.H = 1, s.Ls = 1, s.L = 7, s.ssm_bias = false;
  shapes.push_back(s);
  s.d = 1, s.H = 3, s.Ls = 7, s.L = 1, s.ssm_bias = true, s.shift_bias = false;
  shapes.push_back(s);
  for (const H3Shape& shape : shapes) {
    SCOPED_TRACE(shape.Name());
    H3Tensors t = MakeH3(shape, test::SeedFor("H3Ref.Fd" + shape.Name()), /*grid=*/true);
    const H3BackwardParams p = H3BackwardView(t, shape);
    const std::vector<double> dout = t.dout.ToVector();
    const auto loss = [&] { return Dot(dout, ref::H3F64(p.forward)); };
    const ref::H3GradsF64 g = ref::H3BackwardF64(p);
    const auto check = [&](const std::vector<double>& grad, Tensor* x, const char* what) {
      EXPECT_TRUE(test::CheckClose(grad, test::FiniteDifferenceGradient(x, loss),
                                   test::kFiniteDifferenceCeiling, what));
    };
    check(g.dq, &t.q, "dq");
    check(g.dk, &t.k, "dk");
    check(g.dv, &t.v, "dv");
    check(g.dshift_filter, &t.shift_filter, "dshift_filter");
    check(g.dssm_filter, &t.ssm_filter, "dssm_filter");
    if (shape.shift_bias) {
      check(g.dshift_bias, &t.shift_bias, "dshift_bias");
    } else {
      EXPECT_TRUE(g.dshift_bias.empty());
    }
    if (shape.ssm_bias) {
      check(g.dssm_bias, &t.ssm_bias, "dssm_bias");
    } else {
      EXPECT_TRUE(g.dssm_bias.empty());
    }
  }
}

}  // namespace
}  // namespace tessera
