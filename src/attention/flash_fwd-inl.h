// SPDX-License-Identifier: Apache-2.0
// Exact attention forward: FlashAttention-2 on a CPU, SIMD body (one copy per Highway target).
//
// What it computes: O = softmax(scale*QK^T + softcap/ALiBi, masked) V per query row, plus the
// natural-log LSE, in O(threads x tile) memory (no Sq x Sk buffer).
//
// Partition: one task = (sequence, KV head, block of query positions). The G query heads of a
// GQA group share the task, as G*block rows, so every K/V tile is loaded (and converted from
// bf16/f16) once per group. Tasks are independent; workers claim them dynamically, and since a
// row's reduction order depends only on the fixed key tiling, results are bitwise identical
// across runs, thread counts and batch compositions.
//
// Layout: the task packs its rows transposed, Qt[D][Mp] (Mp = rows rounded up to the vector
// width, pre-multiplied by the scale), so a SIMD vector spans Lanes query rows. Both GEMMs then
// broadcast one K or V element against query vectors and need no transposition of K or V:
//   scores  St[j][i] = sum_d K[j][d] * Qt[d][i]        (register tile: 8 keys x 3 vectors)
//   output  Ot[d][i] = a[i]*Ot[d][i] + sum_j V[j][d] * Pt[j][i]   (8 dims x 3 vectors)
// and the online softmax (running max m, sum l, rescale a) is purely vertical: no horizontal
// reductions. The normalization by l is deferred to the end of the task.
//
// Bytes moved: each K/V tile (kKeyTile rows) is read from memory once per task, so K and V are
// streamed ceil(Sq/block) times per group: (Sq/block) * Sk * D * 2 * sizeof(dtype) bytes per
// KV head, against 4 * Sq * Sk * D * G FLOPs; with 192 rows per task that is ~200 FLOP per
// byte for fp32, far above the ~7 FLOP/byte DRAM ridge of this machine, so the kernel stays
// compute-bound even when a head's K/V (16 MiB at 16K tokens, D = 128) no longer fits in L3.
// Rows of one head are Hkv*D elements apart, beyond the hardware prefetcher's reach, so the next
// tile's rows are prefetched into L2 in small batches interleaved with the GEMM loops.
//
// Tile sizes: for D = 128 the working set of a task is Qt and Ot (96 KiB each for 192 rows),
// the score tile St (128 x 192 x 4 = 96 KiB) and the K/V tiles (64 KiB each, read in place for
// f32 with contiguous rows), ~420 KiB, which sits in the 1 MiB L2 of Zen 4 with the prefetched next
// tile; each key tile runs strip by strip: for a 3-vector column strip of rows (24 KiB of Qt, of
// St and of Ot at D = 128) the scores, their softmax and the PV product follow each other while
// the strip of St is in L1, against K/V rows streamed from L2. 96 rows measured ~15% slower at 16K
// tokens (twice the K/V traffic per FLOP); 288 rows lose at 4K (L2 pressure, coarser load balance),
// and 384 rows, which the 2 MiB L2 of the Emerald Rapids Xeon holds, measured no faster there at
// 4K.
//
// Masks: the mask is a window [pos - wl, pos + wr] per row (causal is (inf, 0)); each key tile
// is classified against the task's rows as empty (never visited), full (no mask evaluated) or
// partial (per-element vector predicate); that mask code is in mask_tiles-inl.h, the softcap and
// ALiBi arithmetic in simd/score_mod-inl.h.

#if defined(TESSERA_ATTENTION_FLASH_FWD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_ATTENTION_FLASH_FWD_INL_H_
#undef TESSERA_ATTENTION_FLASH_FWD_INL_H_
#else
#define TESSERA_ATTENTION_FLASH_FWD_INL_H_
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
#include "core/huge_pages.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "simd/fast_exp-inl.h"
#include "simd/online_softmax-inl.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace flash_impl {

namespace hn = hwy::HWY_NAMESPACE;

