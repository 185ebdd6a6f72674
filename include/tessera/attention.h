// SPDX-License-Identifier: Apache-2.0
// tessera: exact attention forward.
//
//   O = softmax(scale * Q K^T + modifiers, masked) V,  computed tile by tile in O(tile) memory.
//
// Shapes (default layout [batch, seq, heads, head_dim]; any strides, in elements):
//   q    [B, Sq, Hq, D]        f32, bf16 or f16
//   k, v [B, Sk, Hkv, D]       same dtype as q; Hq % Hkv == 0 (GQA/MQA, K/V never copied per head)
//   out  [B, Sq, Hq, D]        same dtype as q, written
//   lse  [B, Hq, Sq]           optional (data == nullptr: not written), f32, natural log
// Varlen (cu_seqlens_q and cu_seqlens_k both set, num_seqs sequences): sequences are packed
// along the token axis; q/out are [1, total_q, Hq, D] or [total_q, Hq, D], k/v [1, total_k, Hkv,
// D] or [total_k, Hkv, D], lse [Hq, total_q] or [1, Hq, total_q]. Sequence s owns query rows
// [cu_seqlens_q[s], cu_seqlens_q[s+1]) and key rows [cu_seqlens_k[s], cu_seqlens_k[s+1]).
//
// Conventions (FlashAttention's): causal and windows are aligned to the bottom-right when
// Sq != Sk, i.e. query i sits at position i + Sk - Sq (top-left alignment on request). A row
// with no visible key (Sk = 0, or everything masked) gets output 0 and LSE = -inf, never NaN.
// Modifiers apply in this order to the scaled logit s = scale * q.k: softcap, ALiBi, mask.
//
// Non-finite inputs: a NaN or inf in a visible q, k or v element reaches every output it
// touches (never hidden). Keys no query of a task block can see are never read; a NaN in V at a
// key masked for one row but visible to another row of the same block of query rows
// (the forward's tiles, attention/flash_tiles.h) may also reach the first row, as 0 * NaN.
//
// Determinism: bitwise-identical results across runs and thread counts (each output row is
// reduced over key tiles of a fixed size, in ascending order, by one worker).
#pragma once

#include <cstdint>
#include <optional>

#include "tessera/context.h"
#include "tessera/mask.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// Attention-score statistics of an observation window: the last `window` query rows of every
// sequence, from which SnapKV, PyramidKV, H2O and CAKE choose the keys to keep (kv_policy.h).
// With p_ij the attention probability of window row i on key j (0 for a masked key):
//   key_mass[b][h][j]    = sum_i p_ij           (the attention key j receives; / W: its mean)
//   key_mass_sq[b][h][j] = sum_i p_ij^2         (with key_mass: its variance across the window)
//   row_entropy[b][h][w] = -sum_j p_ij ln p_ij  for window row i = Sq - W + w (natural log; 0 for
//                                               a row with no visible key)
// With sum_gqa_group, h is the KV head and the sums also run over the query heads of its group.
// The forward computes them after its own pass, from its LSE: one more pass over K for the W
// window rows only (never over V), so at W << Sq they cost a small fraction of the forward
// (docs/kv_eviction.md). Dense batch with causal / window masks, softcap and ALiBi; varlen and
// params.mask are not supported with statistics (Unimplemented). Deterministic: each key's sums
// run over the rows in a fixed order, independent of the thread count.
struct AttentionStats {
  int64_t window = 0;          // W in [1, Sq]; 0: no statistics (the views below must be unset)
  bool sum_gqa_group = false;  // key statistics per KV head, summed over its query heads
  TensorView key_mass;         // f32 [B, H, Sk], H = Hq (Hkv with sum_gqa_group); required
  TensorView key_mass_sq;      // f32 [B, H, Sk], optional
  TensorView row_entropy;      // f32 [B, Hq, W], optional
};

struct AttentionParams {
  TensorView q;    // [B, Sq, Hq, D]
  TensorView k;    // [B, Sk, Hkv, D]
  TensorView v;    // [B, Sk, Hkv, D]
  TensorView out;  // [B, Sq, Hq, D], written
  TensorView lse;  // [B, Hq, Sq] f32, optional, written

  // Softmax scale; default 1/sqrt(D). Must be finite.
  std::optional<float> scale;

  // Causal mask: key j visible to query i iff j <= pos(i). Equivalent to window (-1, 0).
  bool causal = false;
  // Sliding window: key j visible iff pos(i) - window_left <= j <= pos(i) + window_right;
  // -1 means unbounded on that side, and so does any value >= max(Sq, Sk) (it bounds no
  // position). Combined with causal, the right bound is min(wr, 0).
  int64_t window_left = -1;
  int64_t window_right = -1;
  MaskAlign align = MaskAlign::kBottomRight;

  // Tanh softcap: s <- softcap * tanh(s / softcap) on the scaled logit; 0 disables.
  float softcap = 0.0f;

  // ALiBi: bias -slope[h] * |pos(i) - j| added to the (capped) logit. f32 [Hq] or [B, Hq];
  // data == nullptr disables.
  TensorView alibi_slopes;

  // Varlen packing: both off (data == nullptr: dense batch) or both set, i32 [num_seqs + 1]
  // (unit stride), starting at 0, non-decreasing, last entry <= the token extent of q (resp. k).
  TensorView cu_seqlens_q;
  TensorView cu_seqlens_k;
  int32_t num_seqs = 0;

  // Structured and sparse masks, dense mask fallback and the score function (tessera/mask.h).
  MaskParams mask;

  // Optional side outputs: attention statistics of the last stats.window query rows.
  AttentionStats stats;
};

// Computes the attention forward. Validates every argument before any work; on error nothing is
// written. Thread-safe for distinct outputs.
Status AttentionForward(const AttentionParams& params, const Context& ctx);

// Gradients of the attention forward, recomputing the scores tile by tile from the forward's
// log-sum-exp (never the Sq x Sk matrix).
struct AttentionBackwardParams {
  // The forward call: q, k, v, every option (scale, masks, softcap, ALiBi, varlen), its output
  // `out` and its `lse` (required here), all read only.
  AttentionParams forward;
  TensorView dout;  // [B, Sq, Hq, D], gradient of the loss w.r.t. out; dtype of q
  TensorView dq;    // [B, Sq, Hq, D], written; dtype of q
  TensorView dk;    // [B, Sk, Hkv, D], written; summed over the query heads of each GQA group
  TensorView dv;    // [B, Sk, Hkv, D], written; summed over the query heads of each GQA group
};

// Computes dq, dk, dv (fp32 accumulation, written in the input dtype). Rows with no visible key
// get dq = 0; keys no query sees get dk = dv = 0. Deterministic: bitwise-identical across runs
// and thread counts. dK/dV of a block of keys are owned by one task; dQ is accumulated into a
// number of partials fixed by the shape (never by the thread count) and summed in a fixed order;
// no atomics. Extra memory: Sq * Hq floats plus those dQ partials (at most 512 MiB).
Status AttentionBackward(const AttentionBackwardParams& params, const Context& ctx);

}  // namespace tessera
