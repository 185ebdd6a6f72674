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
// f32), ~420 KiB, which sits in the 1 MiB L2 of Zen 4 with the prefetched next tile; the inner
// GEMM loops work on a 3-vector column strip of Qt or Pt (24 KiB at D = 128, L1-resident)
// against K/V rows streamed from L2. 96 rows measured ~15% slower at 16K tokens (twice the K/V
// traffic per FLOP); 288 rows lose at 4K (L2 pressure, coarser load balance).
//
// Masks: the mask is a window [pos - wl, pos + wr] per row (causal is (inf, 0)); each key tile
// is classified against the task's rows as empty (never visited), full (no mask evaluated) or
// partial (per-element vector predicate).

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

#include "attention/attention_problem.h"
#include "attention/flash_fwd.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "attention/softmax_tile-inl.h"
#include "simd/fast_exp-inl.h"
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

struct Task {
  int64_t seq;
  int64_t kv_head;
  int64_t q0;  // first query position of the block, relative to the sequence
  int64_t nq;  // query positions in the block
};

template <int kD>
void RunTask(const AttentionProblem& p, const Task& t, Scratch& s) {
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(p.dim);
  const int64_t group = p.group;
  const int64_t rows = group * t.nq;
  const size_t mp = hwy::DivCeil(static_cast<size_t>(rows), kLanes) * kLanes;
  const int64_t q_len = p.q_len(t.seq), k_len = p.k_len(t.seq);
  const int64_t q_begin = p.q_begin(t.seq), k_begin = p.k_begin(t.seq);
  const int64_t delta = p.top_left ? 0 : k_len - q_len;

  // Pack the rows (head-major: row r is head kv_head*G + r / nq, position q0 + r % nq) and
  // their visible key ranges. Padding rows are zero and see nothing.
  int64_t union_lo = k_len, union_hi = -1, max_lo = 0, min_hi = k_len;
  std::memset(s.qt, 0, dim * mp * sizeof(float));
  for (size_t r = 0; r < mp; ++r) {
    s.m[r] = -std::numeric_limits<float>::infinity();
    s.l[r] = 0.0f;
    s.pos[r] = 0.0f;
    s.slope[r] = 0.0f;
    s.lo[r] = 1;
    s.hi[r] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.nq;
    const int64_t qi = t.q0 + r % t.nq;
    const int64_t pos = qi + delta;
    const auto [lo, hi] = p.visible_keys(pos, k_len);
    s.lo[r] = static_cast<int32_t>(std::min<int64_t>(lo, k_len));
    s.hi[r] = static_cast<int32_t>(std::max<int64_t>(hi, -1));
    max_lo = std::max(max_lo, lo);
    min_hi = std::min(min_hi, hi);
    if (lo <= hi) {
      union_lo = std::min(union_lo, lo);
      union_hi = std::max(union_hi, hi);
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

  const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
  const int64_t k_row_bytes = (static_cast<int64_t>(dim) - 1) * p.k_stride[3] * elem + elem;
  const int64_t v_row_bytes = (static_cast<int64_t>(dim) - 1) * p.v_stride[3] * elem + elem;
  const bool direct_k = p.dtype == DType::kF32 && p.k_stride[3] == 1;
  const bool direct_v = p.dtype == DType::kF32 && p.v_stride[3] == 1;
  if (union_lo <= union_hi) {
    // Key range [a, e) of the tile starting at c0 that some row of the task can see. Keys no row
    // can see are never read (skipping them leaves every row's result bitwise unchanged: they
    // would add exact zeros).
    auto tile_begin = [&](int64_t c0) { return std::max(c0, union_lo); };
    auto tile_end = [&](int64_t c0) {
      return std::min({c0 + flash::kKeyTile, k_len, union_hi + 1});
    };
    // Prefetcher for the visible rows of the tile at c0 (none past the last visible key);
    // `offset` is the element offset of its first row, rows are `row_stride` elements apart.
    auto prefetcher = [&](const void* base, int64_t offset, int64_t row_stride, int64_t row_bytes,
                          int64_t c0) {
      if (c0 > union_hi) return RowPrefetcher();
      return RowPrefetcher{BytePtr(base, offset, elem), row_stride * elem, row_bytes,
                           tile_end(c0) - c0};
    };
    const int64_t first_tile = union_lo / flash::kKeyTile * flash::kKeyTile;
    // f32 rows with unit element stride are read in place (K/V prefetched one tile ahead);
    // other dtypes and layouts are converted into double-buffered f32 tiles, the next tile
    // during the current one's GEMMs (prefetched two tiles ahead).
    if (!direct_k) {
      ConvertRows(p.dtype, p.k, p.k_offset(t.seq, k_begin + union_lo, t.kv_head), p.k_stride[1],
                  p.k_stride[3], static_cast<size_t>(tile_end(first_tile) - union_lo), dim,
                  k_row_bytes, s.kt[0]);
    }
    if (!direct_v) {
      ConvertRows(p.dtype, p.v, p.v_offset(t.seq, k_begin + union_lo, t.kv_head), p.v_stride[1],
                  p.v_stride[3], static_cast<size_t>(tile_end(first_tile) - union_lo), dim,
                  v_row_bytes, s.vt[0]);
    }
    int buf = 0;
    for (int64_t c0 = first_tile; c0 <= union_hi; c0 += flash::kKeyTile, buf ^= 1) {
      const int64_t a = tile_begin(c0), e = tile_end(c0);
      const size_t nkeys = static_cast<size_t>(e - a);
      const bool full = max_lo <= a && min_hi >= e - 1;
      const int64_t next = c0 + flash::kKeyTile;
      // Where this tile's K (or V) rows are read from, and the feed that streams the next tile
      // during this one's GEMMs: a prefetch for rows read in place, or for converted dtypes a
      // prefetch two tiles ahead plus the conversion of the next tile into the other buffer.
      auto stream = [&](const void* base, const int64_t* stride, int64_t row_bytes, bool direct,
                        float* const* bufs, const float** read_from, size_t* ld, TileFeed* feed) {
        auto row_offset = [&](int64_t key) {
          return p.offset(stride, t.seq, k_begin + key, t.kv_head);
        };
        if (direct) {
          *read_from = static_cast<const float*>(base) + row_offset(a);
          *ld = static_cast<size_t>(stride[1]);
          feed->prefetch = prefetcher(base, row_offset(next), stride[1], row_bytes, next);
          return;
        }
        *read_from = bufs[buf];
        *ld = dim;
        const int64_t later = next + flash::kKeyTile;
        feed->prefetch = prefetcher(base, row_offset(later), stride[1], row_bytes, later);
        if (next <= union_hi) {
          feed->convert = RowConverter{
              p.dtype,   base, row_offset(next), stride[1],
              stride[3], dim,  bufs[buf ^ 1],    static_cast<size_t>(tile_end(next) - next),
              0};
        }
      };
      TileFeed feed_k, feed_v;
      const float *kt, *vt;
      size_t ldk, ldv;
      stream(p.k, p.k_stride, k_row_bytes, direct_k, s.kt, &kt, &ldk, &feed_k);
      stream(p.v, p.v_stride, v_row_bytes, direct_v, s.vt, &vt, &ldv, &feed_v);
      RowPanelProduct<kD>(kt, ldk, nkeys, dim, s.qt, mp, s.st, s.tile_max, feed_k);
      SoftmaxTile(p, s, nkeys, mp, a, !full);
      TransposedPanelAccumulate<kD>(vt, ldv, nkeys, dim, s.st, mp, s.alpha, s.ot, feed_v);
      feed_k.convert.Finish();
      feed_v.convert.Finish();
    }
  }

  // Deferred normalization; rows with no visible key get O = 0 and LSE = -inf.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.nq;
    const int64_t token = q_begin + t.q0 + r % t.nq;
    // l is 0 only for a row with no visible key; a NaN l (NaN inputs) must stay NaN.
    const float l = s.l[r];
    const bool none_visible = l <= 0.0f;
    const float inv = none_visible ? 0.0f : 1.0f / l;
    StoreStridedScaled(p.dtype, s.ot + r, mp, dim, inv, p.out, p.out_offset(t.seq, token, head),
                       p.out_stride[3]);
    if (p.lse != nullptr) {
      p.lse[p.lse_offset(t.seq, head, token)] =
          none_visible ? -std::numeric_limits<float>::infinity() : s.m[r] + std::log(l);
    }
  }
}

}  // namespace flash_impl

