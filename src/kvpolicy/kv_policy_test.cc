// SPDX-License-Identifier: Apache-2.0
// Eviction policies: each against a direct re-implementation (scores from the definitions in
// kv_policy.h, a full sort by (score desc, index desc)) on awkward shapes with many ties;
// PyramidKV's and CAKE's budgets (sums, shapes, the cascade); CAKE's preference against its
// formula on statistics from the fp64 reference; argument errors that name the argument.
#include "tessera/kv_policy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ref/attention_ref.h"
#include "tessera/attention.h"

namespace tessera {
namespace {

// Statistics [B, H, S] with few distinct values (ties everywhere).
std::vector<float> TiedStats(size_t n, uint64_t seed, int levels = 4) {
  std::mt19937_64 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng() % levels) * 0.25f;
  return v;
}

TensorView I32(std::vector<int32_t>& v) {
  return MakeView1(v.data(), DType::kI32, static_cast<int64_t>(v.size()));
}

// The direct re-implementation: forced tokens plus the top by a full sort.
std::vector<int32_t> Direct(int64_t len, int64_t budget, int64_t front, int64_t back,
                            const std::vector<double>& score) {
  const int64_t count = std::min(budget, len);
  std::vector<int32_t> out;
  if (count == len) {
    for (int64_t j = 0; j < len; ++j) out.push_back(static_cast<int32_t>(j));
    return out;
  }
  front = std::min(front, count);
  back = std::min(back, count - front);
  std::vector<int32_t> cand;
  for (int64_t j = front; j < len - back && count > front + back; ++j)
    cand.push_back(static_cast<int32_t>(j));
  std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) {
    if (score[a] != score[b]) return score[a] > score[b];
    return a > b;
  });
  for (int64_t j = 0; j < front; ++j) out.push_back(static_cast<int32_t>(j));
  for (int64_t i = 0; i < count - front - back; ++i) out.push_back(cand[i]);
  for (int64_t j = len - back; j < len; ++j) out.push_back(static_cast<int32_t>(j));
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<double> DirectPool(const std::vector<double>& s, int64_t n, int64_t kernel,
                               PoolKind pool) {
  std::vector<double> out(s.size(), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    std::vector<double> w;
    for (int64_t i = j - kernel / 2; i <= j + kernel / 2; ++i) {
      if (i >= 0 && i < n) w.push_back(s[i]);
    }
    double acc = 0.0;
    for (double x : w) acc += x;
    out[j] = pool == PoolKind::kMax ? *std::max_element(w.begin(), w.end())
                                    : acc / static_cast<double>(w.size());
  }
  return out;
}

void ExpectKeep(const KeepSet& keep, int64_t b, int64_t h, const std::vector<int32_t>& want,
                const std::string& what) {
  ASSERT_EQ(keep.counts[b], static_cast<int32_t>(want.size())) << what;
  const int32_t* got = keep.Tokens(b, h);
  EXPECT_EQ(std::vector<int32_t>(got, got + keep.counts[b]), want)
      << what << " b=" << b << " h=" << h;
}

struct Shape {
  std::vector<int32_t> lens = {0, 5, 37, 12};
  int64_t hkv = 3, g = 2, S = 40;
  int64_t H() const { return hkv * g; }
  int64_t B() const { return static_cast<int64_t>(lens.size()); }
};

TEST(KVPolicy, StreamingLLMKeepsSinksAndRecent) {
  Shape sh;
  for (int64_t budget : {1, 3, 4, 9, 100}) {
    for (int64_t sinks : {0, 4}) {
      StreamingLLMParams p;
      p.target = {I32(sh.lens), sh.hkv, budget};
      p.sinks = sinks;
      KeepSet keep;
      ASSERT_TRUE(StreamingLLMKeep(p, &keep).ok());
      for (int64_t b = 0; b < sh.B(); ++b) {
        for (int64_t h = 0; h < sh.hkv; ++h) {
          ExpectKeep(keep, b, h, Direct(sh.lens[b], budget, sinks, budget, {}),
                     "budget " + std::to_string(budget));
        }
      }
    }
  }
}

