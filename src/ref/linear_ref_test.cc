// SPDX-License-Identifier: Apache-2.0
// Tests of the fp64 linear attention reference alone (no kernel): the parallel form it computes
// must equal a scalar recurrent form written here from the other definition (S_t = a_t S_{t-1} +
// phi(k_t) v_t^T, o_t = scale phi(q_t)^T S_t), hand-computed values, the Taylor identity, the
// exact attention reference for BASED's window, and finite differences for its gradients.
#include "ref/linear_ref.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ref/attention_ref.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Ceiling;
using test::Index;
using test::Rng;
using test::Tensor;

enum class Mask { kCausal, kNonCausal, kPrefix };
enum class Decay { kNone, kLambda, kGla };
// Gate distributions (log space): near 0 (decay ~1, the unstable regime of fla#389), moderate,
// very negative (the state is all but erased each token), and each gate one of the extremes.
enum class Gates { kNearZero, kModerate, kVeryNegative, kMixed };

const char* MapName(LinearFeatureMap m) {
  switch (m) {
    case LinearFeatureMap::kIdentity:
      return "identity";
    case LinearFeatureMap::kElu1:
      return "elu1";
    case LinearFeatureMap::kRelu:
      return "relu";
    case LinearFeatureMap::kTaylor2:
      return "taylor2";
  }
  return "?";
}

constexpr LinearFeatureMap kMaps[] = {LinearFeatureMap::kIdentity, LinearFeatureMap::kElu1,
                                      LinearFeatureMap::kRelu, LinearFeatureMap::kTaylor2};
constexpr int64_t kLengths[] = {1, 17, 63, 65};

struct Spec {
  int64_t batch = 2, seq = 17, heads_q = 4, heads_kv = 2, dk = 5, dv = 3;
  LinearFeatureMap map = LinearFeatureMap::kIdentity;
  bool normalize = false;
  Mask mask = Mask::kCausal;
  int64_t prefix = 0;  // kPrefix only
  Decay decay = Decay::kNone;
  Gates gates = Gates::kModerate;  // kGla only
  bool scalar_gates = false;       // kGla only: gates [B, S, Hq], one per token and head
  bool initial_state = false;      // initial_state, and initial_normalizer with normalize
  bool positive = false;           // q, k > 0: keeps the identity map's normalizer away from 0
  std::optional<float> scale;
  int64_t window = 0;

  std::string Name() const {
    std::string n = std::string(MapName(map)) + " B" + std::to_string(batch) + " S" +
                    std::to_string(seq) + " H" + std::to_string(heads_q) + "/" +
                    std::to_string(heads_kv) + " Dk" + std::to_string(dk) + " Dv" +
                    std::to_string(dv);
    if (normalize) n += " normalize";
    if (mask == Mask::kNonCausal) n += " non-causal";
    if (mask == Mask::kPrefix) n += " prefix" + std::to_string(prefix);
    if (decay == Decay::kLambda) n += " decay";
    if (decay == Decay::kGla) n += " gla" + std::to_string(static_cast<int>(gates));
    if (decay == Decay::kGla && scalar_gates) n += " scalar";
    if (initial_state) n += " state";
    if (positive) n += " positive";
    if (scale.has_value()) n += " scale" + std::to_string(*scale);
    if (window > 0) n += " window" + std::to_string(window);
    return n;
  }
};

int64_t FeatureDim(const Spec& s) {
  return s.map == LinearFeatureMap::kTaylor2 ? 1 + s.dk + s.dk * s.dk : s.dk;
}

struct Inputs {
  Tensor q, k, v, dout, decay, gates, s0, z0;
};

// On the grid every value is a multiple of 2^-12 with |x| >= 2^-6, so x +- 2^-8 and x +- 2^-9
// (the finite-difference steps) are exact in f32 and never cross the kink of relu or elu + 1.
double OnGrid(double x) {
  const double g = std::nearbyint(x * 4096.0) / 4096.0;
  if (std::fabs(g) >= 1.0 / 64.0) return g;
  return g < 0.0 ? -1.0 / 64.0 : 1.0 / 64.0;
}

Inputs MakeInputs(const Spec& s, uint64_t seed, bool grid = false, DType dtype = DType::kF32) {
  Rng rng(seed);
  const int64_t f = FeatureDim(s);
  Inputs in;
  in.q = Tensor(dtype, {s.batch, s.seq, s.heads_q, s.dk});
  in.k = Tensor(dtype, {s.batch, s.seq, s.heads_kv, s.dk});
  in.v = Tensor(dtype, {s.batch, s.seq, s.heads_kv, s.dv});
  in.dout = Tensor(DType::kF32, {s.batch, s.seq, s.heads_q, s.dv});
  auto fill = [&](Tensor* t, bool positive) {
    t->ForEach([&](const Index& i) {
      double x = rng.Normal();
      if (positive) x = std::fabs(x) + 0.25;
      t->Set(i, grid ? OnGrid(x) : x);
    });
  };
  fill(&in.q, s.positive);
  fill(&in.k, s.positive);
  fill(&in.v, false);
  fill(&in.dout, false);
  if (s.decay == Decay::kLambda) {
    // One lambda per head, cycling through no decay, mild, strong and near-total decay.
    const double lambdas[] = {1.0, 0.9, 0.5, 0.05};
    in.decay = Tensor(DType::kF32, {s.heads_q});
    for (int64_t h = 0; h < s.heads_q; ++h) in.decay.Set({h}, lambdas[h % 4]);
  }
  if (s.decay == Decay::kGla) {
    in.gates = s.scalar_gates ? Tensor(DType::kF32, {s.batch, s.seq, s.heads_q})
                              : Tensor(DType::kF32, {s.batch, s.seq, s.heads_q, s.dk});
    in.gates.ForEach([&](const Index& i) {
      double g = 0.0;
      switch (s.gates) {
        case Gates::kNearZero:
          g = rng.Uniform(-0.02, -0.001);
          break;
        case Gates::kModerate:
          g = rng.Uniform(-1.0, -0.02);
          break;
        case Gates::kVeryNegative:
          g = rng.Uniform(-21.0, -19.0);
          break;
        case Gates::kMixed:
          g = rng.UniformInt(0, 1) == 0 ? rng.Uniform(-0.02, -0.001) : rng.Uniform(-21.0, -19.0);
          break;
      }
      in.gates.Set(i, grid ? OnGrid(g) : g);
    });
  }
  if (s.initial_state) {
    in.s0 = Tensor(DType::kF32, {s.batch, s.heads_q, f, s.dv});
    fill(&in.s0, false);
    // A normalizer of a state built from positive features is positive.
    in.z0 = Tensor(DType::kF32, {s.batch, s.heads_q, f});
    fill(&in.z0, true);
  }
  return in;
}

