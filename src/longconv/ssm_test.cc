// SPDX-License-Identifier: Apache-2.0
// The diagonal SSM: DiagonalSsmKernel against the kernel formula in fp64, DiagonalSsmScan against
// the recurrence in fp64 and against LongConv1D with the materialized kernel, chained calls
// through the state equal one call bitwise, thread counts, strided views, bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "longconv/longconv_test_util.h"
#include "tessera/longconv.h"

namespace tessera {
namespace {

using Complex = std::complex<double>;

// A random stable model: |a| in [0.5, 0.999] (long and short memories), b, w normal.
struct Ssm {
  int64_t C, n;
  std::vector<float> a, b, w, skip;
  DiagonalSsmParams params;

  Ssm(int64_t channels, int64_t modes, bool with_skip, uint32_t seed = 3) : C(channels), n(modes) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> radius(0.5f, 0.999f), angle(-3.0f, 3.0f);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < C * n; ++i) {
      const float r = radius(rng), phi = angle(rng);
      a.push_back(r * std::cos(phi));
      a.push_back(r * std::sin(phi));
      for (auto* v : {&b, &w}) {
        v->push_back(normal(rng) * 0.3f);
        v->push_back(normal(rng) * 0.3f);
      }
    }
    for (int64_t c = 0; c < C; ++c) skip.push_back(normal(rng));
    params.a = View(a);
    params.b = View(b);
    params.w = View(w);
    if (with_skip) params.skip = MakeView1(skip.data(), DType::kF32, C);
  }
  TensorView View(std::vector<float>& v) const {
    const int64_t shape[3] = {C, n, 2};
    return MakeContiguousView(v.data(), DType::kF32, 3, shape);
  }
  Complex At(const std::vector<float>& v, int64_t c, int64_t m) const {
    return {v[static_cast<size_t>((c * n + m) * 2)], v[static_cast<size_t>((c * n + m) * 2 + 1)]};
  }
  // The recurrence in fp64 over u [B, T, C] (contiguous) from a zero state.
  std::vector<double> ScanF64(const std::vector<float>& u, int64_t B, int64_t T,
                              bool with_skip) const {
    std::vector<double> y(u.size());
    for (int64_t b0 = 0; b0 < B; ++b0) {
      for (int64_t c = 0; c < C; ++c) {
        std::vector<Complex> x(static_cast<size_t>(n));
        for (int64_t t = 0; t < T; ++t) {
          const double ut = u[static_cast<size_t>((b0 * T + t) * C + c)];
          double acc = with_skip ? skip[static_cast<size_t>(c)] * ut : 0.0;
          for (int64_t m = 0; m < n; ++m) {
            x[m] = At(a, c, m) * x[m] + At(b, c, m) * ut;
            acc += (At(w, c, m) * x[m]).real();
          }
          y[static_cast<size_t>((b0 * T + t) * C + c)] = acc;
        }
      }
    }
    return y;
  }
};

