// SPDX-License-Identifier: Apache-2.0
// Linear attention with states in and out, what sequence parallelism (LASP-2) needs: the
// state-only forward against the full forward's final state, the backward of a sequence cut into
// pieces (states handed forward, state gradients handed back) against the backward of the whole,
// the state gradients against the fp64 reference and the reference against finite differences,
// gradient subsets against the full call, and the bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ref/linear_ref.h"
#include "tessera/linear.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

enum class Decay { kNone, kLambda, kGates, kScalarGates };

struct Variant {
  std::string name;
  LinearFeatureMap map = LinearFeatureMap::kIdentity;
  Decay decay = Decay::kNone;
  bool normalize = false;
  int64_t prefix = 0;
  int64_t window = 0;
  int64_t dk = 8;
};

// Every decay form, every feature map, normalization and the prefix form.
std::vector<Variant> Variants() {
  const auto taylor = LinearFeatureMap::kTaylor2, elu1 = LinearFeatureMap::kElu1;
  return {
      {"plain", LinearFeatureMap::kIdentity},
      {"plain elu1 normalized", elu1, Decay::kNone, true},
      {"taylor normalized", taylor, Decay::kNone, true, 0, 0, 4},
      {"relu decay", LinearFeatureMap::kRelu, Decay::kLambda},
      {"decay elu1 normalized", elu1, Decay::kLambda, true},
      {"gla", LinearFeatureMap::kIdentity, Decay::kGates},
      {"gla scalar gates", LinearFeatureMap::kIdentity, Decay::kScalarGates},
      {"gla scalar gates normalized (q, k > 0)", LinearFeatureMap::kIdentity, Decay::kScalarGates,
       true},
      {"elu1 prefix 9 normalized", elu1, Decay::kNone, true, 9},
  };
}

struct Shape {
  int64_t batch = 2, seq = 45, heads_q = 4, heads_kv = 2, dk = 8, dv = 12;
};

// The tokens [t0, t0 + n) of a [B, S, ...] view.
TensorView Tokens(TensorView t, int64_t t0, int64_t n) {
  if (t.data == nullptr) return t;
  t.data = static_cast<char*>(t.data) + t0 * t.strides[1] * static_cast<int64_t>(sizeof(float));
  t.shape[1] = n;
  return t;
}

std::vector<double> Widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Every input and gradient buffer of one problem (f32, contiguous), random and seeded.
class Problem {
 public:
  Problem(const Variant& var, Shape s, uint64_t seed) : var_(var), s_(s) {
    s_.dk = var.dk;
    f_ = LinearFeatureDim(var.map, s_.dk);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const bool positive = var.normalize && var.map == LinearFeatureMap::kIdentity;
    auto fill = [&](std::vector<float>* x, int64_t n, float mul, bool abs) {
      x->resize(static_cast<size_t>(n));
      for (float& e : *x) e = (abs ? std::fabs(normal(rng)) + 0.1f : normal(rng)) * mul;
    };
    const int64_t B = s_.batch, S = s_.seq, Hq = s_.heads_q, Hkv = s_.heads_kv;
    fill(&q_, B * S * Hq * s_.dk, 0.5f, positive);
    fill(&k_, B * S * Hkv * s_.dk, 0.5f, positive);
    fill(&v_, B * S * Hkv * s_.dv, 1.0f, false);
    fill(&dout_, B * S * Hq * s_.dv, 1.0f, false);
    // Initial states of the size a previous piece of the sequence would leave (normalizers of
    // positive features are positive), and gradients of the final state.
    fill(&s0_, B * Hq * f_ * s_.dv, 2.0f, false);
    fill(&z0_, B * Hq * f_, 2.0f, true);
    fill(&dfs_, B * Hq * f_ * s_.dv, 0.3f, false);
    fill(&dfz_, B * Hq * f_, 0.3f, false);
    if (var.map == LinearFeatureMap::kTaylor2) {
      // A Taylor state is symmetric in its pair features: the forward reads S[i, j] + S[j, i]
      // and writes the halves (LinearAttentionForward's final_state), and likewise its gradient.
      for (auto* x : {&s0_, &dfs_}) SymmetrizePairs(x, s_.dv);
      for (auto* x : {&z0_, &dfz_}) SymmetrizePairs(x, 1);
    }
    for (int64_t h = 0; h < Hq; ++h) decay_.push_back(1.0f - std::exp2(-2.0f - h));
    // Gates: mostly mild (log-sigmoid / 16), every 7th strongly negative, so that chunks take
    // both the factored and the pairwise path.
    const int64_t per_token = var.decay == Decay::kScalarGates ? 1 : s_.dk;
    gates_.resize(static_cast<size_t>(B * S * Hq * per_token));
    for (size_t i = 0; i < gates_.size(); ++i) {
      const float x = normal(rng);
      gates_[i] = i % 7 == 3 ? -12.0f * std::fabs(x) : -std::log1p(std::exp(-x)) / 16.0f;
    }
  }