LinearAttentionParams Params(const Spec& s, const Inputs& in) {
  LinearAttentionParams p;
  p.q = in.q.view();
  p.k = in.k.view();
  p.v = in.v.view();
  p.feature_map = s.map;
  p.scale = s.scale;
  p.causal = s.mask != Mask::kNonCausal;
  p.prefix_len = s.mask == Mask::kPrefix ? s.prefix : 0;
  p.normalize = s.normalize;
  if (s.decay == Decay::kLambda) p.decay = in.decay.view();
  if (s.decay == Decay::kGla) p.gates = in.gates.view();
  if (s.initial_state) {
    p.initial_state = in.s0.view();
    if (s.normalize) p.initial_normalizer = in.z0.view();
  }
  p.window = s.window;
  return p;
}

struct Result {
  std::vector<double> out, state, norm;
};

Result RunRef(const Spec& s, const LinearAttentionParams& p) {
  const int64_t f = FeatureDim(s);
  Result r;
  r.out.assign(static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dv), 0.0);
  r.state.assign(static_cast<size_t>(s.batch * s.heads_q * f * s.dv), 0.0);
  r.norm.assign(static_cast<size_t>(s.batch * s.heads_q * f), 0.0);
  ref::LinearForwardF64(p, r.out.data(), r.state.data(), r.norm.data());
  return r;
}

// ---------------------------------------------------------------------------------------------
// The recurrent oracle: token by token, a state per (sequence, query head), features computed
// here from their definitions.

std::vector<double> Phi(LinearFeatureMap map, const std::vector<double>& x) {
  const size_t n = x.size();
  std::vector<double> phi;
  switch (map) {
    case LinearFeatureMap::kIdentity:
      return x;
    case LinearFeatureMap::kElu1:
      for (double e : x) phi.push_back(e > 0.0 ? 1.0 + e : std::exp(e));
      return phi;
    case LinearFeatureMap::kRelu:
      for (double e : x) phi.push_back(std::max(e, 0.0));
      return phi;
    case LinearFeatureMap::kTaylor2: {
      const double dk = static_cast<double>(n);
      phi.push_back(1.0);
      for (double e : x) phi.push_back(e / std::sqrt(std::sqrt(dk)));
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < n; ++j) phi.push_back(x[i] * x[j] / std::sqrt(2.0 * dk));
      }
      return phi;
    }
  }
  return phi;
}

std::vector<double> Row(const Tensor& t, int64_t b, int64_t i, int64_t h) {
  std::vector<double> r(static_cast<size_t>(t.shape(3)));
  for (int64_t c = 0; c < t.shape(3); ++c) r[static_cast<size_t>(c)] = t.Get({b, i, h, c});
  return r;
}

