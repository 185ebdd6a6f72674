// SPDX-License-Identifier: Apache-2.0
// Tests of the fp64 attention reference itself, on cases small enough to compute by hand: the
// oracle every kernel test trusts must be checked against something other than itself.
#include "ref/attention_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace tessera {
namespace {

using test::Index;
using test::Rng;
using test::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();
// Written into the reference's output buffers first, to detect rows it must leave alone.
constexpr double kSentinel = 12345.0;

struct RefResult {
  std::vector<double> out;
  std::vector<double> lse;
};

// Runs the reference with output buffers sized from the views and pre-filled with kSentinel.
RefResult RunRef(const AttentionParams& p) {
  const int last_q = p.q.rank - 1, last_v = p.v.rank - 1;
  const int64_t rows = p.q.numel() / p.q.shape[last_q];
  RefResult r;
  r.out.assign(static_cast<size_t>(rows * p.v.shape[last_v]), kSentinel);
  r.lse.assign(static_cast<size_t>(rows), kSentinel);
  ref::AttentionForwardF64(p, r.out.data(), r.lse.data());
  return r;
}

AttentionParams Dense(const Tensor& q, const Tensor& k, const Tensor& v) {
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  return p;
}

// Which keys each query row sees, read off the reference itself: with q = 0 every visible logit
// is 0, so the output is the mean of the visible value rows; with one-hot values (v_j = e_j) row
// i of the output is the visibility mask of row i divided by its count.
std::vector<std::string> VisibleKeys(int64_t sq, int64_t sk,
                                     const std::function<void(AttentionParams*)>& configure) {
  Tensor q(DType::kF32, {1, sq, 1, sk}), k(DType::kF32, {1, sk, 1, sk}),
      v(DType::kF32, {1, sk, 1, sk});
  q.FromVector(std::vector<double>(static_cast<size_t>(sq * sk), 0.0));
  Rng rng(1);
  k.FillNormal(rng);
  v.ForEach([&](const Index& idx) { v.Set(idx, idx[1] == idx[3] ? 1.0 : 0.0); });
  AttentionParams p = Dense(q, k, v);
  configure(&p);
  const RefResult r = RunRef(p);
  std::vector<std::string> rows;
  for (int64_t i = 0; i < sq; ++i) {
    std::string row;
    int count = 0;
    for (int64_t j = 0; j < sk; ++j) count += r.out[static_cast<size_t>(i * sk + j)] > 0.0;
    for (int64_t j = 0; j < sk; ++j) {
      const double x = r.out[static_cast<size_t>(i * sk + j)];
      // Exactly 1/count where visible and exactly 0 elsewhere: anything else is a bug.
      EXPECT_TRUE(x == 0.0 || x == 1.0 / count) << "row " << i << " key " << j << ": " << x;
      row += x > 0.0 ? '1' : '0';
    }
    const double lse = r.lse[static_cast<size_t>(i)];
    if (count == 0) {
      EXPECT_EQ(lse, -kInf) << "row " << i;
    } else {
      EXPECT_EQ(lse, std::log(static_cast<double>(count))) << "row " << i;
    }
    rows.push_back(row);
  }
  return rows;
}

using Rows = std::vector<std::string>;

TEST(AttentionRef, CausalAlignmentWorkedExamples) {
  // (Lq, Lk) = (2, 5) and (5, 2) under both alignments.
  auto causal = [](MaskAlign align) {
    return [align](AttentionParams* p) {
      p->causal = true;
      p->align = align;
    };
  };
  EXPECT_EQ(VisibleKeys(2, 5, causal(MaskAlign::kBottomRight)), (Rows{"11110", "11111"}));
  EXPECT_EQ(VisibleKeys(2, 5, causal(MaskAlign::kTopLeft)), (Rows{"10000", "11000"}));
  EXPECT_EQ(VisibleKeys(5, 2, causal(MaskAlign::kBottomRight)),
            (Rows{"00", "00", "00", "10", "11"}));
  EXPECT_EQ(VisibleKeys(5, 2, causal(MaskAlign::kTopLeft)), (Rows{"10", "11", "11", "11", "11"}));
}

TEST(AttentionRef, NoMaskSeesEverything) {
  EXPECT_EQ(VisibleKeys(2, 3, [](AttentionParams*) {}), (Rows{"111", "111"}));
}

TEST(AttentionRef, WindowBounds) {
  auto window = [](int64_t wl, int64_t wr, MaskAlign align = MaskAlign::kBottomRight) {
    return [=](AttentionParams* p) {
      p->window_left = wl;
      p->window_right = wr;
      p->align = align;
    };
  };
  EXPECT_EQ(VisibleKeys(4, 4, window(0, 0)), (Rows{"1000", "0100", "0010", "0001"}));
  EXPECT_EQ(VisibleKeys(4, 4, window(1, 0)), (Rows{"1000", "1100", "0110", "0011"}));
  EXPECT_EQ(VisibleKeys(4, 4, window(0, 1)), (Rows{"1100", "0110", "0011", "0001"}));
  EXPECT_EQ(VisibleKeys(4, 4, window(1, 1)), (Rows{"1100", "1110", "0111", "0011"}));
  EXPECT_EQ(VisibleKeys(4, 4, window(4, 0)), (Rows{"1000", "1100", "1110", "1111"}));
  EXPECT_EQ(VisibleKeys(4, 6, window(-1, 1)), (Rows{"111100", "111110", "111111", "111111"}));
  // Lq < Lk: bottom-right puts query i at position i + 2.
  EXPECT_EQ(VisibleKeys(3, 5, window(1, 0)), (Rows{"01100", "00110", "00011"}));
  EXPECT_EQ(VisibleKeys(3, 5, window(1, 1, MaskAlign::kTopLeft)),
            (Rows{"11000", "11100", "01110"}));
  // Lq > Lk: bottom-right puts query i at position i - 2; the first rows see nothing.
  EXPECT_EQ(VisibleKeys(5, 3, window(0, 0)), (Rows{"000", "000", "100", "010", "001"}));
  EXPECT_EQ(VisibleKeys(5, 3, window(0, 0, MaskAlign::kTopLeft)),
            (Rows{"100", "010", "001", "000", "000"}));
}

TEST(AttentionRef, CausalCapsTheRightWindowAtZero) {
  const Rows causal = {"1000", "1100", "1110", "1111"};
  EXPECT_EQ(VisibleKeys(4, 4, [](AttentionParams* p) { p->causal = true; }), causal);
  EXPECT_EQ(VisibleKeys(4, 4,
                        [](AttentionParams* p) {
                          p->causal = true;
                          p->window_right = 3;
                        }),
            causal);
  EXPECT_EQ(VisibleKeys(4, 4,
                        [](AttentionParams* p) {
                          p->causal = true;
                          p->window_left = 1;
                        }),
            (Rows{"1000", "1100", "0110", "0011"}));
}

TEST(AttentionRef, HandComputedTwoKeys) {
  // q = 1, k = [0, 2], scale 0.5: logits [0, 1], weights [1, e] / (1 + e).
  Tensor q(DType::kF32, {1, 1, 1, 1}), k(DType::kF32, {1, 2, 1, 1}), v(DType::kF32, {1, 2, 1, 1});
  q.FromVector({1.0});
  k.FromVector({0.0, 2.0});
  v.FromVector({4.0, 8.0});
  AttentionParams p = Dense(q, k, v);
  p.scale = 0.5f;
  const RefResult r = RunRef(p);
  const double e = std::exp(1.0);
  EXPECT_NEAR(r.out[0], (4.0 + 8.0 * e) / (1.0 + e), 1e-14);
  EXPECT_NEAR(r.lse[0], std::log(1.0 + e), 1e-14);
}

TEST(AttentionRef, UniformAttentionIsTheMeanOfV) {
  const int64_t sk = 7, d = 3;
  Tensor q(DType::kF32, {1, 2, 1, d}), k(DType::kF32, {1, sk, 1, d}), v(DType::kF32, {1, sk, 1, d});
  q.FromVector(std::vector<double>(2 * d, 0.0));
  Rng rng(2);
  k.FillNormal(rng);
  v.FillNormal(rng);
  const RefResult r = RunRef(Dense(q, k, v));
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t c = 0; c < d; ++c) {
      double mean = 0.0;
      for (int64_t j = 0; j < sk; ++j) mean += v.Get({0, j, 0, c});
      mean /= sk;
      EXPECT_NEAR(r.out[static_cast<size_t>(i * d + c)], mean, 1e-14);
    }
    EXPECT_NEAR(r.lse[static_cast<size_t>(i)], std::log(7.0), 1e-14);
  }
}

