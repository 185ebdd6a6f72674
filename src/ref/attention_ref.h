// fp64 references for the exact attention ops: scalar, materializing, obviously right.
// They read the same (rounded) inputs as the kernels, upcast exactly to double.
#pragma once

#include "tessera/attention.h"

namespace tessera {
namespace ref {

// Exact attention forward in fp64. `params` must already be valid (AttentionForward's
// validation passed); params.out and params.lse are ignored. Results:
//   out  contiguous [B, Sq, Hq, D] (dense) or [total_q, Hq, D] (varlen), where total_q is the
//        token extent of params.q; rows of tokens outside every varlen sequence are left as is
//   lse  contiguous [B, Hq, Sq] (dense) or [Hq, total_q] (varlen); may be nullptr
// Masked-out rows: out = 0, lse = -inf.
void AttentionForwardF64(const AttentionParams& params, double* out, double* lse);

// Exact attention gradients in fp64, from q, k, v, dout and the options of params.forward (its
// out and lse are ignored: the reference recomputes the forward in fp64). `params` must be valid
// (AttentionBackward's validation passed). Results, contiguous, in the layouts of q / k / v:
//   dq [B, Sq, Hq, D] or [total_q, Hq, D];  dk, dv [B, Sk, Hkv, D] or [total_k, Hkv, D]
// (dk, dv summed over the query heads of each GQA group). Rows outside every varlen sequence are
// left as is; rows with no visible key get dq = 0; keys no query sees get dk = dv = 0.
void AttentionBackwardF64(const AttentionBackwardParams& params, double* dq, double* dk,
                          double* dv);

}  // namespace ref
}  // namespace tessera