Result Recurrent(const Spec& s, const Inputs& in) {
  const int64_t f = FeatureDim(s), group = s.heads_q / s.heads_kv;
  const double scale = s.scale.has_value() ? *s.scale
                       : s.map == LinearFeatureMap::kTaylor2
                           ? 1.0
                           : static_cast<double>(static_cast<float>(1.0 / std::sqrt(double(s.dk))));
  const double eps = static_cast<double>(LinearAttentionParams().eps);
  // Keys [0, visible_first) are in the state before any query reads it.
  const int64_t visible_first = s.mask == Mask::kNonCausal ? s.seq
                                : s.mask == Mask::kPrefix  ? s.prefix
                                                           : 0;
  Result r;
  r.out.assign(static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dv), 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads_q; ++h) {
      std::vector<double> state(static_cast<size_t>(f * s.dv), 0.0), z(static_cast<size_t>(f), 0.0);
      if (s.initial_state) {
        for (int64_t c = 0; c < f; ++c) {
          for (int64_t d = 0; d < s.dv; ++d) state[size_t(c * s.dv + d)] = in.s0.Get({b, h, c, d});
          if (s.normalize) z[size_t(c)] = in.z0.Get({b, h, c});
        }
      }
      auto add = [&](int64_t t, bool decayed) {
        const std::vector<double> fk = Phi(s.map, Row(in.k, b, t, h / group));
        const std::vector<double> v = Row(in.v, b, t, h / group);
        for (int64_t c = 0; c < f; ++c) {
          double a = 1.0;
          if (decayed && s.decay == Decay::kLambda) a = in.decay.Get({h});
          // (A rank-3 tensor ignores the channel index: scalar gates.)
          if (decayed && s.decay == Decay::kGla) a = std::exp(in.gates.Get({b, t, h, c}));
          z[size_t(c)] = a * z[size_t(c)] + fk[size_t(c)];
          for (int64_t d = 0; d < s.dv; ++d) {
            state[size_t(c * s.dv + d)] =
                a * state[size_t(c * s.dv + d)] + fk[size_t(c)] * v[size_t(d)];
          }
        }
      };
      // Prefix and non-causal forms have no decay: these keys enter undecayed.
      for (int64_t t = 0; t < visible_first; ++t) add(t, false);
      for (int64_t t = 0; t < s.seq; ++t) {
        if (t >= visible_first) add(t, true);
        const std::vector<double> fq = Phi(s.map, Row(in.q, b, t, h));
        double den = 0.0;
        for (int64_t c = 0; c < f; ++c) den += scale * fq[size_t(c)] * z[size_t(c)];
        for (int64_t d = 0; d < s.dv; ++d) {
          double o = 0.0;
          for (int64_t c = 0; c < f; ++c) o += scale * fq[size_t(c)] * state[size_t(c * s.dv + d)];
          r.out[size_t(((b * s.seq + t) * s.heads_q + h) * s.dv + d)] =
              s.normalize ? o / (den + eps) : o;
        }
      }
      r.state.insert(r.state.end(), state.begin(), state.end());
      r.norm.insert(r.norm.end(), z.begin(), z.end());
    }
  }
  return r;
}

void ExpectMatchesRecurrent(const Spec& s, uint64_t seed) {
  SCOPED_TRACE(s.Name());
  const Inputs in = MakeInputs(s, seed);
  const Result got = RunRef(s, Params(s, in));
  const Result want = Recurrent(s, in);
  EXPECT_TRUE(test::CheckClose(got.out, want.out, test::kLinearFp64Agreement, "out"));
  EXPECT_TRUE(test::CheckClose(got.state, want.state, test::kLinearFp64Agreement, "final state"));
  EXPECT_TRUE(
      test::CheckClose(got.norm, want.norm, test::kLinearFp64Agreement, "final normalizer"));
}

// ---------------------------------------------------------------------------------------------
// Feature maps and hand-computed values.

TEST(LinearRef, FeatureDim) {
  for (int64_t dk : {1, 2, 16, 64}) {
    EXPECT_EQ(ref::LinearFeatureDimF64(LinearFeatureMap::kIdentity, dk), dk);
    EXPECT_EQ(ref::LinearFeatureDimF64(LinearFeatureMap::kElu1, dk), dk);
    EXPECT_EQ(ref::LinearFeatureDimF64(LinearFeatureMap::kRelu, dk), dk);
    EXPECT_EQ(ref::LinearFeatureDimF64(LinearFeatureMap::kTaylor2, dk), 1 + dk + dk * dk);
  }
}

TEST(LinearRef, ElementwiseFeatureMaps) {
  const std::vector<double> x = {-2.0, -0.5, 0.0, 0.75, 3.0};
  std::vector<double> phi(x.size());
  ref::LinearFeatureF64(LinearFeatureMap::kIdentity, x.data(), 5, phi.data());
  EXPECT_EQ(phi, x);
  ref::LinearFeatureF64(LinearFeatureMap::kElu1, x.data(), 5, phi.data());
  EXPECT_EQ(phi, (std::vector<double>{std::exp(-2.0), std::exp(-0.5), 1.0, 1.75, 4.0}));
  ref::LinearFeatureF64(LinearFeatureMap::kRelu, x.data(), 5, phi.data());
  EXPECT_EQ(phi, (std::vector<double>{0.0, 0.0, 0.0, 0.75, 3.0}));
}

TEST(LinearRef, TaylorFeaturesGiveTheSecondOrderExpansion) {
  Rng rng(7);
  for (int64_t dk : {1, 2, 3, 16, 40}) {
    SCOPED_TRACE("Dk " + std::to_string(dk));
    const int64_t f = ref::LinearFeatureDimF64(LinearFeatureMap::kTaylor2, dk);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<double> q(static_cast<size_t>(dk)), k(static_cast<size_t>(dk));
      const double mult = trial < 10 ? 1.0 : 2.5;  // s up to several units
      for (auto& e : q) e = mult * rng.Normal();
      for (auto& e : k) e = mult * rng.Normal();
      std::vector<double> fq(static_cast<size_t>(f)), fk(static_cast<size_t>(f));
      ref::LinearFeatureF64(LinearFeatureMap::kTaylor2, q.data(), dk, fq.data());
      ref::LinearFeatureF64(LinearFeatureMap::kTaylor2, k.data(), dk, fk.data());
      double dot = 0.0, qk = 0.0;
      for (int64_t c = 0; c < f; ++c) dot += fq[size_t(c)] * fk[size_t(c)];
      for (int64_t c = 0; c < dk; ++c) qk += q[size_t(c)] * k[size_t(c)];
      const double s = qk / std::sqrt(static_cast<double>(dk));
      const double want = 1.0 + s + s * s / 2.0;
      EXPECT_NEAR(dot, want, 1e-12 * std::max(1.0, std::fabs(want))) << "s = " << s;
    }
  }
}

