// SPDX-License-Identifier: Apache-2.0
// fp64 reference for the long convolution (tessera/longconv.h): the direct causal sum in double,
// obviously right, sharing no code with src/longconv.
#pragma once

#include <vector>

#include "tessera/longconv.h"

namespace tessera {
namespace ref {

// y[b, t, c] = sum_{s = 0..min(t, L - 1)} h[s, c] u[b, t - s, c] (+ bias[c] u[b, t, c]) in fp64,
// from the (strided, f32) views of `params` (valid: LongConv1D's validation passed); params.y is
// not read or written. Result contiguous [B, N, C].
std::vector<double> LongConvF64(const LongConvParams& params);

}  // namespace ref
}  // namespace tessera
