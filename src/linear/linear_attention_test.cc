// SPDX-License-Identifier: Apache-2.0
// Linear attention: the chunked and the recurrent forms against the fp64 parallel form for every
// variant on awkward lengths and chunk sizes, the state hand-over (prefill then continue equals
// one call), stability over a million tokens, and every bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ref/linear_ref.h"
#include "tessera/linear.h"
#include "tolerances.h"

namespace tessera {
namespace {

struct Shape {
  int64_t batch = 1, seq = 17, heads_q = 2, heads_kv = 1, dk = 8, dv = 12;
};

class LinearCase {
 public:
  explicit LinearCase(const Shape& s, uint64_t seed = 5) : s_(s) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill = [&](std::vector<float>* x, int64_t n, float mul) {
      x->resize(static_cast<size_t>(n));
      for (float& v : *x) v = normal(rng) * mul;
    };
    fill(&q_, s.batch * s.seq * s.heads_q * s.dk, 0.5f);
    fill(&k_, s.batch * s.seq * s.heads_kv * s.dk, 0.5f);
    fill(&v_, s.batch * s.seq * s.heads_kv * s.dv, 1.0f);
    // GLA gates: log-sigmoid / 16 (near 0) for most channels, a few strongly negative ones.
    gates_.resize(static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dk));
    for (size_t i = 0; i < gates_.size(); ++i) {
      const float x = normal(rng);
      gates_[i] = i % 7 == 3 ? -20.0f * std::fabs(x) : -std::log1p(std::exp(-x)) / 16.0f;
    }
    // Mild gates only (GLA's usual range): the chunks take the factored path.
    mild_gates_.resize(gates_.size());
    for (float& g : mild_gates_) g = -std::log1p(std::exp(-normal(rng))) / 16.0f;
    // Scalar gates [B, S, Hq] (one per token and head): mostly mild, a few strongly negative,
    // and long runs that sum far past -60 within a chunk.
    scalar_gates_.resize(static_cast<size_t>(s.batch * s.seq * s.heads_q));
    for (size_t i = 0; i < scalar_gates_.size(); ++i) {
      const float x = normal(rng);
      scalar_gates_[i] = i % 5 == 2 ? -12.0f * std::fabs(x) : -std::log1p(std::exp(-x)) / 8.0f;
    }
    for (int64_t h = 0; h < s.heads_q; ++h) decay_.push_back(1.0f - std::exp2(-2.0f - h));
    // LRPE angles: RoPE-like frequencies 10000^(-f / Dk), a little different per head.
    for (int64_t h = 0; h < s.heads_q; ++h) {
      for (int64_t f = 0; f < s.dk; ++f) {
        theta_.push_back(static_cast<float>(
            std::pow(10000.0, -static_cast<double>(f) / static_cast<double>(s.dk)) *
            (1.0 + 0.1 * static_cast<double>(h))));
      }
    }
  }

  LinearAttentionParams Params(std::vector<float>* out) {
    out->assign(static_cast<size_t>(s_.batch * s_.seq * s_.heads_q * s_.dv),
                std::numeric_limits<float>::quiet_NaN());
    LinearAttentionParams p;
    p.q = MakeView4(q_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dk);
    p.k = MakeView4(k_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_kv, s_.dk);
    p.v = MakeView4(v_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_kv, s_.dv);
    p.out = MakeView4(out->data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dv);
    return p;
  }
  TensorView Gates() {
    return MakeView4(gates_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dk);
  }
  TensorView MildGates() {
    return MakeView4(mild_gates_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dk);
  }
  TensorView ScalarGates() {
    return MakeView3(scalar_gates_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q);
  }
  TensorView Decay() { return MakeView1(decay_.data(), DType::kF32, s_.heads_q); }
  // LRPE's theta: [Hq, Dk], or head 0's row as the [Dk] every head shares.
  TensorView Theta(bool per_head) {
    if (!per_head) return MakeView1(theta_.data(), DType::kF32, s_.dk);
    const int64_t shape[2] = {s_.heads_q, s_.dk};
    return MakeContiguousView(theta_.data(), DType::kF32, 2, shape);
  }
  // q, k >= 0 from here on (idempotent): the identity map's normalizer then stays away from 0.
  void MakeQKPositive() {
    for (auto* x : {&q_, &k_}) {
      for (float& e : *x) e = std::fabs(e);
    }
  }

