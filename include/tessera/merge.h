// SPDX-License-Identifier: Apache-2.0
// tessera: merging attention states.
//
// An attention state is the pair (O, LSE) of attention restricted to a set of keys. States over
// disjoint key sets combine exactly:
//   LSE = M + ln sum_r exp(LSE_r - M),  M = max_r LSE_r,   O = sum_r exp(LSE_r - LSE) O_r
// with an empty part (LSE_r = -inf) contributing nothing and all-empty giving (0, -inf). The same
// merge serves split-KV decode, cascade / shared-prefix attention, chunked prefill and ring
// attention. It is commutative and associative (up to fp32 rounding in any regrouping); merging
// with an empty state returns the other state bitwise.
#pragma once

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

struct MergeStatesParams {
  TensorView out_parts;  // [R, T, H, D] partial outputs, f32 / bf16 / f16, any strides
  TensorView lse_parts;  // [R, T, H] f32 natural-log LSE of each part (-inf: empty part); finite
                         // or -inf: +inf and NaN are rejected (InvalidArgument naming the index)
  TensorView out;        // [T, H, D] merged output, written, dtype of out_parts
  TensorView lse;        // [T, H] f32 merged LSE, optional (data == nullptr: not written)
  // LSEs in base 2 (FlashInfer's convention: LSE2 = LSE / ln 2) instead of natural log, for
  // both the parts and the result.
  bool base2 = false;
};

// Merges the R states of every (token, head) row, parts summed in ascending r. Validates every
// argument first (out and lse may not overlap the parts); on error nothing is written. R = 0
// gives (0, -inf).
Status MergeStates(const MergeStatesParams& params, const Context& ctx);

}  // namespace tessera