TEST(AttentionRef, DefaultScaleIsTheFloatNearestOneOverSqrtD) {
  for (int64_t d : {4, 3, 40}) {
    Tensor q(DType::kF32, {1, 3, 1, d}), k(DType::kF32, {1, 5, 1, d}), v(DType::kF32, {1, 5, 1, d});
    Rng rng(3);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    AttentionParams p = Dense(q, k, v);
    const RefResult by_default = RunRef(p);
    p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    const RefResult explicit_scale = RunRef(p);
    EXPECT_EQ(by_default.out, explicit_scale.out) << "D = " << d;
    EXPECT_EQ(by_default.lse, explicit_scale.lse) << "D = " << d;
  }
}

// One query, keys with the given logits (q = 1, k_j = logit_j, D = 1, scale 1) and values v_j:
// the expected output given the final logits after modifiers.
double SoftmaxDot(const std::vector<double>& logits, const std::vector<double>& values) {
  double m = -kInf;
  for (double s : logits) m = std::max(m, s);
  double num = 0.0, den = 0.0;
  for (size_t j = 0; j < logits.size(); ++j) {
    num += std::exp(logits[j] - m) * values[j];
    den += std::exp(logits[j] - m);
  }
  return num / den;
}

TEST(AttentionRef, SoftcapThenAlibiThenMask) {
  // Softcap 10 on logits [0, 40, 25]; ALiBi slope 0.5 on bottom-right distances [2, 1, 0];
  // window (1, -1) masks key 0. Applying ALiBi before the cap would give another answer.
  Tensor q(DType::kF32, {1, 1, 1, 1}), k(DType::kF32, {1, 3, 1, 1}), v(DType::kF32, {1, 3, 1, 1});
  Tensor slopes(DType::kF32, {1});
  q.FromVector({1.0});
  k.FromVector({0.0, 40.0, 25.0});
  v.FromVector({100.0, 1.0, 3.0});
  slopes.FromVector({0.5});
  AttentionParams p = Dense(q, k, v);
  p.scale = 1.0f;
  p.softcap = 10.0f;
  p.alibi_slopes = slopes.view();
  RefResult r = RunRef(p);
  const std::vector<double> capped = {0.0 - 1.0, 10.0 * std::tanh(4.0) - 0.5,
                                      10.0 * std::tanh(2.5)};
  EXPECT_NEAR(r.out[0], SoftmaxDot(capped, {100.0, 1.0, 3.0}), 1e-13);
  p.window_left = 1;
  r = RunRef(p);
  EXPECT_NEAR(r.out[0], SoftmaxDot({capped[1], capped[2]}, {1.0, 3.0}), 1e-13);
}

