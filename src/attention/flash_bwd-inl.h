// SPDX-License-Identifier: Apache-2.0
// Exact attention backward: FlashAttention-2's backward on a CPU, SIMD body (one copy per Highway
// target).
//
// What it computes: dQ, dK, dV of O = softmax(scale*QK^T + softcap/ALiBi, masked) V, recomputing
// the scores tile by tile from the forward's LSE, never the Sq x Sk matrix:
//   P = exp(S - LSE),  dP = dO V^T,  Delta_i = sum_d dO_id O_id,  dS = P o (dP - Delta)
//   (softcap: dS o= 1 - (s/c)^2),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
//
// Partition (deterministic, no atomics): a pre-pass computes Delta per query row; then one task =
// (sequence, KV head, group of consecutive key blocks of kKeyBlock keys). For each of its key
// blocks a task packs K and V transposed (keys in SIMD lanes) and loops over the query heads of
// the GQA group and fixed tiles of kQueryTile query rows that see the block:
//   S = Q K^T, dP = dO V^T          (query rows broadcast, keys in lanes)
//   P, dS                           (element-wise, per row LSE and Delta)
//   dV^T += dO^T P, dK^T += Q^T dS   (accumulated in registers tile by tile, owned by the task)
//   dQ_r += dS K                     (head dim in lanes, into the task group's dQ partial r)
// so each tile costs the 5 GEMMs of the FLOP count, with no recomputation. dK and dV of a key
// have one owner. dQ has one partial per key-block group; the number of groups R depends only on
// the shape (about kTargetTasks tasks in all), and the partials are summed in group order at the
// end, so every gradient is bitwise identical across runs and thread counts.
//
// Bytes moved: each task streams the Q and dO rows of the group once per key block (prefetched
// a tile ahead) and reads/writes its dQ partial rows once per key block. Extra memory: Delta
// (Sq * Hq floats) and R dQ partials (R * Sq * Hq * D floats), plus per-worker tiles.
//
// Masks, softcap and ALiBi are applied exactly as in the forward (same window per query
// position, same order: softcap, ALiBi, mask; simd/score_mod-inl.h and mask_tiles-inl.h); tiles
// no row can see are skipped.

#if defined(TESSERA_ATTENTION_FLASH_BWD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_ATTENTION_FLASH_BWD_INL_H_
#undef TESSERA_ATTENTION_FLASH_BWD_INL_H_
#else
#define TESSERA_ATTENTION_FLASH_BWD_INL_H_
#endif

#include <hwy/aligned_allocator.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/flash_tiles.h"
#include "attention/mask_policy.h"
#include "attention/mask_tiles-inl.h"
#include "core/attention_problem.h"
#include "core/dispatch.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "simd/fast_exp-inl.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace flash_bwd_impl {

namespace hn = hwy::HWY_NAMESPACE;

using flash::kKeyBlock;
using flash::kQueryTile;
// Tasks the key-block pass aims for: (sequence, KV head) pairs are split into groups of key
// blocks until there are about this many, whatever the thread count (see FlashBackward).
constexpr int64_t kTargetTasks = 16;
// Memory the dQ partials may take before fewer groups (less parallelism) are used.
constexpr int64_t kMaxPartialBytes = int64_t{512} << 20;
constexpr float kLog2e = 1.4426950408889634f;

struct Task {
  int64_t seq;
  int64_t kv_head;
  int64_t first;  // group r of key blocks
  int64_t count;  // key blocks of the sequence (the group owns [r*count/R, (r+1)*count/R))
};

// Bytes spanned by a row of `dim` elements `stride` elements apart.
inline int64_t RowBytes(DType dtype, size_t dim, int64_t stride) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  return (static_cast<int64_t>(dim) - 1) * stride * elem + elem;
}

// Prefetches `rows` rows (`row_stride` elements apart from element `offset`) into L2 along with
// the GEMM loops that receive the feed.
inline TileFeed PrefetchFeed(DType dtype, const void* base, int64_t offset, int64_t row_stride,
                             int64_t elem_stride, size_t dim, int64_t rows) {
  TileFeed feed;
  if (rows <= 0) return feed;  // no next tile (callers pass offset 0 then)
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  feed.prefetch = RowPrefetcher{static_cast<const char*>(base) + offset * elem, row_stride * elem,
                                RowBytes(dtype, dim, elem_stride), rows};
  return feed;
}

