// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/gathered_attention.cc: random segments (causal and not, queries listed in
// several segments or in none, unsorted keys, GQA) against the fp64 reference, one segment of
// every token against the exact kernel, determinism across thread counts, bad segments.
#include "approx/gathered_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "comparator.h"
#include "ref/approx_routing_ref.h"
#include "tessera/attention.h"
#include "test_tensor.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

struct Segs {
  std::vector<int64_t> row_begin{0}, q_begin{0}, k_begin{0};
  std::vector<int32_t> q_index, k_index;
  approx::GatheredSegments view() const {
    return {row_begin.data(), q_begin.data(), q_index.data(), k_begin.data(), k_index.data()};
  }
};

// Per row 0..3 segments of random distinct queries (up to `max_q`) and keys (up to `max_k`,
// shuffled), so tokens fall in several segments or in none.
Segs RandomSegments(Rng& rng, int64_t rows, int64_t sq, int64_t sk, int64_t max_q, int64_t max_k) {
  Segs g;
  std::vector<int32_t> qs(static_cast<size_t>(sq)), ks(static_cast<size_t>(sk));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = rng.UniformInt(0, 3);
    for (int64_t s = 0; s < n; ++s) {
      std::iota(qs.begin(), qs.end(), 0);
      std::iota(ks.begin(), ks.end(), 0);
      std::shuffle(qs.begin(), qs.end(), rng.engine());
      std::shuffle(ks.begin(), ks.end(), rng.engine());
      const int64_t nq = rng.UniformInt(0, std::min(max_q, sq));
      const int64_t nk = rng.UniformInt(0, std::min(max_k, sk));
      g.q_index.insert(g.q_index.end(), qs.begin(), qs.begin() + nq);
      g.k_index.insert(g.k_index.end(), ks.begin(), ks.begin() + nk);
      g.q_begin.push_back(static_cast<int64_t>(g.q_index.size()));
      g.k_begin.push_back(static_cast<int64_t>(g.k_index.size()));
    }
    g.row_begin.push_back(static_cast<int64_t>(g.q_begin.size()) - 1);
  }
  return g;
}

struct Case {
  int64_t B, S, Hq, Hkv, D;
  bool causal;
};

class GatheredAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(GatheredAttentionTest, MatchesF64) {
  const Case c = GetParam();
  const std::string name = "gathered_" + std::to_string(c.D) + (c.causal ? "_causal" : "");
  Rng rng(test::SeedFor(name));
  Tensor q(DType::kF32, {c.B, c.S, c.Hq, c.D}), k(DType::kF32, {c.B, c.S, c.Hkv, c.D}),
      v(DType::kF32, {c.B, c.S, c.Hkv, c.D}), vabs(DType::kF32, {c.B, c.S, c.Hkv, c.D});
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  v.ForEach([&](const test::Index& i) { vabs.Set(i, std::fabs(v.Get(i))); });
  const Segs g = RandomSegments(rng, c.B * c.Hq, c.S, c.S, 220, 260);
  Tensor out(DType::kF32, {c.B, c.S, c.Hq, c.D}), lse(DType::kF32, {c.B, c.Hq, c.S});
  approx::GatheredAttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.lse = lse.view();
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  p.causal = c.causal;
  p.segments = g.view();
  Context ctx;
  ctx.num_threads = 2;
  ASSERT_TRUE(approx::GatheredAttention(p, ctx).ok()) << test::Repro(name);
  std::vector<double> ref_out(static_cast<size_t>(out.numel())), ref_lse(lse.numel()),
      mag(ref_out.size());
  ref::GatheredAttentionF64(p, ref_out.data(), ref_lse.data());
  approx::GatheredAttentionParams pa = p;
  pa.v = vabs.view();
  ref::GatheredAttentionF64(pa, mag.data(), nullptr);
  EXPECT_TRUE(
      test::CheckOutput(DType::kF32, out.ToVector(), ref_out, nullptr, test::Rule::kStandard, &mag))
      << test::Repro(name);
  EXPECT_TRUE(test::CheckLse(lse.ToVector(), ref_lse)) << test::Repro(name);

