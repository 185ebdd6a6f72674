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

}  // namespace ref
}  // namespace tessera
