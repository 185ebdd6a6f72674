// SPDX-License-Identifier: Apache-2.0
// MergeStates: the LSE-merge algebra (docs/algorithms.md §3.1) and its identities: split-KV + merge
// equals one pass, merging with an empty part is the identity (bitwise), all-empty gives
// (0, -inf) with no NaN, any grouping agrees, base-2 LSEs, thread invariance, bad arguments.
#include "tessera/merge.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tessera/attention.h"

namespace tessera {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// R states of T rows x H heads x D: parts [R, T, H, D], lse [R, T, H].
struct States {
  int64_t r, t, h, d;
  std::vector<float> out, lse;
  States(int64_t r_, int64_t t_, int64_t h_, int64_t d_)
      : r(r_), t(t_), h(h_), d(d_), out(size_t(r_ * t_ * h_ * d_)), lse(size_t(r_ * t_ * h_)) {}
  float* part_out(int64_t i) { return out.data() + i * t * h * d; }
  float* part_lse(int64_t i) { return lse.data() + i * t * h; }
};

struct Merged {
  std::vector<float> out, lse;
};

Status Merge(States& s, Merged* m, int32_t threads = 0, bool base2 = false) {
  m->out.assign(size_t(s.t * s.h * s.d), kNaN);
  m->lse.assign(size_t(s.t * s.h), kNaN);
  MergeStatesParams p;
  p.out_parts = MakeView4(s.out.data(), DType::kF32, s.r, s.t, s.h, s.d);
  p.lse_parts = MakeView3(s.lse.data(), DType::kF32, s.r, s.t, s.h);
  p.out = MakeView3(m->out.data(), DType::kF32, s.t, s.h, s.d);
  const int64_t lse_shape[2] = {s.t, s.h};
  p.lse = MakeContiguousView(m->lse.data(), DType::kF32, 2, lse_shape);
  p.base2 = base2;
  Context ctx;
  ctx.num_threads = threads;
  return MergeStates(p, ctx);
}

// Attention of q over keys [k0, k1): out [S, H, D] and lse [S, H] (the forward's [1, H, S] LSE
// viewed through strides).
void AttendRange(const std::vector<float>& q, const std::vector<float>& k,
                 const std::vector<float>& v, int64_t sq, int64_t h, int64_t d, int64_t k0,
                 int64_t k1, float* out, float* lse) {
  AttentionParams p;
  p.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, 1, sq, h, d);
  p.k = MakeView4(const_cast<float*>(k.data()) + k0 * h * d, DType::kF32, 1, k1 - k0, h, d);
  p.v = MakeView4(const_cast<float*>(v.data()) + k0 * h * d, DType::kF32, 1, k1 - k0, h, d);
  p.out = MakeView4(out, DType::kF32, 1, sq, h, d);
  p.lse = MakeView3(lse, DType::kF32, 1, h, sq);
  p.lse.strides[1] = 1;  // element (0, head, token) lands at token * H + head
  p.lse.strides[2] = h;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.align = MaskAlign::kTopLeft;
  ASSERT_TRUE(AttentionForward(p, Context()).ok());
}

TEST(MergeStates, SplitKeysAndMergeEqualsOnePass) {
  const int64_t sq = 17, sk = 203, h = 3, d = 40;
  const auto q = Random(size_t(sq * h * d), 1), k = Random(size_t(sk * h * d), 2),
             v = Random(size_t(sk * h * d), 3);
  std::vector<float> ref_out(size_t(sq * h * d)), ref_lse(size_t(sq * h));
  AttendRange(q, k, v, sq, h, d, 0, sk, ref_out.data(), ref_lse.data());
  // Splits include empty ranges (a part with no keys: O = 0, LSE = -inf) and 1-key ranges.
  for (std::vector<int64_t> cuts : {std::vector<int64_t>{0, 100, 203},
                                    {0, 1, 2, 64, 64, 150, 203},
                                    {0, 0, 203, 203},
                                    {0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187, 203}}) {
    States s(int64_t(cuts.size()) - 1, sq, h, d);
    for (int64_t i = 0; i < s.r; ++i) {
      AttendRange(q, k, v, sq, h, d, cuts[size_t(i)], cuts[size_t(i) + 1], s.part_out(i),
                  s.part_lse(i));
    }
    Merged m;
    ASSERT_TRUE(Merge(s, &m).ok());
    for (size_t i = 0; i < m.out.size(); ++i) {
      ASSERT_NEAR(m.out[i], ref_out[i], 1e-5f + 1e-5f * std::fabs(ref_out[i])) << i;
    }
    for (size_t i = 0; i < m.lse.size(); ++i) ASSERT_NEAR(m.lse[i], ref_lse[i], 1e-5f) << i;
  }
}

