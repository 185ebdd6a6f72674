// SPDX-License-Identifier: Apache-2.0
// fp64 references for linear attention (tessera/linear.h): the parallel (materialized) form,
// scalar and quadratic in the sequence length, obviously right. They read the same (rounded)
// inputs as the kernels, upcast exactly to double, and share no code with src/linear (not even
// LinearFeatureDim), so a misreading of the header in the kernels cannot hide here.
#pragma once

#include <cstdint>

#include "tessera/linear.h"

namespace tessera {
namespace ref {

// F, the feature dim of phi: Dk, or 1 + Dk + Dk^2 for the Taylor map.
int64_t LinearFeatureDimF64(LinearFeatureMap map, int64_t dk);

// phi(x) in fp64 for x [dk]; writes phi [LinearFeatureDimF64(map, dk)]. The Taylor map is
// [1, x / dk^(1/4), x_i x_j / (sqrt(2) sqrt(dk)) for every ordered pair (i, j), i-major].
void LinearFeatureF64(LinearFeatureMap map, const double* x, int64_t dk, double* phi);

// The linear attention forward in fp64, from the definitions of tessera/linear.h. `params` must
// be valid (LinearAttentionForward's validation passed); params.out, final_state and
// final_normalizer are not written. For sequence b, query head h (K/V head h / (Hq / Hkv)) and
// query t, with features computed in fp64:
//   W_ts = scale * sum_c phi(q_t)_c phi(k_s)_c decay_c(t, s)   over the visible keys s
// (causal: s <= t; non-causal: every s; prefix: s < prefix_len or s <= t), where decay_c(t, s) is
// 1, lambda_h^(t - s) or exp(sum_{r = s+1..t} g_{r,c}) (GLA), summed directly from the gates
// (no cumulative-sum differences); scalar gates (rank 3, [B, S, Hq]) give g_{r,c} = g_r. The
// initial state is the state before token 0: token r's decay applies to it like to every earlier
// key, so with
//   from_start_c(t) = 1, lambda_h^(t + 1) or exp(sum_{r = 0..t} g_{r,c}),
//   num_t = sum_s W_ts v_s + scale * sum_c phi(q_t)_c from_start_c(t) S0[c, :]
//   den_t = sum_s W_ts     + scale * sum_c phi(q_t)_c from_start_c(t) z0[c]
// and out_t = num_t, or num_t / (den_t + eps) with normalize. With window > 0, out_t also gains
// the exact causal softmax attention of the raw q, k, v over keys [t - window + 1, t] with scale
// the float nearest 1 / sqrt(Dk) (any Dv). The scale default is the float nearest 1 / sqrt(Dk)
// (1 for the Taylor map), the value the kernels must use. Results, contiguous:
//   out               [B, S, Hq, Dv]
//   final_state       [B, Hq, F, Dv]  sum_s decay_c(S - 1, s) phi(k_s)_c v_s
//                                     + from_start_c(S - 1) S0[c, :]; may be nullptr
//   final_normalizer  [B, Hq, F]      the same without v (z0 for S0); may be nullptr
// (from_start(-1) = 1: with S = 0 the final state is the initial one). Missing initial state or
// normalizer views (data == nullptr) read as 0.
void LinearForwardF64(const LinearAttentionParams& params, double* out, double* final_state,
                      double* final_normalizer);

// Exact gradients of the parallel form above (window excluded: the backward rejects it) for the
// loss
//   L = sum_{t, d} dout[t, d] out[t, d] + sum d_final_state * final_state
//                                       + sum d_final_normalizer * final_normalizer
// (the state terms when those views are set). `params` must be valid (LinearAttentionBackward's
// validation passed); forward.initial_state / initial_normalizer are read, forward.final_* and
// the output views are not. Results, contiguous, in the layouts of q / k / v / gates / states:
//   dq [B, S, Hq, Dk];  dk [B, S, Hkv, Dk];  dv [B, S, Hkv, Dv]  (dk, dv summed over the query
//   heads of a GQA group);  dgates [B, S, Hq, Dk] (scalar gates: [B, S, Hq], the sum over
//   channels), only with gates, may be nullptr;  d_initial_state [B, Hq, F, Dv] and
//   d_initial_normalizer [B, Hq, F] (normalize only), dL / d the initial state, may be nullptr.
// Derivatives of the feature maps: elu(x) + 1 -> 1 for x > 0, else exp(x); relu -> 1 for x > 0,
// else 0; Taylor: the product rule on x_i x_j.
void LinearBackwardF64(const LinearAttentionBackwardParams& params, double* dq, double* dk,
                       double* dv, double* dgates, double* d_initial_state = nullptr,
                       double* d_initial_normalizer = nullptr);

}  // namespace ref
}  // namespace tessera