TEST(KVPolicy, H2OTovaSnapKVCakeMatchDirect) {
  Shape sh;
  const int64_t B = sh.B(), H = sh.H(), S = sh.S, Q = 3;
  const std::vector<float> km = TiedStats(size_t(B * H * S), 1);
  const std::vector<float> km2 = TiedStats(size_t(B * H * S), 2, 3);
  const std::vector<float> probs = TiedStats(size_t(B * H * Q * S), 3);
  std::vector<float> km_mut = km, km2_mut = km2, probs_mut = probs;
  const TensorView km_view = MakeView3(km_mut.data(), DType::kF32, B, H, S);
  const TensorView km2_view = MakeView3(km2_mut.data(), DType::kF32, B, H, S);
  const TensorView probs_view = MakeView4(probs_mut.data(), DType::kF32, B, H, Q, S);
  auto at = [&](const std::vector<float>& v, int64_t b, int64_t r, int64_t j) {
    return static_cast<double>(v[size_t((b * H + r) * S + j)]);
  };
  const int64_t rows = 4;
  for (int64_t budget : {1, 2, 6, 11, 36, 50}) {
    for (int64_t window : {0, 3}) {
      const std::string what =
          "budget " + std::to_string(budget) + " window " + std::to_string(window);
      EvictionTarget target{I32(sh.lens), sh.hkv, budget};
      KeepSet h2o, tova, snap, cake;
      H2OParams hp{target, km_view, window};
      ASSERT_TRUE(H2OKeep(hp, &h2o).ok());
      TovaParams tp{target, probs_view};
      ASSERT_TRUE(TovaKeep(tp, &tova).ok());
      SnapKVParams sp{target, km_view, window, 3, PoolKind::kMax};
      ASSERT_TRUE(SnapKVKeep(sp, &snap).ok());
      CakeParams cp;
      cp.window = window;
      cp.kernel = 5;
      cp.gamma = 3.0;
      ASSERT_TRUE(CakeKeep(cp, target, {km_view, km2_view, rows}, &cake).ok());
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = sh.lens[b];
        for (int64_t h = 0; h < sh.hkv; ++h) {
          std::vector<double> group(size_t(len), 0.0), tv(size_t(len), 0.0), cs(size_t(len), 0.0);
          for (int64_t r = h * sh.g; r < (h + 1) * sh.g; ++r) {
            for (int64_t j = 0; j < len; ++j) {
              group[j] += at(km, b, r, j);
              for (int64_t q = 0; q < Q; ++q) tv[j] += probs[size_t(((b * H + r) * Q + q) * S + j)];
              const double mean = at(km, b, r, j) / rows;
              const double var = std::max(0.0, at(km2, b, r, j) / rows - mean * mean);
              cs[j] += (mean + 3.0 * var) / static_cast<double>(sh.g);
            }
          }
          const int64_t back = std::min(window, std::min(budget, len));
          ExpectKeep(h2o, b, h, Direct(len, budget, 0, window, group), "h2o " + what);
          ExpectKeep(tova, b, h, Direct(len, budget, 0, 0, tv), "tova " + what);
          ExpectKeep(
              snap, b, h,
              Direct(len, budget, 0, window, DirectPool(group, len - back, 3, PoolKind::kMax)),
              "snapkv " + what);
          ExpectKeep(cake, b, h,
                     Direct(len, budget, 0, window, DirectPool(cs, len - back, 5, PoolKind::kAvg)),
                     "cake " + what);
        }
      }
    }
  }
}

TEST(KVPolicy, SmallerBudgetKeepsASubset) {
  Shape sh;
  std::vector<float> km = TiedStats(size_t(sh.B() * sh.H() * sh.S), 7);
  const TensorView view = MakeView3(km.data(), DType::kF32, sh.B(), sh.H(), sh.S);
  KeepSet big, small;
  ASSERT_TRUE(SnapKVKeep({{I32(sh.lens), sh.hkv, 20}, view, 4, 5, PoolKind::kAvg}, &big).ok());
  ASSERT_TRUE(SnapKVKeep({{I32(sh.lens), sh.hkv, 7}, view, 4, 5, PoolKind::kAvg}, &small).ok());
  for (int64_t b = 0; b < sh.B(); ++b) {
    for (int64_t h = 0; h < sh.hkv; ++h) {
      EXPECT_TRUE(std::includes(big.Tokens(b, h), big.Tokens(b, h) + big.counts[b],
                                small.Tokens(b, h), small.Tokens(b, h) + small.counts[b]));
    }
  }
}