  // [B, Hq, F, dv] with F = 1 + Dk + Dk^2 (dv = 1: a normalizer): rows (i, j) and (j, i) of the
  // pair block set to their mean.
  void SymmetrizePairs(std::vector<float>* x, int64_t dv) const {
    const int64_t dk = s_.dk;
    for (int64_t bh = 0; bh < s_.batch * s_.heads_q; ++bh) {
      for (int64_t i = 0; i < dk; ++i) {
        for (int64_t j = i + 1; j < dk; ++j) {
          for (int64_t d = 0; d < dv; ++d) {
            float& a = (*x)[static_cast<size_t>((bh * f_ + 1 + dk + i * dk + j) * dv + d)];
            float& b = (*x)[static_cast<size_t>((bh * f_ + 1 + dk + j * dk + i) * dv + d)];
            a = b = 0.5f * (a + b);
          }
        }
      }
    }
  }

  const Shape& shape() const { return s_; }
  int64_t feat() const { return f_; }
  size_t StateSize() const { return static_cast<size_t>(s_.batch * s_.heads_q * f_ * s_.dv); }
  size_t NormSize() const { return static_cast<size_t>(s_.batch * s_.heads_q * f_); }
  size_t Count(int64_t heads, int64_t d) const {
    return static_cast<size_t>(s_.batch * s_.seq * heads * d);
  }
  size_t GateCount() const {
    return var_.decay == Decay::kGates || var_.decay == Decay::kScalarGates ? gates_.size() : 0;
  }
  bool gla() const { return GateCount() > 0; }

  TensorView StateView(std::vector<float>* x) const {
    return MakeView4(x->data(), DType::kF32, s_.batch, s_.heads_q, f_, s_.dv);
  }
  TensorView NormView(std::vector<float>* x) const {
    return MakeView3(x->data(), DType::kF32, s_.batch, s_.heads_q, f_);
  }
  TensorView S0() { return StateView(&s0_); }
  TensorView Z0() { return var_.normalize ? NormView(&z0_) : TensorView(); }
  TensorView DFinal() { return StateView(&dfs_); }
  TensorView DFinalNorm() { return var_.normalize ? NormView(&dfz_) : TensorView(); }
  TensorView GatesLike(std::vector<float>* x) const {
    if (var_.decay == Decay::kScalarGates) {
      return MakeView3(x->data(), DType::kF32, s_.batch, s_.seq, s_.heads_q);
    }
    return MakeView4(x->data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dk);
  }

  // The forward's inputs and options (no output, no state).
  LinearAttentionParams Forward() {
    LinearAttentionParams p;
    p.q = MakeView4(q_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dk);
    p.k = MakeView4(k_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_kv, s_.dk);
    p.v = MakeView4(v_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_kv, s_.dv);
    p.feature_map = var_.map;
    p.normalize = var_.normalize;
    p.prefix_len = std::min(var_.prefix, s_.seq);
    p.window = var_.window;
    if (var_.decay == Decay::kLambda) p.decay = MakeView1(decay_.data(), DType::kF32, s_.heads_q);
    if (gla()) p.gates = GatesLike(&gates_);
    p.chunk_size = 32;
    return p;
  }
  TensorView Dout() {
    return MakeView4(dout_.data(), DType::kF32, s_.batch, s_.seq, s_.heads_q, s_.dv);
  }

 private:
  Variant var_;
  Shape s_;
  int64_t f_ = 0;
  std::vector<float> q_, k_, v_, dout_, s0_, z0_, dfs_, dfz_, decay_, gates_;
};

Context Threads2() {
  Context ctx;
  ctx.num_threads = 2;
  return ctx;
}

// |got - want| <= atol * scale + rtol * |want|, scale the largest |want| unless given (the
// kLinearCeilingF32 rule: an unnormalized sum's small entries carry the rounding of its large
// terms).
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 const std::string& what, double scale = 0.0) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (double x : want) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol =
        test::kLinearCeilingF32.atol * scale + test::kLinearCeilingF32.rtol * std::fabs(want[i]);
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol)
        << what << " at " << i << ": got " << got[i] << ", want " << want[i];
  }
}

