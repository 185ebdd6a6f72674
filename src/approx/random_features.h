// SPDX-License-Identifier: Apache-2.0
// Internal: what the random-feature methods (Performer, performer.cc; WERSA, wersa.cc) share:
// the seeded draws of their projections, the SIMD pieces of their feature maps (a small f32 GEMM
// and row-wise exp / relu), and normalized linear attention over features of any count through
// the chunked linear engine (tessera/linear.h), forward and backward.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {
namespace approx {

// Added to the normalizer of the random-feature methods. Their features can be tiny (Performer's
// key stabilizer is the largest exponent over every key, so a causal prefix may see only keys
// e^-30 below it), while the ratio num / den does not depend on their scale: the smallest normal
// float keeps 0 / 0 finite (rows that see no key mass give 0) without biasing any other row.
inline constexpr float kFeatureEps = std::numeric_limits<float>::min();

// Rows of the feature buffers are padded to a multiple of this many floats (any x86 vector).
inline constexpr int64_t kFeaturePad = 16;
inline int64_t PadFeatures(int64_t m) { return (m + kFeaturePad - 1) / kFeaturePad * kFeaturePad; }

// ---------------------------------------------------------------------------------------------
// Seeded draws (SplitMix64 streams and Box-Muller in double, rounded to f32 at the end): the same
// (seed, shape) gives the same matrix on every machine and thread count.

// [rows, cols] row-major i.i.d. N(0, 1).
void DrawGaussian(uint64_t seed, int64_t rows, int64_t cols, float* out);
// FAVOR+'s orthogonal random features, [m, d] row-major: blocks of d rows orthonormalized (modified
// Gram-Schmidt of a Gaussian d x d block, in double; the last block keeps its first m mod d rows),
// each row then scaled by the norm of an independent Gaussian d-vector (chi with d degrees of
// freedom), so every row is marginally N(0, I_d) while rows of a block stay orthogonal.
void DrawOrthogonalGaussian(uint64_t seed, int64_t m, int64_t d, float* out);

// ---------------------------------------------------------------------------------------------
// SIMD pieces (one copy per Highway target, dynamic dispatch).

// c[n x p] = a[n x k] b[k x p]; a(i, j) = a[i * lda + j], b rows ldb floats apart, c rows ldc
// apart; p a multiple of kFeaturePad (b zero-padded to it).
void FeatureGemm(int64_t n, int64_t p, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc);
// Per row r of y (n rows, ldy apart, first m columns): y = exp(y - max_j y[r, j]) * mul.
void ExpRowsOwnMax(int64_t n, int64_t m, float* y, int64_t ldy, float mul);
// Per row r: y[r, :m] -= sub[r]; returns the largest result (-inf when n == 0).
float SubtractRowsMax(int64_t n, int64_t m, float* y, int64_t ldy, const float* sub);
// y[r, :m] = exp(y[r, :m] - shift) * mul.
void ExpRowsShift(int64_t n, int64_t m, float* y, int64_t ldy, float shift, float mul);
// y[r, :m] = max(y[r, :m], 0) * mul.
void ReluRows(int64_t n, int64_t m, float* y, int64_t ldy, float mul);

// ---------------------------------------------------------------------------------------------
// Normalized linear attention on features (the engine's identity map, scale 1):
//   out_t = sum_s (phi_q(t) . phi_k(s)) v_s / (sum_s phi_q(t) . phi_k(s) + kFeatureEps)
// over s <= t (causal) or every s. phi_q [B, S, Hq, m], phi_k [B, S, Hkv, m], v [B, S, Hkv, D],
// out [B, S, Hq, D], f32 views (any strides). The engine takes at most kMaxHeadDim features per
// call: more are split into groups whose numerators and normalizers add (v extended by a column
// of ones, so D + 1 <= kMaxHeadDim then; CheckFeatureCount says so first).
Status CheckFeatureCount(const char* name, int64_t m, int64_t dim);
Status FeatureAttention(const TensorView& phi_q, const TensorView& phi_k, const TensorView& v,
                        const TensorView& out, bool causal, const Context& ctx);
// Its gradients for the loss sum dout . out: dphi_q [B, S, Hq, m], dphi_k [B, S, Hkv, m] (summed
// over each GQA group), dv [B, S, Hkv, D], all written.
Status FeatureAttentionBackward(const TensorView& phi_q, const TensorView& phi_k,
                                const TensorView& v, const TensorView& dout,
                                const TensorView& dphi_q, const TensorView& dphi_k,
                                const TensorView& dv, bool causal, const Context& ctx);

// A view of heads [h0, h0 + n) of a rank-4 view [B, S, H, X].
TensorView HeadSlice(const TensorView& t, int64_t h0, int64_t n);
// A contiguous-row view [B, S, H, m] over a buffer whose rows are `ld` floats apart.
TensorView FeatureView(float* data, int64_t b, int64_t s, int64_t h, int64_t m, int64_t ld);
// Element [i0, i1, i2, i3] of an f32 rank-4 view.
inline float At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<const float*>(
      t.data)[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]];
}
inline float* AtMut(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<float*>(t.data) + i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] +
         i3 * t.strides[3];
}

// KV heads per slab of the feature buffers: as many as keep `floats_per_kv_head` * n under
// ~512 MiB, at least one, and enough query heads (n * group * batch) to feed `threads` workers.
int64_t KvHeadsPerSlab(int64_t heads_kv, int64_t group, int64_t batch, int64_t floats_per_kv_head,
                       int32_t threads);

// Validation of an optional f32 matrix option [rows, cols] (projection).
Status CheckMatrixOption(const char* name, const TensorView& t, int64_t rows, int64_t cols);
// Copies an f32 rank-2 view into row-major [rows, cols].
void CopyMatrix(const TensorView& t, float* out);
// An uninitialized float buffer of max(n, 1) elements.
std::unique_ptr<float[]> Floats(int64_t n);
// Writes row-major fp64 values (the fp64 reference's results under Path::kReference) into a
// rank-4 f32 view.
void WriteF64(const std::vector<double>& src, const TensorView& dst);

}  // namespace approx
}  // namespace tessera