TEST(AttentionRef, AlibiDistanceFollowsTheAlignment) {
  // q = 0: logits are the biases alone. Lq = 1, Lk = 3.
  Tensor q(DType::kF32, {2, 1, 1, 1}), k(DType::kF32, {2, 3, 1, 1}), v(DType::kF32, {2, 3, 1, 1});
  Tensor slopes(DType::kF32, {2, 1});  // [B, Hq]: batch entries get different slopes
  q.FromVector({0.0, 0.0});
  k.FromVector({1.0, 2.0, 3.0, 1.0, 2.0, 3.0});
  v.FromVector({1.0, 2.0, 4.0, 1.0, 2.0, 4.0});
  slopes.FromVector({0.5, 2.0});
  AttentionParams p = Dense(q, k, v);
  p.alibi_slopes = slopes.view();
  RefResult r = RunRef(p);  // bottom-right: query 0 sits at position 2
  EXPECT_NEAR(r.out[0], SoftmaxDot({-1.0, -0.5, 0.0}, {1.0, 2.0, 4.0}), 1e-14);
  EXPECT_NEAR(r.out[1], SoftmaxDot({-4.0, -2.0, 0.0}, {1.0, 2.0, 4.0}), 1e-14);
  p.align = MaskAlign::kTopLeft;  // query 0 sits at position 0
  r = RunRef(p);
  EXPECT_NEAR(r.out[0], SoftmaxDot({0.0, -0.5, -1.0}, {1.0, 2.0, 4.0}), 1e-14);
  EXPECT_NEAR(r.out[1], SoftmaxDot({0.0, -2.0, -4.0}, {1.0, 2.0, 4.0}), 1e-14);
}

