// Argument validation for AttentionForward: every check runs before any work, and every message
// names the argument, what was expected and what was given.
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "attention/attention_problem.h"
#include "attention/flash_fwd.h"
#include "core/check.h"

namespace tessera {
namespace {

constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max() / 4;

// Brings a varlen [T, H, D] view to [1, T, H, D]; a rank-4 view is kept.
TensorView AsRank4(const TensorView& t) {
  if (t.rank == 4) return t;
  TensorView r = t;
  r.rank = 4;
  r.shape[0] = 1;
  r.strides[0] = 0;
  for (int i = 0; i < 3; ++i) {
    r.shape[i + 1] = t.shape[i];
    r.strides[i + 1] = t.strides[i];
  }
  return r;
}

Status CheckCuSeqlens(const char* name, const int32_t* cu, int32_t num_seqs, int64_t extent) {
  if (cu[0] != 0) {
    return Status::InvalidArgument(Expected(name, "cu_seqlens[0] == 0", std::to_string(cu[0])));
  }
  for (int32_t s = 0; s < num_seqs; ++s) {
    if (cu[s + 1] < cu[s]) {
      return Status::InvalidArgument(std::string(name) + ": expected non-decreasing offsets, got " +
                                     std::to_string(cu[s + 1]) + " after " + std::to_string(cu[s]) +
                                     " at index " + std::to_string(s + 1));
    }
  }
  if (cu[num_seqs] > extent) {
    return Status::InvalidArgument(std::string(name) +
                                   ": expected the last offset <= " + std::to_string(extent) +
                                   " (tokens in the tensor), got " + std::to_string(cu[num_seqs]));
  }
  return Status::Ok();
}

}  // namespace

Status ValidateAttention(const AttentionParams& p, AttentionProblem* prob) {
  const bool varlen = p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr;
  if (varlen && (p.cu_seqlens_q == nullptr || p.cu_seqlens_k == nullptr)) {
    return Status::InvalidArgument(
        std::string("cu_seqlens: expected both cu_seqlens_q and cu_seqlens_k (or neither), got "
                    "only ") +
        (p.cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k"));
  }
  if (varlen && p.num_seqs < 0) {
    return Status::InvalidArgument(
        Expected("num_seqs", "a non-negative count", std::to_string(p.num_seqs)));
  }

  const struct {
    const char* name;
    const TensorView* view;
    bool writable;
  } tensors[] = {{"q", &p.q, false}, {"k", &p.k, false}, {"v", &p.v, false}, {"out", &p.out, true}};
  for (const auto& t : tensors) {
    const TensorView& v = *t.view;
    if (varlen) {
      if (v.rank != 3 && !(v.rank == 4 && v.shape[0] == 1)) {
        return Status::InvalidArgument(
            Expected(t.name, "varlen layout [T, H, D] or [1, T, H, D]",
                     "rank " + std::to_string(v.rank) + " " + ShapeString(v)));
      }
    } else if (v.rank != 4) {
      return Status::InvalidArgument(
          Expected(t.name, "rank 4 [B, S, H, D]", "rank " + std::to_string(v.rank)));
    }
    Status s = CheckRankAndStrides(t.name, v, t.writable);
    if (!s.ok()) return s;
  }
  if (!IsSupportedDType(p.q.dtype)) {
    return Status::InvalidArgument(
        Expected("q", "dtype f32, bf16 or f16", std::to_string(static_cast<int>(p.q.dtype))));
  }
  for (const auto& t : tensors) {
    if (t.view->dtype != p.q.dtype) {
      return Status::InvalidArgument(Expected(
          t.name, std::string("dtype ") + DTypeName(p.q.dtype) + " (the dtype of q)",
          IsSupportedDType(t.view->dtype) ? DTypeName(t.view->dtype) : "an unknown dtype"));
    }
  }

  const TensorView q = AsRank4(p.q), k = AsRank4(p.k), v = AsRank4(p.v), o = AsRank4(p.out);
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Sk = k.shape[1], Hkv = k.shape[2];
  if (k.shape[0] != B) {
    return Status::InvalidArgument(
        Expected("k", "batch " + std::to_string(B) + " (the batch of q)", ShapeString(p.k)));
  }
  // Key positions are 32-bit inside the kernel (the same range as cu_seqlens).
  constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  if (Sq > kMaxTokens || Sk > kMaxTokens) {
    return Status::InvalidArgument(Expected(Sq > kMaxTokens ? "q" : "k",
                                            "at most 2^31 - 1 tokens per sequence axis",
                                            std::to_string(std::max(Sq, Sk))));
  }
  if (D < 1 || D > flash::kMaxHeadDim) {
    return Status::InvalidArgument(Expected(
        "q", "head dim D in [1, " + std::to_string(flash::kMaxHeadDim) + "]", std::to_string(D)));
  }
  if (k.shape[3] != D) {
    return Status::InvalidArgument(
        Expected("k", "head dim " + std::to_string(D) + " (the head dim of q)", ShapeString(p.k)));
  }
  if (Hkv < 1) {
    return Status::InvalidArgument(Expected("k", "at least one KV head", ShapeString(p.k)));
  }
  if (Hq % Hkv != 0) {
    return Status::InvalidArgument(
        Expected("k", "a KV head count dividing the " + std::to_string(Hq) + " query heads",
                 std::to_string(Hkv) + " KV heads"));
  }
  for (int i = 0; i < 4; ++i) {
    if (v.shape[i] != k.shape[i]) {
      if (i == 3) {
        return Status::Unimplemented(Expected("v",
                                              "head dim " + std::to_string(D) +
                                                  " (value head dim != key head dim is not "
                                                  "supported yet)",
                                              ShapeString(p.v)));
      }
      return Status::InvalidArgument(
          Expected("v", "shape " + ShapeString(p.k) + " (the shape of k)", ShapeString(p.v)));
    }
    if (o.shape[i] != q.shape[i]) {
      return Status::InvalidArgument(
          Expected("out", "shape " + ShapeString(p.q) + " (the shape of q)", ShapeString(p.out)));
    }
  }

  if (varlen) {
    Status s = CheckCuSeqlens("cu_seqlens_q", p.cu_seqlens_q, p.num_seqs, Sq);
    if (!s.ok()) return s;
    s = CheckCuSeqlens("cu_seqlens_k", p.cu_seqlens_k, p.num_seqs, Sk);
    if (!s.ok()) return s;
  }
  const int64_t num_seqs = varlen ? p.num_seqs : B;

  if (p.lse.data != nullptr) {
    Status s = CheckRankAndStrides("lse", p.lse, true);
    if (!s.ok()) return s;
    if (p.lse.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected("lse", "dtype f32", DTypeName(p.lse.dtype)));
    }
    bool shape_ok;
    if (varlen) {
      shape_ok =
          (p.lse.rank == 2 && p.lse.shape[0] == Hq && p.lse.shape[1] == Sq) ||
          (p.lse.rank == 3 && p.lse.shape[0] == 1 && p.lse.shape[1] == Hq && p.lse.shape[2] == Sq);
    } else {
      shape_ok =
          p.lse.rank == 3 && p.lse.shape[0] == B && p.lse.shape[1] == Hq && p.lse.shape[2] == Sq;
    }
    if (!shape_ok) {
      const std::string want = varlen ? "[" + std::to_string(Hq) + ", " + std::to_string(Sq) + "]"
                                      : "[" + std::to_string(B) + ", " + std::to_string(Hq) + ", " +
                                            std::to_string(Sq) + "]";
      return Status::InvalidArgument(Expected("lse", "shape " + want, ShapeString(p.lse)));
    }
  }

  if (p.scale.has_value() && !std::isfinite(*p.scale)) {
    return Status::InvalidArgument(Expected("scale", "a finite value", std::to_string(*p.scale)));
  }
  if (!(p.softcap >= 0.0f) || !std::isfinite(p.softcap)) {
    return Status::InvalidArgument(
        Expected("softcap", "a finite value >= 0 (0 disables)", std::to_string(p.softcap)));
  }
  if (p.window_left < -1) {
    return Status::InvalidArgument(
        Expected("window_left", "-1 (unbounded) or >= 0", std::to_string(p.window_left)));
  }
  if (p.window_right < -1) {
    return Status::InvalidArgument(
        Expected("window_right", "-1 (unbounded) or >= 0", std::to_string(p.window_right)));
  }
  if (p.align != MaskAlign::kBottomRight && p.align != MaskAlign::kTopLeft) {
    return Status::InvalidArgument(
        Expected("align", "kBottomRight or kTopLeft", std::to_string(static_cast<int>(p.align))));
  }
  if (p.alibi_slopes.data != nullptr) {
    const TensorView& a = p.alibi_slopes;
    Status s = CheckRankAndStrides("alibi_slopes", a, false);
    if (!s.ok()) return s;
    if (a.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected("alibi_slopes", "dtype f32", DTypeName(a.dtype)));
    }
    const bool shape_ok = (a.rank == 1 && a.shape[0] == Hq) ||
                          (a.rank == 2 && a.shape[0] == num_seqs && a.shape[1] == Hq);
    if (!shape_ok) {
      return Status::InvalidArgument(Expected("alibi_slopes",
                                              "shape [" + std::to_string(Hq) + "] or [" +
                                                  std::to_string(num_seqs) + ", " +
                                                  std::to_string(Hq) + "]",
                                              ShapeString(a)));
    }
  }

  AttentionProblem& r = *prob;
  r = AttentionProblem();
  r.batch = num_seqs;
  r.seq_q = Sq;
  r.seq_k = Sk;
  r.heads_q = Hq;
  r.heads_kv = Hkv;
  r.group = Hq / Hkv;
  r.dim = D;
  r.dtype = p.q.dtype;
  r.q = q.data;
  r.k = k.data;
  r.v = v.data;
  r.out = o.data;
  for (int i = 0; i < 4; ++i) {
    r.q_stride[i] = q.strides[i];
    r.k_stride[i] = k.strides[i];
    r.v_stride[i] = v.strides[i];
    r.out_stride[i] = o.strides[i];
  }
  if (p.lse.data != nullptr) {
    r.lse = static_cast<float*>(p.lse.data);
    const int first = p.lse.rank - 3;  // -1 for a varlen rank-2 view
    for (int i = 0; i < 3; ++i) r.lse_stride[i] = i + first >= 0 ? p.lse.strides[i + first] : 0;
  }
  r.scale = p.scale.has_value() ? *p.scale : static_cast<float>(1.0 / std::sqrt(double(D)));
  r.softcap = p.softcap;
  int64_t wl = p.window_left, wr = p.window_right;
  if (p.causal) wr = (wr < 0) ? 0 : std::min<int64_t>(wr, 0);
  r.window_left = wl < 0 ? kUnbounded : wl;
  r.window_right = wr < 0 ? kUnbounded : wr;
  r.top_left = p.align == MaskAlign::kTopLeft;
  if (p.alibi_slopes.data != nullptr) {
    r.alibi = static_cast<const float*>(p.alibi_slopes.data);
    if (p.alibi_slopes.rank == 1) {
      r.alibi_stride[0] = 0;
      r.alibi_stride[1] = p.alibi_slopes.strides[0];
    } else {
      r.alibi_stride[0] = p.alibi_slopes.strides[0];
      r.alibi_stride[1] = p.alibi_slopes.strides[1];
    }
  }
  if (varlen) {
    r.cu_seqlens_q = p.cu_seqlens_q;
    r.cu_seqlens_k = p.cu_seqlens_k;
  }
  return Status::Ok();
}

}  // namespace tessera