TEST(KVPolicy, PyramidBudgetsDecreaseAndSum) {
  std::vector<int64_t> budgets;
  ASSERT_TRUE(PyramidKVBudgets(1000, 6, 20.0, &budgets).ok());
  ASSERT_EQ(budgets.size(), 6u);
  int64_t sum = 0;
  for (size_t l = 0; l < budgets.size(); ++l) {
    sum += budgets[l];
    if (l > 0) {
      EXPECT_LE(budgets[l], budgets[l - 1]);
    }
  }
  EXPECT_EQ(sum, 1000);
  EXPECT_EQ(budgets.back(), 8);  // floor(1000 / (20 * 6))
  ASSERT_TRUE(PyramidKVBudgets(7, 7, 20.0, &budgets).ok());
  EXPECT_EQ(budgets, std::vector<int64_t>(7, 1));
  ASSERT_TRUE(PyramidKVBudgets(30, 3, 1.0, &budgets).ok());
  EXPECT_EQ(budgets, std::vector<int64_t>(3, 10));
  EXPECT_NE(PyramidKVBudgets(5, 6, 20.0, &budgets).message().find("total"), std::string::npos);
  EXPECT_NE(PyramidKVBudgets(50, 6, 0.5, &budgets).message().find("beta"), std::string::npos);
}

TEST(KVPolicy, CakeAllocatorSumsAndCascades) {
  CakeAllocator alloc;
  ASSERT_TRUE(alloc.Init(5, 1003).ok());
  const double prefs[] = {2.0, 0.5, 3.0, 0.0, 1.25};
  std::vector<int64_t> previous;
  for (int l = 0; l < 5; ++l) {
    ASSERT_TRUE(alloc.AddLayer(prefs[l]).ok());
    const std::vector<int64_t>& b = alloc.budgets();
    ASSERT_EQ(b.size(), size_t(l + 1));
    int64_t sum = 0;
    double psum = 0.0;
    for (int i = 0; i <= l; ++i) {
      sum += b[i];
      psum += prefs[i];
    }
    EXPECT_EQ(sum, 1003) << "after layer " << l;
    for (int i = 0; i <= l; ++i) {
      EXPECT_LE(std::abs(static_cast<double>(b[i]) - 1003.0 * prefs[i] / psum), 1.0);
      // Cascade: a layer already seen never grows when a later one arrives.
      if (i < l) {
        EXPECT_LE(b[i], previous[i]) << "layer " << i << " after " << l;
      }
    }
    previous = b;
  }
  EXPECT_FALSE(alloc.AddLayer(1.0).ok());  // a sixth layer
  // With a reserve per layer: every budget >= the reserve; the layers seen so far hold the
  // shared part and their reserves.
  CakeAllocator reserved;
  ASSERT_TRUE(reserved.Init(4, 100, 20).ok());
  for (int l = 0; l < 4; ++l) {
    ASSERT_TRUE(reserved.AddLayer(l == 2 ? 3.0 : 1.0).ok());
    int64_t sum = 0;
    for (int64_t b : reserved.budgets()) {
      EXPECT_GE(b, 20);
      sum += b;
    }
    EXPECT_EQ(sum, 20 + 20 * (l + 1));
  }
  EXPECT_EQ(reserved.budgets(),
            (std::vector<int64_t>{24, 23, 30, 23}));  // 20 + 20 * (1, 1, 3, 1) / 6
  EXPECT_NE(reserved.Init(4, 100, 26).message().find("reserved"), std::string::npos);
  CakeAllocator zero;
  ASSERT_TRUE(zero.Init(3, 10).ok());
  for (int l = 0; l < 3; ++l) ASSERT_TRUE(zero.AddLayer(0.0).ok());
  EXPECT_EQ(zero.budgets(), (std::vector<int64_t>{4, 3, 3}));
  EXPECT_NE(zero.AddLayer(-1.0).message().find("preference"), std::string::npos);
}