TEST(AttentionRef, MaskedKeysGetExactlyZeroNextToVeryNegativeLogits) {
  // Visible logits near -2e4, a masked key with logit +1e4: a finite mask sentinel would let the
  // masked key win; a true -inf gives it weight 0.
  Tensor q(DType::kF32, {1, 1, 1, 1}), k(DType::kF32, {1, 3, 1, 1}), v(DType::kF32, {1, 3, 1, 1});
  q.FromVector({100.0});
  k.FromVector({-200.0, -200.5, 100.0});
  v.FromVector({1.0, 3.0, 1000.0});
  AttentionParams p = Dense(q, k, v);
  p.scale = 1.0f;
  p.align = MaskAlign::kTopLeft;  // query 0 at position 0
  p.window_right = 1;             // keys 0 and 1 visible, key 2 masked
  const RefResult r = RunRef(p);
  EXPECT_NEAR(r.out[0], SoftmaxDot({-20000.0, -20050.0}, {1.0, 3.0}), 1e-12);
  EXPECT_NEAR(r.lse[0], -20000.0 + std::log1p(std::exp(-50.0)), 1e-9);
}

TEST(AttentionRef, LargeLogitsStayFinite) {
  Tensor q(DType::kF32, {1, 1, 1, 1}), k(DType::kF32, {1, 2, 1, 1}), v(DType::kF32, {1, 2, 1, 1});
  q.FromVector({100.0});
  k.FromVector({100.0, 99.99});
  v.FromVector({2.0, 6.0});
  AttentionParams p = Dense(q, k, v);
  p.scale = 1.0f;
  const RefResult r = RunRef(p);
  const double s1 = 100.0 * static_cast<double>(99.99f);
  EXPECT_NEAR(r.out[0], SoftmaxDot({1e4, s1}, {2.0, 6.0}), 1e-12);
  EXPECT_TRUE(std::isfinite(r.lse[0]));
  EXPECT_NEAR(r.lse[0], 1e4 + std::log1p(std::exp(s1 - 1e4)), 1e-9);
}

TEST(AttentionRef, GqaReadsKvHeadHOverG) {
  // V of KV head g is the constant g + 1, so output head h is h / 2 + 1 for Hq = 4, Hkv = 2.
  const int64_t d = 2, sk = 3;
  Tensor q(DType::kF32, {1, 2, 4, d}), k(DType::kF32, {1, sk, 2, d}), v(DType::kF32, {1, sk, 2, d});
  Rng rng(4);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.ForEach([&](const Index& idx) { v.Set(idx, static_cast<double>(idx[2] + 1)); });
  const RefResult r = RunRef(Dense(q, k, v));
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t h = 0; h < 4; ++h) {
      for (int64_t c = 0; c < d; ++c) {
        EXPECT_NEAR(r.out[static_cast<size_t>((i * 4 + h) * d + c)], static_cast<double>(h / 2 + 1),
                    1e-14);
      }
    }
  }
}