TEST(LinearRef, TaylorForwardOfOneTokenIsTheExpansionWithUnitScale) {
  // One token, v = 1, default scale (1 for the Taylor map): out = 1 + s + s^2 / 2 of the f32 q, k.
  Spec s;
  s.batch = 1;
  s.seq = 1;
  s.heads_q = s.heads_kv = 1;
  s.dk = 16;
  s.dv = 1;
  s.map = LinearFeatureMap::kTaylor2;
  Inputs in = MakeInputs(s, 3);
  in.v.Set({0, 0, 0, 0}, 1.0);
  double qk = 0.0;
  for (int64_t c = 0; c < s.dk; ++c) qk += in.q.Get({0, 0, 0, c}) * in.k.Get({0, 0, 0, c});
  const double sc = qk / 4.0;
  EXPECT_NEAR(RunRef(s, Params(s, in)).out[0], 1.0 + sc + sc * sc / 2.0, 1e-12);
}

TEST(LinearRef, DefaultAndExplicitScale) {
  // The default is the float nearest 1/sqrt(Dk) (the scale parameter is a float).
  Spec s;
  s.batch = s.seq = s.heads_q = s.heads_kv = s.dv = 1;
  s.dk = 3;
  Inputs in = MakeInputs(s, 5);
  double qk = 0.0;
  for (int64_t c = 0; c < s.dk; ++c) qk += in.q.Get({0, 0, 0, c}) * in.k.Get({0, 0, 0, c});
  const double v = in.v.Get({0, 0, 0, 0});
  const double default_scale = static_cast<float>(1.0 / std::sqrt(3.0));
  EXPECT_DOUBLE_EQ(RunRef(s, Params(s, in)).out[0], default_scale * qk * v);
  s.scale = -0.7f;
  EXPECT_DOUBLE_EQ(RunRef(s, Params(s, in)).out[0], static_cast<double>(-0.7f) * qk * v);
}

// One head, Dk = Dv = 1, scale 1, q = [1, 2], k = [3, 1], v = [2, 5], S0 = 7, z0 = 2.
struct Tiny {
  Spec spec;
  Inputs in;
};

Tiny MakeTiny(Decay decay) {
  Tiny t;
  Spec& s = t.spec;
  s.batch = s.heads_q = s.heads_kv = s.dk = s.dv = 1;
  s.seq = 2;
  s.scale = 1.0f;
  s.decay = decay;
  s.initial_state = true;
  t.in = MakeInputs(s, 1);
  t.in.q.FromVector({1.0, 2.0});
  t.in.k.FromVector({3.0, 1.0});
  t.in.v.FromVector({2.0, 5.0});
  t.in.s0.FromVector({7.0});
  t.in.z0.FromVector({2.0});
  if (decay == Decay::kLambda) t.in.decay.FromVector({0.5});
  if (decay == Decay::kGla) t.in.gates.FromVector({-0.5, -0.25});
  return t;
}

TEST(LinearRef, HandComputedDecay) {
  // Token r's decay applies to everything before r, the initial state included.
  Tiny t = MakeTiny(Decay::kLambda);
  Result r = RunRef(t.spec, Params(t.spec, t.in));
  EXPECT_DOUBLE_EQ(r.out[0], 6.0 + 0.5 * 7.0);
  EXPECT_DOUBLE_EQ(r.out[1], 0.5 * 12.0 + 10.0 + 0.25 * 14.0);
  EXPECT_DOUBLE_EQ(r.state[0], 0.5 * 6.0 + 5.0 + 0.25 * 7.0);
  EXPECT_DOUBLE_EQ(r.norm[0], 0.5 * 3.0 + 1.0);  // no initial normalizer without normalize
  t.spec.initial_state = false;
  r = RunRef(t.spec, Params(t.spec, t.in));
  EXPECT_DOUBLE_EQ(r.out[1], 0.5 * 12.0 + 10.0);
  EXPECT_DOUBLE_EQ(r.state[0], 0.5 * 6.0 + 5.0);
}

TEST(LinearRef, HandComputedGatesWithNormalize) {
  Tiny t = MakeTiny(Decay::kGla);
  const double e0 = std::exp(-0.5), e1 = std::exp(-0.25), e01 = std::exp(-0.75);
  Result r = RunRef(t.spec, Params(t.spec, t.in));
  EXPECT_NEAR(r.out[0], 6.0 + 7.0 * e0, 1e-14);
  EXPECT_NEAR(r.out[1], 12.0 * e1 + 10.0 + 14.0 * e01, 1e-14);
  EXPECT_NEAR(r.state[0], 6.0 * e1 + 5.0 + 7.0 * e01, 1e-14);
  t.spec.normalize = true;
  r = RunRef(t.spec, Params(t.spec, t.in));
  const double eps = static_cast<double>(1e-6f);
  EXPECT_NEAR(r.out[0], (6.0 + 7.0 * e0) / (3.0 + 2.0 * e0 + eps), 1e-14);
  EXPECT_NEAR(r.out[1], (12.0 * e1 + 10.0 + 14.0 * e01) / (6.0 * e1 + 2.0 + 4.0 * e01 + eps),
              1e-14);
  EXPECT_NEAR(r.norm[0], 3.0 * e1 + 1.0 + 2.0 * e01, 1e-14);
}

// ---------------------------------------------------------------------------------------------
// Parallel = recurrent, every variant.

