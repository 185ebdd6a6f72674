// SPDX-License-Identifier: Apache-2.0
// fp64 references for the long convolution and H3 (tessera/longconv.h): direct sums in double
// written from the header's formulas, obviously right, sharing no code with src/longconv (and
// the H3 references none with the convolution references, so the tests can check one against
// the other).
#pragma once

#include <vector>

#include "tessera/longconv.h"

namespace tessera {
namespace ref {

// y[b, t, c] = sum_{s = 0..min(t, L - 1)} h[s, c] u[b, t - s, c] (+ bias[c] u[b, t, c]) in fp64,
// from the (strided, f32) views of `params` (valid: LongConv1D's validation passed); params.y is
// not read or written. Result contiguous [B, N, C].
std::vector<double> LongConvF64(const LongConvParams& params);

// The gradients of LongConvF64 for the loss sum(dy * y), contiguous.
struct LongConvGradsF64 {
  std::vector<double> du;       // [B, N, C]
  std::vector<double> dfilter;  // [L, C]
  std::vector<double> dbias;    // [C]; empty without forward.bias
};

// Every gradient by the O(N L) sums of the header, from params.forward (u, filter, bias) and
// params.dy; the output views du / dfilter / dbias are not read or written (all three are
// computed whether set or not). `params` must be valid.
LongConvGradsF64 LongConvBackwardF64(const LongConvBackwardParams& params);

// The H3 layer in fp64 from the header's definition, materializing the shifted keys K [B, N, H,
// d] and the states S [B, N, H, d, d] (O(B H d^2 N L) work): small shapes only. params.out is
// not read or written. Result contiguous [B, N, H, d].
std::vector<double> H3F64(const H3Params& params);

// The gradients of H3F64 for the loss sum(dout * out), contiguous in the layouts of the inputs.
struct H3GradsF64 {
  std::vector<double> dq, dk, dv;     // [B, N, H, d]
  std::vector<double> dshift_filter;  // [Ls, H d]
  std::vector<double> dshift_bias;    // [H d]; empty without forward.shift_bias
  std::vector<double> dssm_filter;    // [L, H]
  std::vector<double> dssm_bias;      // [H]; empty without forward.ssm_bias
};

// Every gradient by the chain rule written out in double: dS = q dout^T, back through the SSM
// convolution (its transpose, anti-causal) to the outer products P = K v^T, then to K and v,
// back through the shift convolution to k. The output views of `params` are not read or written
// (every gradient is computed). `params` must be valid.
H3GradsF64 H3BackwardF64(const H3BackwardParams& params);

}  // namespace ref
}  // namespace tessera
