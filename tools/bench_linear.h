// SPDX-License-Identifier: Apache-2.0
// The linear-attention bench's inputs and FLOP count (bench_linear.cc), shared with
// `bench --op linear --dist lasp2` (bench_dist.cc) so that both time the same kind of problem and
// count its work alike.
#pragma once

#include <cstdint>
#include <vector>

#include "npy.h"
#include "tessera/types.h"

namespace tessera {
namespace cli {
namespace bench {

constexpr int64_t kBasedFeatureDim = 16;  // BASED's q/k projection (Arora et al. 2024)

// n normal-ish values (FillNormalish) rounded to `dtype`, in a buffer of that dtype.
AlignedBytes NormalBuffer(DType dtype, int64_t n, uint64_t seed);

// GLA's gates: log-sigmoid of normal-ish values over 16, so exp(g) sits just below 1 (f32).
AlignedBytes GateBuffer(int64_t n, uint64_t seed);

// RetNet's per-head decay rates lambda_h = 1 - 2^(-5 - 4h / (H - 1)).
std::vector<float> RetNetDecayRates(int64_t heads);

// The FLOPs of linear attention over `tokens` tokens of batch_heads (batch, query head) pairs:
// 4 * F * Dv per token and head (+ 4 * F with normalize), plus 2 * (Dk + Dv) per (query, key)
// pair of the exact window (`window_pairs` per (batch, head)).
double LinearFlops(double batch_heads, double tokens, int64_t feature_dim, int64_t dim_v,
                   bool normalize, double window_pairs, int64_t dim_k);

}  // namespace bench
}  // namespace cli
}  // namespace tessera
