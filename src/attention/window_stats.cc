// SPDX-License-Identifier: Apache-2.0
// Attention statistics of an observation window (AttentionStats, tessera/attention.h): per key
// the probability mass the last W query rows give it (and its square), per window row the
// entropy of its attention, computed after the forward from the forward's LSE.
//
// Why a pass of its own: a probability p_ij = exp(s_ij - lse_i) is known only once row i's LSE
// is, i.e. after the forward has seen every key. Keeping the forward's tiles unchanged and
// recomputing the scores of the W window rows costs W * Sk * D multiply-adds per head, against
// the forward's 2 * Sq * Sk * D: at W = 32, Sq = 16384 about 0.1%, and it reads K only, never V.
// The entropy comes from the same scores: -sum_j p ln p = sum_j p (lse - s).
//
// Layout: rows in lanes, as in the forward: a task = (sequence, KV head, chunk of kChunkKeys
// keys) converts its keys to f32 once, then per query head of the group scores 4 keys x one
// vector of rows at a time against the packed, pre-scaled window rows Qt[D][Mp]. Per key the
// mass sums the row lanes (SumOfLanes, rows and then the group's heads in ascending order); per
// row the entropy partial of each chunk is kept and the chunks are summed in ascending order at
// the end, so every result is independent of the thread count (bitwise).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "attention/window_stats.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
// Order matters: the SIMD headers below are included once per target by foreach_target.
#include <hwy/aligned_allocator.h>
#include <hwy/contrib/math/math-inl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention/window_stats.h"
#include "core/attention_problem.h"
#include "core/dispatch.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "simd/score_mod-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace window_stats_impl {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
using DI = hn::RebindToSigned<DF>;

constexpr int64_t kChunkKeys = 512;

struct Outputs {
  float* mass;  // element (b, h, j) at b * s[0] + h * s[1] + j * s[2]
  float* mass_sq;
  int64_t mass_stride[3], mass_sq_stride[3];
};

