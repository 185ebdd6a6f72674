// SPDX-License-Identifier: Apache-2.0
// The score-modifier policy of the exact kernels on Highway vectors: softcap, ALiBi, the key
// interval (window) test and the sigmoid score function, each as its value and, where the backward
// needs one, its derivative. The forward (ModifyScores, rows in lanes), decode (SoftmaxNarrow,
// keys x rows in one vector) and the backward (GradTileKeyLanes, keys in lanes) lay scores out
// differently but apply the same arithmetic per lane in the same order (softcap, ALiBi, mask, then
// the score function), so each formula is written once, here. Every function is HWY_INLINE: the
// kernels' loops compile as if the arithmetic were written out in them. The constants the backward
// keeps in its GradMath (cap, inv_cap, neg_inf) are taken by reference, so they are read where the
// formula uses them as in written-out code (by value, GCC allocated the scalar target's registers
// differently).

#if defined(TESSERA_SIMD_SCORE_MOD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_SIMD_SCORE_MOD_INL_H_
#undef TESSERA_SIMD_SCORE_MOD_INL_H_
#else
#define TESSERA_SIMD_SCORE_MOD_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Softcap: s' = cap * tanh(s / cap) (inv_cap = 1 / cap).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V SoftcapScore(D d, V x, const V& cap, const V& inv_cap) {
  return hn::Mul(cap, hn::Tanh(d, hn::Mul(x, inv_cap)));
}

// The softcap's derivative applied to a score gradient: ds * (1 - (s' / cap)^2), from the capped
// score s' (tanh' = 1 - tanh^2).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V SoftcapGrad(D d, V ds, V capped, const V& inv_cap) {
  const V t = hn::Mul(capped, inv_cap);
  return hn::Mul(ds, hn::NegMulAdd(t, t, hn::Set(d, 1.0f)));
}

// ALiBi: s' = s - slope * |pos - key| (query position and key index as floats). Its derivative
// with respect to s is 1, so the backward has no ALiBi term.
template <class V>
HWY_INLINE V AlibiScore(V x, V slope, V pos, V key) {
  return hn::NegMulAdd(slope, hn::Abs(hn::Sub(pos, key)), x);
}

// The interval test of the masks: lanes whose key (or grid coordinate) k lies outside [lo, hi]
// (lo > hi: every lane).
template <class VI>
HWY_INLINE auto KeyOutside(VI k, VI lo, VI hi) -> decltype(hn::Lt(k, lo)) {
  return hn::Or(hn::Lt(k, lo), hn::Gt(k, hi));
}

// Hidden lanes (an integer-lane mask such as KeyOutside's) get the score neg_inf (= -inf), so
// their probability is exactly 0 under softmax and sigmoid alike.
template <class D, class M, class V = hn::Vec<D>>
HWY_INLINE V HideKeys(D d, M hidden, const V& neg_inf, V x) {
  return hn::IfThenElse(hn::RebindMask(d, hidden), neg_inf, x);
}

// Sigmoid score function (FlashSigmoid): p = 1 / (1 + exp(-(s + bias))); s = -inf gives exactly 0.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V SigmoidScore(D d, V x, V bias, V one) {
  return hn::Div(one, hn::Add(one, hn::Exp(d, hn::Neg(hn::Add(x, bias)))));
}

// Its derivative applied to dP: dS = dP * p * (1 - p) (no normalization, so no Delta term).
template <class V>
HWY_INLINE V SigmoidGrad(V dp, V prob, V one) {
  return hn::Mul(dp, hn::Mul(prob, hn::Sub(one, prob)));
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_SIMD_SCORE_MOD_INL_H_