  std::vector<float> Run(const std::function<void(LinearAttentionParams&)>& set, bool recurrent) {
    std::vector<float> out;
    LinearAttentionParams p = Params(&out);
    set(p);
    Context ctx;
    ctx.num_threads = 2;
    const Status st = recurrent ? LinearAttentionRecurrent(p, ctx) : LinearAttentionForward(p, ctx);
    EXPECT_TRUE(st.ok()) << st.message();
    return out;
  }
  std::vector<double> Reference(const std::function<void(LinearAttentionParams&)>& set) {
    std::vector<float> out;
    LinearAttentionParams p = Params(&out);
    set(p);
    std::vector<double> ref(out.size());
    ref::LinearForwardF64(p, ref.data(), nullptr, nullptr);
    return ref;
  }
  const Shape& shape() const { return s_; }

 private:
  Shape s_;
  std::vector<float> q_, k_, v_, gates_, mild_gates_, scalar_gates_, decay_, theta_;
};

// `scale`: the magnitude the absolute part is relative to; 0 = the largest |want|.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 const std::string& what, double scale = 0.0) {
  ASSERT_EQ(got.size(), want.size());
  for (double x : want) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol =
        test::kLinearCeilingF32.atol * scale + test::kLinearCeilingF32.rtol * std::fabs(want[i]);
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol)
        << what << " at " << i << ": got " << got[i] << ", want " << want[i];
  }
}

struct Variant {
  std::string name;
  std::function<void(LinearCase&, LinearAttentionParams&)> set;
  int64_t dk = 8;
};

std::vector<Variant> Variants() {
  return {
      {"plain", [](LinearCase&, LinearAttentionParams&) {}},
      {"plain normalized elu1",
       [](LinearCase&, LinearAttentionParams& p) {
         p.feature_map = LinearFeatureMap::kElu1;
         p.normalize = true;
       }},
      {"relu non-causal",
       [](LinearCase&, LinearAttentionParams& p) {
         p.feature_map = LinearFeatureMap::kRelu;
         p.causal = false;
       }},
      {"elu1 prefix 9 normalized",
       [](LinearCase&, LinearAttentionParams& p) {
         p.feature_map = LinearFeatureMap::kElu1;
         p.prefix_len = std::min<int64_t>(9, p.q.shape[1]);
         p.normalize = true;
       }},
      {"decay", [](LinearCase& c, LinearAttentionParams& p) { p.decay = c.Decay(); }},
      {"decay normalized elu1",
       [](LinearCase& c, LinearAttentionParams& p) {
         p.decay = c.Decay();
         p.feature_map = LinearFeatureMap::kElu1;
         p.normalize = true;
       }},
      {"gla", [](LinearCase& c, LinearAttentionParams& p) { p.gates = c.Gates(); }},
      {"gla mild gates", [](LinearCase& c, LinearAttentionParams& p) { p.gates = c.MildGates(); }},
      {"gla scalar gates",
       [](LinearCase& c, LinearAttentionParams& p) { p.gates = c.ScalarGates(); }},
      {"gla scalar gates normalized scale 0.6 (q, k >= 0)",
       [](LinearCase& c, LinearAttentionParams& p) {
         c.MakeQKPositive();
         p.gates = c.ScalarGates();
         p.normalize = true;
         p.scale = 0.6f;
       }},
      {"gla scale 0.7",
       [](LinearCase& c, LinearAttentionParams& p) {
         p.gates = c.Gates();
         p.scale = 0.7f;
       }},
      {"lrpe", [](LinearCase& c, LinearAttentionParams& p) { p.lrpe_theta = c.Theta(false); }},
      {"lrpe decay normalized elu1 per-head theta offset 1000",
       [](LinearCase& c, LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(true);
         p.position_offset = 1000;
         p.decay = c.Decay();
         p.feature_map = LinearFeatureMap::kElu1;
         p.normalize = true;
       }},
      {"lrpe relu prefix 9",
       [](LinearCase& c, LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(true);
         p.feature_map = LinearFeatureMap::kRelu;
         p.prefix_len = std::min<int64_t>(9, p.q.shape[1]);
       }},
      {"lrpe non-causal offset 70",
       [](LinearCase& c, LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(false);
         p.causal = false;
         p.position_offset = 70;
       }},
      {"based (taylor, normalized, window 5)",
       [](LinearCase&, LinearAttentionParams& p) {
         p.feature_map = LinearFeatureMap::kTaylor2;
         p.normalize = true;
         p.window = 5;
       },
       4},
  };
}