// Per-worker scratch, carved from one aligned allocation per call.
struct Scratch {
  float* qt;        // [D][Mp] scaled, transposed query rows
  float* ot;        // [D][Mp] unnormalized output accumulator
  float* st;        // [kKeyTile][Mp] scores, then probabilities
  float* kt[2];     // [kKeyTile][D] K tiles, f32 (current and next)
  float* vt[2];     // [kKeyTile][D] V tiles, f32
  float* m;         // [Mp] running max (natural units)
  float* l;         // [Mp] running sum
  float* alpha;     // [Mp] rescale factor of the current tile
  float* tile_max;  // [Mp] max score of the current tile (before modifiers)
  float* pos;       // [Mp] query position (ALiBi)
  float* slope;     // [Mp] ALiBi slope of the row's head
  int32_t* lo;      // [Mp] first visible key of the row
  int32_t* hi;      // [Mp] last visible key of the row (lo > hi: none)

  static size_t Floats(size_t dim, size_t mp) {
    return 2 * dim * mp + static_cast<size_t>(flash::kKeyTile) * (mp + 4 * dim) + 8 * mp;
  }
  void Carve(float* base, size_t dim, size_t mp) {
    qt = base;
    ot = qt + dim * mp;
    st = ot + dim * mp;
    kt[0] = st + flash::kKeyTile * mp;
    kt[1] = kt[0] + flash::kKeyTile * dim;
    vt[0] = kt[1] + flash::kKeyTile * dim;
    vt[1] = vt[0] + flash::kKeyTile * dim;
    m = vt[1] + flash::kKeyTile * dim;
    l = m + mp;
    alpha = l + mp;
    tile_max = alpha + mp;
    pos = tile_max + mp;
    slope = pos + mp;
    lo = reinterpret_cast<int32_t*>(slope + mp);
    hi = lo + mp;
  }
};

// Query rows of a task: positions [q0, q0 + nq) of the sequence, or (neighborhood masks on 2-D
// and 3-D grids) the box of the grid at `origin` with extents `ext`, rows in row-major order.
struct Task {
  int64_t seq;
  int64_t kv_head;
  int64_t q0;  // first query index (box tasks: the index of the origin)
  int64_t nq;  // query positions in the task
  int32_t box_rank = 0;
  int64_t origin[3] = {0, 0, 0};
  int64_t ext[3] = {1, 1, 1};

  // Query index of the task's r-th position.
  int64_t query(const AttentionProblem& p, int64_t r) const {
    if (box_rank == 0) return q0 + r;
    int64_t index = 0;
    int64_t rest = r;
    int64_t c[3];
    for (int a = box_rank - 1; a >= 0; --a) {
      c[a] = origin[a] + rest % ext[a];
      rest /= ext[a];
    }
    for (int a = 0; a < box_rank; ++a) index = index * p.mask.grid[a] + c[a];
    return index;
  }
};

using mask_impl::DenseRowsAllVisible;
using mask_impl::DenseValue;
using mask_impl::MaskScratch;
using mask_impl::PlanTiles;
using mask_impl::PolicyPredicate;
using mask_impl::TaskKeyRuns;
using mask_impl::TilePlan;

// Where a task reads K and V: the caller's tensors (p.k, p.v, their strides, p.dtype), or the
// task's head packed contiguously in f32 (PackedHeads below; zero batch and head strides).
struct KvSource {
  const void* k;
  const void* v;
  const int64_t* k_stride;
  const int64_t* v_stride;
  DType dtype;
};

