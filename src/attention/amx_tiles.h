// SPDX-License-Identifier: Apache-2.0
// Internal: building blocks shared by the Intel AMX bf16 kernels (flash_fwd_amx.cc,
// flash_bwd_amx.cc): the compiler gate, the tile configuration, the exp2 polynomial, reading a
// bf16 row, and the packings of bf16 rows into AMX's B layouts. Only for .cc files that hold AMX
// kernels (it includes <immintrin.h> when the compiler can target AMX); every function carries
// TESSERA_AMX_TARGET, so the rest of the translation unit keeps the build's baseline ISA.
//
// B layouts (a B tile is 16 rows of 16 pairs of bf16; row j holds reduction indices 2j, 2j + 1):
//   transposed: 16 rows of a matrix x 32 columns, as 16 column pairs x 16 rows (a 32-bit
//               transpose): the B operand of X Y^T when Y's rows are packed (K in Q K^T);
//   interleaved: rows 2j and 2j + 1 interleaved element by element, so 16 interleaved rows x 16
//               columns form the B operand of X Y with Y's rows packed (V in P V).
#pragma once

#include <cstdint>

#include "core/attention_problem.h"

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define TESSERA_AMX_KERNEL 1
#include <immintrin.h>
// GCC 12 reports the _mm512_undefined_* placeholders inside the AVX-512 intrinsics as (maybe)
// uninitialized when they are inlined into target-attribute functions (a false positive; -O1 and
// -O2 report it as certain). Off for the rest of the including .cc, which holds AMX kernels only.
#if !defined(__clang__) && defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#else
#define TESSERA_AMX_KERNEL 0
#endif

#if TESSERA_AMX_KERNEL

#define TESSERA_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace tessera {
namespace amx {

// Pointer to the bf16 row (sequence b, token, head) of a [b, s, h, d] tensor of `p`'s shape; the
// row is gathered into `tmp` (p.dim elements) when its head-dim stride is not 1.
inline const uint16_t* Row(const AttentionProblem& p, const void* base, const int64_t* stride,
                           int64_t b, int64_t token, int64_t head, uint16_t* tmp) {
  const uint16_t* src = static_cast<const uint16_t*>(base) + p.offset(stride, b, token, head);
  if (stride[3] == 1) return src;
  for (int64_t d = 0; d < p.dim; ++d) tmp[d] = src[d * stride[3]];
  return tmp;
}

// Palette 1, tiles 0..7 all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

// The tile loads are asm statements without a memory operand: this keeps the compiler from
// moving the stores that fill their sources past them (and the loads of their results before).
inline void CompilerBarrier() { __asm__ volatile("" ::: "memory"); }

// 2^x for x <= 0 (and NaN; x > 0 is fine up to 127): 2^round(x) * P(x - round(x)), P a degree-5
// polynomial fitted to 2^f on [-1/2, 1/2] for relative error with P(0) = 1 (max 1.9e-7 in f32).
// x < -150 gives 0.
TESSERA_AMX_TARGET inline __m512 Exp2(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);  // NaN in x stays NaN (max returns operand 2)
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 r = _mm512_set1_ps(1.3264727214e-03f);
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(9.6715128125e-03f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(5.5507337448e-02f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(2.4022242083e-01f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(6.9314697760e-01f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(r, n);
}

// Transposes a 16 x 16 matrix of 32-bit elements held in r[0..15] (row i in r[i]).
TESSERA_AMX_TARGET inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4a + c], 128-bit lane j: column 4j + c of rows 4a .. 4a + 3.
  __m512i u[16];
  for (int a = 0; a < 16; a += 4) {
    u[a + 0] = _mm512_unpacklo_epi64(t[a + 0], t[a + 2]);
    u[a + 1] = _mm512_unpackhi_epi64(t[a + 0], t[a + 2]);
    u[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
    u[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
  }
  // Column 4j + c: lane j of u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i x01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x23 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y01 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[0 + c] = _mm512_shuffle_i32x4(x01, y01, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x01, y01, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x23, y23, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x23, y23, 0xDD);
  }
}

// The transposed B layout of 16 rows (src[n], n = 0..15, each `dim` bf16, dim a multiple of 32):
// tile dc (columns [32 dc, 32 dc + 32)) at dst + dc * 512, row j = the pairs (src[n][32 dc + 2j],
// src[n][32 dc + 2j + 1]) for n = 0..15.
TESSERA_AMX_TARGET inline void PackTransposed(const uint16_t* const src[16], int64_t dim,
                                              uint16_t* dst) {
  for (int64_t dc = 0; dc < dim / 32; ++dc) {
    __m512i r[16];
    for (int n = 0; n < 16; ++n) r[n] = _mm512_loadu_si512(src[n] + dc * 32);
    Transpose16x16(r);
    for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + dc * 512 + j * 32, r[j]);
  }
}

// Index vectors of _mm512_permutex2var_epi16 that interleave the first (second) 16 elements of
// two 32-element rows x, y as x0 y0 x1 y1 ...
alignas(64) inline constexpr uint16_t kInterleaveLow[32] = {
    0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) inline constexpr uint16_t kInterleaveHigh[32] = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// The interleaved B layout of rows x and y (`dim` bf16 each, dim a multiple of 32): dst[2d] =
// x[d], dst[2d + 1] = y[d] (2 dim elements, 64-byte aligned).
TESSERA_AMX_TARGET inline void PackInterleaved(const uint16_t* x, const uint16_t* y, int64_t dim,
                                               uint16_t* dst) {
  const __m512i low = _mm512_load_si512(kInterleaveLow);
  const __m512i high = _mm512_load_si512(kInterleaveHigh);
  for (int64_t d = 0; d < dim; d += 32) {
    const __m512i a = _mm512_loadu_si512(x + d);
    const __m512i b = _mm512_loadu_si512(y + d);
    _mm512_store_si512(dst + 2 * d, _mm512_permutex2var_epi16(a, low, b));
    _mm512_store_si512(dst + 2 * d + 32, _mm512_permutex2var_epi16(a, high, b));
  }
}

}  // namespace amx
}  // namespace tessera

#endif  // TESSERA_AMX_KERNEL