TEST(LinearAttention, ChunkedAndRecurrentMatchReference) {
  for (const Variant& var : Variants()) {
    for (const int64_t seq : {1, 17, 63, 64, 65, 113}) {
      Shape s;
      s.seq = seq;
      s.dk = var.dk;
      s.heads_q = 4;
      s.heads_kv = 2;
      LinearCase c(s);
      const std::vector<double> ref = c.Reference([&](LinearAttentionParams& p) { var.set(c, p); });
      for (const int64_t chunk : {16, 64}) {
        const auto set = [&](LinearAttentionParams& p) {
          var.set(c, p);
          p.chunk_size = chunk;
        };
        ExpectClose(c.Run(set, false), ref,
                    var.name + " chunked S=" + std::to_string(seq) + " C=" + std::to_string(chunk));
      }
      ExpectClose(c.Run([&](LinearAttentionParams& p) { var.set(c, p); }, true), ref,
                  var.name + " recurrent S=" + std::to_string(seq));
    }
  }
}

// Gradients of the chunked form against the fp64 parallel form (dq, dk, dv and the GLA gates).
TEST(LinearAttention, BackwardMatchesReference) {
  for (const Variant& var : Variants()) {
    if (var.name.find("window") != std::string::npos) continue;  // rejected in the backward
    for (const int64_t seq : {1, 17, 65, 113}) {
      Shape s;
      s.seq = seq;
      s.dk = var.dk;
      s.heads_q = 4;
      s.heads_kv = 2;
      LinearCase c(s);
      std::vector<float> out;
      LinearAttentionBackwardParams bp;
      bp.forward = c.Params(&out);
      var.set(c, bp.forward);
      bp.forward.chunk_size = 32;
      const bool gla = bp.forward.gates.data != nullptr;
      std::vector<float> dout(out.size()),
          dq(static_cast<size_t>(s.batch * seq * s.heads_q * s.dk)),
          dk(static_cast<size_t>(s.batch * seq * s.heads_kv * s.dk)),
          dv(static_cast<size_t>(s.batch * seq * s.heads_kv * s.dv));
      const bool scalar = gla && bp.forward.gates.rank == 3;
      std::vector<float> dg(!gla     ? 0
                            : scalar ? dq.size() / static_cast<size_t>(s.dk)
                                     : dq.size(),
                            std::numeric_limits<float>::quiet_NaN());
      std::mt19937_64 rng(17);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (float& x : dout) x = normal(rng);
      bp.dout = MakeView4(dout.data(), DType::kF32, s.batch, seq, s.heads_q, s.dv);
      bp.dq = MakeView4(dq.data(), DType::kF32, s.batch, seq, s.heads_q, s.dk);
      bp.dk = MakeView4(dk.data(), DType::kF32, s.batch, seq, s.heads_kv, s.dk);
      bp.dv = MakeView4(dv.data(), DType::kF32, s.batch, seq, s.heads_kv, s.dv);
      // forward.out is not read: it may be left unset.
      if (seq > 20) bp.forward.out = TensorView();
      if (gla) {
        bp.dgates = scalar ? MakeView3(dg.data(), DType::kF32, s.batch, seq, s.heads_q)
                           : MakeView4(dg.data(), DType::kF32, s.batch, seq, s.heads_q, s.dk);
      }
      Context ctx;
      ctx.num_threads = 2;
      const Status st = LinearAttentionBackward(bp, ctx);
      ASSERT_TRUE(st.ok()) << st.message();
      std::vector<double> rq(dq.size()), rk(dk.size()), rv(dv.size()), rg(dg.size());
      ref::LinearBackwardF64(bp, rq.data(), rk.data(), rv.data(), gla ? rg.data() : nullptr);
      // Gradients that cancel analytically (one token under normalization, the gates of one
      // token) carry the rounding of the terms that cancel: the absolute part is relative to the
      // largest gradient of the call.
      double scale = 0.0;
      for (const auto* r : {&rq, &rk, &rv}) {
        for (double x : *r) scale = std::max(scale, std::fabs(x));
      }
      const std::string what = var.name + " S=" + std::to_string(seq);
      ExpectClose(dq, rq, what + " dq", scale);
      ExpectClose(dk, rk, what + " dk", scale);
      ExpectClose(dv, rv, what + " dv", scale);
      if (gla) ExpectClose(dg, rg, what + " dgates", scale);
    }
  }
}

