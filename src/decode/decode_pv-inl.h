// SPDX-License-Identifier: Apache-2.0
// Decode's P.V (one copy per target): acc += P V for up to 4 rows of a head with channels in lanes
// (f32 / f16 / bf16 rows, and quantized code rows whose steps the softmax step folded into P), and
// on VNNI targets the quantized V in 16-bit integers (PackWeights, PvCodesVnni, FlushCodeSums).
// See decode-inl.h for the design and docs/decode.md for the VNNI rounding bound.

#if defined(TESSERA_DECODE_DECODE_PV_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_DECODE_DECODE_PV_INL_H_
#undef TESSERA_DECODE_DECODE_PV_INL_H_
#else
#define TESSERA_DECODE_DECODE_PV_INL_H_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

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

// ---- P.V: acc[i] (+)= sum_j p[j][i] * v_j for up to 4 rows ------------------------------------

// Rows i < kRows of one head, channels [c0, c0 + kVecs * kLanes), keys j < nkeys (rows v[j]);
// with kRescale the accumulators are first multiplied by alpha[i] (the tile's first step).
// Quantized rows (T = uint8_t codes) accumulate the codes: the softmax step has already folded
// the rows' steps into the probabilities (and their minimums into the row offset vbias).
template <int kRows, int kVecs, bool kRescale, class T>
HWY_INLINE void AccumulatePvBlock(const uint8_t* const* v, size_t nkeys, size_t c0,
                                  const float* HWY_RESTRICT pt, size_t mp, const float* alpha,
                                  float* HWY_RESTRICT acc, size_t dp) {
  const DF df;
  VF o[kRows][kVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kVecs; ++c) {
      o[i][c] = hn::Load(df, acc + i * dp + c0 + c * kLanes);
      if (kRescale) o[i][c] = hn::Mul(hn::Set(df, alpha[i]), o[i][c]);
    }
  }
  for (size_t j = 0; j < nkeys; ++j) {
    const T* row = reinterpret_cast<const T*>(v[j]);
    VF x[kVecs];
    for (int c = 0; c < kVecs; ++c) x[c] = LoadVecAsF32(row, c0 + c * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const VF p = hn::Set(df, pt[j * mp + static_cast<size_t>(i)]);
      for (int c = 0; c < kVecs; ++c) o[i][c] = hn::MulAdd(p, x[c], o[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kVecs; ++c) hn::Store(o[i][c], df, acc + i * dp + c0 + c * kLanes);
  }
}

template <int kRows, size_t kDp, bool kRescale, class T>
HWY_INLINE void AccumulatePvRows(const uint8_t* const* v, size_t nkeys, const float* pt, size_t mp,
                                 const float* alpha, float* acc, size_t dp) {
  if (kDp != 0) dp = kDp;
  size_t c = 0;
  for (; c + 4 * kLanes <= dp; c += 4 * kLanes) {
    AccumulatePvBlock<kRows, 4, kRescale, T>(v, nkeys, c, pt, mp, alpha, acc, dp);
  }
  for (; c < dp; c += kLanes) {
    AccumulatePvBlock<kRows, 1, kRescale, T>(v, nkeys, c, pt, mp, alpha, acc, dp);
  }
}

template <size_t kDp, bool kRescale, class T>
HWY_INLINE void AccumulatePvHead(int64_t rows, const uint8_t* const* v, size_t nkeys,
                                 const float* pt, size_t mp, const float* alpha, float* acc,
                                 size_t dp) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* p = pt + r0;
    const float* a = alpha + r0;
    float* o = acc + static_cast<size_t>(r0) * (kDp != 0 ? kDp : dp);
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1:
        AccumulatePvRows<1, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      case 2:
        AccumulatePvRows<2, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      case 3:
        AccumulatePvRows<3, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      default:
        AccumulatePvRows<4, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
    }
  }
}

#if HWY_TARGET == HWY_AVX3_DL
// ---- Quantized V on VNNI: P.V over the codes in 16-bit integers ------------------------------
//
// The f32 P.V widens every code (two instructions per 16 codes) and does 4 FMAs per vector of
// codes. On VNNI targets the tile's weights w_j = p_j * step_j are instead rounded to 15-bit
// integers per row, W_j = round(w_j * 32767 / max_j w_j), and vpdpwssd sums W_j * code_j for a
// pair of keys in one instruction: a third fewer cycles per key (22 against 36 in L1). The sums
// are exact int32 (32 keys x 32767 x 255 < 2^31) and go back to f32 once per tile. The rounding
// adds at most 32 keys x 255 / (2 x 32767) of a row's largest weight per tile, i.e. at most 1/8
// of the largest V quantization step n_c * step_j (int4: 1/140) to an output element
// (docs/decode.md); the f32 path is exact.

