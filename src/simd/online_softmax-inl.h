// SPDX-License-Identifier: Apache-2.0
// The online-softmax step on a score tile laid out key-major with query rows in lanes,
// St[key][Mp], shared by the exact forward and decode (and the forward's sigmoid step). `State`
// provides the per-row arrays (st, m, l, alpha, tile_max, pos, slope, lo, hi; see
// flash_fwd-inl.h's Scratch). A SIMD building block of its own, so that decode uses it without
// including the attention kernels.

#if defined(TESSERA_SIMD_ONLINE_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_SIMD_ONLINE_SOFTMAX_INL_H_
#undef TESSERA_SIMD_ONLINE_SOFTMAX_INL_H_
#else
#define TESSERA_SIMD_ONLINE_SOFTMAX_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <cstdint>
#include <limits>

#include "core/attention_problem.h"
#include "simd/fast_exp-inl.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The mask of partial tiles when each row sees one key interval [lo, hi] (the window and causal
// masks): hidden lanes of rows [i, i + kLanes) for key `key`.
struct WindowPredicate {
  const int32_t* lo;
  const int32_t* hi;
  HWY_INLINE VF Apply(VF x, size_t i, size_t /*j*/, int64_t key) const {
    const DF df;
    const hn::RebindToSigned<DF> di;
    const auto k = hn::Set(di, static_cast<int32_t>(key));
    const auto hidden = KeyOutside(k, hn::Load(di, lo + i), hn::Load(di, hi + i));
    return HideKeys(df, hidden, hn::Set(df, -std::numeric_limits<float>::infinity()), x);
  }
};

// Softcap and ALiBi (when enabled) and then `mask` (when `partial`), applied in place to the score
// tile St; returns the running max of rows [i, i + kLanes) updated with the tile's maximum. Key j
// of the tile is key index keys[j] (keys == nullptr: key0 + j).
template <class State, class Mask>
HWY_INLINE VF ModifyScores(const AttentionProblem& p, State& s, size_t nkeys, size_t mp,
                           int64_t key0, const int32_t* keys, bool partial, const Mask& mask,
                           size_t i, VF mx) {
  const DF df;
  const bool softcap = p.softcap > 0.0f;
  const bool alibi = p.alibi != nullptr;
  const VF cap = hn::Set(df, p.softcap);
  const VF inv_cap = hn::Set(df, softcap ? 1.0f / p.softcap : 0.0f);
  float* col = s.st + i;
  const VF pos = hn::Load(df, s.pos + i);
  const VF slope = hn::Load(df, s.slope + i);
  for (size_t j = 0; j < nkeys; ++j) {
    VF x = hn::Load(df, col + j * mp);
    const int64_t key = keys != nullptr ? keys[j] : key0 + static_cast<int64_t>(j);
    if (softcap) x = SoftcapScore(df, x, cap, inv_cap);
    if (alibi) x = AlibiScore(x, slope, pos, hn::Set(df, static_cast<float>(key)));
    if (partial) x = mask.Apply(x, i, j, key);
    hn::Store(x, df, col + j * mp);
    mx = hn::Max(mx, x);
  }
  return mx;
}

// Applies softcap, ALiBi and (on partial tiles) the mask to St, then the online-softmax update:
// new running max, alpha = exp(m_old - m_new), St <- exp(St - m_new), l <- alpha*l + rowsum.
template <class State>
void SoftmaxTile(const AttentionProblem& p, State& s, size_t nkeys, size_t mp, int64_t key0,
                 bool partial) {
  SoftmaxTile(p, s, nkeys, mp, key0, nullptr, partial, WindowPredicate{s.lo, s.hi});
}