TEST(AttentionRef, GqaEqualsMhaWithRepeatedKv) {
  const int64_t hq = 6, hkv = 2, g = hq / hkv, d = 5, sq = 4, sk = 9;
  Tensor q(DType::kF32, {2, sq, hq, d}), k(DType::kF32, {2, sk, hkv, d}),
      v(DType::kF32, {2, sk, hkv, d});
  Tensor k_rep(DType::kF32, {2, sk, hq, d}), v_rep(DType::kF32, {2, sk, hq, d});
  Rng rng(5);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  k_rep.ForEach([&](const Index& i) { k_rep.Set(i, k.Get({i[0], i[1], i[2] / g, i[3]})); });
  v_rep.ForEach([&](const Index& i) { v_rep.Set(i, v.Get({i[0], i[1], i[2] / g, i[3]})); });
  AttentionParams p = Dense(q, k, v);
  p.causal = true;
  const RefResult gqa = RunRef(p);
  p.k = k_rep.view();
  p.v = v_rep.view();
  const RefResult mha = RunRef(p);
  EXPECT_EQ(gqa.out, mha.out);
  EXPECT_EQ(gqa.lse, mha.lse);
}

TEST(AttentionRef, EmptyKeysGiveZeroAndMinusInf) {
  Tensor q(DType::kF32, {2, 3, 2, 4}), k(DType::kF32, {2, 0, 1, 4}), v(DType::kF32, {2, 0, 1, 4});
  Rng rng(6);
  q.FillNormal(rng);
  const RefResult r = RunRef(Dense(q, k, v));
  for (double x : r.out) EXPECT_EQ(x, 0.0);
  for (double x : r.lse) EXPECT_EQ(x, -kInf);
}

TEST(AttentionRef, LseIsOptional) {
  Tensor q(DType::kF32, {1, 2, 1, 3}), k(DType::kF32, {1, 2, 1, 3}), v(DType::kF32, {1, 2, 1, 3});
  Rng rng(7);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  const AttentionParams p = Dense(q, k, v);
  const RefResult with_lse = RunRef(p);
  std::vector<double> out(6, kSentinel);
  ref::AttentionForwardF64(p, out.data(), nullptr);
  EXPECT_EQ(out, with_lse.out);
}

TEST(AttentionRef, NanInAQueryRowPoisonsThatRowOnly) {
  const int64_t d = 4;
  Tensor q(DType::kF32, {1, 3, 1, d}), k(DType::kF32, {1, 5, 1, d}), v(DType::kF32, {1, 5, 1, d});
  Rng rng(8);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  q.Set({0, 1, 0, 2}, std::numeric_limits<double>::quiet_NaN());
  const RefResult r = RunRef(Dense(q, k, v));
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < d; ++c) {
      EXPECT_EQ(std::isnan(r.out[static_cast<size_t>(i * d + c)]), i == 1) << i << ", " << c;
    }
    EXPECT_EQ(std::isnan(r.lse[static_cast<size_t>(i)]), i == 1) << i;
  }
}

TEST(AttentionRef, NanInAMaskedKeyDoesNotLeak) {
  const int64_t d = 3;
  Tensor q(DType::kF32, {1, 4, 1, d}), k(DType::kF32, {1, 4, 1, d}), v(DType::kF32, {1, 4, 1, d});
  Rng rng(9);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  k.Set({0, 3, 0, 0}, std::numeric_limits<double>::quiet_NaN());
  v.Set({0, 3, 0, 1}, std::numeric_limits<double>::quiet_NaN());
  AttentionParams p = Dense(q, k, v);
  p.causal = true;  // key 3 is visible to row 3 only
  const RefResult r = RunRef(p);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(std::isnan(r.lse[static_cast<size_t>(i)]), i == 3) << i;
    EXPECT_EQ(std::isnan(r.out[static_cast<size_t>(i * d)]), i == 3) << i;
  }
}