// Runs the forward over all tasks. `fast` selects the compile-time head-dim instantiation.
// Returns false when scratch could not be allocated.
bool FlashForward(const AttentionProblem& p, int32_t threads, bool fast) {
  using namespace flash_impl;  // NOLINT
  const int64_t block = flash::QueryBlock(p.group);
  if (p.heads_q == 0) return true;
  std::vector<Task> tasks;
  int64_t max_nq = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = p.q_len(b);
    const int64_t nq = std::min(block, q_len);
    if (nq == 0) continue;
    max_nq = std::max(max_nq, nq);
    const int64_t nblocks = hwy::DivCeil(q_len, block);
    // Last query blocks first: under a causal mask they are the longest, and running them
    // first balances the dynamic schedule.
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      for (int64_t blk = nblocks - 1; blk >= 0; --blk) {
        const int64_t q0 = blk * block;
        tasks.push_back(Task{b, kvh, q0, std::min(block, q_len - q0)});
      }
    }
  }
  if (tasks.empty()) return true;

  const int32_t workers =
      static_cast<int32_t>(std::min<int64_t>(threads, static_cast<int64_t>(tasks.size())));
  const size_t dim = static_cast<size_t>(p.dim);
  const size_t mp = hwy::DivCeil(static_cast<size_t>(p.group * max_nq), kLanes) * kLanes;
  // Round each worker's share to a cache line so workers never share one.
  const size_t per_worker = hwy::DivCeil(Scratch::Floats(dim, mp), size_t{16}) * 16;
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;

  auto run = [&](auto dim_tag) {
    constexpr int kD = decltype(dim_tag)::value;
    ParallelFor(workers, static_cast<int64_t>(tasks.size()), [&](int64_t task, int32_t worker) {
      Scratch s;
      s.Carve(storage.get() + per_worker * static_cast<size_t>(worker), dim, mp);
      RunTask<kD>(p, tasks[static_cast<size_t>(task)], s);
    });
  };
  flash::DispatchHeadDim(fast, p.dim, run);
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_ATTENTION_FLASH_FWD_INL_H_
