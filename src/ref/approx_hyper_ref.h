// SPDX-License-Identifier: Apache-2.0
// fp64 reference of HyperAttention (tessera/approx.h, method kHyper): the same algorithm with the
// same random draws (approx/hyper_draws.h: hyperplanes and sampled keys), evaluated row by row in
// fp64. It shares no code with src/approx/hyper_attention.cc beyond those draws: its own hashing,
// Gray decoding, sorting (std::stable_sort), sampling bookkeeping (std::set) and a direct sum of
// the exponentials of each row (no tiles, no MergeStates), so a misreading of the algorithm in
// the fast path cannot hide here. Quadratic per exact piece: small shapes only.
#pragma once

#include "tessera/approx.h"

namespace tessera {
namespace ref {

// HyperAttention forward in fp64. `params` must be valid (ApproxAttention's validation passed,
// method kHyper); params.out and params.lse are not written. For every (batch, query head), with
// n_outside the keys of a piece outside a query's block and m' = min(samples, n_outside):
//   l = ln( sum_{j in block} e^{s_j} + (n_outside / m') sum_{j sampled} e^{s_j} )
//   o = ( sum_{j in block} e^{s_j} v_j + (n_outside / m') sum_{j sampled} e^{s_j} v_j ) / e^l
// (weight 1 when m' = n_outside; no sampled term when m' = 0), and with causal the recursive
// halving of hyper_attention.cc, states of disjoint key sets merged by LSE. The scale is
// params.scale or the float nearest 1 / sqrt(D), the value the kernels use. Results, contiguous:
//   out [B, S, Hq, D];  lse [B, Hq, S] (may be nullptr).
void HyperForwardF64(const ApproxParams& params, double* out, double* lse);

}  // namespace ref
}  // namespace tessera