using KeyRange = AttentionProblem::KeyRange;

// Constants of the element-wise step (softcap, exp2, mask value).
struct GradMath {
  hn::Vec<DF> cap, inv_cap, log2e, neg_inf;
  bool softcap;
  explicit GradMath(const AttentionProblem& p) {
    const DF df;
    softcap = p.softcap > 0.0f;
    cap = hn::Set(df, p.softcap);
    inv_cap = hn::Set(df, softcap ? 1.0f / p.softcap : 0.0f);
    log2e = hn::Set(df, kLog2e);
    neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  }
};

// ---------------------------------------------------------------------------------------------
// The pass: keys in lanes.

struct Scratch {
  float* kt;      // [D][Np] scaled keys, transposed
  float* vt;      // [D][Np] values, transposed
  float* dkt;     // [D][Np] dK accumulator (unscaled), transposed
  float* dvt;     // [D][Np] dV accumulator, transposed
  float* kpanel;  // [kKeyBlock][Dp] keys as rows (unscaled), the B operand of dQ += dS K
  float* st;      // [kQueryTile][Np] scores, then P
  float* dpt;     // [kQueryTile][Np] dP, then dS
  float* qrows;   // [kQueryTile][D] Q rows (converted dtypes or strides)
  float* dorows;  // [kQueryTile][D] dO rows
  float* ones;    // [Np]
  float* keyf;    // [Np] key index as float (ALiBi)
  int32_t* key;   // [Np] key index (mask)

  static size_t Floats(size_t dim, size_t dp, size_t np) {
    return 4 * dim * np + static_cast<size_t>(kKeyBlock) * dp +
           static_cast<size_t>(kQueryTile) * (2 * np + 2 * dim) + 3 * np;
  }
  void Carve(float* base, size_t dim, size_t dp, size_t np) {
    kt = base;
    vt = kt + dim * np;
    dkt = vt + dim * np;
    dvt = dkt + dim * np;
    kpanel = dvt + dim * np;
    st = kpanel + kKeyBlock * dp;
    dpt = st + kQueryTile * np;
    qrows = dpt + kQueryTile * np;
    dorows = qrows + kQueryTile * dim;
    ones = dorows + kQueryTile * dim;
    keyf = ones + np;
    key = reinterpret_cast<int32_t*>(keyf + np);
  }
};

using mask_impl::MaskRows;
using mask_impl::RowMask;

// St (scores) and dPt (dP) of a tile of query rows, lanes = keys: dPt <- dS, St <- P.
inline void GradTileKeyLanes(const AttentionProblem& p, const GradMath& g, Scratch& s, size_t nrows,
                             size_t np, const float* lse, const float* delta, const float* pos,
                             const KeyRange* range, float slope, bool partial,
                             const MaskRows* masked) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const bool alibi = p.alibi != nullptr;
  const bool sigmoid = p.mask.sigmoid;
  const auto one = hn::Set(df, 1.0f);
  const auto sigmoid_bias = hn::Set(df, p.mask.sigmoid_bias);
  for (size_t r = 0; r < nrows; ++r) {
    const auto row_lse = hn::Set(df, lse[r]);
    const auto row_delta = hn::Set(df, delta[r]);
    const auto row_pos = hn::Set(df, pos[r]);
    const auto lo = hn::Set(di, static_cast<int32_t>(std::max<int64_t>(range[r].lo, -1)));
    const auto hi = hn::Set(di, static_cast<int32_t>(std::max<int64_t>(range[r].hi, -1)));
    const RowMask* rm = masked != nullptr ? masked->tile_rows[r] : nullptr;
    const float* bias = masked != nullptr ? masked->tile_bias[r] : nullptr;
    float* srow = s.st + r * np;
    float* dprow = s.dpt + r * np;
    for (size_t j = 0; j < np; j += kLanes) {
      auto x = hn::Load(df, srow + j);
      auto capped = x;
      if (g.softcap) x = capped = SoftcapScore(df, x, g.cap, g.inv_cap);
      if (alibi) x = AlibiScore(x, hn::Set(df, slope), row_pos, hn::Load(df, s.keyf + j));
      if (partial && rm != nullptr) {
        x = masked->Apply(*rm, s.key, j, x);
        if (bias != nullptr) x = hn::Add(x, hn::Load(df, bias + j));
      } else if (partial) {
        x = HideKeys(df, KeyOutside(hn::Load(di, s.key + j), lo, hi), g.neg_inf, x);
      }
      hn::Vec<DF> prob, ds;
      if (sigmoid) {
        // P = sigmoid(x + b), dS = dP P (1 - P): no normalization, no Delta.
        prob = SigmoidScore(df, x, sigmoid_bias, one);
        ds = SigmoidGrad(hn::Load(df, dprow + j), prob, one);
      } else {
        prob = FastExp2(df, hn::Mul(hn::Sub(x, row_lse), g.log2e));
        ds = hn::Mul(prob, hn::Sub(hn::Load(df, dprow + j), row_delta));
      }
      if (g.softcap) ds = SoftcapGrad(df, ds, capped, g.inv_cap);
      hn::Store(prob, df, srow + j);
      hn::Store(ds, df, dprow + j);
    }
  }
}

