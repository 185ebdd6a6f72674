// SPDX-License-Identifier: Apache-2.0
// fp64 references for the exact attention ops: scalar, materializing, obviously right.
// They read the same (rounded) inputs as the kernels, upcast exactly to double.
//
// Masks: every field of AttentionParams::mask (tessera/mask.h) is evaluated per (query, key)
// pair from the header's definitions; MaterializeMask exposes that one definition to tests.
#pragma once

#include <vector>

#include "tessera/attention.h"

namespace tessera {
namespace ref {

// Exact attention forward in fp64. `params` must already be valid (AttentionForward's
// validation passed); params.out and params.lse are ignored. Results:
//   out  contiguous [B, Sq, Hq, D] (dense) or [total_q, Hq, D] (varlen), where total_q is the
//        token extent of params.q; rows of tokens outside every varlen sequence are left as is
//   lse  contiguous [B, Hq, Sq] (dense) or [Hq, total_q] (varlen); may be nullptr
// Masked-out rows: out = 0, lse = -inf.
// Sigmoid score function (params.mask.score): out = sum over visible keys of
// sigmoid(s + sigmoid_bias) v, unnormalized (a row with no visible key gets 0); there is no LSE,
// and every lse entry of the call is written as 0 (the kernels reject an lse output with sigmoid).
void AttentionForwardF64(const AttentionParams& params, double* out, double* lse);

// The window statistics of params.stats (tessera/attention.h) in fp64, from the same row scores
// as AttentionForwardF64 and each row's exact LSE. Dense batch, softmax only; params.stats.window
// in [1, Sq] (the views of params.stats are not read). Results, contiguous:
//   key_mass, key_mass_sq  [B, H, Sk]  (H = Hq, or Hkv with stats.sum_gqa_group); either may be
//                          nullptr
//   row_entropy            [B, Hq, W]; may be nullptr
void AttentionStatsF64(const AttentionParams& params, double* key_mass, double* key_mass_sq,
                       double* row_entropy);

// Exact attention gradients in fp64, from q, k, v, dout and the options of params.forward (its
// out and lse are ignored: the reference recomputes the forward in fp64). `params` must be valid
// (AttentionBackward's validation passed). Results, contiguous, in the layouts of q / k / v:
//   dq [B, Sq, Hq, D] or [total_q, Hq, D];  dk, dv [B, Sk, Hkv, D] or [total_k, Hkv, D]
// (dk, dv summed over the query heads of each GQA group). Rows outside every varlen sequence are
// left as is; rows with no visible key get dq = 0; keys no query sees get dk = dv = 0.
// With the sigmoid score function: dS = dP * P * (1 - P) (times the softcap derivative), no D.
void AttentionBackwardF64(const AttentionBackwardParams& params, double* dq, double* dk,
                          double* dv);

// The mask of a dense-batch call (no cu_seqlens) as an additive bias, contiguous
// [B, Hq, Sq, Sk]: 0 where key j is visible to query i of head h, -inf where it is hidden, and
// the dense f32 mask's value where that mask is set and the key is otherwise visible. Causal,
// the window, align and every field of params.mask are applied; softcap, ALiBi and the score
// function are not (they are not mask). It is the very function the references above use, so a
// kernel run with `bias` as a dense f32 mask (and no other mask) must match the structured call.
// `bias` is resized; params.out, lse, v and the q / k values are not read (only their shapes).
void MaterializeMask(const AttentionParams& params, std::vector<double>* bias);

}  // namespace ref
}  // namespace tessera