template <int kD>
void RunTask(const AttentionProblem& p, const Task& t, Scratch& s, MaskScratch& ms,
             const KvSource& kv) {
  const AttentionProblem::Masks& m = p.mask;
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(p.dim);
  const int64_t group = p.group;
  const int64_t rows = group * t.nq;
  const size_t mp = hwy::DivCeil(static_cast<size_t>(rows), kLanes) * kLanes;
  const int64_t q_len = p.q_len(t.seq), k_len = p.k_len(t.seq);
  const int64_t q_begin = p.q_begin(t.seq), k_begin = p.k_begin(t.seq);
  const int64_t delta = p.top_left ? 0 : k_len - q_len;
  const int64_t tree_base = k_len - m.tree_size;
  const size_t tree_words = static_cast<size_t>((m.tree_size + 63) / 64);

  // Pack the rows (head-major: row r is head kv_head*G + r / nq, the task's position r % nq) and
  // their mask data. Padding rows are zero and see nothing.
  std::memset(s.qt, 0, dim * mp * sizeof(float));
  for (size_t r = 0; r < mp; ++r) {
    s.m[r] = -std::numeric_limits<float>::infinity();
    s.l[r] = 0.0f;
    s.pos[r] = 0.0f;
    s.slope[r] = 0.0f;
    s.lo[r] = ms.lo2[r] = 1;
    s.hi[r] = ms.hi2[r] = 0;
    for (int a = 0; a < m.grid_rank; ++a) ms.glo[a][r] = 1, ms.ghi[a][r] = 0, ms.gres[a][r] = 0;
  }
  ms.intervals.clear();
  if (m.tree_parents != nullptr) ms.ancestors.assign(static_cast<size_t>(rows) * tree_words, 0);
  int64_t box_lo[3] = {0, 0, 0}, box_hi[3] = {-1, -1, -1};
  for (int a = 0; a < m.grid_rank; ++a) box_lo[a] = m.grid[a], box_hi[a] = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.nq;
    const int64_t qi = t.query(p, r % t.nq);
    const int64_t pos = qi + delta;
    const mask::ClippedIntervals iv =
        mask::Clip(mask::Intervals(p, t.seq, head, qi, pos, k_len), k_len);
    s.lo[r] = iv.lo1;
    s.hi[r] = iv.hi1;
    ms.lo2[r] = iv.lo2;
    ms.hi2[r] = iv.hi2;
    ms.intervals.push_back({iv.lo1, iv.hi1 + int64_t{1}});
    ms.intervals.push_back({iv.lo2, iv.hi2 + int64_t{1}});
    if (m.grid_rank != 0) {
      mask::AxisRange box[3];
      mask::NeighborhoodBox(m, pos, box);
      for (int a = 0; a < m.grid_rank; ++a) {
        ms.glo[a][r] = static_cast<int32_t>(box[a].lo);
        ms.ghi[a][r] = static_cast<int32_t>(box[a].hi);
        ms.gres[a][r] = static_cast<int32_t>(box[a].residue);
        box_lo[a] = std::min(box_lo[a], box[a].lo);
        box_hi[a] = std::max(box_hi[a], box[a].hi);
      }
    }
    if (m.blocks != nullptr) {
      ms.block_row[static_cast<size_t>(r)] = m.blocks + t.seq * m.block_stride[0] +
                                             head * m.block_stride[1] +
                                             qi / m.block_q * m.block_stride[2];
    }
    if (m.dense != nullptr) {
      ms.dense_row[static_cast<size_t>(r)] =
          t.seq * m.dense_stride[0] + head * m.dense_stride[1] + qi * m.dense_stride[2];
    }
    if (m.tree_parents != nullptr) {
      uint64_t* bits = ms.ancestors.data() + static_cast<size_t>(r) * tree_words;
      for (int64_t u = qi; u >= 0; u = m.tree_parents[u]) bits[u / 64] |= uint64_t{1} << (u % 64);
    }
    s.pos[r] = static_cast<float>(pos);
    if (p.alibi != nullptr) s.slope[r] = p.alibi_slope(t.seq, head);
    // Convert the row contiguously (SIMD), then scatter it scaled into column r of Qt; the K
    // tile buffer is free until the tile loop.
    float* row = s.kt[0];
    LoadRow(p.dtype, p.q, p.q_offset(t.seq, q_begin + qi, head), p.q_stride[3], dim, row);
    for (size_t d = 0; d < dim; ++d) s.qt[d * mp + static_cast<size_t>(r)] = p.scale * row[d];
  }
  std::memset(s.ot, 0, dim * mp * sizeof(float));
  TaskKeyRuns(p, rows, k_len, box_lo, box_hi, ms);
  PlanTiles(ms);

  const int64_t elem = static_cast<int64_t>(DTypeSize(kv.dtype));
  const int64_t k_row_bytes = (static_cast<int64_t>(dim) - 1) * kv.k_stride[3] * elem + elem;
  const int64_t v_row_bytes = (static_cast<int64_t>(dim) - 1) * kv.v_stride[3] * elem + elem;
  // f32 rows are read in place only when a tile's rows are contiguous; rows further apart (the
  // [B, S, H, D] layout: H * D floats, 4 KiB at H = 8, D = 128, all on the same cache sets) are
  // copied into the packed tile like converted dtypes: -8% time at B=1, H=8, N=4096, D=128 on
  // the Emerald Rapids Xeon (bench_ab.py, 5 rounds each, causal and not).
  const bool direct_k =
      kv.dtype == DType::kF32 && kv.k_stride[3] == 1 && kv.k_stride[1] == static_cast<int64_t>(dim);
  const bool direct_v =
      kv.dtype == DType::kF32 && kv.v_stride[3] == 1 && kv.v_stride[1] == static_cast<int64_t>(dim);
  // When every row reads the same block-mask row (one head and query block, or a mask
  // broadcast over the heads), the runs hold only kept blocks and the block mask needs no bias.
  bool shared_block_row = true;
  for (int64_t r = 1; r < rows && m.blocks != nullptr; ++r) {
    shared_block_row = shared_block_row && ms.block_row[static_cast<size_t>(r)] == ms.block_row[0];
  }
  const bool bias_tiles =
      (m.blocks != nullptr && !shared_block_row) || m.dense != nullptr || m.tree_parents != nullptr;
  PolicyPredicate pred{s.lo, s.hi, ms.lo2, ms.hi2, m.grid_rank, {}, {},
                       {},   {},   {},     {},     nullptr,     mp};
  for (int a = 0; a < m.grid_rank; ++a) {
    pred.glo[a] = ms.glo[a];
    pred.ghi[a] = ms.ghi[a];
    pred.gres[a] = ms.gres[a];
    pred.kc[a] = ms.kc[a];
    pred.kres[a] = ms.kres[a];
    pred.dilated[a] = m.dilation[a] > 1;
  }
  const auto row_offset = [&](const int64_t* stride, int64_t key) {
    return p.offset(stride, t.seq, k_begin + key, t.kv_head);
  };
  // Prefetcher for the rows of contiguous tile `ti` (none for gathered tiles or past the end).
  const auto prefetcher = [&](const void* base, const int64_t* stride, int64_t row_bytes,
                              size_t ti) {
    if (ti >= ms.tiles.size() || !ms.tiles[ti].contiguous) return RowPrefetcher();
    const int64_t a = ms.pieces[ms.tiles[ti].first].begin;
    return RowPrefetcher{BytePtr(base, row_offset(stride, a), elem), stride[1] * elem, row_bytes,
                         ms.tiles[ti].nkeys};
  };
  // Rows of tile `ti` converted (or copied) into `dst`, piece by piece.
  const auto load_tile = [&](const void* base, const int64_t* stride, int64_t row_bytes, size_t ti,
                             float* dst) {
    const TilePlan& tile = ms.tiles[ti];
    for (size_t i = tile.first; i < tile.first + tile.count; ++i) {
      const mask::Run& piece = ms.pieces[i];
      ConvertRows(kv.dtype, base, row_offset(stride, piece.begin), stride[1], stride[3],
                  static_cast<size_t>(piece.end - piece.begin), dim, row_bytes, dst);
      dst += static_cast<size_t>(piece.end - piece.begin) * dim;
    }
  };
  // Whether the K/V rows of tile `ti` were converted ahead, during the previous tile's GEMMs.
  bool k_ready = false, v_ready = false;
  int buf = 0;
  for (size_t ti = 0; ti < ms.tiles.size(); ++ti, buf ^= 1) {
    const TilePlan& tile = ms.tiles[ti];
    const int64_t a = ms.pieces[tile.first].begin;
    const size_t nkeys = static_cast<size_t>(tile.nkeys);
    const bool gathered = !tile.contiguous;
    if (gathered || bias_tiles || m.grid_rank != 0) {
      size_t j = 0;
      for (size_t i = tile.first; i < tile.first + tile.count; ++i) {
        for (int64_t key = ms.pieces[i].begin; key < ms.pieces[i].end; ++key, ++j) {
          ms.keys[j] = static_cast<int32_t>(key);
        }
      }
    }
    // Full: every row sees every key of the tile under the intervals (and the other masks).
    bool full = m.grid_rank == 0;
    for (int64_t r = 0; r < rows && full; ++r) {
      for (size_t i = tile.first; i < tile.first + tile.count && full; ++i) {
        const int64_t b = ms.pieces[i].begin, e = ms.pieces[i].end - 1;
        full = (s.lo[r] <= b && s.hi[r] >= e) || (ms.lo2[r] <= b && ms.hi2[r] >= e);
      }
    }
    if (m.grid_rank != 0) {
      for (size_t j = 0; j < nkeys; ++j) {
        int64_t c[3];
        mask::GridCoords(m, ms.keys[j], c);
        for (int a2 = 0; a2 < m.grid_rank; ++a2) {
          ms.kc[a2][j] = static_cast<int32_t>(c[a2]);
          ms.kres[a2][j] = static_cast<int32_t>(c[a2] % m.dilation[a2]);
        }
      }
    }
    pred.bias = nullptr;
    if (bias_tiles && DenseRowsAllVisible(m, ms, rows, tile)) {
      // Nothing to add: every row's dense-mask bytes over the tile are nonzero.
    } else if (bias_tiles) {
      // The block / dense / tree part of each (key, row); the tile stays full when it is all 0.
      bool all_zero = true;
      for (size_t j = 0; j < nkeys; ++j) {
        const int64_t key = ms.keys[j];
        float* bias_row = ms.bias.get() + j * mp;
        for (int64_t r = 0; r < rows; ++r) {
          float v = 0.0f;
          if (m.blocks != nullptr &&
              ms.block_row[static_cast<size_t>(r)][key / m.block_k * m.block_stride[3]] == 0) {
            v = -std::numeric_limits<float>::infinity();
          }
          if (m.dense != nullptr) v += DenseValue(m, ms.dense_row[static_cast<size_t>(r)], key);
          if (m.tree_parents != nullptr && key >= tree_base) {
            const uint64_t* bits = ms.ancestors.data() + static_cast<size_t>(r) * tree_words;
            const int64_t u = key - tree_base;
            if (((bits[u / 64] >> (u % 64)) & 1) == 0) v = -std::numeric_limits<float>::infinity();
          }
          bias_row[r] = v;
          all_zero = all_zero && v == 0.0f;
        }
        for (size_t r = static_cast<size_t>(rows); r < mp; ++r) bias_row[r] = 0.0f;
      }
      if (!all_zero) {
        full = false;
        pred.bias = ms.bias.get();
      }
    }
    // Where this tile's K (or V) rows are read from, and the feed that streams the next tile
    // during this one's GEMMs: a prefetch for rows read in place, or for converted dtypes a
    // prefetch two tiles ahead plus the conversion of the next (contiguous) tile into the other
    // buffer. Gathered tiles are converted here, at their turn.
    auto stream = [&](const void* base, const int64_t* stride, int64_t row_bytes, bool direct,
                      float* const* bufs, bool* ready, const float** read_from, size_t* ld,
                      TileFeed* feed) {
      if (direct && !gathered) {
        *read_from = static_cast<const float*>(base) + row_offset(stride, a);
        *ld = static_cast<size_t>(stride[1]);
        feed->prefetch = prefetcher(base, stride, row_bytes, ti + 1);
        *ready = false;
        return;
      }
      if (!*ready) load_tile(base, stride, row_bytes, ti, bufs[buf]);
      *read_from = bufs[buf];
      *ld = dim;
      *ready = false;
      if (direct) return;
      feed->prefetch = prefetcher(base, stride, row_bytes, ti + 2);
      if (ti + 1 < ms.tiles.size() && ms.tiles[ti + 1].contiguous) {
        const TilePlan& next = ms.tiles[ti + 1];
        feed->convert = RowConverter{kv.dtype,
                                     base,
                                     row_offset(stride, ms.pieces[next.first].begin),
                                     stride[1],
                                     stride[3],
                                     dim,
                                     bufs[buf ^ 1],
                                     static_cast<size_t>(next.nkeys),
                                     0};
        *ready = true;
      }
    };
    TileFeed feed_k, feed_v;
    const float *kt, *vt;
    size_t ldk, ldv;
    stream(kv.k, kv.k_stride, k_row_bytes, direct_k, s.kt, &k_ready, &kt, &ldk, &feed_k);
    stream(kv.v, kv.v_stride, v_row_bytes, direct_v, s.vt, &v_ready, &vt, &ldv, &feed_v);
    const int32_t* keys = gathered ? ms.keys : nullptr;
    const bool need_max = !m.sigmoid && full && p.softcap == 0.0f && p.alibi == nullptr;
    // The rows are independent, so the three steps run strip by strip (kTileVecs vectors of
    // rows): the strip's scores stay in L1 from the product through the softmax to the PV
    // product instead of making two round trips to L2 (same arithmetic, same bits).
    const size_t nvec = mp / kLanes;
    for (size_t v0 = 0; v0 < nvec; v0 += kTileVecs) {
      const size_t c = std::min<size_t>(kTileVecs, nvec - v0);
      const size_t i0 = v0 * kLanes, i1 = i0 + c * kLanes;
      RowStripProduct<kD>(kt, ldk, nkeys, dim, s.qt + i0, mp, c, s.st + i0,
                          need_max ? s.tile_max + i0 : nullptr, feed_k);
      if (m.sigmoid) {
        SigmoidColumns(p, s, nkeys, mp, a, keys, !full, pred, i0, i1);
      } else if (m.any) {
        SoftmaxColumns(p, s, nkeys, mp, a, keys, !full, pred, i0, i1);
      } else {
        SoftmaxColumns(p, s, nkeys, mp, a, keys, !full, WindowPredicate{s.lo, s.hi}, i0, i1);
      }
      TransposedStripAccumulate<kD>(vt, ldv, nkeys, dim, s.st + i0, mp, c, s.alpha + i0, s.ot + i0,
                                    feed_v);
    }
    feed_k.convert.Finish();
    feed_v.convert.Finish();
  }

  // Deferred normalization (softmax); rows with no visible key get O = 0 and LSE = -inf.
  // Sigmoid weights are not normalized.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.nq;
    const int64_t token = q_begin + t.query(p, r % t.nq);
    // l is 0 only for a row with no visible key; a NaN l (NaN inputs) must stay NaN.
    const float l = s.l[r];
    const bool none_visible = l <= 0.0f;
    const float inv = m.sigmoid ? 1.0f : none_visible ? 0.0f : 1.0f / l;
    StoreStridedScaled(p.dtype, s.ot + r, mp, dim, inv, p.out, p.out_offset(t.seq, token, head),
                       p.out_stride[3]);
    if (p.lse != nullptr) {
      p.lse[p.lse_offset(t.seq, head, token)] =
          none_visible ? -std::numeric_limits<float>::infinity() : s.m[r] + std::log(l);
    }
  }
}

