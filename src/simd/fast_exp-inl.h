// SPDX-License-Identifier: Apache-2.0
// Fast vectorized exp2 for the online softmax (arguments <= 0 in practice, any value allowed).
//
// exp2(x) = 2^n * 2^f with n = round(x), f = x - n in [-0.5, 0.5]; 2^f is a degree-6 polynomial
// fitted for relative error (4.4e-9 before fp32 rounding, so results are within ~1 ulp). Inputs
// below -127 (including -inf, i.e. masked scores) give exactly 0, NaN stays NaN, so masked keys
// get probability exactly 0 and NaN inputs are never hidden.

#if defined(TESSERA_SIMD_FAST_EXP_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_SIMD_FAST_EXP_INL_H_
#undef TESSERA_SIMD_FAST_EXP_INL_H_
#else
#define TESSERA_SIMD_FAST_EXP_INL_H_
#endif

#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// 2^f for f in [-0.5, 0.5].
template <class DF, class V = hn::Vec<DF>>
HWY_INLINE V Exp2Poly(DF df, V f) {
  V p = hn::Set(df, 1.5332454978080913e-4f);
  p = hn::MulAdd(p, f, hn::Set(df, 1.3394730516990865e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.618491420371696e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.550342218929045e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4022647359101626e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.931471992335769e-1f));
  return hn::MulAdd(p, f, hn::Set(df, 1.0f));
}

template <class DF, class V = hn::Vec<DF>>
HWY_INLINE V FastExp2(DF df, V x) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  if constexpr (sizeof(hn::TFromD<DF>) == 4 && hn::MaxLanes(df) == 16) {
    // AVX-512: the same value, bit for bit, in 11 instructions instead of 16: vscalefps
    // applies 2^n, and the lanes with n <= -127 (x < -126.5 or -inf; the generic path's
    // clamp gives them 2^-127 -> +0.0) are zeroed by the mask instead of clamped. The compare
    // is unordered-true, so a NaN lane is kept and stays NaN. Min(127, x) returns x for NaN.
    x = hn::Min(hn::Set(df, 127.0f), x);
    const V n = hn::Round(x);
    const V p = Exp2Poly(df, hn::Sub(x, n));
    const __mmask16 keep = _mm512_cmp_ps_mask(n.raw, _mm512_set1_ps(-127.0f), _CMP_NLE_UQ);
    return V{_mm512_maskz_scalef_ps(keep, p.raw, n.raw)};
  }
#endif
  const hn::RebindToSigned<DF> di;
  // Comparisons are false for NaN, so NaN passes through unclamped.
  x = hn::IfThenElse(hn::Lt(x, hn::Set(df, -127.0f)), hn::Set(df, -127.0f), x);
  x = hn::IfThenElse(hn::Gt(x, hn::Set(df, 127.0f)), hn::Set(df, 127.0f), x);
  const V n = hn::Round(x);
  const V p = Exp2Poly(df, hn::Sub(x, n));
  // 2^n through the exponent field; n = -127 gives the bit pattern of +0.0.
#if HWY_TARGET == HWY_SCALAR || HWY_TARGET == HWY_EMU128
  // These targets convert with a C++ cast, undefined for NaN (x86's vector conversion is
  // defined): a NaN lane converts 0 instead, and p (NaN) keeps the result NaN.
  const auto bits = hn::ShiftLeft<23>(
      hn::Add(hn::ConvertTo(di, hn::IfThenZeroElse(hn::IsNaN(n), n)), hn::Set(di, 127)));
#else
  const auto bits = hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
#endif
  return hn::Mul(p, hn::BitCast(df, bits));
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_SIMD_FAST_EXP_INL_H_