// Weight packing for t's keys [0, nk4): wq[pair][row] and wscale[row] (see TileSlot). A row whose
// weights are not all finite gets wscale = NaN (its output is NaN, as on the f32 path). With at
// most 4 rows SoftmaxNarrow packs the weights itself.
HWY_INLINE void PackWeights(TileSlot& t, size_t mp) {
  const size_t pairs = t.nk4 / 2;
  // The 15-bit weight of w * inv outside the usual range: NaN and negative (a corrupt cache's
  // negative V step) give 0, values past 32767 (inv = inf for a subnormal wmax) give 32767.
  const auto clamped = [](float x) {
    return x > 0.0f ? static_cast<uint32_t>(std::nearbyint(std::min(x, 32767.0f))) : 0u;
  };
  for (size_t r = 0; r < mp; ++r) {
    float wmax = 0.0f, wmin = 0.0f, total = 0.0f;
    for (size_t j = 0; j < t.nk4; ++j) {
      wmax = std::max(wmax, t.st[j * mp + r]);
      wmin = std::min(wmin, t.st[j * mp + r]);
      total += t.st[j * mp + r];
    }
    const bool finite = std::isfinite(total);
    const float inv = finite && wmax > 0.0f ? 32767.0f / wmax : 0.0f;
    t.wscale[r] = finite ? wmax / 32767.0f : std::numeric_limits<float>::quiet_NaN();
    if (!finite || wmin < 0.0f || std::isinf(inv)) {
      // w * inv may be NaN or past int32 here, and the int32 cast of such a float is undefined.
      for (size_t i = 0; i < pairs; ++i) {
        t.wq[i * mp + r] = static_cast<int32_t>(clamped(t.st[2 * i * mp + r] * inv) |
                                                (clamped(t.st[(2 * i + 1) * mp + r] * inv) << 16));
      }
      continue;
    }
    for (size_t i = 0; i < pairs; ++i) {
      const int32_t lo = static_cast<int32_t>(std::nearbyint(t.st[2 * i * mp + r] * inv));
      const int32_t hi = static_cast<int32_t>(std::nearbyint(t.st[(2 * i + 1) * mp + r] * inv));
      t.wq[i * mp + r] =
          static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
    }
  }
}

// iacc[r][c] (+)= sum over key pairs i < npairs of W_2i[r] * v_2i[c] + W_2i+1[r] * v_2i+1[c] for
// rows in groups of 4 (row_groups) and channels c < dc (a multiple of 64; codes are u8 <= 255);
// `first` starts the sums at 0. wq: the pairs' packed weights [pair][mp]. With `flush` (the
// tile's last keys, and rows of dc floats in acc) the sums go straight to the f32 accumulator as
// in FlushCodeSums (all row_groups * 4 rows) instead of back to iacc.
struct CodeSumsFlush {
  float* acc;
  const float* alpha;
  const float* wscale;
};
HWY_NOINLINE void PvCodesVnni(const uint8_t* const* v, size_t npairs,
                              const int32_t* HWY_RESTRICT wq, size_t mp, size_t row_groups,
                              int32_t* HWY_RESTRICT iacc, size_t dc, bool first,
                              const CodeSumsFlush* flush, int64_t prefetch_offset = 0) {
  // Output q (16 channels of a 64-channel block) interleaves key 2i's and key 2i + 1's codes of
  // channels 16q + m as the two zero-extended 16-bit halves of int32 lane m.
  alignas(64) static constexpr uint8_t kIndex[4][64] = {
#define TESSERA_PAIR(q, m) (16 * (q) + (m)), 0, (64 + 16 * (q) + (m)), 0
#define TESSERA_PAIRS(q)                                                               \
  {TESSERA_PAIR(q, 0),  TESSERA_PAIR(q, 1),  TESSERA_PAIR(q, 2),  TESSERA_PAIR(q, 3),  \
   TESSERA_PAIR(q, 4),  TESSERA_PAIR(q, 5),  TESSERA_PAIR(q, 6),  TESSERA_PAIR(q, 7),  \
   TESSERA_PAIR(q, 8),  TESSERA_PAIR(q, 9),  TESSERA_PAIR(q, 10), TESSERA_PAIR(q, 11), \
   TESSERA_PAIR(q, 12), TESSERA_PAIR(q, 13), TESSERA_PAIR(q, 14), TESSERA_PAIR(q, 15)}
      TESSERA_PAIRS(0), TESSERA_PAIRS(1), TESSERA_PAIRS(2), TESSERA_PAIRS(3)};
#undef TESSERA_PAIRS
#undef TESSERA_PAIR
  const __mmask64 low_bytes = 0x5555555555555555ull;
  const __m512i i0 = _mm512_load_si512(kIndex[0]), i1 = _mm512_load_si512(kIndex[1]);
  const __m512i i2 = _mm512_load_si512(kIndex[2]), i3 = _mm512_load_si512(kIndex[3]);
  for (size_t g = 0; g < row_groups; ++g) {
    for (size_t cb = 0; cb < dc; cb += 64) {
      int32_t* o = iacc + 4 * g * dc + cb;
      // Named accumulators and vpdpwssd in asm: GCC 12 copies the accumulator before every
      // intrinsic, and keeps an accumulator array tied to asm operands in memory.
#define TESSERA_ROW(i)                                                                    \
  __m512i o##i##0 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc);      \
  __m512i o##i##1 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 16); \
  __m512i o##i##2 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 32); \
  __m512i o##i##3 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 48);
      TESSERA_ROW(0)
      TESSERA_ROW(1)
      TESSERA_ROW(2)
      TESSERA_ROW(3)
#undef TESSERA_ROW
      for (size_t i = 0; i < npairs; ++i) {
        if (prefetch_offset != 0 && g == 0 && cb == 0) {
          // The rows prefetch_offset bytes on, spread over the pairs.
          for (size_t line = 0; line < dc; line += 64) {
            __builtin_prefetch(v[2 * i] + prefetch_offset + line, 0, 2);
            __builtin_prefetch(v[2 * i + 1] + prefetch_offset + line, 0, 2);
          }
        }
        const __m512i r0 = _mm512_loadu_si512(v[2 * i] + cb);
        const __m512i r1 = _mm512_loadu_si512(v[2 * i + 1] + cb);
        const __m512i x0 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i0, r1);
        const __m512i x1 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i1, r1);
        const __m512i x2 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i2, r1);
        const __m512i x3 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i3, r1);
        const int32_t* w = wq + i * mp + 4 * g;