// Prefill with final_state, then the rest with that initial_state, equals one call.
TEST(LinearAttention, StateHandOffContinuesExactly) {
  for (const Variant& var : Variants()) {
    if (var.name.find("non-causal") != std::string::npos) continue;
    Shape s;
    s.seq = 90;
    s.dk = var.dk;
    LinearCase c(s);
    const auto base = [&](LinearAttentionParams& p) { var.set(c, p); };
    const std::vector<float> whole = c.Run(base, false);
    std::vector<float> probe;
    LinearAttentionParams probe_params = c.Params(&probe);
    base(probe_params);
    const bool lrpe = probe_params.lrpe_theta.data != nullptr;
    const int64_t F = LinearFeatureDim(
        var.dk == 4 ? LinearFeatureMap::kTaylor2 : LinearFeatureMap::kIdentity, var.dk, lrpe);
    std::vector<float> state(static_cast<size_t>(s.batch * s.heads_q * F * s.dv));
    std::vector<float> norm(static_cast<size_t>(s.batch * s.heads_q * F));
    for (const int64_t split : {1, 37, 64}) {
      std::vector<float> first;
      LinearAttentionParams p1 = c.Params(&first);
      base(p1);
      if (p1.prefix_len > split || p1.window > 0) continue;  // the split must not cut those
      // The first part: tokens [0, split).
      auto slice = [&](TensorView t, int64_t t0, int64_t n) {
        t.data = static_cast<char*>(t.data) + t0 * t.strides[1] * 4;
        t.shape[1] = n;
        return t;
      };
      const int64_t n2 = s.seq - split;
      LinearAttentionParams a = p1, b2 = p1;
      a.q = slice(p1.q, 0, split), a.k = slice(p1.k, 0, split), a.v = slice(p1.v, 0, split);
      a.out = slice(p1.out, 0, split);
      if (a.gates.data != nullptr) a.gates = slice(p1.gates, 0, split);
      a.final_state = MakeView4(state.data(), DType::kF32, s.batch, s.heads_q, F, s.dv);
      if (a.normalize)
        a.final_normalizer = MakeView3(norm.data(), DType::kF32, s.batch, s.heads_q, F);
      ASSERT_TRUE(LinearAttentionForward(a, Context()).ok());
      b2.q = slice(p1.q, split, n2), b2.k = slice(p1.k, split, n2), b2.v = slice(p1.v, split, n2);
      b2.out = slice(p1.out, split, n2);
      if (b2.gates.data != nullptr) b2.gates = slice(p1.gates, split, n2);
      b2.prefix_len = 0;
      b2.position_offset = p1.position_offset + split;  // LRPE: the tokens before this part
      b2.initial_state = a.final_state;
      b2.initial_normalizer = a.final_normalizer;
      // The second part continues token by token (decode) from the prefill's state.
      ASSERT_TRUE(LinearAttentionRecurrent(b2, Context()).ok());
      ExpectClose(first, std::vector<double>(whole.begin(), whole.end()),
                  var.name + " hand-off at " + std::to_string(split));
    }
  }
}

// A million tokens with a constant decay: the chunked form stays finite and equal to the
// recurrent one (every exponent it forms is <= 0).
TEST(LinearAttention, DecayIsStableOverAMillionTokens) {
  Shape s;
  s.seq = int64_t{1} << 20;
  s.heads_q = s.heads_kv = 1;
  s.dk = 4;
  s.dv = 4;
  LinearCase c(s);
  std::vector<float> lambda = {0.9999f};
  const auto set = [&](LinearAttentionParams& p) {
    p.decay = MakeView1(lambda.data(), DType::kF32, 1);
    p.normalize = true;
    p.feature_map = LinearFeatureMap::kElu1;
  };
  const std::vector<float> chunked = c.Run(set, false);
  const std::vector<float> recurrent = c.Run(set, true);
  for (size_t i = 0; i < chunked.size(); ++i) {
    ASSERT_TRUE(std::isfinite(chunked[i])) << i;
    ASSERT_NEAR(chunked[i], recurrent[i],
                test::kLinearLongRunRelTol * (1.0 + std::fabs(recurrent[i])))
        << i;
  }
}