// The tasks of the forward: (sequence, KV head, query positions). Positions are blocks of
// QueryBlock(G) consecutive queries, aligned to the query blocks of a block mask, or boxes of the
// grid for neighborhood masks on 2-D / 3-D grids. Last blocks first: under a causal mask they
// are the longest, and running them first balances the dynamic schedule.
inline void MakeTasks(const AttentionProblem& p, std::vector<Task>* tasks, int64_t* max_nq) {
  const AttentionProblem::Masks& m = p.mask;
  const int64_t block = flash::QueryBlock(p.group);
  *max_nq = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = p.q_len(b);
    if (q_len == 0) continue;
    if (m.grid_rank >= 2) {
      // Boxes of about `block` positions, 16 wide on the last axis, so that the keys of the
      // union of their windows (a box) are few per query.
      const int r = m.grid_rank;
      int64_t ext[3] = {1, 1, 1};
      ext[r - 1] = std::min<int64_t>(m.grid[r - 1], 16);
      int64_t budget = std::max<int64_t>(1, block / ext[r - 1]);
      if (r == 3) {
        ext[1] = std::min<int64_t>(
            m.grid[1], std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(double(budget)))));
        budget = std::max<int64_t>(1, budget / ext[1]);
      }
      ext[0] = std::min<int64_t>(m.grid[0], budget);
      int64_t count[3] = {1, 1, 1};
      for (int a = 0; a < r; ++a) count[a] = hwy::DivCeil(m.grid[a], ext[a]);
      for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
        for (int64_t i0 = count[0] - 1; i0 >= 0; --i0) {
          for (int64_t i1 = count[1] - 1; i1 >= 0; --i1) {
            for (int64_t i2 = count[2] - 1; i2 >= 0; --i2) {
              Task t{b, kvh, 0, 1};
              t.box_rank = r;
              const int64_t idx[3] = {i0, i1, i2};
              for (int a = 0; a < r; ++a) {
                t.origin[a] = idx[a] * ext[a];
                t.ext[a] = std::min(ext[a], m.grid[a] - t.origin[a]);
                t.nq *= t.ext[a];
              }
              t.q0 = t.query(p, 0);
              *max_nq = std::max(*max_nq, t.nq);
              tasks->push_back(t);
            }
          }
        }
      }
      continue;
    }
    // Query blocks: the block mask's (split to keep a task's rows near kRowsTarget), else
    // QueryBlock(G) positions.
    int64_t span = block, sub = block;
    if (m.blocks != nullptr) {
      span = m.block_q;
      const int64_t parts = hwy::DivCeil(m.block_q * p.group, 2 * flash::kRowsTarget);
      sub = hwy::DivCeil(m.block_q, parts);
    }
    const int64_t nspans = hwy::DivCeil(q_len, span);
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      for (int64_t sp = nspans - 1; sp >= 0; --sp) {
        const int64_t end = std::min(q_len, (sp + 1) * span);
        const int64_t nsub = hwy::DivCeil(end - sp * span, sub);
        for (int64_t k = nsub - 1; k >= 0; --k) {
          const int64_t q0 = sp * span + k * sub;
          const int64_t nq = std::min(sub, end - q0);
          *max_nq = std::max(*max_nq, nq);
          tasks->push_back(Task{b, kvh, q0, nq});
        }
      }
    }
  }
}

