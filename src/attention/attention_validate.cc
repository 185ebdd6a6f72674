// SPDX-License-Identifier: Apache-2.0
// Argument validation for AttentionForward: every check runs before any work, and every message
// names the argument, what was expected and what was given.
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/attention_problem.h"
#include "core/check.h"
#include "core/checked_math.h"
#include "core/dispatch.h"
#include "core/i32_view.h"

namespace tessera {
namespace {

constexpr int64_t kUnbounded = kUnboundedWindow;

// A window side as the kernels use it: -1, or a value no position needs (>= max(Sq, Sk): every
// query position lies in [min(0, Sk - Sq), max(Sq, Sk)) and every key in [0, Sk)), becomes
// kUnbounded, so that pos +- window never overflows on any route (tiled, decode, backward).
int64_t ResolveWindow(int64_t w, int64_t sq, int64_t sk) {
  return w < 0 || w >= std::max(sq, sk) ? kUnbounded : w;
}

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

// Strides of a mask view broadcast to `rank` dims: a dim of extent 1 reads with stride 0.
void BroadcastStrides(const TensorView& t, int64_t* strides) {
  for (int i = 0; i < t.rank; ++i) strides[i] = t.shape[i] == 1 ? 0 : t.strides[i];
}

// Validates params.mask against the problem's sizes and fills r->mask.
Status ValidateMasks(const AttentionParams& p, bool varlen, int64_t B, int64_t Sq, int64_t Sk,
                     int64_t Hq, AttentionProblem::Masks* r) {
  const MaskParams& m = p.mask;
  if (m.score != ScoreFunction::kSoftmax && m.score != ScoreFunction::kSigmoid) {
    return Status::InvalidArgument(
        Expected("mask.score", "kSoftmax or kSigmoid", std::to_string(static_cast<int>(m.score))));
  }
  if (m.score == ScoreFunction::kSigmoid) {
    if (!std::isfinite(m.sigmoid_bias)) {
      return Status::InvalidArgument(
          Expected("mask.sigmoid_bias", "a finite value", std::to_string(m.sigmoid_bias)));
    }
    if (p.lse.data != nullptr) {
      return Status::InvalidArgument(
          "lse: expected nullptr with mask.score = kSigmoid (sigmoid attention has no "
          "log-sum-exp), got a tensor");
    }
    r->sigmoid = true;
    r->sigmoid_bias = m.sigmoid_bias;
  }
  if (!m.any()) return Status::Ok();
  if (varlen) {
    return Status::InvalidArgument(
        "mask: expected a dense batch (no cu_seqlens) with block, neighborhood, sink, prefix, "
        "document, group, tree or dense masks, got cu_seqlens");
  }
  r->any = true;
  auto batch_heads_ok = [&](int64_t b, int64_t h) {
    return (b == 1 || b == B) && (h == 1 || h == Hq);
  };

  if (m.blocks.data != nullptr) {
    const TensorView& t = m.blocks;
    for (const auto& [name, bs] : {std::pair<const char*, int64_t>{"mask.block_q", m.block_q},
                                   {"mask.block_k", m.block_k}}) {
      // Up to 2^30: a larger block covers any sequence the same way, and block index * block
      // size stays far from overflow.
      if (bs < 16 || bs % 16 != 0 || bs > (int64_t{1} << 30)) {
        return Status::InvalidArgument(
            Expected(name, "a positive multiple of 16 up to 2^30", std::to_string(bs)));
      }
    }
    Status s = CheckRankAndStrides("mask.blocks", t, false);
    if (!s.ok()) return s;
    if (t.dtype != DType::kU8 && t.dtype != DType::kBool) {
      return Status::InvalidArgument(
          Expected("mask.blocks", "dtype u8 or bool", DTypeName(t.dtype)));
    }
    const int64_t nqb = CeilDiv(Sq, m.block_q), nkb = CeilDiv(Sk, m.block_k);
    const std::string want = "shape [1 or " + std::to_string(B) + ", 1 or " + std::to_string(Hq) +
                             ", " + std::to_string(nqb) + ", " + std::to_string(nkb) +
                             "] (ceil(Sq/block_q), ceil(Sk/block_k))";
    if (t.rank != 4 || !batch_heads_ok(t.shape[0], t.shape[1]) || t.shape[2] != nqb ||
        t.shape[3] != nkb) {
      return Status::InvalidArgument(Expected("mask.blocks", want, ShapeString(t)));
    }
    r->blocks = static_cast<const uint8_t*>(t.data);
    BroadcastStrides(t, r->block_stride);
    r->block_q = m.block_q;
    r->block_k = m.block_k;
  }

  const NeighborhoodMask& n = m.neighborhood;
  if (n.rank != 0) {
    if (n.rank < 1 || n.rank > 3) {
      return Status::InvalidArgument(
          Expected("mask.neighborhood.rank", "0 (off), 1, 2 or 3", std::to_string(n.rank)));
    }
    int64_t tokens = 1;
    for (int a = 0; a < n.rank; ++a) {
      const std::string axis = "[" + std::to_string(a) + "]";
      if (n.grid[a] < 1) {
        return Status::InvalidArgument(
            Expected(("mask.neighborhood.grid" + axis).c_str(), ">= 1", std::to_string(n.grid[a])));
      }
      if (n.dilation[a] < 1) {
        return Status::InvalidArgument(Expected(("mask.neighborhood.dilation" + axis).c_str(),
                                                ">= 1", std::to_string(n.dilation[a])));
      }
      int64_t span = 0;
      if (n.window[a] < 1 || !CheckedMul(n.window[a], n.dilation[a], &span) || span > n.grid[a]) {
        return Status::InvalidArgument(Expected(
            ("mask.neighborhood.window" + axis).c_str(),
            "1 <= window and window * dilation <= grid (" + std::to_string(n.grid[a]) + ")",
            std::to_string(n.window[a]) + " with dilation " + std::to_string(n.dilation[a])));
      }
      if (n.stride[a] < 1 || n.stride[a] > n.window[a]) {
        return Status::InvalidArgument(
            Expected(("mask.neighborhood.stride" + axis).c_str(),
                     "1 <= stride <= window (" + std::to_string(n.window[a]) + ")",
                     std::to_string(n.stride[a])));
      }
      if (!CheckedMul(tokens, n.grid[a], &tokens)) {
        return Status::InvalidArgument(Expected("mask.neighborhood.grid",
                                                "axis lengths whose product fits in int64",
                                                "an overflow at axis " + std::to_string(a)));
      }
      r->grid[a] = n.grid[a];
      r->window[a] = n.window[a];
      r->dilation[a] = n.dilation[a];
      r->stride[a] = n.stride[a];
      r->axis_causal[a] = n.causal[a];
    }
    if (Sq != Sk || tokens != Sk) {
      return Status::InvalidArgument(
          Expected("mask.neighborhood.grid", "a product equal to Sq == Sk",
                   "product " + std::to_string(tokens) + " with Sq " + std::to_string(Sq) +
                       ", Sk " + std::to_string(Sk)));
    }
    r->grid_rank = n.rank;
  }

  if (m.sink_tokens < 0) {
    return Status::InvalidArgument(
        Expected("mask.sink_tokens", ">= 0", std::to_string(m.sink_tokens)));
  }
  if (m.prefix_len < 0) {
    return Status::InvalidArgument(
        Expected("mask.prefix_len", ">= 0", std::to_string(m.prefix_len)));
  }
  r->sink_tokens = m.sink_tokens;
  r->prefix_len = m.prefix_len;

  if (m.document_ids.data != nullptr) {
    const TensorView& t = m.document_ids;
    Status s = CheckRankAndStrides("mask.document_ids", t, false);
    if (!s.ok()) return s;
    if (t.dtype != DType::kI32) {
      return Status::InvalidArgument(
          Expected("mask.document_ids", "dtype i32", DTypeName(t.dtype)));
    }
    if (t.rank != 2 || (t.shape[0] != 1 && t.shape[0] != B) || t.shape[1] != Sk) {
      return Status::InvalidArgument(Expected(
          "mask.document_ids", "shape [1 or " + std::to_string(B) + ", " + std::to_string(Sk) + "]",
          ShapeString(t)));
    }
    const int32_t* ids = static_cast<const int32_t*>(t.data);
    for (int64_t b = 0; b < t.shape[0]; ++b) {
      for (int64_t j = 1; j < Sk; ++j) {
        const int32_t prev = ids[b * t.strides[0] + (j - 1) * t.strides[1]];
        const int32_t cur = ids[b * t.strides[0] + j * t.strides[1]];
        if (cur < prev) {
          return Status::InvalidArgument(
              "mask.document_ids: expected ids non-decreasing along the keys (documents packed "
              "contiguously), got " +
              std::to_string(cur) + " after " + std::to_string(prev) + " at [" + std::to_string(b) +
              ", " + std::to_string(j) + "]");
        }
      }
    }
    r->doc = ids;
    BroadcastStrides(t, r->doc_stride);
  }

  if (m.group_size != 0) {
    if (m.group_size < 0 || (m.shift_half_heads && m.group_size % 2 != 0) ||
        Sk % m.group_size != 0 || Sq != Sk) {
      return Status::InvalidArgument(
          Expected("mask.group_size",
                   std::string("a positive") + (m.shift_half_heads ? " even" : "") +
                       " divisor of Sk with Sq == Sk",
                   std::to_string(m.group_size) + " with Sq " + std::to_string(Sq) + ", Sk " +
                       std::to_string(Sk)));
    }
    r->group_size = m.group_size;
    r->shift_half_heads = m.shift_half_heads;
  }

  if (m.tree_parents.data != nullptr) {
    const int64_t shape[1] = {Sq};
    Status s = CheckI32View("mask.tree_parents", m.tree_parents, 1, shape,
                            "shape [" + std::to_string(Sq) + "] (one parent per query, Sq)");
    if (!s.ok()) return s;
    if (Sq > Sk) {
      return Status::InvalidArgument(
          Expected("mask.tree_parents", "a tree of Sq <= Sk nodes (the tree is the last Sq keys)",
                   "Sq " + std::to_string(Sq) + ", Sk " + std::to_string(Sk)));
    }
    const int32_t* parents = I32Data(m.tree_parents);
    for (int64_t t = 0; t < Sq; ++t) {
      if (parents[t] < -1 || parents[t] >= t) {
        return Status::InvalidArgument(
            "mask.tree_parents: expected parents[t] in [-1, t) (parents before children), got " +
            std::to_string(parents[t]) + " at t = " + std::to_string(t));
      }
    }
    r->tree_parents = parents;
    r->tree_size = Sq;
  }

  if (m.dense.data != nullptr) {
    const TensorView& t = m.dense;
    Status s = CheckRankAndStrides("mask.dense", t, false);
    if (!s.ok()) return s;
    if (t.dtype != DType::kU8 && t.dtype != DType::kBool && t.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected(
          "mask.dense", "dtype bool or u8 (visibility) or f32 (additive)", DTypeName(t.dtype)));
    }
    const bool ok2 = t.rank == 2 && t.shape[0] == Sq && t.shape[1] == Sk;
    const bool ok4 = t.rank == 4 && batch_heads_ok(t.shape[0], t.shape[1]) && t.shape[2] == Sq &&
                     t.shape[3] == Sk;
    if (!ok2 && !ok4) {
      return Status::InvalidArgument(
          Expected("mask.dense",
                   "shape [" + std::to_string(Sq) + ", " + std::to_string(Sk) + "] or [1 or " +
                       std::to_string(B) + ", 1 or " + std::to_string(Hq) + ", " +
                       std::to_string(Sq) + ", " + std::to_string(Sk) + "]",
                   ShapeString(t)));
    }
    if (r->tree_parents != nullptr) {
      return Status::Unimplemented(
          "mask.dense: expected no dense mask together with a tree mask (combine them into one "
          "dense mask), got both");
    }
    r->dense = t.data;
    r->dense_dtype = t.dtype == DType::kF32 ? DType::kF32 : DType::kU8;
    if (ok2) {
      r->dense_stride[2] = t.shape[0] == 1 ? 0 : t.strides[0];
      r->dense_stride[3] = t.shape[1] == 1 ? 0 : t.strides[1];
    } else {
      BroadcastStrides(t, r->dense_stride);
    }
  }
  return Status::Ok();
}

// Validates params.stats (tessera/attention.h: AttentionStats).
Status ValidateStats(const AttentionParams& p, bool varlen, int64_t B, int64_t Sq, int64_t Sk,
                     int64_t Hq, int64_t Hkv) {
  const AttentionStats& st = p.stats;
  const TensorView* views[] = {&st.key_mass, &st.key_mass_sq, &st.row_entropy};
  if (st.window == 0) {
    for (const TensorView* v : views) {
      if (v->data != nullptr) {
        return Status::InvalidArgument(Expected(
            "stats.window", "a window in [1, Sq] (statistics outputs are set)", "0 (off)"));
      }
    }
    return Status::Ok();
  }
  if (varlen) {
    return Status::Unimplemented(
        Expected("stats", "a dense batch (statistics are not supported with varlen yet)",
                 "cu_seqlens_q / cu_seqlens_k set"));
  }
  if (p.mask.score == ScoreFunction::kSigmoid) {
    return Status::InvalidArgument(
        Expected("stats", "the softmax score function (sigmoid has no probabilities)", "kSigmoid"));
  }
  if (st.window < 1 || st.window > Sq) {
    return Status::InvalidArgument(
        Expected("stats.window", "a window in [1, Sq = " + std::to_string(Sq) + "], or 0 for off",
                 std::to_string(st.window)));
  }
  if (st.key_mass.data == nullptr) {
    return Status::InvalidArgument(
        Expected("stats.key_mass", "an f32 output (required when stats.window > 0)", "null"));
  }
  const int64_t H = st.sum_gqa_group ? Hkv : Hq;
  const std::string heads = st.sum_gqa_group ? "Hkv" : "Hq";
  const int64_t key_shape[3] = {B, H, Sk};
  const std::string key_what = "shape [" + std::to_string(B) + ", " + std::to_string(H) + ", " +
                               std::to_string(Sk) + "] ([B, " + heads + ", Sk])";
  const int64_t row_shape[3] = {B, Hq, st.window};
  const std::string row_what = "shape [" + std::to_string(B) + ", " + std::to_string(Hq) + ", " +
                               std::to_string(st.window) + "] ([B, Hq, window])";
  const struct {
    const char* name;
    const TensorView& view;
    const int64_t* shape;
    const std::string& what;
  } outputs[] = {{"stats.key_mass", st.key_mass, key_shape, key_what},
                 {"stats.key_mass_sq", st.key_mass_sq, key_shape, key_what},
                 {"stats.row_entropy", st.row_entropy, row_shape, row_what}};
  for (const auto& o : outputs) {
    if (o.view.data == nullptr) continue;
    if (o.view.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected(o.name, "dtype f32", DTypeName(o.view.dtype)));
    }
    Status s = CheckShape(o.name, o.view, 3, o.shape, o.what, true);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

// The memory every input of the forward may read (outputs must not overlap it).
std::vector<Region> ForwardInputs(const AttentionParams& p) {
  const MaskParams& m = p.mask;
  return {ViewRegion("q", p.q),
          ViewRegion("k", p.k),
          ViewRegion("v", p.v),
          ViewRegion("alibi_slopes", p.alibi_slopes),
          ViewRegion("mask.blocks", m.blocks),
          ViewRegion("mask.document_ids", m.document_ids),
          ViewRegion("mask.dense", m.dense),
          ViewRegion("mask.tree_parents", m.tree_parents),
          ViewRegion("cu_seqlens_q", p.cu_seqlens_q),
          ViewRegion("cu_seqlens_k", p.cu_seqlens_k)};
}

}  // namespace

Status ValidateAttention(const AttentionParams& p, AttentionProblem* prob) {
  const bool varlen = p.cu_seqlens_q.data != nullptr || p.cu_seqlens_k.data != nullptr;
  if (varlen && (p.cu_seqlens_q.data == nullptr || p.cu_seqlens_k.data == nullptr)) {
    return Status::InvalidArgument(
        std::string("cu_seqlens: expected both cu_seqlens_q and cu_seqlens_k (or neither), got "
                    "only ") +
        (p.cu_seqlens_q.data ? "cu_seqlens_q" : "cu_seqlens_k"));
  }
  if (varlen && p.num_seqs < 0) {
    return Status::InvalidArgument(
        Expected("num_seqs", "a non-negative count", std::to_string(p.num_seqs)));
  }
  if (varlen) {
    const int64_t shape[1] = {int64_t{p.num_seqs} + 1};
    const std::string what = "shape [" + std::to_string(shape[0]) + "] (num_seqs + 1 offsets)";
    Status s = CheckI32View("cu_seqlens_q", p.cu_seqlens_q, 1, shape, what);
    if (!s.ok()) return s;
    s = CheckI32View("cu_seqlens_k", p.cu_seqlens_k, 1, shape, what);
    if (!s.ok()) return s;
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
    return Status::InvalidArgument(Expected("q", "dtype f32, bf16 or f16", DTypeName(p.q.dtype)));
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
  if (D < 1 || D > kMaxHeadDim) {
    return Status::InvalidArgument(
        Expected("q", "head dim D in [1, " + std::to_string(kMaxHeadDim) + "]", std::to_string(D)));
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
    Status s = CheckCuSeqlens("cu_seqlens_q", I32Data(p.cu_seqlens_q), p.num_seqs, Sq);
    if (!s.ok()) return s;
    s = CheckCuSeqlens("cu_seqlens_k", I32Data(p.cu_seqlens_k), p.num_seqs, Sk);
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

  AttentionProblem::Masks masks;
  Status mask_status = ValidateMasks(p, varlen, B, Sq, Sk, Hq, &masks);
  if (!mask_status.ok()) return mask_status;
  if (masks.any && p.stats.window != 0) {
    return Status::Unimplemented(
        Expected("stats",
                 "causal / window masks only (statistics are not supported with "
                 "params.mask yet)",
                 "a structured, sparse or dense mask in params.mask"));
  }
  Status stats_status = ValidateStats(p, varlen, B, Sq, Sk, Hq, Hkv);
  if (!stats_status.ok()) return stats_status;
  Status alias_status = CheckDisjoint({ViewRegion("out", p.out), ViewRegion("lse", p.lse),
                                       ViewRegion("stats.key_mass", p.stats.key_mass),
                                       ViewRegion("stats.key_mass_sq", p.stats.key_mass_sq),
                                       ViewRegion("stats.row_entropy", p.stats.row_entropy)},
                                      ForwardInputs(p));
  if (!alias_status.ok()) return alias_status;

  AttentionProblem& r = *prob;
  r = AttentionProblem();
  r.mask = masks;
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
  r.window_left = ResolveWindow(p.window_left, Sq, Sk);
  r.window_right = p.causal ? 0 : ResolveWindow(p.window_right, Sq, Sk);
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
    r.cu_seqlens_q = I32Data(p.cu_seqlens_q);
    r.cu_seqlens_k = I32Data(p.cu_seqlens_k);
  }
  return Status::Ok();
}

AttentionParams WithResolvedWindows(const AttentionParams& params,
                                    const AttentionProblem& problem) {
  AttentionParams r = params;
  if (problem.window_left == kUnboundedWindow) r.window_left = -1;
  if (problem.window_right == kUnboundedWindow) r.window_right = -1;
  return r;
}

}  // namespace tessera

namespace tessera {

Status ValidateAttentionBackward(const AttentionBackwardParams& p, AttentionBackwardProblem* prob) {
  if (p.forward.lse.data == nullptr && p.forward.mask.score != ScoreFunction::kSigmoid) {
    return Status::InvalidArgument(
        "forward.lse: expected the forward's log-sum-exp (the backward recomputes the scores "
        "from it), got nullptr");
  }
  if (p.forward.stats.window != 0) {
    return Status::InvalidArgument(Expected("forward.stats.window",
                                            "0 (the backward writes no statistics)",
                                            std::to_string(p.forward.stats.window)));
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

  std::vector<Region> inputs = ForwardInputs(p.forward);
  inputs.push_back(ViewRegion("forward.out", p.forward.out));
  inputs.push_back(ViewRegion("forward.lse", p.forward.lse));
  inputs.push_back(ViewRegion("dout", p.dout));
  status = CheckDisjoint({ViewRegion("dq", p.dq), ViewRegion("dk", p.dk), ViewRegion("dv", p.dv)},
                         inputs);
  if (!status.ok()) return status;

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