  // Bitwise the same for other thread counts.
  for (int32_t threads : {1, 3}) {
    Tensor out2(DType::kF32, {c.B, c.S, c.Hq, c.D}), lse2(DType::kF32, {c.B, c.Hq, c.S});
    p.out = out2.view();
    p.lse = lse2.view();
    ctx.num_threads = threads;
    ASSERT_TRUE(approx::GatheredAttention(p, ctx).ok());
    EXPECT_TRUE(out2.BitwiseEqual(out)) << "threads " << threads;
    EXPECT_TRUE(lse2.BitwiseEqual(lse)) << "threads " << threads;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GatheredAttentionTest,
                         ::testing::Values(Case{2, 300, 4, 2, 64, false},
                                           Case{2, 300, 4, 2, 64, true},
                                           Case{1, 260, 2, 1, 40, true},
                                           Case{1, 260, 2, 2, 40, false}));

// One segment holding every token in order is exact attention (causal or not).
TEST(GatheredAttention, AllTokensIsExactAttention) {
  const int64_t B = 1, S = 333, H = 2, D = 64;
  Rng rng(test::SeedFor("gathered_all_tokens"));
  Tensor q(DType::kF32, {B, S, H, D}), k(DType::kF32, {B, S, H, D}), v(DType::kF32, {B, S, H, D});
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  Segs g;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t t = S - 1; t >= 0; --t) g.q_index.push_back(static_cast<int32_t>(t));
    for (int64_t t = 0; t < S; ++t) g.k_index.push_back(static_cast<int32_t>((t * 7) % S));
    g.q_begin.push_back(static_cast<int64_t>(g.q_index.size()));
    g.k_begin.push_back(static_cast<int64_t>(g.k_index.size()));
    g.row_begin.push_back(h + 1);
  }
  for (bool causal : {false, true}) {
    Tensor out(DType::kF32, {B, S, H, D}), lse(DType::kF32, {B, H, S});
    Tensor eout(DType::kF32, {B, S, H, D}), else_(DType::kF32, {B, H, S});
    approx::GatheredAttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.out = out.view();
    p.lse = lse.view();
    p.scale = 1.0f / std::sqrt(static_cast<float>(D));
    p.causal = causal;
    p.segments = g.view();
    ASSERT_TRUE(approx::GatheredAttention(p, Context()).ok());
    AttentionParams a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.out = eout.view();
    a.lse = else_.view();
    a.causal = causal;
    ASSERT_TRUE(AttentionForward(a, Context()).ok());
    EXPECT_TRUE(test::CheckClose(out.ToVector(), eout.ToVector(),
                                 test::IdentityCeiling(DType::kF32), "out"));
    EXPECT_TRUE(test::CheckClose(lse.ToVector(), else_.ToVector(), test::kLseCeiling, "lse"));
  }
}

TEST(GatheredAttention, BadSegmentsWriteNothing) {
  const int64_t S = 20, D = 16;
  Tensor q(DType::kF32, {1, S, 1, D}), k(DType::kF32, {1, S, 1, D}), v(DType::kF32, {1, S, 1, D});
  Rng rng(1);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  Tensor out(DType::kF32, {1, S, 1, D});
  out.Snapshot();
  std::vector<int64_t> row_begin = {0, 1}, q_begin = {0, 2}, k_begin = {0, 2};
  std::vector<int32_t> q_index = {3, 5}, k_index = {1, 20};
  approx::GatheredAttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.segments = {row_begin.data(), q_begin.data(), q_index.data(), k_begin.data(), k_index.data()};
  Status s = approx::GatheredAttention(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("segments.k_index[1]"), std::string::npos) << s.message();
  EXPECT_TRUE(out.Unchanged());
  k_index[1] = 2;
  q_begin = {0, -1};
  s = approx::GatheredAttention(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("segments.q_begin[1]"), std::string::npos) << s.message();
  EXPECT_TRUE(out.Unchanged());
}

}  // namespace
}  // namespace tessera