// K and V are packed once per (sequence, KV head) into contiguous f32 rows on huge pages, which
// every task of the head then reads in place with the hardware prefetcher's help, instead of each
// task gathering (f32 rows that are not contiguous: the [B, S, H, D] layout puts them H * D floats
// apart, 4 KiB at H = 8, D = 128, all on the same cache sets and one 4 KiB page each) or
// converting (bf16, f16) the rows of every key tile again: a head's rows are read once per query
// block. Contiguous f32 rows are read in place as they are. Heads go in rounds whose packed K
// and V stay within flash::ForwardPackBudget() (32 MiB). Only where the rows are reused enough to
// pay for the copy: no masks beyond the window (their tasks may visit few keys), and at least
// kMinReuse query blocks read each key row.
struct PackedHeads {
  static constexpr int64_t kMinReuse = 4;
  int64_t heads_per_round = 0;       // 0: no packing
  int64_t head_floats = 0;           // Sk * D, of K (and of V)
  PageBytes buffer;                  // [heads_per_round][2][Sk][D]
  int64_t stride[4] = {0, 0, 0, 1};  // of a packed head: rows D apart, no batch or head stride

  void Plan(const AttentionProblem& p, int64_t tasks) {
    const bool strided_k = p.k_stride[3] != 1 || p.k_stride[1] != p.dim;
    const bool strided_v = p.v_stride[3] != 1 || p.v_stride[1] != p.dim;
    const int64_t budget = flash::ForwardPackBudget().load(std::memory_order_relaxed);
    const bool converted = p.dtype != DType::kF32;
    if (p.varlen() || p.mask.any || (!converted && !strided_k && !strided_v) || budget <= 0) return;
    const int64_t heads = p.batch * p.heads_kv;
    const int64_t blocks_per_head = tasks / std::max<int64_t>(heads, 1);
    // Query blocks reading one key row: all of them, or those within the window's reach.
    const int64_t block_rows = std::max<int64_t>(1, p.seq_q * heads / std::max<int64_t>(tasks, 1));
    const int64_t window = p.window_left >= kUnboundedWindow || p.window_right >= kUnboundedWindow
                               ? p.seq_q
                               : p.window_left + p.window_right + 1;
    const int64_t reuse = std::min(blocks_per_head, hwy::DivCeil(window, block_rows) + 1);
    if (reuse < kMinReuse) return;
    head_floats = p.seq_k * p.dim;
    const int64_t head_bytes = 2 * head_floats * static_cast<int64_t>(sizeof(float));
    heads_per_round = std::clamp<int64_t>(budget / head_bytes, 1, heads);
    buffer = AllocatePages(static_cast<size_t>(heads_per_round * head_bytes));
    if (!buffer) heads_per_round = 0;  // an optimization only: the tasks read in place instead
    stride[1] = p.dim;
  }