std::vector<float> Normal(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(DiagonalSsm, KernelMatchesFormula) {
  for (const int64_t L : {1, 50, 333}) {
    Ssm ssm(19, 3, false);
    std::vector<float> h(static_cast<size_t>(L * 19 * 2), -5.0f);
    // A strided filter view: every other column of [L, 38].
    TensorView filter = MakeView3(h.data(), DType::kF32, 1, L, 38);
    filter.rank = 2;
    filter.shape[0] = L, filter.shape[1] = 19;
    filter.strides[0] = 38, filter.strides[1] = 2;
    ASSERT_TRUE(DiagonalSsmKernel(ssm.params, filter, Context()).ok());
    double err = 0.0;
    for (int64_t c = 0; c < 19; ++c) {
      for (int64_t s = 0; s < L; ++s) {
        double want = 0.0;
        for (int64_t m = 0; m < 3; ++m) {
          want += (ssm.At(ssm.w, c, m) * std::pow(ssm.At(ssm.a, c, m), static_cast<double>(s)) *
                   ssm.At(ssm.b, c, m))
                      .real();
        }
        err = std::max(err, std::abs(h[static_cast<size_t>(s * 38 + 2 * c)] - want));
        EXPECT_EQ(h[static_cast<size_t>(s * 38 + 2 * c + 1)], -5.0f);  // untouched columns
      }
    }
    EXPECT_LE(err, 1e-6) << "L=" << L;
  }
}

TEST(DiagonalSsm, ScanMatchesRecurrenceAndLongConv) {
  struct Case {
    int64_t B, T, C, n;
    bool skip;
  };
  for (const Case& k : {Case{1, 1, 1, 1, false}, Case{2, 37, 19, 3, true},
                        Case{1, 700, 33, 8, true}, Case{2, 300, 5, 1, false}}) {
    Ssm ssm(k.C, k.n, k.skip);
    const std::vector<float> u = Normal(k.B * k.T * k.C, 7);
    std::vector<float> y(u.size(), -9.0f);
    DiagonalSsmScanParams p;
    p.ssm = ssm.params;
    p.u = MakeView3(const_cast<float*>(u.data()), DType::kF32, k.B, k.T, k.C);
    p.y = MakeView3(y.data(), DType::kF32, k.B, k.T, k.C);
    ASSERT_TRUE(DiagonalSsmScan(p, Context()).ok());
    EXPECT_LE(test::RelErrorToScale(y, ssm.ScanF64(u, k.B, k.T, k.skip)), 2e-5)
        << "B=" << k.B << " T=" << k.T << " C=" << k.C << " n=" << k.n;
    // The same model as a long convolution with its kernel (L = T) and bias skip.
    std::vector<float> h(static_cast<size_t>(k.T * k.C)), yc(u.size());
    const int64_t hshape[2] = {k.T, k.C};
    LongConvParams conv;
    conv.u = p.u;
    conv.filter = MakeContiguousView(h.data(), DType::kF32, 2, hshape);
    conv.bias = ssm.params.skip;
    conv.y = MakeView3(yc.data(), DType::kF32, k.B, k.T, k.C);
    ASSERT_TRUE(DiagonalSsmKernel(ssm.params, conv.filter, Context()).ok());
    ASSERT_TRUE(LongConv1D(conv, Context()).ok());
    EXPECT_LE(test::RelErrorToScale(y, std::vector<double>(yc.begin(), yc.end())), 5e-5);
  }
}

// Chained calls (decode steps of one token, then blocks) through the state equal one call bit
// for bit, for every thread count; strided u and y.
TEST(DiagonalSsm, StateChainsExactlyAcrossCallsAndThreads) {
  const int64_t B = 2, T = 600, C = 21, n = 5;
  Ssm ssm(C, n, true);
  // u with channel stride 2 (every other column of [B, T, 2C]).
  std::vector<float> ubuf = Normal(B * T * 2 * C, 9);
  TensorView u = MakeView3(ubuf.data(), DType::kF32, B, T, 2 * C);
  u.shape[2] = C, u.strides[2] = 2;
  std::vector<float> whole(static_cast<size_t>(B * T * C));
  DiagonalSsmScanParams p;
  p.ssm = ssm.params;
  p.u = u;
  p.y = MakeView3(whole.data(), DType::kF32, B, T, C);
  ASSERT_TRUE(DiagonalSsmScan(p, Context()).ok());
  for (const int32_t threads : {1, 3}) {
    std::vector<float> pieces(whole.size(), -1.0f), state(static_cast<size_t>(B * C * n * 2), 0.0f);
    const int64_t sshape[4] = {B, C, n, 2};
    p.state = MakeContiguousView(state.data(), DType::kF32, 4, sshape);
    Context ctx;
    ctx.num_threads = threads;
    for (int64_t t0 = 0, len = 1; t0 < T; t0 += len, len = std::min<int64_t>(2 * len + 1, 257)) {
      const int64_t steps = std::min(len, T - t0);
      p.u = u;
      p.u.data = ubuf.data() + t0 * u.strides[1];
      p.u.shape[1] = steps;
      p.y = MakeView3(pieces.data() + t0 * C, DType::kF32, B, steps, C);
      p.y.strides[0] = T * C;
      ASSERT_TRUE(DiagonalSsmScan(p, ctx).ok());
    }
    EXPECT_EQ(0, std::memcmp(whole.data(), pieces.data(), whole.size() * sizeof(float)))
        << "threads=" << threads;
  }
}

TEST(DiagonalSsm, BadInputNamesTheArgumentAndWritesNothing) {
  const int64_t B = 1, T = 4, C = 3, n = 2;
  std::vector<float> u = Normal(B * T * C, 1);
  std::vector<float> y(u.size(), 7.0f), state(static_cast<size_t>(B * C * n * 2), 5.0f);
  const int64_t sshape[4] = {B, C, n, 2};
  struct Mutation {
    const char* name;
    void (*apply)(Ssm&, DiagonalSsmScanParams&);
  };
  const Mutation mutations[] = {
      {"a", [](Ssm& s, DiagonalSsmScanParams&) { s.a[0] = 1.5f; }},
      {"a", [](Ssm& s, DiagonalSsmScanParams&) { s.a[3] = std::nanf(""); }},
      {"b", [](Ssm& s, DiagonalSsmScanParams&) { s.b[2] = INFINITY; }},
      {"w", [](Ssm&, DiagonalSsmScanParams& p) { p.ssm.w.shape[1] = 3; }},
      {"skip", [](Ssm& s, DiagonalSsmScanParams&) { s.skip[1] = std::nanf(""); }},
      {"skip", [](Ssm&, DiagonalSsmScanParams& p) { p.ssm.skip.shape[0] = 2; }},
      {"a", [](Ssm&, DiagonalSsmScanParams& p) { p.ssm.a.shape[0] = 4; }},
      {"a", [](Ssm&, DiagonalSsmScanParams& p) { p.ssm.a.dtype = DType::kF16; }},
      {"u", [](Ssm&, DiagonalSsmScanParams& p) { p.u.shape[1] = 0; }},
      {"y", [](Ssm&, DiagonalSsmScanParams& p) { p.y.shape[1] = 5; }},
      {"y", [](Ssm&, DiagonalSsmScanParams& p) { p.y.data = p.u.data; }},
      {"state", [](Ssm&, DiagonalSsmScanParams& p) { p.state.shape[2] = 3; }},
  };
  for (const Mutation& mut : mutations) {
    Ssm ssm(C, n, true);
    DiagonalSsmScanParams p;
    p.ssm = ssm.params;
    p.u = MakeView3(u.data(), DType::kF32, B, T, C);
    p.y = MakeView3(y.data(), DType::kF32, B, T, C);
    p.state = MakeContiguousView(state.data(), DType::kF32, 4, sshape);
    mut.apply(ssm, p);
    const std::vector<float> u_before = u;
    const Status st = DiagonalSsmScan(p, Context());
    ASSERT_FALSE(st.ok()) << mut.name;
    EXPECT_EQ(st.message().rfind(mut.name, 0), 0u) << st.message();
    EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](float v) { return v == 7.0f; })) << mut.name;
    EXPECT_TRUE(std::all_of(state.begin(), state.end(), [](float v) { return v == 5.0f; }));
    EXPECT_EQ(u, u_before);
  }
  // The kernel: an L of 0, a filter of the wrong channel count.
  Ssm ssm(C, n, false);
  std::vector<float> h(12, 3.0f);
  TensorView filter = MakeView1(h.data(), DType::kF32, 12);
  filter.rank = 2, filter.shape[0] = 4, filter.shape[1] = 3, filter.strides[0] = 3,
  filter.strides[1] = 1;
  TensorView bad = filter;
  bad.shape[1] = 2;
  Status st = DiagonalSsmKernel(ssm.params, bad, Context());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.message().rfind("filter", 0), 0u) << st.message();
  bad = filter;
  bad.shape[0] = 0;
  EXPECT_FALSE(DiagonalSsmKernel(ssm.params, bad, Context()).ok());
  EXPECT_TRUE(std::all_of(h.begin(), h.end(), [](float v) { return v == 3.0f; }));
}

}  // namespace
}  // namespace tessera
