// SPDX-License-Identifier: Apache-2.0
// fp64 references for Agent Attention and HiLo (tessera/approx.h, src/approx/agent.cc and
// hilo.cc): every score materialized, scalar, quadratic in the sequence length; small shapes
// only. They read the same (rounded) f32 inputs as the kernels, upcast exactly to double, and
// share no code with src/approx or the exact kernel.
#pragma once

#include "tessera/approx.h"

namespace tessera {
namespace ref {

// Agent Attention in fp64. `params` must be valid (ApproxAttention's checks passed); params.out
// is not written. With n = agent.agents, for sequence b and query head h (KV head h / (Hq / Hkv)):
//   a_i   = mean of q rows [floor(i S / n), floor((i + 1) S / n))                     i < n
//   va_i  = sum_j softmax_j(scale a_i . k_j + agent_bias[h', i, j]) v_j
//   out_t = sum_i softmax_i(scale q_t . a_i + query_bias[h', t, i]) va_i (+ dwc[b, t, h])
// with h' = h (0 for a bias with one head) and scale = params.scale or the float nearest
// 1 / sqrt(D). Result contiguous: out [B, S, Hq, D].
void AgentForwardF64(const ApproxParams& params, double* out);

// HiLo in fp64. `params` must be valid. For token t = (y, x) of the grid_h x grid_w grid and
// s = hilo.window, window (y / s, x / s) holds the grid tokens with the same window coordinates.
// Query head h < Hq - lofi_heads (Hi-Fi) attends to the keys of its window; a Lo-Fi head attends
// to one pooled key per window (the mean of that window's k and v rows), every window. Results
// contiguous: out [B, S, Hq, D]; lse [B, Hq, S] (natural log, over the attended keys), may be
// nullptr.
void HiLoForwardF64(const ApproxParams& params, double* out, double* lse);

}  // namespace ref
}  // namespace tessera
