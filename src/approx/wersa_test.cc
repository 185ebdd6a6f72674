// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/wersa.cc: the fast path against the fp64 reference of the same algorithm
// with the same projection (gates, level weights, causal and not, GQA, lengths that are not a
// power of two), the backward against the reference's gradients, the identity limit (unit gates
// and weights: plain random-feature linear attention with the same W), no leakage from future
// tokens in the causal form, and bad knobs.
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
#include "tessera/linear.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

struct Case {
  int64_t batch = 2, seq = 37, heads_q = 4, heads_kv = 2, dim = 16, features = 24, levels = 3;
  bool causal = false;
  bool gates = true, weights = true;
  bool unit_gates = false;  // a gates tensor of ones
};

struct Problem {
  Tensor q, k, v, out, dout, gates, weights;
  std::vector<float> w;  // [D, r]
  ApproxParams params;
};

void Build(const Case& c, uint64_t seed, Problem* p) {
  Rng rng(seed);
  p->q = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  p->k = Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
  p->v = Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
  p->out = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  p->dout = Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  for (Tensor* t : {&p->q, &p->k, &p->v, &p->dout}) t->FillNormal(rng);
  ApproxParams& a = p->params;
  a.method = ApproxMethod::kWersa;
  a.q = p->q.view();
  a.k = p->k.view();
  a.v = p->v.view();
  a.out = p->out.view();
  a.causal = c.causal;
  a.seed = seed;
  a.wersa.levels = c.levels;
  a.wersa.features = c.features;
  a.wersa.bandwidth = 2.0f;
  if (c.gates || c.unit_gates) {
    p->gates = Tensor(DType::kF32, {c.batch, c.seq, c.levels});
    p->gates.ForEach(
        [&](const test::Index& i) { p->gates.Set(i, c.unit_gates ? 1.0 : rng.Uniform(0.0, 1.5)); });
    a.wersa.gates = p->gates.view();
  }
  if (c.weights) {
    p->weights = Tensor(DType::kF32, {c.levels});
    p->weights.ForEach([&](const test::Index& i) { p->weights.Set(i, rng.Uniform(0.25, 2.0)); });
    a.wersa.level_weights = p->weights.view();
  }
  p->w.resize(static_cast<size_t>(c.dim * c.features));
  approx::DrawGaussian(seed, c.dim, c.features, p->w.data());
}

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

TEST(Wersa, MatchesReference) {
  for (bool causal : {false, true}) {
    for (int64_t levels : {int64_t{1}, int64_t{3}, int64_t{7}}) {
      const std::string name =
          std::string("wersa fwd causal") + (causal ? "1" : "0") + " L" + std::to_string(levels);
      SCOPED_TRACE(test::Repro(name));
      Case c;
      c.causal = causal;
      c.levels = levels;
      Problem p;
      Build(c, test::SeedFor(name), &p);
      ASSERT_TRUE(ApproxAttention(p.params, Context{}).ok());
      std::vector<double> ref(static_cast<size_t>(p.out.numel()));
      ref::WersaForwardF64(p.params, p.w.data(), ref.data());
      EXPECT_TRUE(Near(p.out.ToVector(), ref, "out"));
    }
  }
}

TEST(Wersa, GivenProjectionMatchesReference) {
  Case c;
  c.causal = true;
  Problem p;
  Build(c, test::SeedFor("wersa given"), &p);
  Tensor proj(DType::kF32, {c.dim, c.features});
  Rng rng(test::SeedFor("wersa given w"));
  proj.FillNormal(rng);
  for (int64_t i = 0; i < c.dim * c.features; ++i) {
    p.w[static_cast<size_t>(i)] = static_cast<float>(proj.Get({i / c.features, i % c.features}));
  }
  p.params.wersa.projection = proj.view();
  ASSERT_TRUE(ApproxAttention(p.params, Context{}).ok());
  std::vector<double> ref(static_cast<size_t>(p.out.numel()));
  ref::WersaForwardF64(p.params, p.w.data(), ref.data());
  EXPECT_TRUE(Near(p.out.ToVector(), ref, "out"));
}

TEST(Wersa, BackwardMatchesReference) {
  for (bool causal : {false, true}) {
    const std::string name = std::string("wersa bwd causal") + (causal ? "1" : "0");
    SCOPED_TRACE(test::Repro(name));
    Case c;
    c.causal = causal;
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
    ref::WersaBackwardF64(bp, p.w.data(), rq.data(), rk.data(), rv.data());
    EXPECT_TRUE(Near(dq.ToVector(), rq, "dq"));
    EXPECT_TRUE(Near(dk.ToVector(), rk, "dk"));
    EXPECT_TRUE(Near(dv.ToVector(), rv, "dv"));
  }
}