TEST(LinearRef, PlainMatchesRecurrent) {
  for (int64_t len : kLengths) {
    for (LinearFeatureMap map : kMaps) {
      for (bool normalize : {false, true}) {
        for (Mask mask : {Mask::kCausal, Mask::kNonCausal, Mask::kPrefix}) {
          // Prefix lengths: one key, a third, everything.
          std::vector<int64_t> prefixes = {0};
          if (mask == Mask::kPrefix) prefixes = {1, len / 3, len};
          for (int64_t prefix : prefixes) {
            Spec s;
            s.seq = len;
            s.map = map;
            s.dk = map == LinearFeatureMap::kTaylor2 ? 4 : 5;
            s.normalize = normalize;
            s.mask = mask;
            s.prefix = prefix;
            ExpectMatchesRecurrent(s, 100 + static_cast<uint64_t>(len));
          }
        }
      }
    }
  }
}

TEST(LinearRef, DecayMatchesRecurrent) {
  for (int64_t len : kLengths) {
    for (LinearFeatureMap map : kMaps) {
      for (bool normalize : {false, true}) {
        Spec s;
        s.seq = len;
        s.map = map;
        s.dk = map == LinearFeatureMap::kTaylor2 ? 3 : 5;
        s.normalize = normalize;
        s.decay = Decay::kLambda;
        ExpectMatchesRecurrent(s, 200 + static_cast<uint64_t>(len));
      }
    }
  }
}

TEST(LinearRef, GatesMatchRecurrent) {
  for (int64_t len : kLengths) {
    for (Gates g : {Gates::kNearZero, Gates::kModerate, Gates::kVeryNegative, Gates::kMixed}) {
      for (bool normalize : {false, true}) {
        Spec s;
        s.seq = len;
        s.decay = Decay::kGla;
        s.gates = g;
        s.normalize = normalize;
        s.positive = normalize;
        ExpectMatchesRecurrent(s, 300 + static_cast<uint64_t>(len));
        s.scalar_gates = true;
        ExpectMatchesRecurrent(s, 350 + static_cast<uint64_t>(len));
      }
    }
  }
}

// Scalar gates [B, S, Hq] are the per-channel gates [B, S, Hq, Dk] with every channel alike:
// outputs, states and gradients (dgates summed over the channels) agree.
TEST(LinearRef, ScalarGatesArePerChannelGatesRepeated) {
  for (bool normalize : {false, true}) {
    Spec s;
    s.seq = 19;
    s.decay = Decay::kGla;
    s.gates = Gates::kMixed;
    s.scalar_gates = true;
    s.normalize = normalize;
    s.positive = normalize;
    s.initial_state = true;
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s, 41);
    Tensor wide(DType::kF32, {s.batch, s.seq, s.heads_q, s.dk});
    wide.ForEach([&](const Index& i) { wide.Set(i, in.gates.Get({i[0], i[1], i[2], 0})); });
    LinearAttentionParams scalar = Params(s, in), channels = scalar;
    channels.gates = wide.view();
    const Result a = RunRef(s, scalar), b = RunRef(s, channels);
    EXPECT_TRUE(test::CheckClose(a.out, b.out, test::kLinearFp64Agreement, "out"));
    EXPECT_TRUE(test::CheckClose(a.state, b.state, test::kLinearFp64Agreement, "state"));

    Spec gs = s;
    gs.initial_state = false;
    LinearAttentionBackwardParams bs;
    bs.forward = Params(gs, in);
    bs.dout = in.dout.view();
    LinearAttentionBackwardParams bc = bs;
    bc.forward.gates = wide.view();
    const size_t nq = static_cast<size_t>(in.q.numel()), nk = static_cast<size_t>(in.k.numel()),
                 nv = static_cast<size_t>(in.v.numel());
    std::vector<double> dq1(nq), dk1(nk), dv1(nv), dg1(static_cast<size_t>(in.gates.numel()));
    std::vector<double> dq2(nq), dk2(nk), dv2(nv), dg2(static_cast<size_t>(wide.numel()));
    ref::LinearBackwardF64(bs, dq1.data(), dk1.data(), dv1.data(), dg1.data());
    ref::LinearBackwardF64(bc, dq2.data(), dk2.data(), dv2.data(), dg2.data());
    EXPECT_TRUE(test::CheckClose(dq1, dq2, test::kLinearFp64Agreement, "dq"));
    EXPECT_TRUE(test::CheckClose(dk1, dk2, test::kLinearFp64Agreement, "dk"));
    EXPECT_TRUE(test::CheckClose(dv1, dv2, test::kLinearFp64Agreement, "dv"));
    std::vector<double> summed(dg1.size(), 0.0);
    for (size_t i = 0; i < dg2.size(); ++i) summed[i / static_cast<size_t>(s.dk)] += dg2[i];
    EXPECT_TRUE(test::CheckClose(dg1, summed, test::kLinearFp64Agreement, "dgates"));
  }
}

