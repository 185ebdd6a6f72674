// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/performer.cc: the fast path against the fp64 reference of the same
// algorithm with the same projection (seeded and given, causal and not, GQA, more features than
// one engine call takes), the backward against the reference's gradients and those against
// finite differences, the estimator's limits (unbiased kernel estimate, error ~ 1/sqrt(m)),
// thread-count determinism and bad knobs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "approx/random_features.h"
#include "ref/approx_features_ref.h"
#include "tessera/approx.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

struct Case {
  int64_t batch = 2, seq = 37, heads_q = 4, heads_kv = 2, dim = 16, features = 24;
  bool causal = false;
  bool given = false;  // projection passed as performer.projection
  double mult = 1.0;   // input scale
};

struct Problem {
  Case c;
  Tensor q, k, v, out, dout, proj;
  std::vector<float> w;  // [m, D], the draws the fast path uses
  ApproxParams params;
};

void Build(const Case& c, uint64_t seed, Problem* p) {
  p->c = c;
  Rng rng(seed);
  p->q = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  p->k = Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
  p->v = Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
  p->out = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  p->dout = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  p->q.FillNormal(rng, c.mult);
  p->k.FillNormal(rng, c.mult);
  p->v.FillNormal(rng);
  p->dout.FillNormal(rng);
  p->w.resize(static_cast<size_t>(c.features * c.dim));
  ApproxParams& a = p->params;
  a.method = ApproxMethod::kPerformer;
  a.q = p->q.view();
  a.k = p->k.view();
  a.v = p->v.view();
  a.out = p->out.view();
  a.causal = c.causal;
  a.seed = seed;
  a.performer.features = c.features;
  if (c.given) {
    p->proj = Tensor(DType::kF32, {c.features, c.dim});
    p->proj.FillNormal(rng);
    for (int64_t i = 0; i < c.features * c.dim; ++i) {
      p->w[static_cast<size_t>(i)] = static_cast<float>(p->proj.Get({i / c.dim, i % c.dim}));
    }
    a.performer.projection = p->proj.view();
  } else {
    approx::DrawOrthogonalGaussian(seed, c.features, c.dim, p->w.data());
  }
}

