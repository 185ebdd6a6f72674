// SPDX-License-Identifier: Apache-2.0
// LongConv1DBackward, H3Layer and H3LayerBackward against the fp64 references
// (src/ref/longconv_ref.h), and the references themselves: H3 reduced to a long convolution
// where the two must agree, and every backward reference against central finite differences of
// its forward reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "longconv/longconv_test_util.h"
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
  LongConvPath path = LongConvPath::kAuto;

  std::string Name() const {
    return "B=" + std::to_string(B) + " N=" + std::to_string(N) + " H=" + std::to_string(H) +
           " d=" + std::to_string(d) + " Ls=" + std::to_string(Ls) + " L=" + std::to_string(L) +
           " shift_bias=" + std::to_string(shift_bias) + " ssm_bias=" + std::to_string(ssm_bias) +
           " layout=" + std::to_string(static_cast<int>(layout)) +
           " path=" + std::to_string(static_cast<int>(path));
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
  p.path = s.path;
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
      EXPECT_LE(test::RelErrorToScale(ref::H3F64(H3View(t, s)), expected), 1e-13);
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
        EXPECT_LE(test::RelErrorToScale(ref::H3F64(H3View(t, s)), expected), 1e-13);
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

// ---------------------------------------------------------------------------------------------
// LongConv1DBackward against the reference.

constexpr LongConvPath kPaths[] = {LongConvPath::kDirect, LongConvPath::kFft, LongConvPath::kAuto};

// The direct sum rounds each product once; the FFT path's error grows with log M.
double ConvTolerance(LongConvPath path) { return path == LongConvPath::kDirect ? 1e-5 : 5e-5; }

// Which gradients a call asks for (dbias only where the forward has a bias).
struct ConvWanted {
  bool du = true, dfilter = true, dbias = true;
};

void ExpectConvBackwardMatches(const ConvShape& s, ConvWanted want = {}) {
  SCOPED_TRACE(s.Name());
  ConvTensors t = MakeConv(s, test::SeedFor("LongConvBackward" + s.Name()), /*grid=*/false);
  LongConvBackwardParams p = ConvView(t, s);
  if (!want.du) p.du = TensorView();
  if (!want.dfilter) p.dfilter = TensorView();
  if (!want.dbias) p.dbias = TensorView();
  t.du.Snapshot();
  Context ctx;
  ctx.num_threads = 2;
  const Status status = LongConv1DBackward(p, ctx);
  ASSERT_TRUE(status.ok()) << status.message();
  const ref::LongConvGradsF64 g = ref::LongConvBackwardF64(p);
  const double tol = ConvTolerance(s.path);
  if (want.du) {
    EXPECT_LE(test::RelErrorToScale(t.du.ToVector(), g.du), tol) << "du";
    EXPECT_TRUE(t.du.OutsideViewUntouched());  // the gaps of a strided du
  }
  if (want.dfilter) {
    EXPECT_LE(test::RelErrorToScale(t.dfilter.ToVector(), g.dfilter), tol) << "dfilter";
  }
  if (want.dbias && s.bias) {
    EXPECT_LE(test::RelErrorToScale(t.dbias.ToVector(), g.dbias), tol) << "dbias";
  }
}

TEST(LongConvBackward, MatchesReferenceOnAwkwardShapes) {
  const int64_t lengths[][2] = {{1, 1}, {37, 37}, {300, 17}};  // {N, L}
  for (const LongConvPath path : kPaths) {
    for (const auto& nl : lengths) {
      for (const int64_t C : {int64_t{3}, int64_t{19}}) {
        for (const bool bias : {false, true}) {
          for (const int64_t cstride : {int64_t{1}, int64_t{2}}) {
            ConvShape s;
            s.B = 2, s.N = nl[0], s.C = C, s.L = nl[1];
            s.bias = bias;
            s.cstride = cstride;
            s.path = path;
            ExpectConvBackwardMatches(s);
          }
        }
      }
    }
    ConvShape s;  // one sequence, a filter as long as it
    s.N = s.L = 300, s.C = 5, s.bias = true, s.path = path;
    ExpectConvBackwardMatches(s);
  }
}

TEST(LongConvBackward, EachOutputIsOptional) {
  for (const LongConvPath path : kPaths) {
    ConvShape s;
    s.B = 2, s.N = 37, s.C = 19, s.L = 37, s.bias = true, s.cstride = 2, s.path = path;
    ExpectConvBackwardMatches(s, {true, false, false});
    ExpectConvBackwardMatches(s, {false, true, false});
    ExpectConvBackwardMatches(s, {false, false, true});
    s.bias = false;
    ExpectConvBackwardMatches(s, {true, false, false});
    ExpectConvBackwardMatches(s, {false, true, false});
  }
}

TEST(LongConvBackward, DeterministicAcrossThreadCounts) {
  for (const LongConvPath path : kPaths) {
    for (const int64_t L : {int64_t{17}, int64_t{300}}) {
      ConvShape s;
      s.B = 2, s.N = 300, s.C = 19, s.L = L, s.bias = true, s.cstride = 2, s.path = path;
      SCOPED_TRACE(s.Name());
      std::vector<ConvTensors> runs;
      for (const int32_t threads : {1, 3}) {
        runs.push_back(MakeConv(s, 11, /*grid=*/false));
        Context ctx;
        ctx.num_threads = threads;
        ASSERT_TRUE(LongConv1DBackward(ConvView(runs.back(), s), ctx).ok());
      }
      EXPECT_TRUE(runs[0].du.BitwiseEqual(runs[1].du));
      EXPECT_TRUE(runs[0].dfilter.BitwiseEqual(runs[1].dfilter));
      EXPECT_TRUE(runs[0].dbias.BitwiseEqual(runs[1].dbias));
    }
  }
}

// The status names `name` first, and no tensor (input or output, sentinel-filled) changed.
void ExpectRejected(const Status& status, const char* name, const std::vector<Tensor*>& tensors) {
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << name << ": " << status.message();
  EXPECT_EQ(status.message().rfind(std::string(name) + ":", 0), 0u)
      << "expected a message naming " << name << ", got: " << status.message();
  for (const Tensor* t : tensors) EXPECT_TRUE(t->Unchanged()) << name;
}

TEST(LongConvBackward, BadInputNamesTheArgumentAndWritesNothing) {
  ConvShape s;
  s.B = 2, s.N = 8, s.C = 3, s.L = 4, s.bias = true;
  ConvTensors t = MakeConv(s, 5, /*grid=*/false);
  const std::vector<Tensor*> all = {&t.u, &t.filter, &t.bias, &t.dy, &t.du, &t.dfilter, &t.dbias};
  for (Tensor* x : {&t.du, &t.dfilter, &t.dbias}) x->FillSlots(-7.0);
  for (Tensor* x : all) x->Snapshot();
  const LongConvBackwardParams good = ConvView(t, s);
  ASSERT_TRUE(LongConv1DBackward(good, Context()).ok());  // the base case is valid
  for (Tensor* x : {&t.du, &t.dfilter, &t.dbias}) x->FillSlots(-7.0);
  for (Tensor* x : all) x->Snapshot();
  const auto expect = [&](const LongConvBackwardParams& p, const char* name) {
    ExpectRejected(LongConv1DBackward(p, Context()), name, all);
  };
  LongConvBackwardParams p = good;
  p.forward.u.rank = 2;
  expect(p, "u");
  p = good;
  p.forward.u.data = nullptr;
  expect(p, "u");
  p = good;
  p.forward.filter.shape[1] = 4;  // C + 1 channels
  expect(p, "filter");
  p = good;
  p.forward.filter.shape[0] = 9;  // L > N
  expect(p, "filter");
  p = good;
  p.forward.bias.shape[0] = 2;
  expect(p, "bias");
  p = good;
  p.forward.path = static_cast<LongConvPath>(7);
  expect(p, "path");
  p = good;
  p.dy.shape[1] = 7;
  expect(p, "dy");
  p = good;
  p.dy.dtype = DType::kBF16;
  expect(p, "dy");
  p = good;
  p.dy.data = nullptr;
  expect(p, "dy");
  p = good;
  p.du.shape[2] = 2;
  expect(p, "du");
  p = good;
  p.du.dtype = DType::kF16;
  expect(p, "du");
  p = good;
  p.dfilter.shape[0] = 3;
  expect(p, "dfilter");
  p = good;
  p.dbias.shape[0] = 4;
  expect(p, "dbias");
  p = good;
  p.forward.bias = TensorView();  // dbias without a forward bias
  expect(p, "dbias");
  p = good;
  p.du.data = t.u.data();  // du aliases u
  expect(p, "du");
  p = good;
  p.dfilter.data = t.dy.data();  // dfilter inside dy
  expect(p, "dfilter");
  p = good;
  p.dbias.data = t.dfilter.data();  // two outputs overlap: the later one is named
  expect(p, "dbias");
}

// ---------------------------------------------------------------------------------------------
// H3Layer and H3LayerBackward against the references.

constexpr double kH3Tolerance = 1e-4;  // two convolutions compose

// Which gradients an H3LayerBackward call asks for (the bias gradients only where the forward
// has the bias).
struct H3Wanted {
  bool dq = true, dk = true, dv = true, shift = true, ssm = true;
};

H3BackwardParams WithOnly(H3BackwardParams p, const H3Wanted& want) {
  if (!want.dq) p.dq = TensorView();
  if (!want.dk) p.dk = TensorView();
  if (!want.dv) p.dv = TensorView();
  if (!want.shift) p.dshift_filter = p.dshift_bias = TensorView();
  if (!want.ssm) p.dssm_filter = p.dssm_bias = TensorView();
  return p;
}

void ExpectGradientsMatch(const H3Tensors& t, const H3Shape& s, const ref::H3GradsF64& g,
                          const H3Wanted& want) {
  const auto check = [](const Tensor& got, const std::vector<double>& ref, const char* what) {
    EXPECT_LE(test::RelErrorToScale(got.ToVector(), ref), kH3Tolerance) << what;
    EXPECT_TRUE(got.OutsideViewUntouched()) << what;
  };
  if (want.dq) check(t.dq, g.dq, "dq");
  if (want.dk) check(t.dk, g.dk, "dk");
  if (want.dv) check(t.dv, g.dv, "dv");
  if (want.shift) {
    check(t.dshift_filter, g.dshift_filter, "dshift_filter");
    if (s.shift_bias) check(t.dshift_bias, g.dshift_bias, "dshift_bias");
  }
  if (want.ssm) {
    check(t.dssm_filter, g.dssm_filter, "dssm_filter");
    if (s.ssm_bias) check(t.dssm_bias, g.dssm_bias, "dssm_bias");
  }
}

// Forward and backward of `shape` on every path against one reference.
void ExpectH3Matches(H3Shape s) {
  s.path = LongConvPath::kAuto;
  const uint64_t seed = test::SeedFor("H3" + s.Name());
  H3Tensors t = MakeH3(s, seed, /*grid=*/false);
  const std::vector<double> out_ref = ref::H3F64(H3View(t, s));
  const ref::H3GradsF64 g = ref::H3BackwardF64(H3BackwardView(t, s));
  for (const LongConvPath path : kPaths) {
    s.path = path;
    SCOPED_TRACE(s.Name());
    t = MakeH3(s, seed, /*grid=*/false);
    for (Tensor* x : {&t.out, &t.dq, &t.dk, &t.dv}) x->Snapshot();
    Context ctx;
    ctx.num_threads = 2;
    Status status = H3Layer(H3View(t, s), ctx);
    ASSERT_TRUE(status.ok()) << status.message();
    EXPECT_LE(test::RelErrorToScale(t.out.ToVector(), out_ref), kH3Tolerance) << "out";
    EXPECT_TRUE(t.out.OutsideViewUntouched());
    status = H3LayerBackward(H3BackwardView(t, s), ctx);
    ASSERT_TRUE(status.ok()) << status.message();
    ExpectGradientsMatch(t, s, g, H3Wanted());
  }
}

TEST(H3Layer, MatchesReferenceOnAwkwardShapes) {
  int64_t counter = 0;
  for (const int64_t d : {int64_t{1}, int64_t{2}, int64_t{3}}) {
    for (const int64_t H : {int64_t{1}, int64_t{3}}) {
      for (const int64_t N : {int64_t{1}, int64_t{29}, int64_t{130}}) {
        for (const int64_t L : {N, int64_t{17}}) {
          if (L > N || (L == 17 && N == 17)) continue;
          // The remaining parameters cycle with coprime-ish periods over the 30 cases, so every
          // (d, H) sees both batch sizes, both shift lengths, each bias on and off, every layout.
          H3Shape s;
          s.B = 1 + counter % 2;
          s.N = N, s.H = H, s.d = d, s.L = L;
          s.Ls = std::min<int64_t>(N, counter % 3 == 1 ? 1 : 4);
          s.shift_bias = (counter & 1) != 0;
          s.ssm_bias = ((counter / 2) % 2) != 0;
          s.layout = static_cast<Layout>(counter % 3);
          ExpectH3Matches(s);
          ++counter;
        }
      }
    }
  }
  EXPECT_EQ(counter, 30);
}

TEST(H3Layer, DeterministicAcrossThreadCounts) {
  for (const LongConvPath path : kPaths) {
    for (const int64_t L : {int64_t{17}, int64_t{130}}) {
      H3Shape s;
      s.B = 2, s.N = 130, s.H = 3, s.d = 3, s.Ls = 4, s.L = L;
      s.shift_bias = s.ssm_bias = true;
      s.layout = Layout::kEveryOther;
      s.path = path;
      SCOPED_TRACE(s.Name());
      std::vector<H3Tensors> runs;
      for (const int32_t threads : {1, 2}) {
        runs.push_back(MakeH3(s, 13, /*grid=*/false));
        H3Tensors& t = runs.back();
        Context ctx;
        ctx.num_threads = threads;
        ASSERT_TRUE(H3Layer(H3View(t, s), ctx).ok());
        ASSERT_TRUE(H3LayerBackward(H3BackwardView(t, s), ctx).ok());
      }
      const H3Tensors &a = runs[0], &b = runs[1];
      EXPECT_TRUE(a.out.BitwiseEqual(b.out));
      EXPECT_TRUE(a.dq.BitwiseEqual(b.dq));
      EXPECT_TRUE(a.dk.BitwiseEqual(b.dk));
      EXPECT_TRUE(a.dv.BitwiseEqual(b.dv));
      EXPECT_TRUE(a.dshift_filter.BitwiseEqual(b.dshift_filter));
      EXPECT_TRUE(a.dshift_bias.BitwiseEqual(b.dshift_bias));
      EXPECT_TRUE(a.dssm_filter.BitwiseEqual(b.dssm_filter));
      EXPECT_TRUE(a.dssm_bias.BitwiseEqual(b.dssm_bias));
    }
  }
}

TEST(H3LayerBackward, EachOutputIsOptional) {
  const H3Wanted cases[] = {{true, false, false, false, false}, {false, true, false, false, false},
                            {false, false, true, false, false}, {false, false, false, true, false},
                            {false, false, false, false, true}, {true, false, true, false, true}};
  for (const LongConvPath path : {LongConvPath::kDirect, LongConvPath::kFft}) {
    H3Shape s;
    s.B = 2, s.N = 29, s.H = 3, s.d = 2, s.Ls = 4, s.L = 17;
    s.shift_bias = s.ssm_bias = true;
    s.layout = Layout::kHeadMajor;
    s.path = path;
    SCOPED_TRACE(s.Name());
    H3Tensors t = MakeH3(s, 17, /*grid=*/false);
    const H3BackwardParams all = H3BackwardView(t, s);
    const ref::H3GradsF64 g = ref::H3BackwardF64(all);
    for (const H3Wanted& want : cases) {
      // Fresh sentinels: an output the call should write cannot pass on an earlier call's values.
      for (Tensor* x :
           {&t.dq, &t.dk, &t.dv, &t.dshift_filter, &t.dshift_bias, &t.dssm_filter, &t.dssm_bias}) {
        x->FillSlots(-7.0);
        x->Snapshot();
      }
      ASSERT_TRUE(H3LayerBackward(WithOnly(all, want), Context()).ok());
      ExpectGradientsMatch(t, s, g, want);
    }
  }
}

TEST(H3Layer, BadInputNamesTheArgumentAndWritesNothing) {
  H3Shape s;
  s.B = 2, s.N = 6, s.H = 2, s.d = 2, s.Ls = 3, s.L = 4;
  s.shift_bias = s.ssm_bias = true;
  H3Tensors t = MakeH3(s, 19, /*grid=*/false);
  const std::vector<Tensor*> outputs = {
      &t.out, &t.dq, &t.dk, &t.dv, &t.dshift_filter, &t.dshift_bias, &t.dssm_filter, &t.dssm_bias};
  std::vector<Tensor*> all = {&t.q,          &t.k,          &t.v,        &t.shift_filter,
                              &t.shift_bias, &t.ssm_filter, &t.ssm_bias, &t.dout};
  all.insert(all.end(), outputs.begin(), outputs.end());
  const H3Params good = H3View(t, s);
  const H3BackwardParams good_back = H3BackwardView(t, s);
  ASSERT_TRUE(H3Layer(good, Context()).ok());  // the base cases are valid
  ASSERT_TRUE(H3LayerBackward(good_back, Context()).ok());
  for (Tensor* x : outputs) x->FillSlots(-7.0);
  for (Tensor* x : all) x->Snapshot();

  // Forward-argument errors, through both calls.
  const auto expect = [&](const H3Params& p, const char* name) {
    ExpectRejected(H3Layer(p, Context()), name, all);
    H3BackwardParams bp = good_back;
    bp.forward = p;
    bp.forward.out = TensorView();
    if (p.out.data != nullptr) ExpectRejected(H3LayerBackward(bp, Context()), name, all);
  };
  H3Params p = good;
  p.q.rank = 3;
  expect(p, "q");
  p = good;
  p.q.dtype = DType::kBF16;
  expect(p, "q");
  p = good;
  p.q.data = nullptr;
  expect(p, "q");
  p = good;
  p.k.shape[3] = 3;  // q and k differ
  expect(p, "k");
  p = good;
  p.v.shape[1] = 5;
  expect(p, "v");
  p = good;
  p.k.data = nullptr;
  expect(p, "k");
  p = good;
  p.shift_filter.shape[1] = 5;  // H d + 1 channels
  expect(p, "shift_filter");
  p = good;
  p.shift_filter.shape[0] = 7;  // Ls > N
  expect(p, "shift_filter");
  p = good;
  p.shift_filter.data = nullptr;
  expect(p, "shift_filter");
  p = good;
  p.shift_bias.shape[0] = 2;
  expect(p, "shift_bias");
  p = good;
  p.ssm_filter.shape[1] = 3;  // [L, H + 1]
  expect(p, "ssm_filter");
  p = good;
  p.ssm_filter.shape[0] = 7;  // L > N
  expect(p, "ssm_filter");
  p = good;
  p.ssm_filter.dtype = DType::kF16;
  expect(p, "ssm_filter");
  p = good;
  p.ssm_bias.shape[0] = 4;
  expect(p, "ssm_bias");
  p = good;
  p.path = static_cast<LongConvPath>(5);
  expect(p, "path");

  // Output errors of the forward.
  const auto expect_forward = [&](const H3Params& bad, const char* name) {
    ExpectRejected(H3Layer(bad, Context()), name, all);
  };
  p = good;
  p.out.shape[2] = 1;
  expect_forward(p, "out");
  p = good;
  p.out.data = nullptr;
  expect_forward(p, "out");
  p = good;
  p.out.dtype = DType::kBF16;
  expect_forward(p, "out");
  p = good;
  p.out.data = t.v.data();  // out aliases v
  expect_forward(p, "out");
  p = good;
  p.out.data = t.ssm_filter.data();  // out covers the SSM filter
  expect_forward(p, "out");

  // Errors of the backward's own arguments.
  const auto expect_backward = [&](const H3BackwardParams& bad, const char* name) {
    ExpectRejected(H3LayerBackward(bad, Context()), name, all);
  };
  H3BackwardParams bp = good_back;
  bp.dout.shape[1] = 5;
  expect_backward(bp, "dout");
  bp = good_back;
  bp.dout.data = nullptr;
  expect_backward(bp, "dout");
  bp = good_back;
  bp.dout.dtype = DType::kF16;
  expect_backward(bp, "dout");
  bp = good_back;
  bp.dq.shape[3] = 1;
  expect_backward(bp, "dq");
  bp = good_back;
  bp.dv.shape[0] = 1;
  expect_backward(bp, "dv");
  bp = good_back;
  bp.dshift_filter.shape[0] = 2;
  expect_backward(bp, "dshift_filter");
  bp = good_back;
  bp.dssm_filter.shape[1] = 3;
  expect_backward(bp, "dssm_filter");
  bp = good_back;
  bp.dssm_bias.shape[0] = 1;
  expect_backward(bp, "dssm_bias");
  bp = good_back;
  bp.forward.shift_bias = TensorView();  // dshift_bias without a shift bias
  expect_backward(bp, "dshift_bias");
  bp = good_back;
  bp.forward.ssm_bias = TensorView();  // dssm_bias without an SSM bias
  expect_backward(bp, "dssm_bias");
  bp = good_back;
  bp.dk.data = t.k.data();  // dk aliases k
  expect_backward(bp, "dk");
  bp = good_back;
  bp.dq.data = t.dout.data();  // dq aliases dout
  expect_backward(bp, "dq");
  bp = good_back;
  bp.dssm_filter.data = t.dv.data();  // two outputs overlap: the later one is named
  expect_backward(bp, "dssm_filter");
}

}  // namespace
}  // namespace tessera
