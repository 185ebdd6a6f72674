// SPDX-License-Identifier: Apache-2.0
// Internal: an AttentionParams after validation, normalized to rank-4 strided views and
// resolved options, shared by every forward path.
#pragma once

#include <climits>
#include <cstdint>

#include "tessera/attention.h"
#include "tessera/types.h"

namespace tessera {

// A window side that bounds nothing, small enough that position +- window cannot overflow.
constexpr int64_t kUnboundedWindow = INT64_MAX / 4;

struct AttentionProblem {
  int64_t batch = 0;     // number of sequences (B, or num_seqs for varlen)
  int64_t seq_q = 0;     // dense Sq (varlen: total query tokens)
  int64_t seq_k = 0;     // dense Sk (varlen: total key tokens)
  int64_t heads_q = 0;   // Hq
  int64_t heads_kv = 0;  // Hkv
  int64_t group = 1;     // Hq / Hkv
  int64_t dim = 0;       // D
  DType dtype = DType::kF32;

  // Element strides of the rank-4 views [b, s, h, d] (varlen: b stride unused, b = 0).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t out_stride[4] = {0, 0, 0, 0};
  // LSE [b, h, s] strides; lse == nullptr when not requested.
  float* lse = nullptr;
  int64_t lse_stride[3] = {0, 0, 0};

  float scale = 1.0f;
  float softcap = 0.0f;
  // Visible keys for query position p: max(0, p - window_left) <= j <= p + window_right, with
  // window_left/right = kUnboundedWindow when unbounded: -1, or a window no position of the call
  // needs (>= max(Sq, Sk)), so p +- window never overflows on any route.
  int64_t window_left = 0;
  int64_t window_right = 0;
  bool top_left = false;  // alignment: pos(i) = i (top-left) or i + Sk - Sq (bottom-right)
  // ALiBi slopes [b, h] with strides (b stride 0 for a [Hq] tensor); nullptr when disabled.
  const float* alibi = nullptr;
  int64_t alibi_stride[2] = {0, 0};

  const int32_t* cu_seqlens_q = nullptr;  // varlen when non-null
  const int32_t* cu_seqlens_k = nullptr;

  // The masks of tessera/mask.h beyond the window, validated; strides in elements, 0 along a
  // broadcast dimension. The kernels read them through mask_policy.h.
  struct Masks {
    bool any = false;                 // some field below is set (the window alone leaves it false)
    const uint8_t* blocks = nullptr;  // [b, h, query block, key block], nonzero = computed
    int64_t block_stride[4] = {0, 0, 0, 0};
    int64_t block_q = 0, block_k = 0;
    int32_t grid_rank = 0;  // neighborhood axes (0: off)
    int64_t grid[3] = {1, 1, 1}, window[3] = {1, 1, 1}, dilation[3] = {1, 1, 1},
            stride[3] = {1, 1, 1};
    bool axis_causal[3] = {false, false, false};
    int64_t sink_tokens = 0;
    int64_t prefix_len = 0;
    const int32_t* doc = nullptr;  // [b, key]
    int64_t doc_stride[2] = {0, 0};
    int64_t group_size = 0;
    bool shift_half_heads = false;
    const int32_t* tree_parents = nullptr;
    int64_t tree_size = 0;
    const void* dense = nullptr;     // [b, h, query, key]
    DType dense_dtype = DType::kU8;  // kU8 (bool stored as bytes too) or kF32 (additive)
    int64_t dense_stride[4] = {0, 0, 0, 0};
    bool sigmoid = false;
    float sigmoid_bias = 0.0f;
  } mask;

  bool varlen() const { return cu_seqlens_q != nullptr; }
  // Query / key token range of sequence b along the token axis.
  int64_t q_begin(int64_t b) const { return varlen() ? cu_seqlens_q[b] : 0; }
  int64_t q_len(int64_t b) const {
    return varlen() ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seq_q;
  }
  int64_t k_begin(int64_t b) const { return varlen() ? cu_seqlens_k[b] : 0; }
  int64_t k_len(int64_t b) const {
    return varlen() ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seq_k;
  }
  // Element offset of token t (absolute along the token axis) of sequence b, head h, in a
  // [b, s, h, d] tensor with these strides.
  int64_t offset(const int64_t* stride, int64_t b, int64_t t, int64_t h) const {
    return (varlen() ? 0 : b * stride[0]) + t * stride[1] + h * stride[2];
  }
  int64_t q_offset(int64_t b, int64_t t, int64_t h) const { return offset(q_stride, b, t, h); }
  int64_t k_offset(int64_t b, int64_t t, int64_t h) const { return offset(k_stride, b, t, h); }
  int64_t v_offset(int64_t b, int64_t t, int64_t h) const { return offset(v_stride, b, t, h); }
  int64_t out_offset(int64_t b, int64_t t, int64_t h) const { return offset(out_stride, b, t, h); }
  int64_t lse_offset(int64_t b, int64_t h, int64_t t) const {
    return (varlen() ? 0 : b * lse_stride[0]) + h * lse_stride[1] + t * lse_stride[2];
  }
  // Keys [lo, hi] visible to query position `pos` of a sequence with k_len keys (lo > hi: none).
  struct KeyRange {
    int64_t lo, hi;
  };
  KeyRange visible_keys(int64_t pos, int64_t k_len) const {
    return KeyRange{pos - window_left > 0 ? pos - window_left : 0,
                    pos + window_right < k_len - 1 ? pos + window_right : k_len - 1};
  }
  float alibi_slope(int64_t b, int64_t h) const {
    return alibi[b * alibi_stride[0] + h * alibi_stride[1]];
  }
};

// An AttentionBackwardParams after validation: the forward problem plus the gradient views, with
// the same [b, s, h, d] normalization (varlen: b stride unused).
struct AttentionBackwardProblem {
  AttentionProblem fwd;
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dout_stride[4] = {0, 0, 0, 0};
  int64_t dq_stride[4] = {0, 0, 0, 0};
  int64_t dk_stride[4] = {0, 0, 0, 0};
  int64_t dv_stride[4] = {0, 0, 0, 0};

  int64_t dout_offset(int64_t b, int64_t t, int64_t h) const {
    return fwd.offset(dout_stride, b, t, h);
  }
  int64_t dq_offset(int64_t b, int64_t t, int64_t h) const {
    return fwd.offset(dq_stride, b, t, h);
  }
  int64_t dk_offset(int64_t b, int64_t t, int64_t h) const {
    return fwd.offset(dk_stride, b, t, h);
  }
  int64_t dv_offset(int64_t b, int64_t t, int64_t h) const {
    return fwd.offset(dv_stride, b, t, h);
  }
};

// Validates `params` and fills `problem`. Returns kInvalidArgument naming the argument, what was
// expected and what was given. Writes nothing else.
Status ValidateAttention(const AttentionParams& params, AttentionProblem* problem);

// `params` with the window sides the problem resolved as unbounded set to -1, for the fp64
// references (which take the user's form of the options).
AttentionParams WithResolvedWindows(const AttentionParams& params, const AttentionProblem& problem);

// Validates a backward call: params.forward as for the forward (lse required), dout like out, dq
// like q, dk / dv like k / v (same dtype, no zero strides on written dims). Writes nothing else.
Status ValidateAttentionBackward(const AttentionBackwardParams& params,
                                 AttentionBackwardProblem* problem);

}  // namespace tessera
