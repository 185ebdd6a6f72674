// SPDX-License-Identifier: Apache-2.0
// Decode's online-softmax step for at most 4 rows per head (one copy per target): SoftmaxNarrow on
// a [key][4] score tile packed 4 keys x 4 rows per vector, so no lane is padding. More rows use the
// forward's SoftmaxTile (simd/online_softmax-inl.h). See decode-inl.h for the design.

#if defined(TESSERA_DECODE_DECODE_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_DECODE_DECODE_SOFTMAX_INL_H_
#undef TESSERA_DECODE_DECODE_SOFTMAX_INL_H_
#else
#define TESSERA_DECODE_DECODE_SOFTMAX_INL_H_
#endif

#include <hwy/highway.h>

#include <cstddef>
#include <cstdint>
#include <limits>

#include "core/attention_problem.h"
#include "decode/decode_tile-inl.h"
#include "simd/fast_exp-inl.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#include <immintrin.h>
#endif

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace decode_impl {

namespace hn = hwy::HWY_NAMESPACE;

// ---- Online softmax for at most 4 rows --------------------------------------------------------

#if HWY_TARGET != HWY_SCALAR
// With at most 4 rows per head (GQA group x queries), St is [key][4] and one vector holds
// kLanes / 4 keys x 4 rows: the online-softmax step of SoftmaxTile on that packed layout, so no
// lane is padding. Lane l is row l % 4 of key l / 4. `kstep` / `kmin` (quantized K: the logit is
// qa * step_j * dot + qb * min_j first) may be null. Keys nkeys .. (next multiple of 4) are
// padding and get probability 0. With `wq` (quantized V on VNNI targets) the weights
// p_j * step_j go straight to PvCodesVnni's 15-bit integers (wq, wscale; see PackWeights), scaled
// by an upper bound of their maximum rather than the maximum itself, so no second pass is needed.
void SoftmaxNarrow(const AttentionProblem& p, const HeadState& hs, const float* qa, const float* qb,
                   const float* kstep, const float* kmin, const float* vstep, const float* vmin,
                   float* vbias, size_t nkeys, int64_t key0, bool partial,
                   float* HWY_RESTRICT bounce, int32_t* HWY_RESTRICT wq = nullptr,
                   float* HWY_RESTRICT wscale = nullptr) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::CappedTag<float, 4> d4;
  constexpr size_t kKeysPerVec = kLanes / 4;
  const size_t nk4 = hwy::DivCeil(nkeys, size_t{4}) * 4;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  const VF log2e = hn::Set(df, 1.4426950408889634f);
  const bool softcap = p.softcap > 0.0f;
  const bool alibi = p.alibi != nullptr;
  const bool quant = kstep != nullptr;
  const VF cap = hn::Set(df, p.softcap);
  const VF inv_cap = hn::Set(df, softcap ? 1.0f / p.softcap : 0.0f);
  // Per-lane row values: the 4 rows repeated in every 128-bit block.
  const VF pos = hn::LoadDup128(df, hs.pos);
  const VF slope = hn::LoadDup128(df, hs.slope);
  const auto lo = hn::LoadDup128(di, hs.lo);
  const auto hi = hn::LoadDup128(di, hs.hi);
  const VF a4 = quant ? hn::LoadDup128(df, qa) : hn::Zero(df);
  const VF b4 = quant ? hn::LoadDup128(df, qb) : hn::Zero(df);
  // Key offset of each lane within its vector: l / 4; per-key values are spread to their 4
  // lanes with one table lookup.
  const auto lane_key = hn::ShiftRight<2>(hn::Iota(di, 0));
  const auto spread = hn::IndicesFromVec(df, lane_key);
  auto per_key = [&](const float* values, size_t j) {
    return hn::TableLookupLanes(hn::LoadDup128(df, values + j), spread);
  };
  const bool tail = nk4 > nkeys;
  VF mx = neg_inf;
  for (size_t j = 0; j < nk4; j += kKeysPerVec) {
    float* col = hs.st + 4 * j;
    VF x = hn::Load(df, col);
    const auto key = hn::Add(lane_key, hn::Set(di, static_cast<int32_t>(key0 + int64_t(j))));
    if (quant) x = hn::MulAdd(hn::Mul(a4, per_key(kstep, j)), x, hn::Mul(b4, per_key(kmin, j)));
    if (softcap) x = SoftcapScore(df, x, cap, inv_cap);
    if (alibi) x = AlibiScore(x, slope, pos, hn::ConvertTo(df, key));
    if (partial || tail) {
      auto hidden = KeyOutside(key, lo, hi);
      const auto end = hn::Set(di, static_cast<int32_t>(key0 + static_cast<int64_t>(nkeys)));
      hidden = hn::Or(hidden, hn::Not(hn::Lt(key, end)));
      x = HideKeys(df, hidden, neg_inf, x);
    }
    hn::Store(x, df, col);
    mx = hn::Max(mx, x);
  }
  // Fold the keys of a vector: the max per row over the 128-bit blocks.
  hn::Store(mx, df, bounce);
  auto tile_max = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) tile_max = hn::Max(tile_max, hn::Load(d4, bounce + b));
  const auto m_old = hn::Load(d4, hs.m);
  const auto m4 = hn::Max(m_old, tile_max);
  // A row that has seen no visible key keeps m = -inf; subtracting 0 instead keeps its
  // probabilities exp(-inf) = 0 and avoids (-inf) - (-inf).
  const auto m_safe =
      hn::IfThenZeroElse(hn::Eq(m4, hn::Set(d4, -std::numeric_limits<float>::infinity())), m4);
  const auto alpha =
      FastExp2(d4, hn::Mul(hn::Sub(m_old, m_safe), hn::Set(d4, 1.4426950408889634f)));
  hn::Store(m_safe, d4, bounce);
  const VF m = hn::LoadDup128(df, bounce);
  VF sum = hn::Zero(df), bias = hn::Zero(df);