#define TESSERA_ROW(i)                                             \
  {                                                                \
    const __m512i wi = _mm512_set1_epi32(w[i]);                    \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##0) : "v"(x0), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##1) : "v"(x1), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##2) : "v"(x2), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##3) : "v"(x3), "v"(wi)); \
  }
        TESSERA_ROW(0)
        TESSERA_ROW(1)
        TESSERA_ROW(2)
        TESSERA_ROW(3)
#undef TESSERA_ROW
      }
      if (flush != nullptr) {
        // acc = alpha * acc + wscale * float(sums), row by row: FlushCodeSums' arithmetic, written
        // out again on purpose (through a shared helper, int8 decode from memory measured 9-16%
        // slower; docs/decode.md).
        auto to_acc = [&](size_t row, __m512i x0, __m512i x1, __m512i x2, __m512i x3) {
          const __m512 a = _mm512_set1_ps(flush->alpha[row]);
          const __m512 w = _mm512_set1_ps(flush->wscale[row]);
          float* f = flush->acc + row * dc + cb;
          const __m512i x[4] = {x0, x1, x2, x3};
          for (int k = 0; k < 4; ++k) {
            _mm512_storeu_ps(f + 16 * k,
                             _mm512_fmadd_ps(w, _mm512_cvtepi32_ps(x[k]),
                                             _mm512_mul_ps(a, _mm512_loadu_ps(f + 16 * k))));
          }
        };
        to_acc(4 * g, o00, o01, o02, o03);
        to_acc(4 * g + 1, o10, o11, o12, o13);
        to_acc(4 * g + 2, o20, o21, o22, o23);
        to_acc(4 * g + 3, o30, o31, o32, o33);
        continue;
      }
#define TESSERA_ROW(i)                           \
  _mm512_storeu_si512(o + (i)*dc, o##i##0);      \
  _mm512_storeu_si512(o + (i)*dc + 16, o##i##1); \
  _mm512_storeu_si512(o + (i)*dc + 32, o##i##2); \
  _mm512_storeu_si512(o + (i)*dc + 48, o##i##3);
      TESSERA_ROW(0)
      TESSERA_ROW(1)
      TESSERA_ROW(2)
      TESSERA_ROW(3)
#undef TESSERA_ROW
    }
  }
}

// acc[r][c] = alpha[r] * acc[r][c] + wscale[r] * iacc[r][c]: the tile's integer sums back in f32
// (rows < rows, channels < dp; iacc rows are dc apart).
HWY_INLINE void FlushCodeSums(const int32_t* HWY_RESTRICT iacc, size_t dc, const float* alpha,
                              const float* wscale, int64_t rows, float* HWY_RESTRICT acc,
                              size_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]), w = _mm512_set1_ps(wscale[r]);
    float* o = acc + static_cast<size_t>(r) * dp;
    const int32_t* x = iacc + static_cast<size_t>(r) * dc;
    for (size_t c = 0; c < dp; c += 16) {
      _mm512_storeu_ps(o + c, _mm512_fmadd_ps(w, _mm512_cvtepi32_ps(_mm512_loadu_si512(x + c)),
                                              _mm512_mul_ps(a, _mm512_loadu_ps(o + c))));
    }
  }
}
#endif

}  // namespace decode_impl
}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_PV_INL_H_
