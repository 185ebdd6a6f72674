// SPDX-License-Identifier: Apache-2.0
// Argument validation for linear attention: every check runs before any work, and every message
// names the argument, what was expected and what was given.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/dispatch.h"
#include "linear/linear_problem.h"

namespace tessera {
namespace {

// Largest feature dim F: the state of one head is F x Dv floats per worker.
constexpr int64_t kMaxFeatureDim = kMaxLinearFeatureDim;

std::string Dims(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

// An optional f32 tensor of an exact shape.
Status CheckF32(const char* name, const TensorView& t, std::initializer_list<int64_t> shape,
                bool writable) {
  const int64_t* dims = shape.begin();
  Status s = CheckShape(name, t, static_cast<int32_t>(shape.size()), dims, "shape " + Dims(shape),
                        writable);
  if (!s.ok()) return s;
  if (t.dtype != DType::kF32) {
    return Status::InvalidArgument(Expected(name, "dtype f32", DTypeName(t.dtype)));
  }
  return Status::Ok();
}

// Also called on optional views left unset (out of a state-only call, unrequested gradients),
// which were never validated: their rank may be anything, so at most 4 strides are read.
void CopyStrides(const TensorView& t, int64_t* strides) {
  for (int i = 0; i < t.rank && i < 4; ++i) strides[i] = t.strides[i];
}

}  // namespace

int64_t LinearFeatureDim(LinearFeatureMap map, int64_t dk, bool lrpe) {
  if (map != LinearFeatureMap::kTaylor2) return lrpe ? 2 * dk : dk;  // dk <= 512: no overflow
  int64_t f = 0;
  if (!CheckedMul(dk, dk, &f) || !CheckedAdd(f, dk, &f) || !CheckedAdd(f, 1, &f)) {
    return std::numeric_limits<int64_t>::max();
  }
  return f;
}

Status ValidateLinearAttention(const LinearAttentionParams& p, LinearProblem* prob, bool with_out) {
  const struct {
    const char* name;
    const TensorView* view;
    bool writable;
  } tensors[] = {{"q", &p.q, false}, {"k", &p.k, false}, {"v", &p.v, false}, {"out", &p.out, true}};
  for (const auto& t : tensors) {
    if (!with_out && t.view == &p.out) continue;
    if (t.view->rank != 4) {
      return Status::InvalidArgument(
          Expected(t.name, "rank 4 [B, S, H, D]", "rank " + std::to_string(t.view->rank)));
    }
    Status s = CheckRankAndStrides(t.name, *t.view, t.writable);
    if (!s.ok()) return s;
  }
  if (!IsSupportedDType(p.q.dtype)) {
    return Status::InvalidArgument(Expected("q", "dtype f32, bf16 or f16", DTypeName(p.q.dtype)));
  }
  for (const auto& t : tensors) {
    if (!with_out && t.view == &p.out) continue;
    if (t.view->dtype != p.q.dtype) {
      return Status::InvalidArgument(
          Expected(t.name, std::string("dtype ") + DTypeName(p.q.dtype) + " (the dtype of q)",
                   DTypeName(t.view->dtype)));
    }
  }
  const int64_t B = p.q.shape[0], S = p.q.shape[1], Hq = p.q.shape[2], Dk = p.q.shape[3];
  const int64_t Hkv = p.k.shape[2], Dv = p.v.shape[3];
  if (Dk < 1 || Dk > kMaxHeadDim) {
    return Status::InvalidArgument(
        Expected("q", "head dim in [1, " + std::to_string(kMaxHeadDim) + "]", ShapeString(p.q)));
  }
  if (p.k.shape[0] != B || p.k.shape[1] != S || p.k.shape[3] != Dk || Hkv < 1 || Hq % Hkv != 0) {
    return Status::InvalidArgument(Expected("k",
                                            "shape [" + std::to_string(B) + ", " +
                                                std::to_string(S) + ", Hkv, " + std::to_string(Dk) +
                                                "] with Hkv dividing " + std::to_string(Hq),
                                            ShapeString(p.k)));
  }
  if (p.v.shape[0] != B || p.v.shape[1] != S || p.v.shape[2] != Hkv || Dv < 1 || Dv > kMaxHeadDim) {
    return Status::InvalidArgument(Expected("v",
                                            "shape [" + std::to_string(B) + ", " +
                                                std::to_string(S) + ", " + std::to_string(Hkv) +
                                                ", Dv] with Dv in [1, 512]",
                                            ShapeString(p.v)));
  }
  if (with_out && (p.out.shape[0] != B || p.out.shape[1] != S || p.out.shape[2] != Hq ||
                   p.out.shape[3] != Dv)) {
    return Status::InvalidArgument(
        Expected("out", "shape " + Dims({B, S, Hq, Dv}), ShapeString(p.out)));
  }
  if (p.feature_map != LinearFeatureMap::kIdentity && p.feature_map != LinearFeatureMap::kElu1 &&
      p.feature_map != LinearFeatureMap::kRelu && p.feature_map != LinearFeatureMap::kTaylor2) {
    return Status::InvalidArgument(Expected("feature_map", "kIdentity, kElu1, kRelu or kTaylor2",
                                            std::to_string(static_cast<int>(p.feature_map))));
  }
  const bool lrpe = p.lrpe_theta.data != nullptr;
  if (lrpe && p.feature_map == LinearFeatureMap::kTaylor2) {
    return Status::InvalidArgument(
        "lrpe_theta: expected the identity, elu + 1 or relu feature map, got the Taylor map");
  }
  if (lrpe && p.gates.data != nullptr) {
    return Status::InvalidArgument(
        "lrpe_theta: expected no gates (gates act on the Dk key channels), got gates");
  }
  if (lrpe) {
    if (p.lrpe_theta.rank == 2) {
      Status s = CheckF32("lrpe_theta", p.lrpe_theta, {Hq, Dk}, false);
      if (!s.ok()) return s;
    } else {
      Status s = CheckF32("lrpe_theta", p.lrpe_theta, {Dk}, false);
      if (!s.ok()) return s;
    }
    const float* th = static_cast<const float*>(p.lrpe_theta.data);
    const int64_t heads = p.lrpe_theta.rank == 2 ? Hq : 1;
    const int64_t hs = p.lrpe_theta.rank == 2 ? p.lrpe_theta.strides[0] : 0;
    const int64_t fs = p.lrpe_theta.strides[p.lrpe_theta.rank - 1];
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t f = 0; f < Dk; ++f) {
        const float x = th[h * hs + f * fs];
        if (!std::isfinite(x)) {
          return Status::InvalidArgument(
              Expected("lrpe_theta", "finite angles", std::to_string(x) + " at " + Dims({h, f})));
        }
      }
    }
  }
  if (p.position_offset < 0 || p.position_offset > (int64_t{1} << 52)) {
    return Status::InvalidArgument(
        Expected("position_offset", "in [0, 2^52]", std::to_string(p.position_offset)));
  }
  const int64_t F = LinearFeatureDim(p.feature_map, Dk, lrpe);
  if (F > kMaxFeatureDim) {
    return Status::InvalidArgument(Expected(
        "q", "a feature dim 1 + Dk + Dk^2 <= " + std::to_string(kMaxFeatureDim) + " (Taylor map)",
        "Dk = " + std::to_string(Dk)));
  }
  if (p.scale.has_value() && !std::isfinite(*p.scale)) {
    return Status::InvalidArgument(Expected("scale", "a finite value", std::to_string(*p.scale)));
  }
  if (!(p.eps > 0.0f) || !std::isfinite(p.eps)) {
    return Status::InvalidArgument(Expected("eps", "a finite value > 0", std::to_string(p.eps)));
  }
  if (p.prefix_len < 0 || p.prefix_len > S) {
    return Status::InvalidArgument(
        Expected("prefix_len", "in [0, " + std::to_string(S) + "]", std::to_string(p.prefix_len)));
  }
  if (p.chunk_size < 16 || p.chunk_size > 256 || p.chunk_size % 16 != 0) {
    return Status::InvalidArgument(
        Expected("chunk_size", "a multiple of 16 in [16, 256]", std::to_string(p.chunk_size)));
  }
  if (p.window < 0) {
    return Status::InvalidArgument(Expected("window", ">= 0", std::to_string(p.window)));
  }
  if (p.window > 0 && !p.causal) {
    return Status::InvalidArgument(
        "window: expected causal attention for the sliding-window part, got causal = false");
  }
  const bool decayed = p.decay.data != nullptr || p.gates.data != nullptr;
  if (decayed && (!p.causal || p.prefix_len > 0)) {
    return Status::InvalidArgument(
        std::string(p.decay.data != nullptr ? "decay" : "gates") +
        ": expected causal attention without a prefix (decay is defined along the causal order), "
        "got " +
        (p.causal ? "prefix_len = " + std::to_string(p.prefix_len) : "causal = false"));
  }
  if (p.decay.data != nullptr && p.gates.data != nullptr) {
    return Status::InvalidArgument("gates: expected either decay or gates, got both");
  }
  if (p.decay.data != nullptr) {
    Status s = CheckF32("decay", p.decay, {Hq}, false);
    if (!s.ok()) return s;
    const float* d = static_cast<const float*>(p.decay.data);
    for (int64_t h = 0; h < Hq; ++h) {
      const float lambda = d[h * p.decay.strides[0]];
      if (!(lambda > 0.0f && lambda <= 1.0f)) {
        return Status::InvalidArgument(
            Expected("decay", "lambda in (0, 1] per head",
                     std::to_string(lambda) + " at head " + std::to_string(h)));
      }
    }
  }
  if (p.gates.data != nullptr) {
    // Rank 4: one gate per channel; rank 3: one per token and head (scalar gates).
    const bool scalar = p.gates.rank == 3;
    if (p.gates.rank != 3 && p.gates.rank != 4) {
      return Status::InvalidArgument(Expected("gates",
                                              "rank 4 " + Dims({B, S, Hq, Dk}) +
                                                  " (per channel) or rank 3 " + Dims({B, S, Hq}) +
                                                  " (scalar per token and head)",
                                              "rank " + std::to_string(p.gates.rank)));
    }
    Status s = scalar ? CheckF32("gates", p.gates, {B, S, Hq}, false)
                      : CheckF32("gates", p.gates, {B, S, Hq, Dk}, false);
    if (!s.ok()) return s;
    if (p.feature_map != LinearFeatureMap::kIdentity) {
      return Status::InvalidArgument(
          "gates: expected the identity feature map (gates act on the Dk key channels), got "
          "another feature map");
    }
    const float* g = static_cast<const float*>(p.gates.data);
    const int64_t* st = p.gates.strides;
    const int64_t channels = scalar ? 1 : Dk, channel_stride = scalar ? 0 : st[3];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < S; ++t) {
        for (int64_t h = 0; h < Hq; ++h) {
          for (int64_t c = 0; c < channels; ++c) {
            const float x = g[b * st[0] + t * st[1] + h * st[2] + c * channel_stride];
            if (!(x <= 0.0f) || !std::isfinite(x)) {
              return Status::InvalidArgument(Expected(
                  "gates", "finite log-space gates <= 0",
                  std::to_string(x) + " at " + (scalar ? Dims({b, t, h}) : Dims({b, t, h, c}))));
            }
          }
        }
      }
    }
  }
  const bool any_state = p.initial_state.data != nullptr || p.final_state.data != nullptr ||
                         p.initial_normalizer.data != nullptr || p.final_normalizer.data != nullptr;
  if (any_state && !p.causal) {
    return Status::InvalidArgument(
        "initial_state / final_state: expected causal attention (a state carries the causal "
        "prefix), got causal = false");
  }
  const struct {
    const char* name;
    const TensorView* view;
    bool writable;
    bool normalizer;
  } states[] = {{"initial_state", &p.initial_state, false, false},
                {"final_state", &p.final_state, true, false},
                {"initial_normalizer", &p.initial_normalizer, false, true},
                {"final_normalizer", &p.final_normalizer, true, true}};
  for (const auto& st : states) {
    if (st.view->data == nullptr) continue;
    if (st.normalizer && !p.normalize) {
      return Status::InvalidArgument(std::string(st.name) +
                                     ": expected no normalizer state without normalize, got one");
    }
    Status s = st.normalizer ? CheckF32(st.name, *st.view, {B, Hq, F}, st.writable)
                             : CheckF32(st.name, *st.view, {B, Hq, F, Dv}, st.writable);
    if (!s.ok()) return s;
  }

  Status alias = CheckDisjoint({ViewRegion("out", p.out), ViewRegion("final_state", p.final_state),
                                ViewRegion("final_normalizer", p.final_normalizer)},
                               {ViewRegion("q", p.q), ViewRegion("k", p.k), ViewRegion("v", p.v),
                                ViewRegion("decay", p.decay), ViewRegion("gates", p.gates),
                                ViewRegion("initial_state", p.initial_state),
                                ViewRegion("initial_normalizer", p.initial_normalizer)});
  if (!alias.ok()) return alias;

  LinearProblem& r = *prob;
  r = LinearProblem();
  r.batch = B;
  r.seq = S;
  r.heads_q = Hq;
  r.heads_kv = Hkv;
  r.group = Hq / Hkv;
  r.dk = Dk;
  r.dv = Dv;
  r.feat = F;
  r.dtype = p.q.dtype;
  r.q = p.q.data;
  r.k = p.k.data;
  r.v = p.v.data;
  r.out = p.out.data;
  CopyStrides(p.q, r.q_stride);
  CopyStrides(p.k, r.k_stride);
  CopyStrides(p.v, r.v_stride);
  CopyStrides(p.out, r.out_stride);
  r.map = p.feature_map;
  r.scale = p.scale.has_value() ? *p.scale
            : p.feature_map == LinearFeatureMap::kTaylor2
                ? 1.0f
                : static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dk)));
  r.causal = p.causal;
  r.prefix = p.causal ? p.prefix_len : S;
  r.normalize = p.normalize;
  r.eps = p.eps;
  if (p.decay.data != nullptr) {
    r.decay = static_cast<const float*>(p.decay.data);
    r.decay_stride = p.decay.strides[0];
  }
  if (p.gates.data != nullptr) {
    r.gates = static_cast<const float*>(p.gates.data);
    CopyStrides(p.gates, r.gates_stride);
    // Scalar gates read as per-channel gates with a zero channel stride.
    r.scalar_gates = p.gates.rank == 3;
    if (r.scalar_gates) r.gates_stride[3] = 0;
  }
  // A window past the sequence sees every key of the call: the same as window = S, and the
  // kernels' sizes (chunk + window) stay small.
  r.window = std::min(p.window, S);
  if (lrpe) {
    r.lrpe_theta = static_cast<const float*>(p.lrpe_theta.data);
    const bool per_head = p.lrpe_theta.rank == 2;
    r.lrpe_theta_stride[0] = per_head ? p.lrpe_theta.strides[0] : 0;
    r.lrpe_theta_stride[1] = p.lrpe_theta.strides[per_head ? 1 : 0];
  }
  r.position_offset = p.position_offset;
  if (p.initial_state.data != nullptr) {
    r.state_in = static_cast<const float*>(p.initial_state.data);
    CopyStrides(p.initial_state, r.state_in_stride);
  }
  if (p.initial_normalizer.data != nullptr) {
    r.norm_in = static_cast<const float*>(p.initial_normalizer.data);
    CopyStrides(p.initial_normalizer, r.norm_in_stride);
  }
  if (p.final_state.data != nullptr) {
    r.state_out = static_cast<float*>(p.final_state.data);
    CopyStrides(p.final_state, r.state_out_stride);
  }
  if (p.final_normalizer.data != nullptr) {
    r.norm_out = static_cast<float*>(p.final_normalizer.data);
    CopyStrides(p.final_normalizer, r.norm_out_stride);
  }
  r.chunk = p.chunk_size;
  return Status::Ok();
}