TEST(LinearAttention, BadInputsAreRejected) {
  Shape s;
  LinearCase c(s);
  std::vector<float> bad_decay = {1.5f, 0.5f};
  std::vector<float> pos_gates(static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dk), 0.1f);
  std::vector<float> nan_gates(pos_gates.size(), -0.5f);
  nan_gates[5] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::pair<std::string, std::function<void(LinearAttentionParams&)>>> cases = {
      {"decay",
       [&](LinearAttentionParams& p) { p.decay = MakeView1(bad_decay.data(), DType::kF32, 2); }},
      {"gates",
       [&](LinearAttentionParams& p) {
         p.gates = MakeView4(pos_gates.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk);
       }},
      {"gates",
       [&](LinearAttentionParams& p) {
         p.gates = c.Gates();
         p.feature_map = LinearFeatureMap::kElu1;
       }},
      {"decay",
       [&](LinearAttentionParams& p) {
         p.decay = c.Decay();
         p.causal = false;
       }},
      {"gates",
       [&](LinearAttentionParams& p) {
         p.gates = MakeView3(pos_gates.data(), DType::kF32, s.batch, s.seq, s.heads_q);
       }},
      {"gates",  // scalar gates of the wrong shape
       [&](LinearAttentionParams& p) {
         p.gates = MakeView3(nan_gates.data(), DType::kF32, s.batch, s.seq, s.heads_q + 1);
       }},
      {"gates",  // a NaN scalar gate
       [&](LinearAttentionParams& p) {
         p.gates = MakeView3(nan_gates.data(), DType::kF32, s.batch, s.seq, s.heads_q);
       }},
      {"gates",  // rank 1
       [&](LinearAttentionParams& p) { p.gates = MakeView1(nan_gates.data(), DType::kF32, 4); }},
      {"chunk_size", [](LinearAttentionParams& p) { p.chunk_size = 24; }},
      {"prefix_len", [](LinearAttentionParams& p) { p.prefix_len = 18; }},
      {"eps", [](LinearAttentionParams& p) { p.eps = 0.0f; }},
      {"window",
       [](LinearAttentionParams& p) {
         p.window = 4;
         p.causal = false;
       }},
      {"final_normalizer",
       [&](LinearAttentionParams& p) {
         p.final_normalizer = MakeView3(pos_gates.data(), DType::kF32, 1, 2, 8);
       }},
      {"v", [](LinearAttentionParams& p) { p.v.shape[2] = 2; }},
      {"lrpe_theta",  // with the Taylor map
       [&](LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(false);
         p.feature_map = LinearFeatureMap::kTaylor2;
       }},
      {"lrpe_theta",  // with gates
       [&](LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(false);
         p.gates = c.Gates();
       }},
      {"lrpe_theta",  // [Dk + 1]
       [&](LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(false);
         p.lrpe_theta.shape[0] += 1;
       }},
      {"lrpe_theta",  // a NaN angle
       [&](LinearAttentionParams& p) {
         p.lrpe_theta = MakeView1(nan_gates.data(), DType::kF32, s.dk);
       }},
      {"position_offset",
       [&](LinearAttentionParams& p) {
         p.lrpe_theta = c.Theta(false);
         p.position_offset = -1;
       }},
  };
  for (const auto& [name, set] : cases) {
    std::vector<float> out;
    LinearAttentionParams p = c.Params(&out);
    std::fill(out.begin(), out.end(), 3.0f);
    set(p);
    const Status st = LinearAttentionForward(p, Context());
    EXPECT_FALSE(st.ok()) << name;
    EXPECT_NE(st.message().find(name), std::string::npos) << st.message();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 3.0f; })) << name;
  }
}

