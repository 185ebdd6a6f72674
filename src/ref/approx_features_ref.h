// SPDX-License-Identifier: Apache-2.0
// fp64 references of the random-feature approximate methods (tessera/approx.h): Performer FAVOR+
// and WERSA, materialized and scalar, from their definitions (src/approx/performer.cc,
// src/approx/wersa.cc), given the same projection the fast path uses (its random draws, or the
// caller's matrix). They check the implementation, not the approximation: the approximation
// error is measured against exact attention by `tessera bench --op approx`.
//
// Both end in normalized linear attention on features, computed here as the materialized sum
//   out_t = sum_s a_ts v_s / (sum_s a_ts + eps),  a_ts = phi(q_t) . phi(k_s)
// over s <= t (causal) or every s, with eps the smallest normal float (as the fast path).
#pragma once

#include <cstdint>

#include "tessera/approx.h"

namespace tessera {
namespace ref {

// FAVOR+ features without stabilizer: phi_i = exp(w_i . x' - |x'|^2 / 2) / sqrt(m) with
// x' = sqrt(scale) x, for x [d] and w [m, d]; phi(q) . phi(k) is the unbiased estimate of
// exp(scale q . k).
void PerformerFeatureF64(const double* x, int64_t d, const float* w, int64_t m, double scale,
                         double* phi);

// Performer forward: phi(q)_i = exp(y_i - max_j y_j) / sqrt(m) (y = W q'), phi(k)_i =
// exp(y_i - |k'|^2 / 2 - M) / sqrt(m) with M the largest exponent y_i - |k'|^2 / 2 over every key
// and feature of the (batch, KV head); then the normalized sum above. w [m, D] is the projection;
// p valid for ApproxAttention with method performer. out [B, S, Hq, D] contiguous.
void PerformerForwardF64(const ApproxParams& p, const float* w, double* out);
// Its exact gradients for the loss sum dout . out (stabilizers constant: they cancel), contiguous
// in the layouts of q, k, v (dk, dv summed over each GQA group).
void PerformerBackwardF64(const ApproxBackwardParams& p, const float* w, double* dq, double* dk,
                          double* dv);

// WERSA's gated Haar transform of x [B, S, H, D] (q or k) with p.wersa's levels, gates and level
// weights: with A_l x the mean of x over token t's level-l window,
//   non-causal: [floor(t / 2^l) 2^l, min(that + 2^l, S))   (the last block may be shorter)
//   causal:     [max(0, t - 2^l + 1), t]
// and A_0 x = x,
//   x~_t = A_L x_t + sum_{l = 1..L} level_weight_l gate_{b, t, l} (A_{l-1} x_t - A_l x_t).
// out [B, S, H, D] contiguous.
void WersaTransformF64(const ApproxParams& p, const TensorView& x, double* out);
// WERSA forward: phi(x)_i = max((x~ / bandwidth) . W[:, i], 0) / sqrt(r) for q~ and k~, then the
// normalized sum above. w [D, r]. out [B, S, Hq, D] contiguous.
void WersaForwardF64(const ApproxParams& p, const float* w, double* out);
// Its exact gradients (relu' = 1 for a positive argument, else 0), as PerformerBackwardF64.
void WersaBackwardF64(const ApproxBackwardParams& p, const float* w, double* dq, double* dk,
                      double* dv);

}  // namespace ref
}  // namespace tessera