// |x - ref| <= atol * max|ref| + rtol * |ref| (kLinearCeilingF32: the engine's rule).
::testing::AssertionResult Near(const std::vector<double>& got, const std::vector<double>& ref,
                                const std::string& what) {
  double scale = 0.0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  const test::Ceiling c = test::kLinearCeilingF32;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = c.atol * scale + c.rtol * std::fabs(ref[i]);
    if (!(std::fabs(got[i] - ref[i]) <= tol)) {
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << got[i] << ", reference "
                                           << ref[i] << " (tol " << tol << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

void ExpectMatchesReference(const Case& c, const std::string& name) {
  SCOPED_TRACE(test::Repro(name));
  Problem p;
  Build(c, test::SeedFor(name), &p);
  ASSERT_TRUE(ApproxAttention(p.params, Context{}).ok());
  ASSERT_TRUE(p.out.AllFinite());
  std::vector<double> ref(static_cast<size_t>(p.out.numel()));
  ref::PerformerForwardF64(p.params, p.w.data(), ref.data());
  EXPECT_TRUE(Near(p.out.ToVector(), ref, "out"));
}

TEST(Performer, MatchesReference) {
  for (bool causal : {false, true}) {
    for (bool given : {false, true}) {
      Case c;
      c.causal = causal;
      c.given = given;
      ExpectMatchesReference(c, std::string("performer fwd causal") + (causal ? "1" : "0") +
                                    " given" + (given ? "1" : "0"));
    }
  }
}

TEST(Performer, ManyFeaturesInGroupsMatchReference) {
  // 600 features: two engine calls whose numerators and normalizers add.
  Case c;
  c.batch = 1;
  c.seq = 19;
  c.heads_q = 2;
  c.heads_kv = 1;
  c.dim = 8;
  c.features = 600;
  for (bool causal : {false, true}) {
    c.causal = causal;
    ExpectMatchesReference(c, std::string("performer groups causal") + (causal ? "1" : "0"));
  }
}

TEST(Performer, BackwardMatchesReference) {
  for (bool causal : {false, true}) {
    for (int64_t features : {int64_t{24}, int64_t{520}}) {
      const std::string name = std::string("performer bwd causal") + (causal ? "1" : "0") + " m" +
                               std::to_string(features);
      SCOPED_TRACE(test::Repro(name));
      Case c;
      c.causal = causal;
      c.features = features;
      if (features > 512) c.seq = 9, c.dim = 8;
      Problem p;
      Build(c, test::SeedFor(name), &p);
      Tensor dq(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
      Tensor dk(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
      Tensor dv(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
      ApproxBackwardParams bp;
      bp.forward = p.params;
      bp.dout = p.dout.view();
      bp.dq = dq.view();
      bp.dk = dk.view();
      bp.dv = dv.view();
      ASSERT_TRUE(ApproxAttentionBackward(bp, Context{}).ok());
      std::vector<double> rq(static_cast<size_t>(dq.numel())), rk(static_cast<size_t>(dk.numel())),
          rv(static_cast<size_t>(dv.numel()));
      ref::PerformerBackwardF64(bp, p.w.data(), rq.data(), rk.data(), rv.data());
      EXPECT_TRUE(Near(dq.ToVector(), rq, "dq"));
      EXPECT_TRUE(Near(dk.ToVector(), rk, "dk"));
      EXPECT_TRUE(Near(dv.ToVector(), rv, "dv"));
    }
  }
}

TEST(Performer, ReferenceBackwardMatchesFiniteDifferences) {
  for (bool causal : {false, true}) {
    const std::string name = std::string("performer fd causal") + (causal ? "1" : "0");
    SCOPED_TRACE(test::Repro(name));
    Case c;
    c.batch = 1, c.seq = 5, c.heads_q = 2, c.heads_kv = 1, c.dim = 3, c.features = 4;
    c.causal = causal;
    Problem p;
    Build(c, test::SeedFor(name), &p);
    // Inputs on the grid of multiples of 2^-9 keep the finite-difference steps exact.
    for (Tensor* t : {&p.q, &p.k, &p.v}) {
      t->ForEach(
          [&](const test::Index& i) { t->Set(i, std::nearbyint(t->Get(i) * 512.0) / 512.0); });
    }
    const std::vector<double> dout = p.dout.ToVector();
    auto loss = [&]() {
      std::vector<double> out(dout.size());
      ref::PerformerForwardF64(p.params, p.w.data(), out.data());
      double l = 0.0;
      for (size_t i = 0; i < out.size(); ++i) l += out[i] * dout[i];
      return l;
    };
    ApproxBackwardParams bp;
    bp.forward = p.params;
    bp.dout = p.dout.view();
    std::vector<double> dq(static_cast<size_t>(p.q.numel())), dk(static_cast<size_t>(p.k.numel())),
        dv(static_cast<size_t>(p.v.numel()));
    ref::PerformerBackwardF64(bp, p.w.data(), dq.data(), dk.data(), dv.data());
    const test::Ceiling fd = test::kFiniteDifferenceCeiling;
    const std::pair<Tensor*, const std::vector<double>*> grads[] = {
        {&p.q, &dq}, {&p.k, &dk}, {&p.v, &dv}};
    for (const auto& g : grads) {
      const std::vector<double> num = test::FiniteDifferenceGradient(g.first, loss);
      for (size_t i = 0; i < num.size(); ++i) {
        EXPECT_NEAR((*g.second)[i], num[i], fd.atol + fd.rtol * std::fabs(num[i])) << i;
      }
    }
  }
}

TEST(Performer, KernelEstimateIsUnbiased) {
  // mean over seeds of phi(q) . phi(k) -> exp(scale q . k), within kMonteCarloSigmas standard
  // errors of the mean.
  const int64_t d = 4, m = 8;
  const int draws = test::SmallTests() ? 500 : 2000;
  const double q[d] = {0.5, -0.25, 0.75, 0.125}, k[d] = {0.25, 0.5, -0.5, 0.375};
  const double scale = 0.5;
  double exact = 0.0;
  for (int64_t i = 0; i < d; ++i) exact += q[i] * k[i];
  exact = std::exp(scale * exact);
  std::vector<float> w(static_cast<size_t>(m * d));
  std::vector<double> pq(static_cast<size_t>(m)), pk(static_cast<size_t>(m));
  double sum = 0.0, sum_sq = 0.0;
  for (int s = 0; s < draws; ++s) {
    approx::DrawOrthogonalGaussian(test::BaseSeed() + static_cast<uint64_t>(s), m, d, w.data());
    ref::PerformerFeatureF64(q, d, w.data(), m, scale, pq.data());
    ref::PerformerFeatureF64(k, d, w.data(), m, scale, pk.data());
    double e = 0.0;
    for (int64_t i = 0; i < m; ++i) e += pq[static_cast<size_t>(i)] * pk[static_cast<size_t>(i)];
    sum += e;
    sum_sq += e * e;
  }
  const double mean = sum / draws;
  const double se = std::sqrt((sum_sq / draws - mean * mean) / draws);
  EXPECT_LE(std::fabs(mean - exact), test::kMonteCarloSigmas * se)
      << "mean " << mean << " exact " << exact << " se " << se;
}

TEST(Performer, ErrorFallsLikeOneOverRootM) {
  // The kernel matrix estimate phi(Q) phi(K)^T against exp(scale Q K^T), relative Frobenius
  // error averaged over seeds: from m = 16 to m = 256 it should fall 4x; kRootMRateSlack allows
  // half of that. Inputs of norm ~1: the estimator's variance grows like exp(|q' + k'|^2), and
  // with heavier tails the mean over a few seeds says little.
  const int64_t n = 16, d = 8, ms[2] = {16, 256};
  const int seeds = 8;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Rng rng(test::SeedFor("performer rate"));
  std::vector<double> q(static_cast<size_t>(n * d)), k(q.size());
  for (double& x : q) x = 0.5 * rng.Normal();
  for (double& x : k) x = 0.5 * rng.Normal();
  double err[2] = {0.0, 0.0};
  for (int i = 0; i < 2; ++i) {
    const int64_t m = ms[i];
    std::vector<float> w(static_cast<size_t>(m * d));
    std::vector<double> pq(static_cast<size_t>(n * m)), pk(pq.size());
    for (int s = 0; s < seeds; ++s) {
      approx::DrawOrthogonalGaussian(test::SeedFor("performer rate") + static_cast<uint64_t>(s), m,
                                     d, w.data());
      for (int64_t r = 0; r < n; ++r) {
        ref::PerformerFeatureF64(&q[static_cast<size_t>(r * d)], d, w.data(), m, scale,
                                 &pq[static_cast<size_t>(r * m)]);
        ref::PerformerFeatureF64(&k[static_cast<size_t>(r * d)], d, w.data(), m, scale,
                                 &pk[static_cast<size_t>(r * m)]);
      }
      double num = 0.0, den = 0.0;
      for (int64_t a = 0; a < n; ++a) {
        for (int64_t b = 0; b < n; ++b) {
          double dot = 0.0, est = 0.0;
          for (int64_t j = 0; j < d; ++j)
            dot += q[static_cast<size_t>(a * d + j)] * k[static_cast<size_t>(b * d + j)];
          for (int64_t j = 0; j < m; ++j)
            est += pq[static_cast<size_t>(a * m + j)] * pk[static_cast<size_t>(b * m + j)];
          const double exact = std::exp(scale * dot);
          num += (est - exact) * (est - exact);
          den += exact * exact;
        }
      }
      err[i] += std::sqrt(num / den) / seeds;
    }
  }
  const double expected = std::sqrt(static_cast<double>(ms[1]) / static_cast<double>(ms[0]));
  EXPECT_LE(err[1] * expected, test::kRootMRateSlack * err[0])
      << "m=16: " << err[0] << " m=256: " << err[1];
  EXPECT_LT(err[1], err[0]);
}

TEST(Performer, DeterministicAcrossThreadCounts) {
  Case c;
  c.causal = true;
  c.seq = 300;  // several row chunks per head
  Problem a, b;
  Build(c, test::SeedFor("performer threads"), &a);
  Build(c, test::SeedFor("performer threads"), &b);
  Context one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  ASSERT_TRUE(ApproxAttention(a.params, one).ok());
  ASSERT_TRUE(ApproxAttention(b.params, two).ok());
  EXPECT_TRUE(a.out.BitwiseEqual(b.out));
}

TEST(Performer, BadKnobsAreErrorsAndWriteNothing) {
  Case c;
  Problem p;
  Build(c, test::SeedFor("performer bad"), &p);
  Tensor lse(DType::kF32, {c.batch, c.heads_q, c.seq});
  Tensor wrong(DType::kF32, {c.features, c.dim + 1});
  wrong.FillSlots(0.0);
  struct Bad {
    const char* field;
    std::function<void(ApproxParams*)> edit;
  };
  const Bad bad[] = {
      {"performer.features", [](ApproxParams* a) { a->performer.features = 0; }},
      {"performer.features", [](ApproxParams* a) { a->performer.features = 9000; }},
      {"performer.projection", [&](ApproxParams* a) { a->performer.projection = wrong.view(); }},
      {"scale", [](ApproxParams* a) { a->scale = -1.0f; }},
      {"lse", [&](ApproxParams* a) { a->lse = lse.view(); }},
  };
  p.out.Snapshot();
  for (const Bad& b : bad) {
    ApproxParams a = p.params;
    b.edit(&a);
    const Status s = ApproxAttention(a, Context{});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(s.message().find(b.field), std::string::npos) << s.message();
    EXPECT_TRUE(p.out.Unchanged()) << b.field;
  }
}

}  // namespace
}  // namespace tessera