  float* k(int64_t slot) const {
    return reinterpret_cast<float*>(buffer.get()) + 2 * slot * head_floats;
  }
  float* v(int64_t slot) const { return k(slot) + head_floats; }

  // Converts rows [r0, r1) of K and V of flat head `head` (b * Hkv + kv head) into `slot`.
  void Pack(const AttentionProblem& p, int64_t head, int64_t slot, int64_t r0, int64_t r1) const {
    const int64_t b = head / p.heads_kv, kvh = head % p.heads_kv;
    const size_t dim = static_cast<size_t>(p.dim);
    const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
    ConvertRows(p.dtype, p.k, p.offset(p.k_stride, b, r0, kvh), p.k_stride[1], p.k_stride[3],
                static_cast<size_t>(r1 - r0), dim, (p.dim - 1) * p.k_stride[3] * elem + elem,
                k(slot) + r0 * p.dim);
    ConvertRows(p.dtype, p.v, p.offset(p.v_stride, b, r0, kvh), p.v_stride[1], p.v_stride[3],
                static_cast<size_t>(r1 - r0), dim, (p.dim - 1) * p.v_stride[3] * elem + elem,
                v(slot) + r0 * p.dim);
  }
};

}  // namespace flash_impl

// Runs the forward over all tasks. `fast` selects the compile-time head-dim instantiation.
// Returns false when scratch could not be allocated.
bool FlashForward(const AttentionProblem& p, int32_t threads, bool fast) {
  using namespace flash_impl;  // NOLINT
  if (p.heads_q == 0) return true;
  std::vector<Task> tasks;
  int64_t max_nq = 0;
  MakeTasks(p, &tasks, &max_nq);
  if (tasks.empty()) return true;

  const int32_t workers =
      static_cast<int32_t>(std::min<int64_t>(threads, static_cast<int64_t>(tasks.size())));
  const size_t dim = static_cast<size_t>(p.dim);
  const int64_t max_rows = p.group * max_nq;
  const size_t mp = hwy::DivCeil(static_cast<size_t>(max_rows), kLanes) * kLanes;
  // Round each worker's share to a cache line so workers never share one.
  const size_t per_worker = hwy::DivCeil(Scratch::Floats(dim, mp), size_t{16}) * 16;
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;
  std::vector<MaskScratch> mask_scratch(static_cast<size_t>(workers));
  for (MaskScratch& ms : mask_scratch) {
    if (!ms.Allocate(mp, max_rows, p.mask.dense != nullptr ? p.seq_k : 0)) return false;
  }

  PackedHeads packed;
  packed.Plan(p, static_cast<int64_t>(tasks.size()));
  const KvSource caller{p.k, p.v, p.k_stride, p.v_stride, p.dtype};
  auto run_tasks = [&](auto dim_tag, const Task* first, int64_t count, auto&& source) {
    constexpr int kD = decltype(dim_tag)::value;
    ParallelFor(workers, count, [&](int64_t task, int32_t worker) {
      Scratch s;
      s.Carve(storage.get() + per_worker * static_cast<size_t>(worker), dim, mp);
      RunTask<kD>(p, first[task], s, mask_scratch[static_cast<size_t>(worker)],
                  source(first[task]));
    });
  };
  auto run = [&](auto dim_tag) {
    if (packed.heads_per_round == 0) {
      run_tasks(dim_tag, tasks.data(), static_cast<int64_t>(tasks.size()),
                [&](const Task&) { return caller; });
      return;
    }
    // MakeTasks lists the tasks head by head (b outer, KV head inner): a round is a run of them.
    constexpr int64_t kPackRows = 256;  // rows per packing unit
    const int64_t chunks = hwy::DivCeil(p.seq_k, kPackRows);
    const int64_t heads = p.batch * p.heads_kv;
    size_t first = 0;
    for (int64_t h0 = 0; h0 < heads; h0 += packed.heads_per_round) {
      const int64_t n = std::min(packed.heads_per_round, heads - h0);
      ParallelFor(workers, n * chunks, [&](int64_t unit, int32_t) {
        const int64_t r0 = unit % chunks * kPackRows;
        packed.Pack(p, h0 + unit / chunks, unit / chunks, r0, std::min(p.seq_k, r0 + kPackRows));
      });
      size_t last = first;
      while (last < tasks.size() && tasks[last].seq * p.heads_kv + tasks[last].kv_head < h0 + n) {
        ++last;
      }
      run_tasks(dim_tag, tasks.data() + first, static_cast<int64_t>(last - first),
                [&](const Task& t) {
                  const int64_t slot = t.seq * p.heads_kv + t.kv_head - h0;
                  return KvSource{packed.k(slot), packed.v(slot), packed.stride, packed.stride,
                                  DType::kF32};
                });
      first = last;
    }
  };
  DispatchHeadDim(fast, p.dim, run);
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_ATTENTION_FLASH_FWD_INL_H_