// CAKE's preference on statistics of a real attention (the fp64 reference), against its formula.
TEST(KVPolicy, CakePreferenceFromReferenceStats) {
  const int64_t B = 2, Sq = 24, Sk = 24, Hq = 4, Hkv = 2, D = 8, W = 6;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> dist;
  std::vector<float> q(size_t(B * Sq * Hq * D)), k(size_t(B * Sk * Hkv * D)), v(k.size()),
      out(q.size());
  for (float& x : q) x = 2.0f * dist(rng);
  for (float& x : k) x = dist(rng);
  for (float& x : v) x = dist(rng);
  AttentionParams ap;
  ap.q = MakeView4(q.data(), DType::kF32, B, Sq, Hq, D);
  ap.k = MakeView4(k.data(), DType::kF32, B, Sk, Hkv, D);
  ap.v = MakeView4(v.data(), DType::kF32, B, Sk, Hkv, D);
  ap.out = MakeView4(out.data(), DType::kF32, B, Sq, Hq, D);
  ap.causal = true;
  ap.stats.window = W;
  std::vector<double> km(size_t(B * Hq * Sk)), km2(km.size());
  ref::AttentionStatsF64(ap, km.data(), km2.data(), nullptr);
  std::vector<float> kmf(km.begin(), km.end()), km2f(km2.begin(), km2.end());
  std::vector<int32_t> lens = {static_cast<int32_t>(Sk), static_cast<int32_t>(Sk)};
  CakeParams cp;
  cp.tau1 = 0.5;
  cp.tau2 = 2.0;
  double pref = 0, disp = 0, shift = 0;
  const CakeLayerStats st{MakeView3(kmf.data(), DType::kF32, B, Hq, Sk),
                          MakeView3(km2f.data(), DType::kF32, B, Hq, Sk), W};
  ASSERT_TRUE(CakeLayerPreference(cp, {I32(lens), Hkv, 8}, st, &pref, &disp, &shift).ok());
  double H = 0, V = 0;
  for (int64_t r = 0; r < B * Hq; ++r) {
    double mass = 0;
    for (int64_t j = 0; j < Sk; ++j) {
      const double mean = static_cast<float>(km[size_t(r * Sk + j)]) / double(W);
      const double sq = static_cast<float>(km2[size_t(r * Sk + j)]) / double(W);
      mass += mean;
      if (mean > 0) H -= mean * std::log(mean) / double(B * Hq);
      V += std::max(0.0, sq - mean * mean) / double(B * Hq);
    }
    EXPECT_NEAR(mass, 1.0, 1e-5);  // window-averaged attention is a distribution
  }
  EXPECT_NEAR(disp, H, 1e-9 * H);
  EXPECT_NEAR(shift, V, 1e-9 * V);
  EXPECT_NEAR(pref, std::pow(H, 2.0) * std::pow(V, 0.5), 1e-9 * pref);
  EXPECT_GT(H, 0.0);
  EXPECT_GT(V, 0.0);
}

TEST(KVPolicy, BadInputNamesTheArgument) {
  std::vector<int32_t> lens = {4, 6};
  std::vector<float> km(2 * 2 * 6, 0.5f);
  const TensorView view = MakeView3(km.data(), DType::kF32, 2, 2, 6);
  KeepSet keep;
  keep.counts = {99};
  auto msg = [](const Status& s) { return s.ok() ? std::string("ok") : s.message(); };
  EXPECT_NE(msg(H2OKeep({{I32(lens), 2, 0}, view, 1}, &keep)).find("target.budget"),
            std::string::npos);
  EXPECT_NE(msg(H2OKeep({{I32(lens), 0, 3}, view, 1}, &keep)).find("target.num_kv_heads"),
            std::string::npos);
  EXPECT_NE(msg(H2OKeep({{I32(lens), 2, 3}, view, -1}, &keep)).find("recent"), std::string::npos);
  EXPECT_NE(msg(H2OKeep({{I32(lens), 4, 3}, view, 1}, &keep)).find("multiple"), std::string::npos);
  EXPECT_NE(msg(SnapKVKeep({{I32(lens), 2, 3}, view, 1, 4, PoolKind::kMax}, &keep)).find("kernel"),
            std::string::npos);
  std::vector<int32_t> long_lens = {4, 7};
  EXPECT_NE(msg(H2OKeep({{I32(long_lens), 2, 3}, view, 1}, &keep)).find("longest"),
            std::string::npos);
  km[7] = std::numeric_limits<float>::quiet_NaN();
  const std::string nan = msg(H2OKeep({{I32(lens), 2, 3}, view, 1}, &keep));
  EXPECT_NE(nan.find("scores[0][1][1]"), std::string::npos) << nan;
  EXPECT_EQ(keep.counts, std::vector<int32_t>{99});  // nothing written on error
  std::vector<int32_t> neg = {4, -1};
  EXPECT_NE(msg(StreamingLLMKeep({{I32(neg), 2, 3}, 1}, &keep)).find("seq_lens[1]"),
            std::string::npos);
  CakeParams cp;
  cp.tau1 = 0.0;
  double pref = 0;
  EXPECT_NE(
      msg(CakeLayerPreference(cp, {I32(lens), 2, 3}, {view, view, 4}, &pref, nullptr, nullptr))
          .find("tau1"),
      std::string::npos);
}

}  // namespace
}  // namespace tessera