// Where a task accumulates its share of dQ: partial r of dQ (unscaled), [Hq][q_rows][Dp].
struct DqPartials {
  float* data;
  int64_t q_rows;  // rows of the token axis (dense: B * Sq)
  size_t dp;       // D rounded up to the vector width
  float* rows(const AttentionProblem& p, int64_t r, int64_t head, int64_t row) const {
    return data + ((r * p.heads_q + head) * q_rows + row) * static_cast<int64_t>(dp);
  }
};

// Task (seq, kv_head, group r = t.first of key blocks [t.first * nb / R, ...) as set up by
// FlashBackward): for each key block, dK and dV of its keys over every query row of the GQA group
// that sees them, and the contribution of these keys to dQ, added to partial r.
template <int kD>
void RunTask(const AttentionBackwardProblem& bp, const float* delta_rows, const DqPartials& dq,
             int64_t block_begin, int64_t block_end, const Task& t, Scratch& s, MaskRows* mr) {
  const AttentionProblem& p = bp.fwd;
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(p.dim);
  const size_t dp = dq.dp;
  const int64_t q_len = p.q_len(t.seq), k_len = p.k_len(t.seq);
  const int64_t q_begin = p.q_begin(t.seq), k_begin = p.k_begin(t.seq);
  const int64_t delta = p.top_left ? 0 : k_len - q_len;
  const int64_t row_base = p.varlen() ? 0 : t.seq * p.seq_q;
  const GradMath g(p);
  const bool direct_q = p.dtype == DType::kF32 && p.q_stride[3] == 1;
  const bool direct_do = p.dtype == DType::kF32 && bp.dout_stride[3] == 1;
  TileFeed none;
  float lse[kQueryTile], dlt[kQueryTile], pos[kQueryTile];
  KeyRange range[kQueryTile];
  if (mr != nullptr) mr->Prepare(t.seq, t.kv_head, q_len, k_len, delta);

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t j0 = block * kKeyBlock;
    const int64_t nk = std::min(kKeyBlock, k_len - j0);
    const int64_t j1 = j0 + nk;
    const size_t np = hwy::DivCeil(static_cast<size_t>(nk), kLanes) * kLanes;

    for (float* panel : {s.kt, s.vt, s.dkt, s.dvt}) std::memset(panel, 0, dim * np * sizeof(float));
    std::memset(s.kpanel, 0, static_cast<size_t>(nk) * dp * sizeof(float));
    float* row = s.qrows;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t token = k_begin + j0 + j;
      LoadRow(p.dtype, p.k, p.k_offset(t.seq, token, t.kv_head), p.k_stride[3], dim, row);
      for (size_t d = 0; d < dim; ++d) {
        s.kt[d * np + static_cast<size_t>(j)] = p.scale * row[d];
        s.kpanel[static_cast<size_t>(j) * dp + d] = row[d];
      }
      LoadRow(p.dtype, p.v, p.v_offset(t.seq, token, t.kv_head), p.v_stride[3], dim, row);
      for (size_t d = 0; d < dim; ++d) s.vt[d * np + static_cast<size_t>(j)] = row[d];
    }
    for (size_t j = 0; j < np; ++j) {
      s.ones[j] = 1.0f;
      // Padding lanes get a key index no query sees, so partial tiles mask them.
      const int64_t key = static_cast<int64_t>(j) < nk ? j0 + static_cast<int64_t>(j) : -2;
      s.key[j] = static_cast<int32_t>(key);
      s.keyf[j] = static_cast<float>(key);
    }

    // Query positions p (index i = p - delta) that see some key of [j0, j1):
    // p - wl <= j1 - 1 and p + wr >= j0. Under the other masks every query tile is asked.
    int64_t i_lo = std::max<int64_t>(0, j0 - p.window_right - delta);
    int64_t i_hi = std::min<int64_t>(q_len - 1, j1 - 1 + p.window_left - delta);
    if (mr != nullptr) {
      mr->SetKeys(j0, nk, np);
      i_lo = 0;
      i_hi = q_len - 1;
    }
    for (int64_t gi = 0; gi < p.group && i_lo <= i_hi; ++gi) {
      const int64_t head = t.kv_head * p.group + gi;
      const float slope = p.alibi != nullptr ? p.alibi_slope(t.seq, head) : 0.0f;
      for (int64_t q0 = i_lo / kQueryTile * kQueryTile; q0 <= i_hi; q0 += kQueryTile) {
        if (mr != nullptr && !mr->TileMaySee(gi, q0 / kQueryTile, j0, j1)) continue;
        const int64_t a = std::max(q0, i_lo), e = std::min(q0 + kQueryTile, i_hi + 1);
        const size_t nrows = static_cast<size_t>(e - a);
        bool full = true;
        for (size_t r = 0; r < nrows; ++r) {
          const int64_t qi = a + static_cast<int64_t>(r);
          const int64_t token = q_begin + qi;
          range[r] = p.visible_keys(qi + delta, k_len);
          full = full && range[r].lo <= j0 && range[r].hi >= j1 - 1;
          // Sigmoid attention has neither an LSE nor a Delta term.
          const float l = p.mask.sigmoid ? 0.0f : p.lse[p.lse_offset(t.seq, head, token)];
          lse[r] = std::isinf(l) && l < 0.0f ? 0.0f : l;
          dlt[r] = p.mask.sigmoid ? 0.0f : delta_rows[(row_base + token) * p.heads_q + head];
          pos[r] = static_cast<float>(qi + delta);
        }
        // Padding lanes (keys past nk) are unmasked in a full tile; they only touch their own
        // lanes of dK and dV, which are never written out, and never enter dQ (inner dim nk).
        const int64_t token0 = q_begin + a;
        const float* qr = s.qrows;
        const float* dor = s.dorows;
        size_t ldq = dim, ldo = dim;
        if (direct_q) {
          qr = static_cast<const float*>(p.q) + p.q_offset(t.seq, token0, head);
          ldq = static_cast<size_t>(p.q_stride[1]);
        } else {
          ConvertRows(p.dtype, p.q, p.q_offset(t.seq, token0, head), p.q_stride[1], p.q_stride[3],
                      nrows, dim, RowBytes(p.dtype, dim, p.q_stride[3]), s.qrows);
        }
        if (direct_do) {
          dor = static_cast<const float*>(bp.dout) + bp.dout_offset(t.seq, token0, head);
          ldo = static_cast<size_t>(bp.dout_stride[1]);
        } else {
          ConvertRows(p.dtype, bp.dout, bp.dout_offset(t.seq, token0, head), bp.dout_stride[1],
                      bp.dout_stride[3], nrows, dim, RowBytes(p.dtype, dim, bp.dout_stride[3]),
                      s.dorows);
        }
        // The next query tile's Q rows stream in during this tile's first product, its dO rows
        // during the second.
        const int64_t next = q0 + kQueryTile;
        const int64_t next_rows = std::min(next + kQueryTile, i_hi + 1) - next;
        // Offsets of a next tile only when there is one: past the tensor's end, token x stride
        // may overflow (a stride that fits the view's extent, not one more tile).
        const bool has_next = next_rows > 0;
        TileFeed next_q =
            PrefetchFeed(p.dtype, p.q, has_next ? p.q_offset(t.seq, q_begin + next, head) : 0,
                         p.q_stride[1], p.q_stride[3], dim, next_rows);
        TileFeed next_do = PrefetchFeed(p.dtype, bp.dout,
                                        has_next ? bp.dout_offset(t.seq, q_begin + next, head) : 0,
                                        bp.dout_stride[1], bp.dout_stride[3], dim, next_rows);
        RowPanelProduct<kD>(qr, ldq, nrows, dim, s.kt, np, s.st, nullptr, next_q);
        RowPanelProduct<kD>(dor, ldo, nrows, dim, s.vt, np, s.dpt, nullptr, next_do);
        if (mr != nullptr) {
          full = mr->TileFull(gi, a, e, j0, j1);
          if (!full) mr->SetTile(gi, a, nrows, j0, nk, np);
        }
        GradTileKeyLanes(p, g, s, nrows, np, lse, dlt, pos, range, slope, !full,
                         full ? nullptr : mr);
        TransposedPanelAccumulate<kD>(dor, ldo, nrows, dim, s.st, np, s.ones, s.dvt, none);
        TransposedPanelAccumulate<kD>(qr, ldq, nrows, dim, s.dpt, np, s.ones, s.dkt, none);
        // dQ rows += dS K over this block's keys (inner dim nk, lanes = head dim).
        RowPanelProduct<0, true>(s.dpt, np, nrows, static_cast<size_t>(nk), s.kpanel, dp,
                                 dq.rows(p, t.first, head, row_base + token0), nullptr, none);
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t token = k_begin + j0 + j;
      StoreStridedScaled(p.dtype, s.dkt + j, np, dim, p.scale, bp.dk,
                         bp.dk_offset(t.seq, token, t.kv_head), bp.dk_stride[3]);
      StoreStridedScaled(p.dtype, s.dvt + j, np, dim, 1.0f, bp.dv,
                         bp.dv_offset(t.seq, token, t.kv_head), bp.dv_stride[3]);
    }
  }
}

}  // namespace flash_bwd_impl