bool Run(const AttentionProblem& p, const AttentionStats& stats, const float* lse,
         const int64_t* lse_stride, int32_t threads) {
  const DF df;
  const DI di;
  const size_t lanes = hn::Lanes(df);
  const size_t dim = static_cast<size_t>(p.dim);
  const int64_t window = stats.window, batch = p.batch, heads_kv = p.heads_kv, group = p.group;
  const int64_t seq_q = p.seq_q, seq_k = p.seq_k;
  const size_t mp = hwy::DivCeil(static_cast<size_t>(window), lanes) * lanes;
  const int64_t chunks = hwy::DivCeil(seq_k, kChunkKeys);
  const int64_t delta = p.top_left ? 0 : seq_k - seq_q;
  const bool sum_group = stats.sum_gqa_group;
  const bool want_sq = stats.key_mass_sq.data != nullptr;
  const bool want_entropy = stats.row_entropy.data != nullptr;
  constexpr float kInf = std::numeric_limits<float>::infinity();

  // Entropy partials [batch][Hq][chunk][Mp], summed over the chunks in order at the end.
  std::vector<float> entropy_parts;
  if (want_entropy) {
    entropy_parts.assign(static_cast<size_t>(batch * p.heads_q * chunks) * mp, 0.0f);
  }
  // Per worker: the chunk's keys in f32, Qt, the row vectors (lse, lo, hi, pos) and the
  // group sums of one chunk.
  const size_t worker_floats = static_cast<size_t>(kChunkKeys) * dim + dim * mp + 5 * mp +
                               2 * static_cast<size_t>(kChunkKeys);
  const int32_t workers = std::max<int32_t>(1, threads);
  auto scratch = hwy::AllocateAligned<float>(worker_floats * static_cast<size_t>(workers));
  if (!scratch) return false;

  const TensorView& km = stats.key_mass;
  const TensorView& ks = stats.key_mass_sq;
  float* const mass_out = static_cast<float*>(km.data);
  float* const sq_out = static_cast<float*>(ks.data);

  ParallelFor(threads, batch * heads_kv * chunks, [&](int64_t task, int32_t worker) {
    const int64_t chunk = task % chunks;
    const int64_t hkv = (task / chunks) % heads_kv;
    const int64_t b = task / chunks / heads_kv;
    const int64_t k0 = chunk * kChunkKeys;
    const int64_t nk = std::min(kChunkKeys, seq_k - k0);

    float* const base = scratch.get() + worker_floats * static_cast<size_t>(worker);
    float* const kf = base;                                        // [kChunkKeys][D]
    float* const qt = kf + static_cast<size_t>(kChunkKeys) * dim;  // [D][Mp]
    float* const row_lse = qt + dim * mp;
    float* const row_pos = row_lse + mp;
    int32_t* const row_lo = reinterpret_cast<int32_t*>(row_pos + mp);
    int32_t* const row_hi = row_lo + mp;
    float* const entropy = row_pos + 3 * mp;  // [Mp]
    float* const group_mass = entropy + mp;
    float* const group_sq = group_mass + kChunkKeys;

    for (int64_t j = 0; j < nk; ++j) {
      LoadRow(p.dtype, p.k, p.k_offset(b, k0 + j, hkv), p.k_stride[3], dim,
              kf + static_cast<size_t>(j) * dim);
    }
    if (sum_group) {
      std::fill(group_mass, group_mass + nk, 0.0f);
      std::fill(group_sq, group_sq + nk, 0.0f);
    }

    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hkv * group + g;
      // The window rows of head h, scaled and transposed; padding lanes get no visible key.
      for (size_t r = 0; r < mp; ++r) {
        const int64_t w = static_cast<int64_t>(r);
        if (w < window) {
          const int64_t i = seq_q - window + w;
          float row[kMaxHeadDim];
          LoadRow(p.dtype, p.q, p.q_offset(b, i, h), p.q_stride[3], dim, row);
          for (size_t d = 0; d < dim; ++d) qt[d * mp + r] = row[d] * p.scale;
          const int64_t pos = i + delta;
          const float l = lse[b * lse_stride[0] + h * lse_stride[1] + i * lse_stride[2]];
          const AttentionProblem::KeyRange keys = p.visible_keys(pos, seq_k);
          const bool any = keys.lo <= keys.hi && l > -kInf;
          row_lse[r] = any ? l : kInf;
          row_pos[r] = static_cast<float>(pos);
          row_lo[r] = any ? static_cast<int32_t>(keys.lo) : 1;
          row_hi[r] = any ? static_cast<int32_t>(keys.hi) : 0;
        } else {
          for (size_t d = 0; d < dim; ++d) qt[d * mp + r] = 0.0f;
          row_lse[r] = kInf;
          row_pos[r] = 0.0f;
          row_lo[r] = 1;
          row_hi[r] = 0;
        }
        entropy[r] = 0.0f;
      }
      const VF cap = hn::Set(df, p.softcap);
      const VF inv_cap = hn::Set(df, p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f);
      const VF slope = hn::Set(df, p.alibi != nullptr ? p.alibi_slope(b, h) : 0.0f);
      const int64_t h_out = sum_group ? hkv : h;

      for (int64_t j0 = 0; j0 < nk; j0 += 4) {
        const int64_t nj = std::min<int64_t>(4, nk - j0);
        float mass[4] = {0.0f, 0.0f, 0.0f, 0.0f}, mass_sq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (size_t r0 = 0; r0 < mp; r0 += lanes) {
          VF acc[4] = {hn::Zero(df), hn::Zero(df), hn::Zero(df), hn::Zero(df)};
          const float* k_rows = kf + static_cast<size_t>(j0) * dim;
          for (size_t d = 0; d < dim; ++d) {
            const VF qv = hn::Load(df, qt + d * mp + r0);
            for (int64_t jj = 0; jj < 4; ++jj) {
              // Past the chunk's end the rows are stale scratch: their scores are never used.
              acc[jj] =
                  hn::MulAdd(qv, hn::Set(df, k_rows[static_cast<size_t>(jj) * dim + d]), acc[jj]);
            }
          }
          const VF lse_v = hn::Load(df, row_lse + r0);
          const auto lo = hn::Load(di, row_lo + r0), hi = hn::Load(di, row_hi + r0);
          for (int64_t jj = 0; jj < nj; ++jj) {
            const int64_t key = k0 + j0 + jj;
            VF x = acc[jj];
            if (p.softcap > 0.0f) x = SoftcapScore(df, x, cap, inv_cap);
            if (p.alibi != nullptr) {
              x = AlibiScore(x, slope, hn::Load(df, row_pos + r0),
                             hn::Set(df, static_cast<float>(key)));
            }
            const auto visible = hn::RebindMask(
                df, hn::Not(KeyOutside(hn::Set(di, static_cast<int32_t>(key)), lo, hi)));
            const VF prob = hn::IfThenElseZero(visible, hn::Exp(df, hn::Sub(x, lse_v)));
            mass[jj] += hn::GetLane(hn::SumOfLanes(df, prob));
            if (want_sq) mass_sq[jj] += hn::GetLane(hn::SumOfLanes(df, hn::Mul(prob, prob)));
            if (want_entropy) {
              const VF term = hn::IfThenElseZero(visible, hn::Mul(prob, hn::Sub(lse_v, x)));
              hn::Store(hn::Add(hn::Load(df, entropy + r0), term), df, entropy + r0);
            }
          }
        }
        for (int64_t jj = 0; jj < nj; ++jj) {
          const int64_t key = k0 + j0 + jj;
          if (sum_group) {
            group_mass[j0 + jj] += mass[jj];
            group_sq[j0 + jj] += mass_sq[jj];
          } else {
            mass_out[b * km.strides[0] + h_out * km.strides[1] + key * km.strides[2]] = mass[jj];
            if (want_sq) {
              sq_out[b * ks.strides[0] + h_out * ks.strides[1] + key * ks.strides[2]] = mass_sq[jj];
            }
          }
        }
      }
      if (want_entropy) {
        float* part =
            entropy_parts.data() + static_cast<size_t>((b * p.heads_q + h) * chunks + chunk) * mp;
        std::copy(entropy, entropy + mp, part);
      }
    }
    if (sum_group) {
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t key = k0 + j;
        mass_out[b * km.strides[0] + hkv * km.strides[1] + key * km.strides[2]] = group_mass[j];
        if (want_sq) {
          sq_out[b * ks.strides[0] + hkv * ks.strides[1] + key * ks.strides[2]] = group_sq[j];
        }
      }
    }
  });

  if (want_entropy) {
    const TensorView& re = stats.row_entropy;
    float* const out = static_cast<float*>(re.data);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const float* parts =
            entropy_parts.data() + static_cast<size_t>((b * p.heads_q + h) * chunks) * mp;
        for (int64_t w = 0; w < window; ++w) {
          float sum = 0.0f;
          for (int64_t c = 0; c < chunks; ++c) sum += parts[static_cast<size_t>(c) * mp + w];
          out[b * re.strides[0] + h * re.strides[1] + w * re.strides[2]] = sum;
        }
      }
    }
  }
  return true;
}

}  // namespace window_stats_impl

bool WindowStats(const AttentionProblem& p, const AttentionStats& stats, const float* lse,
                 const int64_t* lse_stride, int32_t threads) {
  return window_stats_impl::Run(p, stats, lse, lse_stride, threads);
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tessera {

HWY_EXPORT(WindowStats);

bool ComputeWindowStats(const AttentionProblem& problem, const AttentionStats& stats,
                        const float* lse, const int64_t* lse_stride, int32_t threads) {
  return HWY_DYNAMIC_DISPATCH(WindowStats)(problem, stats, lse, lse_stride, threads);
}

}  // namespace tessera
#endif  // HWY_ONCE