// Scalar gates [B, S, Hq] equal per-channel gates [B, S, Hq, Dk] with every channel alike (the
// scalar form takes the decay's GEMM route, the per-channel one its own), and dgates is the sum
// of the per-channel gradient over channels; a dgates of the other form is rejected.
TEST(LinearAttention, ScalarGatesEqualRepeatedChannelGates) {
  Shape s;
  s.batch = 2;
  s.seq = 71;
  s.heads_q = 3;
  s.heads_kv = 1;
  s.dk = 5;
  s.dv = 7;
  LinearCase c(s);
  c.MakeQKPositive();  // for the normalized case
  const TensorView scalar_view = c.ScalarGates();
  const float* scalar = static_cast<const float*>(scalar_view.data);
  std::vector<float> wide(static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dk));
  for (size_t i = 0; i < wide.size(); ++i) wide[i] = scalar[i / static_cast<size_t>(s.dk)];
  const TensorView wide_view = MakeView4(wide.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk);
  for (const bool normalize : {false, true}) {
    const auto with = [&](const TensorView& g) {
      return [&, g](LinearAttentionParams& p) {
        p.gates = g;
        p.normalize = normalize;
        p.chunk_size = 32;
      };
    };
    const std::vector<float> a = c.Run(with(scalar_view), false);
    const std::vector<float> b = c.Run(with(wide_view), false);
    ExpectClose(a, std::vector<double>(b.begin(), b.end()), "scalar vs per-channel forward");

    std::vector<float> out;
    LinearAttentionBackwardParams bp;
    bp.forward = c.Params(&out);
    with(scalar_view)(bp.forward);
    std::vector<float> dout(out.size(), 0.25f);
    for (size_t i = 0; i < dout.size(); ++i) dout[i] = static_cast<float>(i % 11) / 11.0f - 0.4f;
    const size_t nq = static_cast<size_t>(s.batch * s.seq * s.heads_q * s.dk),
                 nk = static_cast<size_t>(s.batch * s.seq * s.heads_kv * s.dk),
                 nv = static_cast<size_t>(s.batch * s.seq * s.heads_kv * s.dv);
    std::vector<float> dq1(nq), dk1(nk), dv1(nv), dg1(nq / static_cast<size_t>(s.dk));
    std::vector<float> dq2(nq), dk2(nk), dv2(nv), dg2(nq);
    bp.dout = MakeView4(dout.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dv);
    LinearAttentionBackwardParams bc = bp;
    bc.forward.gates = wide_view;
    bp.dq = MakeView4(dq1.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk);
    bp.dk = MakeView4(dk1.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dk);
    bp.dv = MakeView4(dv1.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dv);
    bc.dq = MakeView4(dq2.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk);
    bc.dk = MakeView4(dk2.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dk);
    bc.dv = MakeView4(dv2.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dv);
    bc.dgates = MakeView4(dg2.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk);
    // The per-channel dgates shape with scalar gates is refused, naming dgates.
    bp.dgates = bc.dgates;
    Status st = LinearAttentionBackward(bp, Context());
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("dgates"), std::string::npos) << st.message();
    bp.dgates = MakeView3(dg1.data(), DType::kF32, s.batch, s.seq, s.heads_q);
    ASSERT_TRUE(LinearAttentionBackward(bp, Context()).ok());
    ASSERT_TRUE(LinearAttentionBackward(bc, Context()).ok());
    double scale = 0.0;
    for (const auto* g : {&dq2, &dk2, &dv2}) {
      for (float x : *g) scale = std::max(scale, std::fabs(static_cast<double>(x)));
    }
    ExpectClose(dq1, std::vector<double>(dq2.begin(), dq2.end()), "dq", scale);
    ExpectClose(dk1, std::vector<double>(dk2.begin(), dk2.end()), "dk", scale);
    ExpectClose(dv1, std::vector<double>(dv2.begin(), dv2.end()), "dv", scale);
    std::vector<double> summed(dg1.size(), 0.0);
    for (size_t i = 0; i < dg2.size(); ++i) summed[i / static_cast<size_t>(s.dk)] += dg2[i];
    ExpectClose(dg1, summed, "dgates", scale);
  }
}

// LRPE sees relative positions only: without an initial state, moving every token by the same
// offset changes no output beyond rounding (the offsets cross many of the angles' anchors).
TEST(LinearAttention, LrpeDependsOnRelativePositionsOnly) {
  Shape s;
  s.seq = 150;
  s.heads_q = 2;
  s.heads_kv = 1;
  LinearCase c(s);
  for (const bool recurrent : {false, true}) {
    const auto with_offset = [&](int64_t offset) {
      return [&c, offset](LinearAttentionParams& p) {
        p.lrpe_theta = c.Theta(true);
        p.position_offset = offset;
        p.decay = c.Decay();
      };
    };
    const std::vector<float> base = c.Run(with_offset(0), recurrent);
    const std::vector<double> want(base.begin(), base.end());
    for (const int64_t offset : {int64_t{1}, int64_t{4093}, int64_t{1} << 30}) {
      ExpectClose(c.Run(with_offset(offset), recurrent), want,
                  "offset " + std::to_string(offset) + (recurrent ? " recurrent" : " chunked"));
    }
  }
}