namespace tessera {

Status ValidateAttentionBackward(const AttentionBackwardParams& p, AttentionBackwardProblem* prob) {
  if (p.forward.lse.data == nullptr) {
    return Status::InvalidArgument(
        "forward.lse: expected the forward's log-sum-exp (the backward recomputes the scores "
        "from it), got nullptr");
  }
  AttentionProblem fwd;
  Status status = ValidateAttention(p.forward, &fwd);
  if (!status.ok()) return status;

  const struct {
    const char* name;
    const TensorView* view;
    const TensorView* like;  // the forward tensor whose shape it must have
    const char* like_name;
    bool writable;
  } grads[] = {{"dout", &p.dout, &p.forward.out, "out", false},
               {"dq", &p.dq, &p.forward.q, "q", true},
               {"dk", &p.dk, &p.forward.k, "k", true},
               {"dv", &p.dv, &p.forward.v, "v", true}};
  for (const auto& g : grads) {
    const TensorView& v = *g.view;
    bool same_shape = v.rank == g.like->rank;
    for (int i = 0; same_shape && i < v.rank; ++i) same_shape = v.shape[i] == g.like->shape[i];
    if (!same_shape) {
      return Status::InvalidArgument(
          Expected(g.name, "shape " + ShapeString(*g.like) + " (the shape of " + g.like_name + ")",
                   ShapeString(v)));
    }
    status = CheckRankAndStrides(g.name, v, g.writable);
    if (!status.ok()) return status;
    if (v.dtype != p.forward.q.dtype) {
      return Status::InvalidArgument(Expected(
          g.name, std::string("dtype ") + DTypeName(p.forward.q.dtype) + " (the dtype of q)",
          IsSupportedDType(v.dtype) ? DTypeName(v.dtype) : "an unknown dtype"));
    }
  }

  AttentionBackwardProblem& r = *prob;
  r = AttentionBackwardProblem();
  r.fwd = fwd;
  const TensorView dout = AsRank4(p.dout), dq = AsRank4(p.dq), dk = AsRank4(p.dk),
                   dv = AsRank4(p.dv);
  r.dout = dout.data;
  r.dq = dq.data;
  r.dk = dk.data;
  r.dv = dv.data;
  for (int i = 0; i < 4; ++i) {
    r.dout_stride[i] = dout.strides[i];
    r.dq_stride[i] = dq.strides[i];
    r.dk_stride[i] = dk.strides[i];
    r.dv_stride[i] = dv.strides[i];
  }
  return Status::Ok();
}

}  // namespace tessera