TEST(MergeStates, EmptyPartIsTheIdentityBitwise) {
  States s(2, 5, 2, 7);
  const auto x = Random(size_t(5 * 2 * 7), 4);
  std::copy(x.begin(), x.end(), s.part_out(0));
  s.part_out(0)[3] = -0.0f;  // signed zero survives
  for (int64_t i = 0; i < 10; ++i) s.part_lse(0)[i] = 0.5f * float(i) - 2.0f;
  std::fill(s.part_out(1), s.part_out(1) + 70, kNaN);  // an empty part's O is never read
  std::fill(s.part_lse(1), s.part_lse(1) + 10, -kInf);
  for (bool base2 : {false, true}) {
    Merged m;
    ASSERT_TRUE(Merge(s, &m, 0, base2).ok());
    EXPECT_EQ(std::memcmp(m.out.data(), s.part_out(0), 70 * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(m.lse.data(), s.part_lse(0), 10 * sizeof(float)), 0);
  }
}

TEST(MergeStates, AllEmptyAndNoPartsGiveZeroAndMinusInf) {
  for (int64_t r : {0, 1, 3}) {
    States s(r, 4, 2, 5);
    std::fill(s.out.begin(), s.out.end(), kNaN);
    std::fill(s.lse.begin(), s.lse.end(), -kInf);
    Merged m;
    ASSERT_TRUE(Merge(s, &m).ok());
    for (float x : m.out) EXPECT_EQ(x, 0.0f);
    for (float x : m.lse) EXPECT_EQ(x, -kInf);
  }
}

TEST(MergeStates, AnyGroupingAgrees) {
  const int64_t t = 9, h = 2, d = 16;
  States abc(3, t, h, d);
  abc.out = Random(abc.out.size(), 5);
  abc.lse = Random(abc.lse.size(), 6);
  abc.part_lse(1)[4] = -kInf;  // one empty part in one row
  Merged all;
  ASSERT_TRUE(Merge(abc, &all).ok());
  // (a, b) then c, and a then (b, c).
  for (int split : {1, 2}) {
    States first(split, t, h, d), second(3 - split, t, h, d);
    const size_t out_n = size_t(t * h * d), lse_n = size_t(t * h);
    std::copy(abc.out.begin(), abc.out.begin() + long(split * out_n), first.out.begin());
    std::copy(abc.out.begin() + long(split * out_n), abc.out.end(), second.out.begin());
    std::copy(abc.lse.begin(), abc.lse.begin() + long(split * lse_n), first.lse.begin());
    std::copy(abc.lse.begin() + long(split * lse_n), abc.lse.end(), second.lse.begin());
    Merged m1, m2;
    ASSERT_TRUE(Merge(first, &m1).ok());
    ASSERT_TRUE(Merge(second, &m2).ok());
    States pair(2, t, h, d);
    std::copy(m1.out.begin(), m1.out.end(), pair.part_out(0));
    std::copy(m2.out.begin(), m2.out.end(), pair.part_out(1));
    std::copy(m1.lse.begin(), m1.lse.end(), pair.part_lse(0));
    std::copy(m2.lse.begin(), m2.lse.end(), pair.part_lse(1));
    Merged grouped;
    ASSERT_TRUE(Merge(pair, &grouped).ok());
    for (size_t i = 0; i < all.out.size(); ++i) {
      EXPECT_NEAR(grouped.out[i], all.out[i], 1e-6f + 1e-6f * std::fabs(all.out[i]));
    }
    for (size_t i = 0; i < all.lse.size(); ++i) EXPECT_NEAR(grouped.lse[i], all.lse[i], 1e-6f);
  }
}

TEST(MergeStates, Base2MatchesNaturalLog) {
  States nat(4, 6, 3, 8);
  nat.out = Random(nat.out.size(), 7);
  nat.lse = Random(nat.lse.size(), 8);
  States two = nat;
  for (float& l : two.lse) l = static_cast<float>(l / std::log(2.0));
  Merged a, b;
  ASSERT_TRUE(Merge(nat, &a).ok());
  ASSERT_TRUE(Merge(two, &b, 0, /*base2=*/true).ok());
  for (size_t i = 0; i < a.out.size(); ++i) EXPECT_NEAR(b.out[i], a.out[i], 1e-6f);
  for (size_t i = 0; i < a.lse.size(); ++i) {
    EXPECT_NEAR(b.lse[i] * std::log(2.0f), a.lse[i], 1e-6f);
  }
}

// A part LSE of NaN or +inf would make its whole row NaN: it is rejected before anything is
// written (the scan of R * T * H floats is cheap next to the merge).
TEST(MergeStates, NanOrPlusInfPartLseIsRejected) {
  for (float bad : {kNaN, kInf}) {
    States s(2, 3, 1, 4);
    s.out = Random(s.out.size(), 9);
    s.lse = Random(s.lse.size(), 10);
    s.part_lse(1)[1] = bad;
    Merged m;
    const Status status = Merge(s, &m);
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << status.ToString();
    EXPECT_NE(status.message().find("lse_parts"), std::string::npos) << status.message();
    EXPECT_NE(status.message().find("[1, 1, 0]"), std::string::npos) << status.message();
    for (float x : m.out) EXPECT_TRUE(std::isnan(x));  // still Merge's NaN fill: not written
    for (float x : m.lse) EXPECT_TRUE(std::isnan(x));
  }
}

TEST(MergeStates, ThreadCountInvariantBitwise) {
  States s(5, 301, 4, 24);
  s.out = Random(s.out.size(), 11);
  s.lse = Random(s.lse.size(), 12);
  Merged one, two, three;
  ASSERT_TRUE(Merge(s, &one, 1).ok());
  ASSERT_TRUE(Merge(s, &two, 2).ok());
  ASSERT_TRUE(Merge(s, &three, 3).ok());
  EXPECT_EQ(std::memcmp(one.out.data(), two.out.data(), one.out.size() * 4), 0);
  EXPECT_EQ(std::memcmp(one.out.data(), three.out.data(), one.out.size() * 4), 0);
  EXPECT_EQ(std::memcmp(one.lse.data(), two.lse.data(), one.lse.size() * 4), 0);
}

TEST(MergeStates, Bf16PartsMatchTheirF32Values) {
  States s(3, 4, 2, 8);
  s.out = Random(s.out.size(), 13);
  s.lse = Random(s.lse.size(), 14);
  std::vector<uint16_t> parts16(s.out.size()), out16(size_t(4 * 2 * 8));
  for (size_t i = 0; i < s.out.size(); ++i) {
    parts16[i] = FloatToBF16(s.out[i]);
    s.out[i] = BF16ToFloat(parts16[i]);  // the f32 run sees the same rounded values
  }
  Merged ref;
  ASSERT_TRUE(Merge(s, &ref).ok());
  MergeStatesParams p;
  p.out_parts = MakeView4(parts16.data(), DType::kBF16, 3, 4, 2, 8);
  p.lse_parts = MakeView3(s.lse.data(), DType::kF32, 3, 4, 2);
  p.out = MakeView3(out16.data(), DType::kBF16, 4, 2, 8);
  ASSERT_TRUE(MergeStates(p, Context()).ok());
  for (size_t i = 0; i < out16.size(); ++i) EXPECT_EQ(out16[i], FloatToBF16(ref.out[i])) << i;
}

TEST(MergeStates, BadArgumentsAreRejectedAndNothingIsWritten) {
  States s(2, 3, 2, 4);
  std::vector<float> out(size_t(3 * 2 * 4), 7.0f), lse(size_t(3 * 2), 7.0f);
  auto valid = [&] {
    MergeStatesParams p;
    p.out_parts = MakeView4(s.out.data(), DType::kF32, 2, 3, 2, 4);
    p.lse_parts = MakeView3(s.lse.data(), DType::kF32, 2, 3, 2);
    p.out = MakeView3(out.data(), DType::kF32, 3, 2, 4);
    const int64_t lse_shape[2] = {3, 2};
    p.lse = MakeContiguousView(lse.data(), DType::kF32, 2, lse_shape);
    return p;
  };
  ASSERT_TRUE(MergeStates(valid(), Context()).ok());
  std::fill(out.begin(), out.end(), 7.0f);
  std::fill(lse.begin(), lse.end(), 7.0f);
  struct Case {
    const char* arg;
    void (*mutate)(MergeStatesParams&);
  } cases[] = {
      {"out_parts", [](MergeStatesParams& p) { p.out_parts.rank = 3; }},
      {"out_parts", [](MergeStatesParams& p) { p.out_parts.data = nullptr; }},
      {"lse_parts", [](MergeStatesParams& p) { p.lse_parts.shape[0] = 3; }},
      {"lse_parts", [](MergeStatesParams& p) { p.lse_parts.dtype = DType::kBF16; }},
      {"out", [](MergeStatesParams& p) { p.out.shape[2] = 5; }},
      {"out", [](MergeStatesParams& p) { p.out.dtype = DType::kF16; }},
      {"out", [](MergeStatesParams& p) { p.out.strides[0] = 0; }},
      {"lse", [](MergeStatesParams& p) { p.lse.shape[1] = 1; }},
      {"lse", [](MergeStatesParams& p) { p.lse.strides[1] = -1; }},
  };
  for (const Case& c : cases) {
    MergeStatesParams p = valid();
    c.mutate(p);
    const Status st = MergeStates(p, Context());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << c.arg;
    EXPECT_EQ(st.message().rfind(std::string(c.arg) + ":", 0), 0u) << st.message();
    for (float x : out) EXPECT_EQ(x, 7.0f);
    for (float x : lse) EXPECT_EQ(x, 7.0f);
  }
}

}  // namespace
}  // namespace tessera