#if HWY_TARGET == HWY_AVX3_DL
  if (wq != nullptr) {
    // Every weight e_j * step_j of row i is at most max_j step_j * exp(tile max_i - m_i): W =
    // round(w * 32767 / that bound) fits 15 bits (clamped, should the exp round up), and
    // PackWeights' bound on the rounding error still holds (the bound is at most l_i * max step).
    float step_max = 0.0f;
    for (size_t j = 0; j < nk4; ++j) step_max = std::max(step_max, vstep[j]);
    const auto bound =
        hn::Mul(hn::Set(d4, step_max),
                FastExp2(d4, hn::Mul(hn::Sub(tile_max, m_safe), hn::Set(d4, 1.4426950408889634f))));
    const auto positive = hn::Gt(bound, hn::Zero(d4));
    const auto inv4 = hn::IfThenElseZero(positive, hn::Div(hn::Set(d4, 32767.0f), bound));
    hn::Store(inv4, d4, bounce);
    const __m512 inv = _mm512_broadcast_f32x4(_mm_loadu_ps(bounce));
    const __m512i w_max = _mm512_set1_epi32(32767);
    // Words (4 * key + row) -> int32 (row) of key pair (0, 1), then of pair (2, 3).
    const __m256i to_pairs =
        _mm256_setr_epi16(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    VF wsum = hn::Zero(df);
    for (size_t j = 0; j < nk4; j += kKeysPerVec) {
      const VF e = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, hs.st + 4 * j), m), log2e));
      sum = hn::Add(sum, e);
      bias = hn::MulAdd(e, per_key(vmin, j), bias);
      const VF w = hn::Mul(e, per_key(vstep, j));
      wsum = hn::Add(wsum, w);
      const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w.raw, inv)), w_max);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + j / 2 * 4),
                          _mm256_permutexvar_epi16(to_pairs, _mm512_cvtepi32_epi16(q)));
    }
    // A row whose weights are not all finite gets wscale = NaN (its output is NaN).
    hn::Store(wsum, df, bounce);
    auto w4 = hn::Load(d4, bounce);
    for (size_t b = 4; b < kLanes; b += 4) w4 = hn::Add(w4, hn::Load(d4, bounce + b));
    const auto finite = hn::Eq(hn::Sub(w4, w4), hn::Zero(d4));
    hn::Store(hn::IfThenElse(finite, hn::Mul(bound, hn::Set(d4, 1.0f / 32767.0f)),
                             hn::Set(d4, std::numeric_limits<float>::quiet_NaN())),
              d4, wscale);
  } else
#endif
    for (size_t j = 0; j < nk4; j += kKeysPerVec) {
      float* col = hs.st + 4 * j;
      const VF e = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, col), m), log2e));
      sum = hn::Add(sum, e);
      if (vstep != nullptr) {
        // Quantized V: P.V sums the codes weighted by p_j * step_j; sum_j p_j * min_j is the row
        // offset.
        bias = hn::MulAdd(e, per_key(vmin, j), bias);
        hn::Store(hn::Mul(e, per_key(vstep, j)), df, col);
      } else {
        hn::Store(e, df, col);
      }
    }
  hn::Store(sum, df, bounce);
  auto s4 = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) s4 = hn::Add(s4, hn::Load(d4, bounce + b));
  if (vstep != nullptr) {
    hn::Store(bias, df, bounce);
    auto b4_sum = hn::Load(d4, bounce);
    for (size_t b = 4; b < kLanes; b += 4) b4_sum = hn::Add(b4_sum, hn::Load(d4, bounce + b));
    hn::Store(hn::MulAdd(alpha, hn::Load(d4, vbias), b4_sum), d4, vbias);
  }
  hn::Store(m4, d4, hs.m);
  hn::Store(hn::MulAdd(alpha, hn::Load(d4, hs.l), s4), d4, hs.l);
  hn::Store(alpha, d4, hs.alpha);
}
#endif

}  // namespace decode_impl
}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_SOFTMAX_INL_H_