TEST(LinearRef, InitialStateMatchesRecurrent) {
  for (int64_t len : kLengths) {
    for (bool normalize : {false, true}) {
      std::vector<Spec> specs;
      for (LinearFeatureMap map : kMaps) {
        Spec s;
        s.map = map;
        s.dk = map == LinearFeatureMap::kTaylor2 ? 3 : 5;
        specs.push_back(s);
        s.decay = Decay::kLambda;
        specs.push_back(s);
        s.decay = Decay::kNone;
        s.mask = Mask::kPrefix;
        s.prefix = len / 2 + 1;
        specs.push_back(s);
      }
      for (Gates g : {Gates::kNearZero, Gates::kVeryNegative, Gates::kMixed}) {
        Spec s;
        s.decay = Decay::kGla;
        s.gates = g;
        s.positive = normalize;
        specs.push_back(s);
        s.scalar_gates = true;
        specs.push_back(s);
      }
      for (Spec& s : specs) {
        s.seq = len;
        s.prefix = std::min(s.prefix, len);
        s.normalize = normalize;
        s.initial_state = true;
        ExpectMatchesRecurrent(s, 400 + static_cast<uint64_t>(len));
      }
    }
  }
}

TEST(LinearRef, EmptySequenceHandsTheInitialStateThrough) {
  Spec s;
  s.seq = 0;
  s.decay = Decay::kGla;
  s.normalize = true;
  s.initial_state = true;
  const Inputs in = MakeInputs(s, 9);
  const Result r = RunRef(s, Params(s, in));
  EXPECT_TRUE(r.out.empty());
  EXPECT_EQ(r.state, in.s0.ToVector());
  EXPECT_EQ(r.norm, in.z0.ToVector());
}

// ---------------------------------------------------------------------------------------------
// Identities between calls of the reference.

// Tokens [begin, begin + len) of a [B, S, H, D] tensor.
TensorView Tokens(const Tensor& t, int64_t begin, int64_t len) {
  TensorView v = t.view();
  v.data =
      static_cast<char*>(v.data) + static_cast<size_t>(begin * t.stride(1)) * DTypeSize(t.dtype());
  v.shape[1] = len;
  return v;
}

TEST(LinearRef, SplittingTheSequenceCarriesTheState) {
  std::vector<Spec> specs;
  for (LinearFeatureMap map : kMaps) {
    Spec s;
    s.map = map;
    s.dk = map == LinearFeatureMap::kTaylor2 ? 3 : 4;
    s.normalize = map != LinearFeatureMap::kIdentity;
    specs.push_back(s);
  }
  Spec s;
  s.decay = Decay::kLambda;
  specs.push_back(s);
  s.normalize = true;
  s.map = LinearFeatureMap::kElu1;
  s.initial_state = true;  // the first call starts from a state too
  specs.push_back(s);
  s = Spec();
  s.decay = Decay::kGla;
  s.gates = Gates::kMixed;
  specs.push_back(s);
  s.gates = Gates::kNearZero;
  s.normalize = true;
  s.positive = true;
  s.initial_state = true;
  specs.push_back(s);
  s.scalar_gates = true;
  specs.push_back(s);
  s = Spec();
  s.mask = Mask::kPrefix;  // the second call is plain causal: every prefix key is in the state
  s.map = LinearFeatureMap::kRelu;
  s.normalize = true;
  specs.push_back(s);

  for (int64_t len : {17, 65}) {
    for (Spec spec : specs) {
      spec.seq = len;
      spec.prefix = spec.mask == Mask::kPrefix ? len / 4 : 0;
      for (int64_t split : {int64_t{1}, len / 4 + 1, len / 2, len - 1}) {
        if (split < spec.prefix) continue;  // the first call must hold the whole prefix
        SCOPED_TRACE(spec.Name() + " split at " + std::to_string(split));
        const Inputs in = MakeInputs(spec, 500 + static_cast<uint64_t>(len));
        const LinearAttentionParams whole = Params(spec, in);
        const Result one = RunRef(spec, whole);

        Spec first_spec = spec, second_spec = spec;
        first_spec.seq = split;
        second_spec.seq = len - split;
        second_spec.mask = Mask::kCausal;
        LinearAttentionParams first = whole, second = whole;
        for (auto [p, begin, n] :
             {std::tuple{&first, int64_t{0}, split}, std::tuple{&second, split, len - split}}) {
          p->q = Tokens(in.q, begin, n);
          p->k = Tokens(in.k, begin, n);
          p->v = Tokens(in.v, begin, n);
          if (spec.decay == Decay::kGla) p->gates = Tokens(in.gates, begin, n);
        }
        const Result a = RunRef(first_spec, first);
        // The state crosses the boundary in f32, as the kernels hand it over.
        const int64_t f = FeatureDim(spec);
        Tensor state(DType::kF32, {spec.batch, spec.heads_q, f, spec.dv});
        Tensor norm(DType::kF32, {spec.batch, spec.heads_q, f});
        state.FromVector(a.state);
        norm.FromVector(a.norm);
        second.prefix_len = 0;
        second.initial_state = state.view();
        second.initial_normalizer = spec.normalize ? norm.view() : TensorView();
        const Result b = RunRef(second_spec, second);

        std::vector<double> joined = a.out;
        joined.insert(joined.end(), b.out.begin(), b.out.end());
        // Outputs are [B, S, H, Dv]: with B > 1 the two calls interleave per sequence.
        std::vector<double> expected;
        const size_t row = static_cast<size_t>(spec.heads_q * spec.dv);
        for (int64_t bb = 0; bb < spec.batch; ++bb) {
          const auto first_rows = a.out.begin() + static_cast<std::ptrdiff_t>(bb * split * row);
          expected.insert(expected.end(), first_rows,
                          first_rows + static_cast<std::ptrdiff_t>(split * row));
          const auto second_rows =
              b.out.begin() + static_cast<std::ptrdiff_t>(bb * (len - split) * row);
          expected.insert(expected.end(), second_rows,
                          second_rows + static_cast<std::ptrdiff_t>((len - split) * row));
        }
        EXPECT_TRUE(
            test::CheckClose(expected, one.out, test::kLinearF32StateHandover, "out, two calls"));
        EXPECT_TRUE(
            test::CheckClose(b.state, one.state, test::kLinearF32StateHandover, "final state"));
        if (spec.normalize) {
          EXPECT_TRUE(test::CheckClose(b.norm, one.norm, test::kLinearF32StateHandover,
                                       "final normalizer"));
        }
      }
    }
  }
}