// With LRPE a state-only call (no outputs: it reads the keys alone, in another order than the
// full call) gives the full call's final state bit for bit: the angles of a position do not
// depend on the order positions are visited in.
TEST(LinearAttention, LrpeStateOnlyEqualsFullCallBitwise) {
  Shape s;
  s.seq = 203;
  LinearCase c(s);
  const int64_t F = LinearFeatureDim(LinearFeatureMap::kElu1, s.dk, true);
  std::vector<float> full(static_cast<size_t>(s.batch * s.heads_q * F * s.dv), 1.0f), only = full;
  std::vector<float> zfull(static_cast<size_t>(s.batch * s.heads_q * F), 1.0f), zonly = zfull;
  std::vector<float> out;
  LinearAttentionParams p = c.Params(&out);
  p.lrpe_theta = c.Theta(true);
  p.position_offset = 77;
  p.feature_map = LinearFeatureMap::kElu1;
  p.normalize = true;
  p.chunk_size = 32;
  p.final_state = MakeView4(full.data(), DType::kF32, s.batch, s.heads_q, F, s.dv);
  p.final_normalizer = MakeView3(zfull.data(), DType::kF32, s.batch, s.heads_q, F);
  ASSERT_TRUE(LinearAttentionForward(p, Context()).ok());
  p.out = TensorView();
  p.final_state.data = only.data();
  p.final_normalizer.data = zonly.data();
  ASSERT_TRUE(LinearAttentionForward(p, Context()).ok());
  EXPECT_EQ(full, only);
  EXPECT_EQ(zfull, zonly);
}

// A normalized row whose normalizer is exactly -eps (identity features take both signs) has no
// finite normalization: its output and its gradients are non-finite, the other rows are not, and
// no float division by zero runs (fuzz finding 15).
TEST(LinearAttention, ZeroNormalizerRowIsNonFiniteOnly) {
  constexpr float kEps = 0.25f;
  // B = 1, S = 2, one head, Dk = Dv = 1, scale 1: den_0 = q_0 k_0 = -eps, den_1 = q_1 (k_0 + k_1).
  std::vector<float> q = {1.0f, 1.0f}, k = {-kEps, 2.0f}, v = {3.0f, 5.0f};
  std::vector<float> out(2, 0.0f), dout = {1.0f, 1.0f}, dq(2), dk(2), dv(2);
  LinearAttentionParams p;
  p.q = MakeView4(q.data(), DType::kF32, 1, 2, 1, 1);
  p.k = MakeView4(k.data(), DType::kF32, 1, 2, 1, 1);
  p.v = MakeView4(v.data(), DType::kF32, 1, 2, 1, 1);
  p.out = MakeView4(out.data(), DType::kF32, 1, 2, 1, 1);
  p.scale = 1.0f;
  p.normalize = true;
  p.eps = kEps;
  for (const bool recurrent : {false, true}) {
    std::fill(out.begin(), out.end(), 0.0f);
    ASSERT_TRUE(
        (recurrent ? LinearAttentionRecurrent(p, Context()) : LinearAttentionForward(p, Context()))
            .ok());
    EXPECT_FALSE(std::isfinite(out[0])) << out[0];
    EXPECT_FLOAT_EQ(out[1], (3.0f * -kEps + 5.0f * 2.0f) / (2.0f - kEps + kEps));
  }
  LinearAttentionBackwardParams bp;
  bp.forward = p;
  bp.dout = MakeView4(dout.data(), DType::kF32, 1, 2, 1, 1);
  bp.dq = MakeView4(dq.data(), DType::kF32, 1, 2, 1, 1);
  bp.dk = MakeView4(dk.data(), DType::kF32, 1, 2, 1, 1);
  bp.dv = MakeView4(dv.data(), DType::kF32, 1, 2, 1, 1);
  ASSERT_TRUE(LinearAttentionBackward(bp, Context()).ok());
  EXPECT_FALSE(std::isfinite(dq[0])) << dq[0];
  EXPECT_TRUE(std::isfinite(dq[1])) << dq[1];
}

}  // namespace
}  // namespace tessera
