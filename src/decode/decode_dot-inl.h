// SPDX-License-Identifier: Apache-2.0
// Decode's scores, the Q.K dot products (one copy per target): 4 query rows x 4 keys with channels
// in lanes, reduced across lanes by a transposing shuffle tree (DotBlock4x4), and on VNNI targets
// the exact integer dot products of int8 query codes with u8 key codes (CodeDotBlock4x4). Separate
// from P.V and the softmax step, which have register layouts of their own; see decode-inl.h for
// the design.

#if defined(TESSERA_DECODE_DECODE_DOT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_DECODE_DECODE_DOT_INL_H_
#undef TESSERA_DECODE_DECODE_DOT_INL_H_
#else
#define TESSERA_DECODE_DECODE_DOT_INL_H_
#endif

#include <hwy/highway.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "decode/decode_tile-inl.h"
#include "simd/tile_gemm-inl.h"

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#include <immintrin.h>
#endif

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace decode_impl {

namespace hn = hwy::HWY_NAMESPACE;

// ---- Q.K: 4 rows x 4 keys of dot products, reduced across lanes ------------------------------

#if HWY_TARGET == HWY_SCALAR
// One lane: the accumulators are the sums.
HWY_INLINE void StoreRowSums4(VF a0, VF a1, VF a2, VF a3, float* HWY_RESTRICT,
                              float* HWY_RESTRICT out) {
  out[0] = hn::GetLane(a0);
  out[1] = hn::GetLane(a1);
  out[2] = hn::GetLane(a2);
  out[3] = hn::GetLane(a3);
}
#else
// Sums of the 4 vectors a0..a3 per 128-bit block: lane 4 * block + i = block sum of a_i.
HWY_INLINE VF BlockSums4(VF a0, VF a1, VF a2, VF a3) {
  const DF df;
  const hn::Repartition<uint64_t, DF> du64;
  const VF t01 = hn::Add(hn::InterleaveLower(df, a0, a1), hn::InterleaveUpper(df, a0, a1));
  const VF t23 = hn::Add(hn::InterleaveLower(df, a2, a3), hn::InterleaveUpper(df, a2, a3));
  const auto w01 = hn::BitCast(du64, t01), w23 = hn::BitCast(du64, t23);
  return hn::Add(hn::BitCast(df, hn::InterleaveLower(du64, w01, w23)),
                 hn::BitCast(df, hn::InterleaveUpper(du64, w01, w23)));
}

// out[i] = sum of the lanes of a_i for i < 4, through a transposing shuffle tree and a bounce
// buffer of kLanes floats for the final sum across 128-bit blocks.
HWY_INLINE void StoreRowSums4(VF a0, VF a1, VF a2, VF a3, float* HWY_RESTRICT bounce,
                              float* HWY_RESTRICT out) {
  const hn::CappedTag<float, 4> d4;
  hn::Store(BlockSums4(a0, a1, a2, a3), DF(), bounce);
  auto s = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) s = hn::Add(s, hn::Load(d4, bounce + b));
  hn::StoreU(s, d4, out);
}
#endif

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
// Block j of r (the 4 row scores of key j) to st + j * mp: one store when the keys' scores are
// contiguous (mp == 4).
HWY_INLINE void StoreKeyBlocks(__m512 r, float* HWY_RESTRICT st, size_t mp) {
  if (mp == 4) {
    _mm512_storeu_ps(st, r);
    return;
  }
  _mm_storeu_ps(st, _mm512_castps512_ps128(r));
  _mm_storeu_ps(st + mp, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(st + 2 * mp, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(st + 3 * mp, _mm512_extractf32x4_ps(r, 3));
}
#endif

// St[j][i] (j < 4 keys at st + j * mp, i < 4 rows) = the lane sums of a[j][i].
HWY_INLINE void StoreSums4x4(const VF (&a)[4][4], float* HWY_RESTRICT st, size_t mp,
                             float* HWY_RESTRICT bounce) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  // AVX-512: per-block row sums of each key (BlockSums4), then one 4 x 4 block transpose-add
  // leaves key j's 4 row sums in block j: 9 shuffles and adds for the 4 keys, one store when the
  // 4 keys' scores are contiguous (mp == 4).
  __m512 u[4];
  for (int j = 0; j < 4; ++j) u[j] = BlockSums4(a[j][0], a[j][1], a[j][2], a[j][3]).raw;
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  StoreKeyBlocks(r, st, mp);
  (void)bounce;
#else
  for (int j = 0; j < 4; ++j)
    StoreRowSums4(a[j][0], a[j][1], a[j][2], a[j][3], bounce, st + j * mp);
#endif
}

// St[j][r0 + i] = q_i . k_j for i < 4 rows (q rows at q + i * dp) and j < 4 keys (rows
// k[0..3]); dp channels (a multiple of kLanes; kDp > 0 fixes it at compile time).
template <size_t kDp, class T>
HWY_INLINE void DotBlock4x4(const float* HWY_RESTRICT q, size_t dp, const uint8_t* const* k,
                            float* HWY_RESTRICT st, size_t mp, float* HWY_RESTRICT bounce) {
  const DF df;
  if (kDp != 0) dp = kDp;
  VF a[4][4];
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < 4; ++i) a[j][i] = hn::Zero(df);
  }
  if constexpr (std::is_same<T, Bf16Pairs>::value) {
    // A pair block (2 vectors) per step, so which half a vector is is known at compile time.
    auto step = [&](size_t c, auto half) {
      VF qv[4], kv[4];
      for (int i = 0; i < 4; ++i) qv[i] = hn::Load(df, q + i * dp + c + half);
      for (int j = 0; j < 4; ++j) kv[j] = LoadVecAsF32(reinterpret_cast<const T*>(k[j]) + c, half);
      for (int j = 0; j < 4; ++j) {
        for (int i = 0; i < 4; ++i) a[j][i] = hn::MulAdd(qv[i], kv[j], a[j][i]);
      }
    };
    for (size_t c = 0; c < dp; c += 2 * kLanes) {
      step(c, std::integral_constant<size_t, 0>());
      step(c, std::integral_constant<size_t, kLanes>());
    }
  } else {
    for (size_t c = 0; c < dp; c += kLanes) {
      VF qv[4], kv[4];
      for (int i = 0; i < 4; ++i) qv[i] = hn::Load(df, q + i * dp + c);
      for (int j = 0; j < 4; ++j) kv[j] = LoadAsF32(reinterpret_cast<const T*>(k[j]) + c);
      for (int j = 0; j < 4; ++j) {
        for (int i = 0; i < 4; ++i) a[j][i] = hn::MulAdd(qv[i], kv[j], a[j][i]);
      }
    }
  }
  StoreSums4x4(a, st, mp, bounce);
}