TEST(LinearRef, GqaEqualsRepeatedKv) {
  for (Decay decay : {Decay::kNone, Decay::kLambda, Decay::kGla}) {
    Spec s;
    s.heads_q = 4;
    s.heads_kv = 2;
    s.decay = decay;
    s.normalize = true;
    s.positive = true;
    s.initial_state = true;
    SCOPED_TRACE(s.Name());
    Inputs in = MakeInputs(s, 11);
    const Result gqa = RunRef(s, Params(s, in));
    Spec mha = s;
    mha.heads_kv = 4;
    Tensor k(DType::kF32, {s.batch, s.seq, 4, s.dk}), v(DType::kF32, {s.batch, s.seq, 4, s.dv});
    k.ForEach([&](const Index& i) { k.Set(i, in.k.Get({i[0], i[1], i[2] / 2, i[3]})); });
    v.ForEach([&](const Index& i) { v.Set(i, in.v.Get({i[0], i[1], i[2] / 2, i[3]})); });
    in.k = std::move(k);
    in.v = std::move(v);
    const Result rep = RunRef(mha, Params(mha, in));
    EXPECT_EQ(gqa.out, rep.out);
    EXPECT_EQ(gqa.state, rep.state);
    EXPECT_EQ(gqa.norm, rep.norm);
  }
}

// A copy of `t` in `dtype` with the given strides (same values: `t` holds values of that dtype).
Tensor Relayout(const Tensor& t, DType dtype, std::vector<int64_t> strides) {
  Tensor r(dtype, t.shape(), std::move(strides), 3);
  r.FromVector(t.ToVector());
  return r;
}

TEST(LinearRef, LowPrecisionAndStridedInputsAreReadExactly) {
  Spec s;
  s.seq = 17;
  s.decay = Decay::kGla;
  s.normalize = true;
  s.positive = true;
  s.initial_state = true;
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const Inputs low = MakeInputs(s, 13, false, dtype);
    const Result got = RunRef(s, Params(s, low));
    // The same values in f32, in [B, H, S, D] order and with padded rows.
    Inputs f32 = MakeInputs(s, 13);
    auto bhsd = [](const Tensor& t) {
      const int64_t S = t.shape(1), H = t.shape(2), D = t.shape(3);
      return std::vector<int64_t>{S * H * (D + 2), D + 2, S * (D + 2), 1};
    };
    f32.q = Relayout(low.q, DType::kF32, bhsd(low.q));
    f32.k = Relayout(low.k, DType::kF32, bhsd(low.k));
    f32.v = Relayout(low.v, DType::kF32, Tensor::PaddedStrides(low.v.shape(), 1));
    f32.gates = Relayout(low.gates, DType::kF32, Tensor::PaddedStrides(low.gates.shape(), 2));
    f32.s0 = Relayout(low.s0, DType::kF32, Tensor::PaddedStrides(low.s0.shape(), 3));
    f32.z0 = Relayout(low.z0, DType::kF32, Tensor::PaddedStrides(low.z0.shape(), 1));
    const Result want = RunRef(s, Params(s, f32));
    EXPECT_EQ(got.out, want.out);
    EXPECT_EQ(got.state, want.state);
    EXPECT_EQ(got.norm, want.norm);
  }
  // A strided decay vector.
  Spec d;
  d.decay = Decay::kLambda;
  Inputs in = MakeInputs(d, 17);
  const Result want = RunRef(d, Params(d, in));
  in.decay = Relayout(in.decay, DType::kF32, {3});
  EXPECT_EQ(RunRef(d, Params(d, in)).out, want.out);
}