double Largest(std::initializer_list<const std::vector<double>*> xs) {
  double m = 0.0;
  for (const auto* x : xs) {
    for (double e : *x) m = std::max(m, std::fabs(e));
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// State-only forward.

// out unset, final_state set: the final state (and normalizer) of the full call bit for bit (the
// same state updates in the same order), and within the f32 ceiling of the fp64 reference.
TEST(LinearState, StateOnlyForwardEqualsFullForwardState) {
  std::vector<Variant> variants = Variants();
  variants.push_back({"based window 5 (never enters the state)", LinearFeatureMap::kTaylor2,
                      Decay::kNone, true, 0, 5, 4});
  for (const Variant& var : variants) {
    for (const int64_t seq : {1, 45, 100}) {
      for (const bool with_initial : {false, true}) {
        Shape s;
        s.seq = seq;
        Problem pr(var, s, 11 + static_cast<uint64_t>(seq));
        const std::string what =
            var.name + " S=" + std::to_string(seq) + (with_initial ? " with initial state" : "");
        LinearAttentionParams p = pr.Forward();
        if (with_initial) {
          p.initial_state = pr.S0();
          p.initial_normalizer = pr.Z0();
        }
        std::vector<float> out(pr.Count(s.heads_q, s.dv)), full_state(pr.StateSize()),
            full_norm(pr.NormSize()), state(pr.StateSize(), -1.0f), norm(pr.NormSize(), -1.0f);
        LinearAttentionParams full = p;
        full.out = MakeView4(out.data(), DType::kF32, s.batch, seq, s.heads_q, s.dv);
        full.final_state = pr.StateView(&full_state);
        if (var.normalize) full.final_normalizer = pr.NormView(&full_norm);
        ASSERT_TRUE(LinearAttentionForward(full, Threads2()).ok()) << what;

        LinearAttentionParams only = p;
        only.final_state = pr.StateView(&state);
        if (var.normalize) only.final_normalizer = pr.NormView(&norm);
        const Status st = LinearAttentionForward(only, Threads2());
        ASSERT_TRUE(st.ok()) << what << ": " << st.message();
        EXPECT_EQ(0, std::memcmp(state.data(), full_state.data(), state.size() * sizeof(float)))
            << what << ": final_state differs from the full call's";
        if (var.normalize) {
          EXPECT_EQ(0, std::memcmp(norm.data(), full_norm.data(), norm.size() * sizeof(float)))
              << what << ": final_normalizer differs from the full call's";
        }

        std::vector<double> ref_out(out.size()), ref_state(state.size()), ref_norm(norm.size());
        ref::LinearForwardF64(only, ref_out.data(), ref_state.data(), ref_norm.data());
        ExpectClose(state, ref_state, what + " final_state vs fp64");
        if (var.normalize) ExpectClose(norm, ref_norm, what + " final_normalizer vs fp64");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The sequence cut into pieces (LASP-2): forward piece by piece with the states handed forward,
// backward from the last piece with the state gradients handed back.

struct Gradients {
  std::vector<float> dq, dk, dv, dg, d_state, d_norm;
};

Gradients AllocateGradients(const Problem& pr) {
  const Shape& s = pr.shape();
  Gradients g;
  g.dq.assign(pr.Count(s.heads_q, s.dk), std::numeric_limits<float>::quiet_NaN());
  g.dk.assign(pr.Count(s.heads_kv, s.dk), std::numeric_limits<float>::quiet_NaN());
  g.dv.assign(pr.Count(s.heads_kv, s.dv), std::numeric_limits<float>::quiet_NaN());
  g.dg.assign(pr.GateCount(), std::numeric_limits<float>::quiet_NaN());
  g.d_state.assign(pr.StateSize(), std::numeric_limits<float>::quiet_NaN());
  g.d_norm.assign(pr.NormSize(), std::numeric_limits<float>::quiet_NaN());
  return g;
}

// Backward params writing every gradient of `g` (tokens [t0, t0 + n) of the whole sequence).
LinearAttentionBackwardParams BackwardInto(Problem& pr, Gradients* g, int64_t t0, int64_t n,
                                           bool normalize) {
  const Shape& s = pr.shape();
  LinearAttentionBackwardParams bp;
  bp.dout = Tokens(pr.Dout(), t0, n);
  bp.dq = Tokens(MakeView4(g->dq.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dk), t0, n);
  bp.dk = Tokens(MakeView4(g->dk.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dk), t0, n);
  bp.dv = Tokens(MakeView4(g->dv.data(), DType::kF32, s.batch, s.seq, s.heads_kv, s.dv), t0, n);
  if (pr.gla()) bp.dgates = Tokens(pr.GatesLike(&g->dg), t0, n);
  bp.d_initial_state = pr.StateView(&g->d_state);
  if (normalize) bp.d_initial_normalizer = pr.NormView(&g->d_norm);
  return bp;
}

TEST(LinearState, SplitBackwardEqualsWholeBackward) {
  for (const Variant& var : Variants()) {
    if (var.prefix > 0) continue;  // a prefix belongs to the first piece only
    for (const std::vector<int64_t>& cuts :
         std::vector<std::vector<int64_t>>{{37}, {13, 58}, {32, 64}}) {
      Shape s;
      s.seq = 100;
      Problem pr(var, s, 23);
      std::string what = var.name + " cut at";
      for (int64_t c : cuts) what += " " + std::to_string(c);

      // The whole sequence.
      std::vector<float> whole_out(pr.Count(s.heads_q, s.dv));
      LinearAttentionParams whole = pr.Forward();
      whole.out = MakeView4(whole_out.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dv);
      ASSERT_TRUE(LinearAttentionForward(whole, Threads2()).ok()) << what;
      Gradients want = AllocateGradients(pr);
      LinearAttentionBackwardParams wbp = BackwardInto(pr, &want, 0, s.seq, var.normalize);
      wbp.forward = pr.Forward();
      Status st = LinearAttentionBackward(wbp, Threads2());
      ASSERT_TRUE(st.ok()) << what << ": " << st.message();

      // Pieces: forward from the first, each starting from the previous one's final state.
      std::vector<int64_t> bounds = {0};
      bounds.insert(bounds.end(), cuts.begin(), cuts.end());
      bounds.push_back(s.seq);
      const size_t pieces = bounds.size() - 1;
      std::vector<std::vector<float>> states(pieces + 1), norms(pieces + 1);
      std::vector<float> out(whole_out.size(), std::numeric_limits<float>::quiet_NaN());
      const auto piece_forward = [&](size_t i) {
        LinearAttentionParams p = pr.Forward();
        const int64_t t0 = bounds[i], n = bounds[i + 1] - bounds[i];
        p.q = Tokens(p.q, t0, n), p.k = Tokens(p.k, t0, n), p.v = Tokens(p.v, t0, n);
        p.gates = Tokens(p.gates, t0, n);
        if (i > 0) {
          p.initial_state = pr.StateView(&states[i]);
          if (var.normalize) p.initial_normalizer = pr.NormView(&norms[i]);
        }
        return p;
      };
      for (size_t i = 0; i < pieces; ++i) {
        states[i + 1].resize(pr.StateSize());
        norms[i + 1].resize(pr.NormSize());
        LinearAttentionParams p = piece_forward(i);
        p.out = Tokens(MakeView4(out.data(), DType::kF32, s.batch, s.seq, s.heads_q, s.dv),
                       bounds[i], bounds[i + 1] - bounds[i]);
        p.final_state = pr.StateView(&states[i + 1]);
        if (var.normalize) p.final_normalizer = pr.NormView(&norms[i + 1]);
        ASSERT_TRUE(LinearAttentionForward(p, Threads2()).ok()) << what;
      }
      ExpectClose(out, Widen(whole_out), what + " out");

      // Backward from the last piece, each handing d_initial_state to the previous one as
      // d_final_state.
      Gradients got = AllocateGradients(pr);
      std::vector<std::vector<float>> d_states(pieces + 1), d_norms(pieces + 1);
      for (size_t i = pieces; i-- > 0;) {
        const int64_t t0 = bounds[i], n = bounds[i + 1] - bounds[i];
        LinearAttentionBackwardParams bp = BackwardInto(pr, &got, t0, n, var.normalize);
        bp.forward = piece_forward(i);
        d_states[i].resize(pr.StateSize());
        d_norms[i].resize(pr.NormSize());
        bp.d_initial_state = pr.StateView(&d_states[i]);
        if (var.normalize) bp.d_initial_normalizer = pr.NormView(&d_norms[i]);
        if (i + 1 < pieces) {
          bp.d_final_state = pr.StateView(&d_states[i + 1]);
          if (var.normalize) bp.d_final_normalizer = pr.NormView(&d_norms[i + 1]);
        }
        st = LinearAttentionBackward(bp, Threads2());
        ASSERT_TRUE(st.ok()) << what << " piece " << i << ": " << st.message();
      }

      // Against the whole call (f32) and against the fp64 gradients of the whole sequence.
      std::vector<double> rq(got.dq.size()), rk(got.dk.size()), rv(got.dv.size()),
          rg(got.dg.size()), rs(got.d_state.size()), rz(got.d_norm.size());
      ref::LinearBackwardF64(wbp, rq.data(), rk.data(), rv.data(), pr.gla() ? rg.data() : nullptr,
                             rs.data(), var.normalize ? rz.data() : nullptr);
      const double scale = Largest({&rq, &rk, &rv});
      ExpectClose(got.dq, Widen(want.dq), what + " dq vs whole", scale);
      ExpectClose(got.dk, Widen(want.dk), what + " dk vs whole", scale);
      ExpectClose(got.dv, Widen(want.dv), what + " dv vs whole", scale);
      ExpectClose(got.dq, rq, what + " dq vs fp64", scale);
      ExpectClose(got.dk, rk, what + " dk vs fp64", scale);
      ExpectClose(got.dv, rv, what + " dv vs fp64", scale);
      if (pr.gla()) {
        ExpectClose(got.dg, Widen(want.dg), what + " dgates vs whole", scale);
        ExpectClose(got.dg, rg, what + " dgates vs fp64", scale);
      }
      // The first piece's initial-state gradient is the whole sequence's.
      ExpectClose(d_states[0], Widen(want.d_state), what + " d_initial_state vs whole");
      ExpectClose(d_states[0], rs, what + " d_initial_state vs fp64");
      if (var.normalize) {
        ExpectClose(d_norms[0], Widen(want.d_norm), what + " d_initial_normalizer vs whole");
        ExpectClose(d_norms[0], rz, what + " d_initial_normalizer vs fp64");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The state gradients against the fp64 reference.

// Every gradient of a call with an initial state and d_final_state (and their normalizers)
// against the fp64 parallel form, on awkward lengths, GQA, B = 2; S = 0 hands d_final_state
// through unchanged.
TEST(LinearState, BackwardWithStatesMatchesReference) {
  for (const Variant& var : Variants()) {
    for (const int64_t seq : {0, 1, 45, 100}) {
      for (const bool with_initial : {false, true}) {
        Shape s;
        s.seq = seq;
        Problem pr(var, s, 31 + static_cast<uint64_t>(seq));
        const std::string what =
            var.name + " S=" + std::to_string(seq) + (with_initial ? " with initial state" : "");
        Gradients got = AllocateGradients(pr);
        LinearAttentionBackwardParams bp = BackwardInto(pr, &got, 0, seq, var.normalize);
        bp.forward = pr.Forward();
        if (with_initial) {
          bp.forward.initial_state = pr.S0();
          bp.forward.initial_normalizer = pr.Z0();
        }
        bp.d_final_state = pr.DFinal();
        bp.d_final_normalizer = pr.DFinalNorm();
        const Status st = LinearAttentionBackward(bp, Threads2());
        ASSERT_TRUE(st.ok()) << what << ": " << st.message();

        std::vector<double> rq(got.dq.size()), rk(got.dk.size()), rv(got.dv.size()),
            rg(got.dg.size()), rs(got.d_state.size()), rz(got.d_norm.size());
        ref::LinearBackwardF64(bp, rq.data(), rk.data(), rv.data(), pr.gla() ? rg.data() : nullptr,
                               rs.data(), var.normalize ? rz.data() : nullptr);
        const double scale = Largest({&rq, &rk, &rv});
        ExpectClose(got.dq, rq, what + " dq", scale);
        ExpectClose(got.dk, rk, what + " dk", scale);
        ExpectClose(got.dv, rv, what + " dv", scale);
        if (pr.gla()) ExpectClose(got.dg, rg, what + " dgates", scale);
        ExpectClose(got.d_state, rs, what + " d_initial_state");
        if (var.normalize) ExpectClose(got.d_norm, rz, what + " d_initial_normalizer");
        if (seq == 0 && var.map != LinearFeatureMap::kTaylor2) {
          // Nothing between the states: d_initial_state = d_final_state (bit for bit but for the
          // Taylor pairs, which go through the 1 / sqrt(2) of the kernels' basis).
          const TensorView dfs = pr.DFinal();
          const float* want = static_cast<const float*>(dfs.data);
          for (size_t i = 0; i < got.d_state.size(); ++i) {
            ASSERT_EQ(got.d_state[i], want[i]) << what << " at " << i;
          }
        }
      }
    }
  }
}

// Every output requested alone equals the same output of the call that requests them all, bit for
// bit (the sweeps skip only work whose results are not written), and nothing else is written.
TEST(LinearState, EachGradientAloneEqualsTheFullCall) {
  for (const Variant& var : Variants()) {
    Shape s;
    s.seq = 77;
    Problem pr(var, s, 41);
    const auto with_states = [&](LinearAttentionBackwardParams* bp) {
      bp->forward = pr.Forward();
      bp->forward.initial_state = pr.S0();
      bp->forward.initial_normalizer = pr.Z0();
      bp->d_final_state = pr.DFinal();
      bp->d_final_normalizer = pr.DFinalNorm();
    };
    Gradients all = AllocateGradients(pr);
    LinearAttentionBackwardParams bp = BackwardInto(pr, &all, 0, s.seq, var.normalize);
    with_states(&bp);
    ASSERT_TRUE(LinearAttentionBackward(bp, Threads2()).ok()) << var.name;

    using Member = TensorView LinearAttentionBackwardParams::*;
    using Buffer = std::vector<float> Gradients::*;
    const struct {
      const char* name;
      Member view;
      Buffer buffer;
    } outputs[] = {
        {"dq", &LinearAttentionBackwardParams::dq, &Gradients::dq},
        {"dk", &LinearAttentionBackwardParams::dk, &Gradients::dk},
        {"dv", &LinearAttentionBackwardParams::dv, &Gradients::dv},
        {"dgates", &LinearAttentionBackwardParams::dgates, &Gradients::dg},
        {"d_initial_state", &LinearAttentionBackwardParams::d_initial_state, &Gradients::d_state},
        {"d_initial_normalizer", &LinearAttentionBackwardParams::d_initial_normalizer,
         &Gradients::d_norm},
    };
    for (const auto& o : outputs) {
      Gradients one = AllocateGradients(pr);  // NaN everywhere
      const LinearAttentionBackwardParams every = BackwardInto(pr, &one, 0, s.seq, var.normalize);
      if ((every.*o.view).data == nullptr) continue;  // dgates without gates, ...
      LinearAttentionBackwardParams alone;
      with_states(&alone);
      alone.dout = every.dout;
      alone.*o.view = every.*o.view;
      const Status st = LinearAttentionBackward(alone, Threads2());
      ASSERT_TRUE(st.ok()) << var.name << " " << o.name << " alone: " << st.message();
      const std::vector<float>& got = one.*o.buffer;
      const std::vector<float>& want = all.*o.buffer;
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
          << var.name << ": " << o.name << " alone differs from the full call's";
      for (const auto& other : outputs) {
        if (other.buffer == o.buffer) continue;
        const std::vector<float>& untouched = one.*other.buffer;
        EXPECT_TRUE(
            std::all_of(untouched.begin(), untouched.end(), [](float x) { return std::isnan(x); }))
            << var.name << ": " << other.name << " written by a call for " << o.name;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The fp64 reference's state gradients against finite differences of its forward.

// On the grid every value is a multiple of 2^-12 with |x| >= 2^-6: x +- 2^-8 and x +- 2^-9 (the
// finite-difference steps) are exact in f32 and cross no kink of relu or elu + 1.
double OnGrid(double x) {
  const double g = std::nearbyint(x * 4096.0) / 4096.0;
  if (std::fabs(g) >= 1.0 / 64.0) return g;
  return g < 0.0 ? -1.0 / 64.0 : 1.0 / 64.0;
}

TEST(LinearState, ReferenceStateGradientsMatchFiniteDifferences) {
  using test::Tensor;
  for (const Variant& var : Variants()) {
    for (const int64_t seq : {1, 5}) {
      const int64_t B = 2, Hq = 2, Hkv = 1, dk = var.map == LinearFeatureMap::kTaylor2 ? 2 : 3,
                    dv = 2, F = LinearFeatureDim(var.map, dk);
      const bool gla = var.decay == Decay::kGates || var.decay == Decay::kScalarGates;
      std::mt19937_64 rng(53 + static_cast<uint64_t>(seq));
      std::normal_distribution<double> normal(0.0, 1.0);
      const bool positive = var.normalize && var.map == LinearFeatureMap::kIdentity;
      auto fill = [&](Tensor* t, bool pos, double mul) {
        t->ForEach([&](const test::Index& i) {
          double x = normal(rng);
          if (pos) x = std::fabs(x) + 0.25;
          t->Set(i, OnGrid(x * mul));
        });
      };
      Tensor q(DType::kF32, {B, seq, Hq, dk}), k(DType::kF32, {B, seq, Hkv, dk}),
          v(DType::kF32, {B, seq, Hkv, dv}), dout(DType::kF32, {B, seq, Hq, dv}),
          s0(DType::kF32, {B, Hq, F, dv}), z0(DType::kF32, {B, Hq, F}),
          dfs(DType::kF32, {B, Hq, F, dv}), dfz(DType::kF32, {B, Hq, F}), decay(DType::kF32, {Hq});
      fill(&q, positive, 1.0);
      fill(&k, positive, 1.0);
      fill(&v, false, 1.0);
      fill(&dout, false, 1.0);
      fill(&s0, false, 1.0);
      fill(&z0, true, 1.0);
      fill(&dfs, false, 1.0);
      fill(&dfz, false, 1.0);
      decay.Set({0}, 0.75);
      decay.Set({1}, 0.5);
      Tensor gates = var.decay == Decay::kScalarGates ? Tensor(DType::kF32, {B, seq, Hq})
                                                      : Tensor(DType::kF32, {B, seq, Hq, dk});
      gates.ForEach([&](const test::Index& i) {
        gates.Set(i, OnGrid(-0.05 - 0.3 * std::fabs(normal(rng))));
      });

      LinearAttentionBackwardParams bp;
      LinearAttentionParams& p = bp.forward;
      p.q = q.view(), p.k = k.view(), p.v = v.view();
      p.feature_map = var.map;
      p.normalize = var.normalize;
      p.prefix_len = std::min<int64_t>(var.prefix > 0 ? 3 : 0, seq);
      if (var.decay == Decay::kLambda) p.decay = decay.view();
      if (gla) p.gates = gates.view();
      p.initial_state = s0.view();
      if (var.normalize) p.initial_normalizer = z0.view();
      bp.dout = dout.view();
      bp.d_final_state = dfs.view();
      if (var.normalize) bp.d_final_normalizer = dfz.view();

      std::vector<double> gq(static_cast<size_t>(q.numel())), gk(static_cast<size_t>(k.numel())),
          gv(static_cast<size_t>(v.numel())), gg(gla ? static_cast<size_t>(gates.numel()) : 0),
          gs(static_cast<size_t>(s0.numel())), gz(static_cast<size_t>(z0.numel()));
      ref::LinearBackwardF64(bp, gq.data(), gk.data(), gv.data(), gla ? gg.data() : nullptr,
                             gs.data(), var.normalize ? gz.data() : nullptr);

      // L = dout . out + dF . final_state (+ dFz . final_normalizer), all fp64.
      const auto loss = [&] {
        std::vector<double> out(static_cast<size_t>(dout.numel())),
            fs(static_cast<size_t>(s0.numel())), fz(static_cast<size_t>(z0.numel()));
        ref::LinearForwardF64(p, out.data(), fs.data(), fz.data());
        double l = 0.0;
        const std::vector<double> g = dout.ToVector(), df = dfs.ToVector(), dz = dfz.ToVector();
        for (size_t i = 0; i < out.size(); ++i) l += g[i] * out[i];
        for (size_t i = 0; i < fs.size(); ++i) l += df[i] * fs[i];
        for (size_t i = 0; i < fz.size() && var.normalize; ++i) l += dz[i] * fz[i];
        return l;
      };
      const std::string what = var.name + " S=" + std::to_string(seq);
      SCOPED_TRACE(what);
      EXPECT_TRUE(test::CheckClose(gq, test::FiniteDifferenceGradient(&q, loss),
                                   test::kFiniteDifferenceCeiling, "dq"));
      EXPECT_TRUE(test::CheckClose(gk, test::FiniteDifferenceGradient(&k, loss),
                                   test::kFiniteDifferenceCeiling, "dk"));
      EXPECT_TRUE(test::CheckClose(gv, test::FiniteDifferenceGradient(&v, loss),
                                   test::kFiniteDifferenceCeiling, "dv"));
      if (gla) {
        EXPECT_TRUE(test::CheckClose(gg, test::FiniteDifferenceGradient(&gates, loss),
                                     test::kFiniteDifferenceCeiling, "dgates"));
      }
      EXPECT_TRUE(test::CheckClose(gs, test::FiniteDifferenceGradient(&s0, loss),
                                   test::kFiniteDifferenceCeiling, "d_initial_state"));
      if (var.normalize) {
        EXPECT_TRUE(test::CheckClose(gz, test::FiniteDifferenceGradient(&z0, loss),
                                     test::kFiniteDifferenceCeiling, "d_initial_normalizer"));
      }
      // Not a test of zeros.
      double largest = 0.0;
      for (double x : gs) largest = std::max(largest, std::fabs(x));
      EXPECT_GT(largest, 1e-2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: a clear error naming the argument, and nothing written.

TEST(LinearState, BadInputsAreRejected) {
  Variant var{"elu1 normalized", LinearFeatureMap::kElu1, Decay::kNone, true};
  Shape s;
  Problem pr(var, s, 61);
  const size_t state_size = pr.StateSize(), norm_size = pr.NormSize();
  std::vector<float> wide_state(state_size + 64, 0.5f), other_norm(norm_size, 0.5f);
  const auto bad_shape = [&](std::vector<float>* x) {
    return MakeView4(x->data(), DType::kF32, s.batch, s.heads_q, pr.feat() + 1, s.dv);
  };
  const auto bf16 = [&](std::vector<float>* x) {
    TensorView t = pr.StateView(x);
    t.dtype = DType::kBF16;
    return t;
  };
  const std::vector<std::pair<std::string, std::function<void(LinearAttentionBackwardParams&)>>>
      cases = {
          {"d_final_state", [&](auto& bp) { bp.d_final_state = bad_shape(&wide_state); }},
          {"d_final_state", [&](auto& bp) { bp.d_final_state = bf16(&wide_state); }},
          {"d_initial_state", [&](auto& bp) { bp.d_initial_state = bad_shape(&wide_state); }},
          {"d_initial_state", [&](auto& bp) { bp.d_initial_state = bf16(&wide_state); }},
          {"d_final_normalizer",
           [&](auto& bp) {
             bp.d_final_normalizer =
                 MakeView3(other_norm.data(), DType::kF32, s.batch, s.heads_q + 1, pr.feat());
           }},
          {"d_final_normalizer",  // without normalize
           [&](auto& bp) {
             bp.forward.normalize = false;
             bp.d_final_normalizer = pr.NormView(&other_norm);
           }},
          {"d_initial_state",  // non-causal: no state
           [&](auto& bp) {
             bp.forward.causal = false;
             bp.d_final_state = TensorView();
           }},
          {"d_initial_state",  // an output over an input
           [&](auto& bp) { bp.d_initial_state = bp.d_final_state; }},
          {"d_initial_state",  // no gradient output at all
           [&](auto& bp) {
             bp.dq = bp.dk = bp.dv = bp.dgates = bp.d_initial_state = bp.d_initial_normalizer =
                 TensorView();
           }},
          {"dq",
           [&](auto& bp) {
             bp.dq = bp.dk = bp.dv = bp.dgates = bp.d_initial_state = bp.d_initial_normalizer =
                 TensorView();
           }},
          {"initial_state", [&](auto& bp) { bp.forward.initial_state = bad_shape(&wide_state); }},
      };
  for (const auto& [name, set] : cases) {
    Gradients g = AllocateGradients(pr);
    for (auto* x : {&g.dq, &g.dk, &g.dv, &g.d_state, &g.d_norm}) {
      std::fill(x->begin(), x->end(), 3.0f);
    }
    LinearAttentionBackwardParams bp = BackwardInto(pr, &g, 0, s.seq, true);
    bp.forward = pr.Forward();
    bp.d_final_state = pr.DFinal();
    bp.d_final_normalizer = pr.DFinalNorm();
    set(bp);
    const Status st = LinearAttentionBackward(bp, Context());
    ASSERT_FALSE(st.ok()) << name;
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.message();
    EXPECT_NE(st.message().find(name), std::string::npos) << name << ": " << st.message();
    for (auto* x : {&g.dq, &g.dk, &g.dv, &g.d_state, &g.d_norm}) {
      EXPECT_TRUE(std::all_of(x->begin(), x->end(), [](float e) { return e == 3.0f; })) << name;
    }
  }

  // The forward: out unset without final_state, and the recurrent form without out.
  std::vector<float> state(state_size, 3.0f);
  LinearAttentionParams p = pr.Forward();
  Status st = LinearAttentionForward(p, Context());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message().rfind("out: expected", 0), 0u) << st.message();
  p.final_normalizer = pr.NormView(&other_norm);
  st = LinearAttentionForward(p, Context());
  EXPECT_EQ(st.message().rfind("out: expected", 0), 0u) << st.message();
  p.final_state = pr.StateView(&state);
  st = LinearAttentionRecurrent(p, Context());
  EXPECT_EQ(st.message().rfind("out: expected", 0), 0u) << st.message();
  EXPECT_TRUE(std::all_of(state.begin(), state.end(), [](float e) { return e == 3.0f; }));
  // A state-only call still validates the rest.
  p.final_state = bad_shape(&wide_state);
  st = LinearAttentionForward(p, Context());
  EXPECT_NE(st.message().find("final_state"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace tessera