#if HWY_TARGET == HWY_AVX3_DL
// Offset of query code (row r of a 4-row group, channel c) in the group's VNNI layout: 16-channel
// chunks of the 4 rows, [dc / 16][4][16], so one 64-byte vector holds a chunk of every row.
HWY_INLINE size_t GroupCodeIndex(size_t r, size_t c) { return (c / 16) * 64 + r * 16 + c % 16; }

// The same over int8 query codes and u8 key codes with vpdpbusd: exact integer dot products,
// converted to f32 (exact, |sum| < 2^24), so the result equals DotBlock4x4's bits. The 16 codes
// of a key chunk are broadcast to both 128-bit halves of a 256-bit vector and multiplied with the
// chunk of rows 0-1 and of rows 2-3 (q4, GroupCodeIndex layout): block i of a key's two
// accumulators holds row i's partial sums, so no lane is idle and the reduction is one
// block-sum step for 4 keys (not a 16-vector tree). 256-bit rather than 512-bit vectors: on Zen 4
// a 128-bit broadcast load into a 512-bit register costs a shuffle besides the load, into a
// 256-bit one it is a plain load, and two 256-bit vpdpbusd issue per cycle (scores in L1: 12.0 ->
// 8.7 cycles per key and 4 rows). Highway 1.0.3's AVX3_DL target string names only the VEX form
// (avxvnni), but its CPU check requires AVX512-VNNI; vpdpbusd is written in asm, so no function
// needs the extra feature (one that did could not be inlined here). kDc > 0 fixes dc.
template <size_t kDc>
HWY_INLINE void CodeDotBlock4x4(const int8_t* HWY_RESTRICT q4, size_t dc, const uint8_t* const* k,
                                float* HWY_RESTRICT st, size_t mp) {
  if (kDc != 0) dc = kDc;
  // Named accumulators (rows 0-1 and 2-3 of each key) and vpdpbusd in asm: GCC 12 copies the
  // accumulator before every vpdpbusd intrinsic, and an accumulator array tied to asm operands
  // stays in memory.
  __m256i a01 = _mm256_setzero_si256(), a23 = a01, b01 = a01, b23 = a01, c01 = a01, c23 = a01,
          d01 = a01, d23 = a01;
  const uint8_t *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  auto dot = [](__m256i& rows01, __m256i& rows23, const uint8_t* key, __m256i q01, __m256i q23) {
    const __m256i kv =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(key)));
    asm("vpdpbusd %2, %1, %0" : "+v"(rows01) : "v"(kv), "v"(q01));
    asm("vpdpbusd %2, %1, %0" : "+v"(rows23) : "v"(kv), "v"(q23));
  };
  for (size_t c = 0; c < dc; c += 16) {
    const __m256i q01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + c * 4));
    const __m256i q23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + c * 4 + 32));
    dot(a01, a23, k0 + c, q01, q23);
    dot(b01, b23, k1 + c, q01, q23);
    dot(c01, c23, k2 + c, q01, q23);
    dot(d01, d23, k3 + c, q01, q23);
  }
  auto join = [](__m256i rows01, __m256i rows23) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(rows01), rows23, 1);
  };
  const __m512i u[4] = {join(a01, a23), join(b01, b23), join(c01, c23), join(d01, d23)};
  // Block sums: lane 4 * i + j = row i's score of key j, then transposed to key-major blocks.
  const __m512i t01 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]));
  const __m512i t23 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(u[2], u[3]), _mm512_unpackhi_epi32(u[2], u[3]));
  const __m512i rows =
      _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
  const __m512i to_keys = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  StoreKeyBlocks(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(to_keys, rows)), st, mp);
}
#endif

}  // namespace decode_impl
}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_DOT_INL_H_