// BASED: the window part is exactly the causal sliding-window softmax attention of the raw
// q, k, v, added to the linear part.
TEST(LinearRef, WindowAddsExactSlidingWindowAttention) {
  for (int64_t len : {1, 17, 65}) {
    for (int64_t window : {1, 3, 16, 64, 100}) {
      std::vector<Spec> specs;
      Spec s;
      s.map = LinearFeatureMap::kTaylor2;
      s.dk = 4;
      s.dv = 4;
      s.normalize = true;
      specs.push_back(s);
      s.dv = 3;  // the reference allows Dv != Dk
      s.normalize = false;
      specs.push_back(s);
      s = Spec();
      s.decay = Decay::kGla;
      s.initial_state = true;
      specs.push_back(s);
      for (Spec spec : specs) {
        spec.seq = len;
        SCOPED_TRACE(spec.Name() + " window " + std::to_string(window));
        const Inputs in = MakeInputs(spec, 600 + static_cast<uint64_t>(len));
        const Result linear = RunRef(spec, Params(spec, in));
        spec.window = window;
        const Result both = RunRef(spec, Params(spec, in));

        AttentionParams ap;
        ap.q = in.q.view();
        ap.k = in.k.view();
        ap.v = in.v.view();
        ap.causal = true;
        ap.window_left = window - 1;
        std::vector<double> softmax(linear.out.size());
        ref::AttentionForwardF64(ap, softmax.data(), nullptr);
        std::vector<double> sum(linear.out.size());
        for (size_t i = 0; i < sum.size(); ++i) sum[i] = linear.out[i] + softmax[i];
        EXPECT_TRUE(test::CheckClose(both.out, sum, test::kLinearFp64Agreement, "linear + window"));
        EXPECT_EQ(both.state, linear.state);  // the window never enters the state
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients against central finite differences of the forward reference.

double Loss(const Spec& s, const Inputs& in) {
  const Result r = RunRef(s, Params(s, in));
  const std::vector<double> dout = in.dout.ToVector();
  double l = 0.0;
  for (size_t i = 0; i < r.out.size(); ++i) l += dout[i] * r.out[i];
  return l;
}

// d(Loss)/dx by the shared finite-difference oracle (test_util.h).
std::vector<double> FiniteDifferences(const Spec& s, Inputs* in, Tensor* x) {
  return test::FiniteDifferenceGradient(x, [&] { return Loss(s, *in); });
}

std::vector<Spec> GradientSpecs() {
  std::vector<Spec> specs;
  auto small = [](int64_t seq, LinearFeatureMap map) {
    Spec s;
    s.batch = 2;
    s.seq = seq;
    s.heads_q = 2;
    s.heads_kv = 1;  // GQA: dk, dv sum two query heads
    s.map = map;
    s.dk = map == LinearFeatureMap::kTaylor2 ? 2 : 3;
    s.dv = 2;
    return s;
  };
  for (int64_t seq : {1, 5, 17}) {
    for (LinearFeatureMap map : kMaps) {
      for (bool normalize : {false, true}) {
        Spec s = small(seq, map);
        s.normalize = normalize;
        s.positive = normalize && map == LinearFeatureMap::kIdentity;
        specs.push_back(s);
      }
    }
  }
  for (LinearFeatureMap map : kMaps) {
    Spec s = small(6, map);
    s.mask = Mask::kNonCausal;
    s.normalize = map != LinearFeatureMap::kIdentity;
    specs.push_back(s);
    s = small(7, map);
    s.mask = Mask::kPrefix;
    s.prefix = 3;
    s.normalize = map == LinearFeatureMap::kTaylor2;
    specs.push_back(s);
    s = small(9, map);
    s.decay = Decay::kLambda;
    s.normalize = map == LinearFeatureMap::kElu1;
    specs.push_back(s);
  }
  for (Gates g : {Gates::kNearZero, Gates::kModerate, Gates::kVeryNegative, Gates::kMixed}) {
    for (bool normalize : {false, true}) {
      Spec s = small(g == Gates::kModerate ? 17 : 8, LinearFeatureMap::kIdentity);
      s.decay = Decay::kGla;
      s.gates = g;
      s.normalize = normalize;
      s.positive = normalize;
      specs.push_back(s);
      s.scalar_gates = true;
      specs.push_back(s);
    }
  }
  Spec s = small(6, LinearFeatureMap::kRelu);
  s.scale = -0.7f;
  specs.push_back(s);
  return specs;
}

TEST(LinearRef, BackwardMatchesFiniteDifferences) {
  for (const Spec& s : GradientSpecs()) {
    SCOPED_TRACE(s.Name());
    Inputs in = MakeInputs(s, 700 + static_cast<uint64_t>(s.seq), /*grid=*/true);
    LinearAttentionBackwardParams bp;
    bp.forward = Params(s, in);
    bp.dout = in.dout.view();
    std::vector<double> dq(static_cast<size_t>(in.q.numel())),
        dk(static_cast<size_t>(in.k.numel())), dv(static_cast<size_t>(in.v.numel()));
    std::vector<double> dg(s.decay == Decay::kGla ? static_cast<size_t>(in.gates.numel()) : 0);
    ref::LinearBackwardF64(bp, dq.data(), dk.data(), dv.data(),
                           s.decay == Decay::kGla ? dg.data() : nullptr);
    EXPECT_TRUE(test::CheckClose(dq, FiniteDifferences(s, &in, &in.q),
                                 test::kFiniteDifferenceCeiling, "dq vs finite differences"));
    EXPECT_TRUE(test::CheckClose(dk, FiniteDifferences(s, &in, &in.k),
                                 test::kFiniteDifferenceCeiling, "dk vs finite differences"));
    EXPECT_TRUE(test::CheckClose(dv, FiniteDifferences(s, &in, &in.v),
                                 test::kFiniteDifferenceCeiling, "dv vs finite differences"));
    if (s.decay == Decay::kGla) {
      EXPECT_TRUE(test::CheckClose(dg, FiniteDifferences(s, &in, &in.gates),
                                   test::kFiniteDifferenceCeiling, "dgates vs finite differences"));
      // Without dgates the other gradients are unchanged.
      std::vector<double> dq2(dq.size()), dk2(dk.size()), dv2(dv.size());
      ref::LinearBackwardF64(bp, dq2.data(), dk2.data(), dv2.data(), nullptr);
      EXPECT_EQ(dq2, dq);
      EXPECT_EQ(dk2, dk);
      EXPECT_EQ(dv2, dv);
    }
    // The gradients are not all ~0 (a case that tests nothing).
    double largest = 0.0;
    for (double x : dv) largest = std::max(largest, std::fabs(x));
    EXPECT_GT(largest, 1e-2);
  }
}

}  // namespace
}  // namespace tessera