// SoftmaxTile on the rows in lanes [i_begin, i_end) only (multiples of kLanes): the rows are
// independent, so a caller may run the step on a strip of rows while it is in L1.
template <class State, class Mask>
void SoftmaxColumns(const AttentionProblem& p, State& s, size_t nkeys, size_t mp, int64_t key0,
                    const int32_t* keys, bool partial, const Mask& mask, size_t i_begin,
                    size_t i_end) {
  const DF df;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  const VF log2e = hn::Set(df, 1.4426950408889634f);
  const bool modify = p.softcap > 0.0f || p.alibi != nullptr || partial;
  for (size_t i = i_begin; i < i_end; i += kLanes) {
    float* col = s.st + i;
    const VF m_old = hn::Load(df, s.m + i);
    const VF mx = modify ? ModifyScores(p, s, nkeys, mp, key0, keys, partial, mask, i, m_old)
                         : hn::Max(m_old, hn::Load(df, s.tile_max + i));
    // A row that has seen no visible key keeps m = -inf; subtracting 0 instead keeps its
    // probabilities exp(-inf) = 0 and avoids (-inf) - (-inf).
    const VF m_safe = hn::IfThenZeroElse(hn::Eq(mx, neg_inf), mx);
    const VF alpha = FastExp2(df, hn::Mul(hn::Sub(m_old, m_safe), log2e));
    VF sum0 = hn::Zero(df), sum1 = hn::Zero(df);
    size_t j = 0;
    for (; j + 2 <= nkeys; j += 2) {
      const VF p0 = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, col + j * mp), m_safe), log2e));
      const VF p1 = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, col + (j + 1) * mp), m_safe), log2e));
      hn::Store(p0, df, col + j * mp);
      hn::Store(p1, df, col + (j + 1) * mp);
      sum0 = hn::Add(sum0, p0);
      sum1 = hn::Add(sum1, p1);
    }
    if (j < nkeys) {
      const VF p0 = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, col + j * mp), m_safe), log2e));
      hn::Store(p0, df, col + j * mp);
      sum0 = hn::Add(sum0, p0);
    }
    const VF l_new = hn::MulAdd(alpha, hn::Load(df, s.l + i), hn::Add(sum0, sum1));
    hn::Store(mx, df, s.m + i);
    hn::Store(l_new, df, s.l + i);
    hn::Store(alpha, df, s.alpha + i);
  }
}

template <class State, class Mask>
void SoftmaxTile(const AttentionProblem& p, State& s, size_t nkeys, size_t mp, int64_t key0,
                 const int32_t* keys, bool partial, const Mask& mask) {
  SoftmaxColumns(p, s, nkeys, mp, key0, keys, partial, mask, 0, mp);
}

// FlashSigmoid's step: St <- sigmoid(St' + bias) where St' is St after softcap, ALiBi and the
// mask (hidden keys get exactly 0); no running max and no normalization, so alpha = 1. This
// form runs it on the rows in lanes [i_begin, i_end) only (multiples of kLanes); SigmoidTile on
// all of them.
template <class State, class Mask>
void SigmoidColumns(const AttentionProblem& p, State& s, size_t nkeys, size_t mp, int64_t key0,
                    const int32_t* keys, bool partial, const Mask& mask, size_t i_begin,
                    size_t i_end) {
  const DF df;
  const VF bias = hn::Set(df, p.mask.sigmoid_bias);
  const VF one = hn::Set(df, 1.0f);
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  for (size_t i = i_begin; i < i_end; i += kLanes) {
    float* col = s.st + i;
    ModifyScores(p, s, nkeys, mp, key0, keys, partial, mask, i, neg_inf);
    for (size_t j = 0; j < nkeys; ++j) {
      // A hidden key (-inf) gets exactly 0.
      hn::Store(SigmoidScore(df, hn::Load(df, col + j * mp), bias, one), df, col + j * mp);
    }
    hn::Store(one, df, s.alpha + i);
  }
}

template <class State, class Mask>
void SigmoidTile(const AttentionProblem& p, State& s, size_t nkeys, size_t mp, int64_t key0,
                 const int32_t* keys, bool partial, const Mask& mask) {
  SigmoidColumns(p, s, nkeys, mp, key0, keys, partial, mask, 0, mp);
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_SIMD_ONLINE_SOFTMAX_INL_H_