// Runs the backward: the Delta pre-pass, the key-block pass (dK, dV, dQ partials), then the
// reduction of the dQ partials. Returns false when a buffer could not be allocated.
bool FlashBackward(const AttentionBackwardProblem& bp, int32_t threads, bool fast) {
  using namespace flash_bwd_impl;  // NOLINT
  const AttentionProblem& p = bp.fwd;
  if (p.batch == 0) return true;
  const size_t dim = static_cast<size_t>(p.dim);
  const size_t dp = hwy::DivCeil(dim, kLanes) * kLanes;
  const int64_t q_rows = p.varlen() ? p.seq_q : p.batch * p.seq_q;
  if (q_rows == 0 || p.heads_q == 0) {
    // No query rows: every key gets zero gradients.
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t t = p.k_begin(b); t < p.k_begin(b) + p.k_len(b); ++t) {
        for (int64_t h = 0; h < p.heads_kv; ++h) {
          for (size_t d = 0; d < dim; ++d) {
            const int64_t dd = static_cast<int64_t>(d);
            StoreElement(p.dtype, bp.dk, bp.dk_offset(b, t, h) + dd * bp.dk_stride[3], 0.0f);
            StoreElement(p.dtype, bp.dv, bp.dv_offset(b, t, h) + dd * bp.dv_stride[3], 0.0f);
          }
        }
      }
    }
    return true;
  }

  // Delta_i = sum_d dO_id * O_id per row of the token axis (dense: B * Sq, batch-major; varlen:
  // the packed tokens, of which those outside every sequence are computed but never read).
  auto delta = hwy::AllocateAligned<float>(static_cast<size_t>(q_rows * p.heads_q));
  if (!delta) return false;
  const int64_t chunk = 64;
  ParallelFor(threads, hwy::DivCeil(q_rows, chunk), [&](int64_t task, int32_t) {
    HWY_ALIGN float o_row[kMaxHeadDim];
    HWY_ALIGN float do_row[kMaxHeadDim];
    for (int64_t row = task * chunk; row < std::min((task + 1) * chunk, q_rows); ++row) {
      const int64_t b = p.varlen() ? 0 : row / p.seq_q;
      const int64_t token = p.varlen() ? row : row % p.seq_q;
      for (int64_t h = 0; h < p.heads_q; ++h) {
        LoadRow(p.dtype, p.out, p.out_offset(b, token, h), p.out_stride[3], dim, o_row);
        LoadRow(p.dtype, bp.dout, bp.dout_offset(b, token, h), bp.dout_stride[3], dim, do_row);
        float sum = 0.0f;
        for (size_t d = 0; d < dim; ++d) sum += o_row[d] * do_row[d];
        delta[static_cast<size_t>(row * p.heads_q + h)] = sum;
      }
    }
  });

  // Tasks: (sequence, KV head, group r of key blocks). The number of groups R depends only on
  // the problem's shape (enough tasks for kTargetTasks workers), never on the thread count, so
  // the dQ reduction order, and hence every bit of dQ, is the same for any number of threads.
  int64_t max_blocks = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    max_blocks = std::max(max_blocks, hwy::DivCeil(p.k_len(b), kKeyBlock));
  }
  const int64_t units = p.batch * p.heads_kv;
  const int64_t partial_bytes = q_rows * p.heads_q * static_cast<int64_t>(dp * sizeof(float));
  const int64_t groups =
      std::max<int64_t>(1, std::min({max_blocks, hwy::DivCeil(kTargetTasks, units),
                                     kMaxPartialBytes / std::max<int64_t>(partial_bytes, 1)}));
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nb = hwy::DivCeil(p.k_len(b), kKeyBlock);
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      for (int64_t r = 0; r < groups && nb > 0; ++r) tasks.push_back(Task{b, kvh, r, nb});
    }
  }

  // dQ partials, one per group, zero where no key of the group is visible.
  const size_t partial_floats = static_cast<size_t>(groups * p.heads_q * q_rows) * dp;
  auto partials = hwy::AllocateAligned<float>(partial_floats);
  if (!partials) return false;
  std::memset(partials.get(), 0, partial_floats * sizeof(float));
  const DqPartials dq{partials.get(), q_rows, dp};

  const size_t np = hwy::DivCeil(static_cast<size_t>(kKeyBlock), kLanes) * kLanes;
  const size_t per_worker = hwy::DivCeil(Scratch::Floats(dim, dp, np), size_t{16}) * 16;
  const int32_t workers = static_cast<int32_t>(
      std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()))));
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;
  std::vector<MaskRows> mask_rows(p.mask.any ? static_cast<size_t>(workers) : 0);
  for (MaskRows& mr : mask_rows) {
    mr.p = &p;
    if (!mr.Allocate(np)) return false;
  }

  auto run = [&](auto dim_tag) {
    constexpr int kD = decltype(dim_tag)::value;
    ParallelFor(workers, static_cast<int64_t>(tasks.size()), [&](int64_t task, int32_t w) {
      const Task& t = tasks[static_cast<size_t>(task)];
      Scratch s;
      s.Carve(storage.get() + per_worker * static_cast<size_t>(w), dim, dp, np);
      RunTask<kD>(bp, delta.get(), dq, t.first * t.count / groups, (t.first + 1) * t.count / groups,
                  t, s, mask_rows.empty() ? nullptr : &mask_rows[static_cast<size_t>(w)]);
    });
  };
  DispatchHeadDim(fast, p.dim, run);

  // dQ = scale * (partial_0 + partial_1 + ...), summed in group order, for the rows of every
  // sequence (rows with no visible key are 0).
  ParallelFor(threads, p.batch, [&](int64_t b, int32_t) {
    const int64_t row_base = p.varlen() ? 0 : b * p.seq_q;
    HWY_ALIGN float sum[kMaxHeadDim];
    for (int64_t t = p.q_begin(b); t < p.q_begin(b) + p.q_len(b); ++t) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        std::memcpy(sum, dq.rows(p, 0, h, row_base + t), dim * sizeof(float));
        for (int64_t r = 1; r < groups; ++r) {
          const float* part = dq.rows(p, r, h, row_base + t);
          for (size_t d = 0; d < dim; ++d) sum[d] += part[d];
        }
        StoreStridedScaled(p.dtype, sum, 1, dim, p.scale, bp.dq, bp.dq_offset(b, t, h),
                           bp.dq_stride[3]);
      }
    }
  });
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_ATTENTION_FLASH_BWD_INL_H_
