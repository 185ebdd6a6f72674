// SPDX-License-Identifier: Apache-2.0
// fp64 references for attention over gathered segments (approx/gathered_attention.h) and for
// Routing attention (tessera/approx.h, RoutingOptions): scalar loops straight from the
// definitions, sharing no code with src/approx, reading the same f32 inputs upcast to double.
#pragma once

#include <cstdint>

#include "approx/gathered_attention.h"
#include "tessera/approx.h"

namespace tessera {
namespace ref {

// GatheredAttention in fp64. `params` must be valid (the op accepted it); its outputs are not
// written. Results, contiguous: out [B, Sq, Hq, D], lse [B, Hq, Sq] (may be nullptr).
void GatheredAttentionF64(const approx::GatheredAttentionParams& params, double* out, double* lse);

// Routing attention in fp64 with the same draws (none: the centroids are an input). `params`
// must be valid (ApproxAttention accepted it, method routing); its outputs are not written.
// For sequence b and query head h (KV head h / (Hq / Hkv)): q and k rows L2-normalized (a zero
// row stays zero), score of token i for cluster c = x_i . centroid[h, c]; cluster c takes the w
// tokens of highest score (ties to the lower index) among the queries and among the keys; then
// GatheredAttentionF64 over these segments (causal on the original positions when
// params.causal). The EMA update: each normalized q row of (b, h) and k row of (b, h / G) goes
// to its nearest centroid (highest score, ties to the lower cluster); for each (h, c) with rows,
// updated = ema * centroid + (1 - ema) * (their mean over the batch), else the centroid.
// Results, contiguous: out [B, S, Hq, D], lse [B, Hq, S] (may be nullptr), updated_centroids
// [Hq, C, D] (may be nullptr).
void RoutingForwardF64(const ApproxParams& params, double* out, double* lse,
                       double* updated_centroids);

}  // namespace ref
}  // namespace tessera