// Values exactly representable in bf16 and f16 give bitwise the same reference in every dtype:
// inputs are upcast exactly.
TEST(AttentionRef, LowPrecisionInputsAreUpcastExactly) {
  const std::vector<int64_t> qs = {1, 5, 2, 8}, ks = {1, 7, 1, 8};
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Tensor q(dt, qs), k(dt, ks), v(dt, ks);
    Rng rng(10);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng, 100.0);
    Tensor qf(DType::kF32, qs), kf(DType::kF32, ks), vf(DType::kF32, ks);
    qf.FromVector(q.ToVector());
    kf.FromVector(k.ToVector());
    vf.FromVector(v.ToVector());
    AttentionParams p = Dense(q, k, v);
    p.causal = true;
    AttentionParams pf = Dense(qf, kf, vf);
    pf.causal = true;
    const RefResult a = RunRef(p), b = RunRef(pf);
    EXPECT_EQ(a.out, b.out) << DTypeName(dt);
    EXPECT_EQ(a.lse, b.lse) << DTypeName(dt);
  }
}

TEST(AttentionRef, StridedViewsGiveTheSameResult) {
  const int64_t b = 2, sq = 5, sk = 6, hq = 4, hkv = 2, d = 3;
  Tensor q(DType::kF32, {b, sq, hq, d}), k(DType::kF32, {b, sk, hkv, d}),
      v(DType::kF32, {b, sk, hkv, d});
  Rng rng(11);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  // q padded (2 spare elements per row) at offset 3; k stored heads-major [B, H, S, D]; v with
  // a stride-0 batch (both batch entries read the same storage).
  Tensor qp(DType::kF32, {b, sq, hq, d}, Tensor::PaddedStrides({b, sq, hq, d}, 2), 3);
  qp.FromVector(q.ToVector());
  Tensor kt(DType::kF32, {b, sk, hkv, d}, {hkv * sk * d, d, sk * d, 1});
  kt.FromVector(k.ToVector());
  Tensor v0(DType::kF32, {b, sk, hkv, d}, {0, hkv * d, d, 1});
  v0.ForEach([&](const Index& i) { v0.Set(i, v.Get({0, i[1], i[2], i[3]})); });
  Tensor vb(DType::kF32, {b, sk, hkv, d});  // the same values, dense
  vb.ForEach([&](const Index& i) { vb.Set(i, v.Get({0, i[1], i[2], i[3]})); });
  AttentionParams dense = Dense(q, k, vb);
  AttentionParams strided = Dense(qp, kt, v0);
  dense.causal = strided.causal = true;
  const RefResult a = RunRef(dense), c = RunRef(strided);
  EXPECT_EQ(a.out, c.out);
  EXPECT_EQ(a.lse, c.lse);
}