Status ValidateLinearAttentionBackward(const LinearAttentionBackwardParams& p,
                                       LinearBackwardProblem* prob) {
  // forward.final_state / final_normalizer are ignored (not checked: the forward wrote them), and
  // forward.out is not read: checked only when set.
  LinearAttentionParams forward = p.forward;
  forward.final_state = TensorView();
  forward.final_normalizer = TensorView();
  LinearProblem fwd;
  Status status = ValidateLinearAttention(forward, &fwd, forward.out.data != nullptr);
  if (!status.ok()) return status;
  if (fwd.window > 0) {
    return Status::Unimplemented(
        "forward.window: expected 0 in the backward (the sliding-window part's gradient is not "
        "implemented; use AttentionBackward for it), got " +
        std::to_string(fwd.window));
  }
  // Every gradient output is optional (data == nullptr: not computed), but one must be set; an
  // empty dq, dk or dv (a shaped view with no elements, whose data may be nullptr) counts.
  const auto set = [](const TensorView& t) {
    return t.data != nullptr || (t.rank != 0 && t.numel() == 0);
  };
  if (!set(p.dq) && !set(p.dk) && !set(p.dv) && p.dgates.data == nullptr &&
      p.d_initial_state.data == nullptr && p.d_initial_normalizer.data == nullptr) {
    return Status::InvalidArgument(
        "dq / dk / dv / dgates / d_initial_state / d_initial_normalizer: expected at least one "
        "gradient output, got none");
  }
  const int64_t out_shape[4] = {fwd.batch, fwd.seq, fwd.heads_q, fwd.dv};
  const struct {
    const char* name;
    const TensorView* view;
    const int64_t* shape;
    const char* like_name;
    bool writable;
  } grads[] = {{"dout", &p.dout, out_shape, "out", false},
               {"dq", &p.dq, p.forward.q.shape, "q", true},
               {"dk", &p.dk, p.forward.k.shape, "k", true},
               {"dv", &p.dv, p.forward.v.shape, "v", true}};
  for (const auto& g : grads) {
    if (g.writable && g.view->data == nullptr) continue;
    const int64_t* s = g.shape;
    Status st = CheckShape(g.name, *g.view, 4, s,
                           std::string("shape ") + Dims({s[0], s[1], s[2], s[3]}) +
                               " (the shape of " + g.like_name + ")",
                           g.writable);
    if (!st.ok()) return st;
    if (g.view->dtype != p.forward.q.dtype) {
      return Status::InvalidArgument(Expected(
          g.name, std::string("dtype ") + DTypeName(p.forward.q.dtype) + " (the dtype of q)",
          DTypeName(g.view->dtype)));
    }
  }
  if (p.dgates.data != nullptr) {
    if (fwd.gates == nullptr) {
      return Status::InvalidArgument("dgates: expected no dgates without forward.gates, got one");
    }
    Status st = fwd.scalar_gates
                    ? CheckF32("dgates", p.dgates, {fwd.batch, fwd.seq, fwd.heads_q}, true)
                    : CheckF32("dgates", p.dgates, {fwd.batch, fwd.seq, fwd.heads_q, fwd.dk}, true);
    if (!st.ok()) return st;
  }
  const bool any_state_grad =
      p.d_final_state.data != nullptr || p.d_initial_state.data != nullptr ||
      p.d_final_normalizer.data != nullptr || p.d_initial_normalizer.data != nullptr;
  if (any_state_grad && !fwd.causal) {
    return Status::InvalidArgument(
        "d_final_state / d_initial_state: expected causal attention (a state carries the causal "
        "prefix), got causal = false");
  }
  const int64_t B = fwd.batch, Hq = fwd.heads_q, F = fwd.feat, Dv = fwd.dv;
  const struct {
    const char* name;
    const TensorView* view;
    bool writable;
    bool normalizer;
  } state_grads[] = {{"d_final_state", &p.d_final_state, false, false},
                     {"d_initial_state", &p.d_initial_state, true, false},
                     {"d_final_normalizer", &p.d_final_normalizer, false, true},
                     {"d_initial_normalizer", &p.d_initial_normalizer, true, true}};
  for (const auto& st : state_grads) {
    if (st.view->data == nullptr) continue;
    if (st.normalizer && !fwd.normalize) {
      return Status::InvalidArgument(
          std::string(st.name) + ": expected no normalizer gradient without normalize, got one");
    }
    Status s = st.normalizer ? CheckF32(st.name, *st.view, {B, Hq, F}, st.writable)
                             : CheckF32(st.name, *st.view, {B, Hq, F, Dv}, st.writable);
    if (!s.ok()) return s;
  }
  Status alias = CheckDisjoint(
      {ViewRegion("dq", p.dq), ViewRegion("dk", p.dk), ViewRegion("dv", p.dv),
       ViewRegion("dgates", p.dgates), ViewRegion("d_initial_state", p.d_initial_state),
       ViewRegion("d_initial_normalizer", p.d_initial_normalizer)},
      {ViewRegion("q", p.forward.q), ViewRegion("k", p.forward.k), ViewRegion("v", p.forward.v),
       ViewRegion("dout", p.dout), ViewRegion("decay", p.forward.decay),
       ViewRegion("gates", p.forward.gates), ViewRegion("initial_state", p.forward.initial_state),
       ViewRegion("initial_normalizer", p.forward.initial_normalizer),
       ViewRegion("d_final_state", p.d_final_state),
       ViewRegion("d_final_normalizer", p.d_final_normalizer)});
  if (!alias.ok()) return alias;

  LinearBackwardProblem& r = *prob;
  r = LinearBackwardProblem();
  r.fwd = fwd;
  r.dout = p.dout.data;
  r.dq = p.dq.data;
  r.dk = p.dk.data;
  r.dv = p.dv.data;
  CopyStrides(p.dout, r.dout_stride);
  CopyStrides(p.dq, r.dq_stride);
  CopyStrides(p.dk, r.dk_stride);
  CopyStrides(p.dv, r.dv_stride);
  if (p.dgates.data != nullptr) {
    r.dgates = static_cast<float*>(p.dgates.data);
    CopyStrides(p.dgates, r.dgates_stride);
  }
  if (p.d_final_state.data != nullptr) {
    r.d_state_in = static_cast<const float*>(p.d_final_state.data);
    CopyStrides(p.d_final_state, r.d_state_in_stride);
  }
  if (p.d_final_normalizer.data != nullptr) {
    r.d_norm_in = static_cast<const float*>(p.d_final_normalizer.data);
    CopyStrides(p.d_final_normalizer, r.d_norm_in_stride);
  }
  if (p.d_initial_state.data != nullptr) {
    r.d_state_out = static_cast<float*>(p.d_initial_state.data);
    CopyStrides(p.d_initial_state, r.d_state_out_stride);
  }
  if (p.d_initial_normalizer.data != nullptr) {
    r.d_norm_out = static_cast<float*>(p.d_initial_normalizer.data);
    CopyStrides(p.d_initial_normalizer, r.d_norm_out_stride);
  }
  return Status::Ok();
}

}  // namespace tessera