TEST(Wersa, UnitGatesEqualPlainRandomFeatureAttention) {
  // Haar analysis + synthesis with every detail kept is the identity: WERSA is then normalized
  // linear attention on relu(x W / bw) / sqrt(r), computed here through the engine directly.
  for (int64_t levels : {int64_t{1}, int64_t{3}}) {
    for (bool causal : {false, true}) {
      const std::string name =
          std::string("wersa unit L") + std::to_string(levels) + (causal ? " causal" : "");
      SCOPED_TRACE(test::Repro(name));
      Case c;
      c.levels = levels;
      c.causal = causal;
      c.gates = false;
      c.weights = false;
      c.unit_gates = true;
      Problem p;
      Build(c, test::SeedFor(name), &p);
      ASSERT_TRUE(ApproxAttention(p.params, Context{}).ok());
      const float bw = p.params.wersa.bandwidth;
      auto features = [&](const Tensor& x) {
        Tensor f(DType::kF32, {x.shape(0), x.shape(1), x.shape(2), c.features});
        f.ForEach([&](const test::Index& i) {
          double y = 0.0;
          for (int64_t d = 0; d < c.dim; ++d) {
            y +=
                x.Get({i[0], i[1], i[2], d}) / bw * p.w[static_cast<size_t>(d * c.features + i[3])];
          }
          f.Set(i, std::max(y, 0.0) / std::sqrt(static_cast<double>(c.features)));
        });
        return f;
      };
      const Tensor fq = features(p.q), fk = features(p.k);
      Tensor expect(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
      LinearAttentionParams lp;
      lp.q = fq.view();
      lp.k = fk.view();
      lp.v = p.v.view();
      lp.out = expect.view();
      lp.scale = 1.0f;
      lp.causal = causal;
      lp.normalize = true;
      lp.eps = approx::kFeatureEps;
      ASSERT_TRUE(LinearAttentionForward(lp, Context{}).ok());
      const test::Ceiling id = test::IdentityCeiling(DType::kF32);
      const std::vector<double> got = p.out.ToVector(), want = expect.ToVector();
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got[i], want[i], id.atol + id.rtol * std::fabs(want[i])) << i;
      }
    }
  }
}

TEST(Wersa, CausalDoesNotLeakFutureTokens) {
  Case c;
  c.causal = true;
  c.seq = 200;  // chunks of 128 tokens with a halo
  c.levels = 4;
  Problem a, b;
  Build(c, test::SeedFor("wersa leak"), &a);
  Build(c, test::SeedFor("wersa leak"), &b);
  const int64_t t_star = 150;
  for (int64_t h = 0; h < c.heads_kv; ++h) {
    for (int64_t d = 0; d < c.dim; ++d) {
      b.k.Set({1, t_star, h, d}, 5.0);
      b.v.Set({1, t_star, h, d}, -7.0);
    }
  }
  for (int64_t h = 0; h < c.heads_q; ++h) b.q.Set({1, t_star, h, 0}, 9.0);
  for (int64_t l = 0; l < c.levels; ++l) b.gates.Set({1, t_star, l}, 0.0);
  ASSERT_TRUE(ApproxAttention(a.params, Context{}).ok());
  ASSERT_TRUE(ApproxAttention(b.params, Context{}).ok());
  for (int64_t bb = 0; bb < c.batch; ++bb) {
    for (int64_t t = 0; t < c.seq; ++t) {
      bool same = true;
      for (int64_t h = 0; h < c.heads_q; ++h) {
        for (int64_t d = 0; d < c.dim; ++d) {
          same = same && a.out.Get({bb, t, h, d}) == b.out.Get({bb, t, h, d});
        }
      }
      if (bb == 0 || t < t_star) {
        EXPECT_TRUE(same) << "batch " << bb << " token " << t;
      } else if (t == t_star) {
        EXPECT_FALSE(same) << "the changed token itself";
      }
    }
  }
}

TEST(Wersa, DeterministicAcrossThreadCounts) {
  Case c;
  c.causal = true;
  c.seq = 300;
  Problem a, b;
  Build(c, test::SeedFor("wersa threads"), &a);
  Build(c, test::SeedFor("wersa threads"), &b);
  Context one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  ASSERT_TRUE(ApproxAttention(a.params, one).ok());
  ASSERT_TRUE(ApproxAttention(b.params, two).ok());
  EXPECT_TRUE(a.out.BitwiseEqual(b.out));
}

TEST(Wersa, BadKnobsAreErrorsAndWriteNothing) {
  Case c;
  Problem p;
  Build(c, test::SeedFor("wersa bad"), &p);
  Tensor lse(DType::kF32, {c.batch, c.heads_q, c.seq});
  Tensor short_gates(DType::kF32, {c.batch, c.seq, c.levels - 1});
  Tensor wrong_weights(DType::kF32, {c.levels + 1});
  Tensor wrong_proj(DType::kF32, {c.features, c.dim});
  for (Tensor* t : {&short_gates, &wrong_weights, &wrong_proj}) t->FillSlots(1.0);
  struct Bad {
    const char* field;
    std::function<void(ApproxParams*)> edit;
  };
  const Bad bad[] = {
      {"wersa.levels", [](ApproxParams* a) { a->wersa.levels = 0; }},
      {"wersa.levels", [](ApproxParams* a) { a->wersa.levels = 31; }},
      {"wersa.features", [](ApproxParams* a) { a->wersa.features = 0; }},
      {"wersa.bandwidth", [](ApproxParams* a) { a->wersa.bandwidth = 0.0f; }},
      {"wersa.bandwidth", [](ApproxParams* a) { a->wersa.bandwidth = INFINITY; }},
      {"wersa.gates", [&](ApproxParams* a) { a->wersa.gates = short_gates.view(); }},
      {"wersa.level_weights",
       [&](ApproxParams* a) { a->wersa.level_weights = wrong_weights.view(); }},
      {"wersa.projection", [&](ApproxParams* a) { a->wersa.projection = wrong_proj.view(); }},
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