TEST(AttentionRef, VarlenSequencesAreIndependentAndAligned) {
  // Three sequences: q lengths [2, 0, 3], k lengths [3, 0, 1]; query token 5 is outside every
  // sequence and must be left alone. Bottom-right causal per sequence.
  const int64_t hq = 2, d = 3, total_q = 6, total_k = 5;
  const std::vector<int32_t> cu_q = {0, 2, 2, 5}, cu_k = {0, 3, 3, 4};
  Tensor q(DType::kF32, {total_q, hq, d}), k(DType::kF32, {total_k, 1, d}),
      v(DType::kF32, {total_k, 1, d});
  Rng rng(12);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.cu_seqlens_q = test::I32View(cu_q);
  p.cu_seqlens_k = test::I32View(cu_k);
  p.num_seqs = 3;
  p.causal = true;
  const RefResult r = RunRef(p);

  // Untouched row: query token 5, every head; lse layout [Hq, total_q].
  for (int64_t h = 0; h < hq; ++h) {
    for (int64_t c = 0; c < d; ++c)
      EXPECT_EQ(r.out[static_cast<size_t>((5 * hq + h) * d + c)], kSentinel);
    EXPECT_EQ(r.lse[static_cast<size_t>(h * total_q + 5)], kSentinel);
  }
  // Sequence 2 (q rows 2..4, one key): bottom-right puts rows at positions -2, -1, 0.
  for (int64_t h = 0; h < hq; ++h) {
    for (int64_t t = 2; t < 4; ++t) {
      for (int64_t c = 0; c < d; ++c)
        EXPECT_EQ(r.out[static_cast<size_t>((t * hq + h) * d + c)], 0.0);
      EXPECT_EQ(r.lse[static_cast<size_t>(h * total_q + t)], -kInf);
    }
    for (int64_t c = 0; c < d; ++c) {
      EXPECT_EQ(r.out[static_cast<size_t>((4 * hq + h) * d + c)], v.Get({3, 0, c}));
    }
  }
  // Sequence 0 equals a dense call on its rows alone, bitwise.
  Tensor q0(DType::kF32, {1, 2, hq, d}), k0(DType::kF32, {1, 3, 1, d}),
      v0(DType::kF32, {1, 3, 1, d});
  q0.ForEach([&](const Index& i) { q0.Set(i, q.Get({i[1], i[2], i[3]})); });
  k0.ForEach([&](const Index& i) { k0.Set(i, k.Get({i[1], i[2], i[3]})); });
  v0.ForEach([&](const Index& i) { v0.Set(i, v.Get({i[1], i[2], i[3]})); });
  AttentionParams pd = Dense(q0, k0, v0);
  pd.causal = true;
  const RefResult dense = RunRef(pd);
  for (size_t i = 0; i < dense.out.size(); ++i) EXPECT_EQ(r.out[i], dense.out[i]) << i;
  for (int64_t h = 0; h < hq; ++h) {
    for (int64_t t = 0; t < 2; ++t) {
      EXPECT_EQ(r.lse[static_cast<size_t>(h * total_q + t)],
                dense.lse[static_cast<size_t>(h * 2 + t)]);
    }
  }

  // The rank-4 [1, T, H, D] varlen layout reads the same tokens.
  Tensor q4(DType::kF32, {1, total_q, hq, d});
  q4.FromVector(q.ToVector());
  p.q = q4.view();
  const RefResult r4 = RunRef(p);
  EXPECT_EQ(r4.out, r.out);
  EXPECT_EQ(r4.lse, r.lse);
}

TEST(AttentionRef, AlibiPerSequenceInVarlen) {
  // [num_seqs, Hq] slopes: sequence s reads row s; q = 0 so logits are the biases alone.
  const std::vector<int32_t> cu_q = {0, 1, 2}, cu_k = {0, 2, 4};
  Tensor q(DType::kF32, {2, 1, 1}), k(DType::kF32, {4, 1, 1}), v(DType::kF32, {4, 1, 1});
  Tensor slopes(DType::kF32, {2, 1});
  q.FromVector({0.0, 0.0});
  k.FromVector({1.0, 1.0, 1.0, 1.0});
  v.FromVector({1.0, 5.0, 1.0, 5.0});
  slopes.FromVector({1.0, 3.0});
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.alibi_slopes = slopes.view();
  p.cu_seqlens_q = test::I32View(cu_q);
  p.cu_seqlens_k = test::I32View(cu_k);
  p.num_seqs = 2;
  const RefResult r = RunRef(p);  // each query sits at position 1 of its sequence
  EXPECT_NEAR(r.out[0], SoftmaxDot({-1.0, 0.0}, {1.0, 5.0}), 1e-14);
  EXPECT_NEAR(r.out[1], SoftmaxDot({-3.0, 0.0}, {1.0, 5.0}), 1e-14);
}

}  // namespace
}  // namespace tessera
