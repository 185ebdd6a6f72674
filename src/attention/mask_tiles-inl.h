// SPDX-License-Identifier: Apache-2.0
// The SIMD half of the mask policy (mask_policy.h holds the scalar half): what the exact kernels
// need, per task and per tile, to skip the keys no row sees and to mask partial tiles. Kept out of
// the kernel files so that each holds only its own loop, and beside mask_policy.h so the masks'
// two halves are read together.
//  - The forward (query rows in lanes): the per-worker MaskScratch, the predicate of partial
//    tiles (PolicyPredicate), the keys a task can see as runs (TaskKeyRuns) and their packing
//    into tiles of at most kKeyTile keys (PlanTiles).
//  - The backward (keys in lanes): per query row its intervals and box (RowMask), per query tile
//    a conservative hull (TileHull), and the predicate and bias vectors of partial tiles
//    (MaskRows).

#if defined(TESSERA_ATTENTION_MASK_TILES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_ATTENTION_MASK_TILES_INL_H_
#undef TESSERA_ATTENTION_MASK_TILES_INL_H_
#else
#define TESSERA_ATTENTION_MASK_TILES_INL_H_
#endif

#include <hwy/aligned_allocator.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/flash_tiles.h"
#include "attention/mask_policy.h"
#include "core/attention_problem.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace mask_impl {

namespace hn = hwy::HWY_NAMESPACE;
using flash::kQueryTile;

// ---- The forward: query rows in lanes ---------------------------------------------------------

// A tile of keys: pieces [first, first + count) of the task's piece list, nkeys keys in all.
struct TilePlan {
  size_t first, count;
  int64_t nkeys;
  bool contiguous;  // the pieces follow each other (the rows can be read in place)
};

// Per-worker state of the mask policy (mask_policy.h), allocated once per call and reused by the
// worker's tasks.
struct MaskScratch {
  hwy::AlignedFreeUniquePtr<int32_t[]> ints;  // the per-row and per-key vectors below
  int32_t *lo2, *hi2;                         // [Mp] second visible interval of each row
  int32_t *glo[3], *ghi[3], *gres[3];         // [Mp] neighborhood box per axis
  int32_t *keys, *kc[3], *kres[3];            // [kKeyTile] key index, grid coordinate, residue
  hwy::AlignedFreeUniquePtr<float[]> bias;    // [kKeyTile][Mp] 0 / -inf / additive mask
  std::vector<const uint8_t*> block_row;      // [rows] row of the block mask
  std::vector<int64_t> dense_row;             // [rows] element offset of the dense mask row
  std::vector<uint64_t> ancestors;            // [rows][words] tree nodes visible to the row
  std::vector<uint8_t> seen;                  // [Sk] dense scan: some row sees the key
  std::vector<mask::Run> intervals, runs, other, tmp, pieces;
  std::vector<TilePlan> tiles;

  bool Allocate(size_t mp, int64_t rows, int64_t seq_k) {
    const size_t tile = static_cast<size_t>(flash::kKeyTile);
    ints = hwy::AllocateAligned<int32_t>(11 * mp + 7 * tile);
    bias = hwy::AllocateAligned<float>(tile * mp);
    if (!ints || !bias) return false;
    int32_t* q = ints.get();
    auto take = [&](size_t n) {
      int32_t* r = q;
      q += n;
      return r;
    };
    lo2 = take(mp);
    hi2 = take(mp);
    for (int a = 0; a < 3; ++a) {
      glo[a] = take(mp);
      ghi[a] = take(mp);
      gres[a] = take(mp);
    }
    keys = take(tile);
    for (int a = 0; a < 3; ++a) {
      kc[a] = take(tile);
      kres[a] = take(tile);
    }
    block_row.resize(static_cast<size_t>(rows));
    dense_row.resize(static_cast<size_t>(rows));
    seen.resize(static_cast<size_t>(seq_k));
    return true;
  }
};

// The predicate of partial tiles under the general mask: the row's two key intervals, then the
// neighborhood box per grid axis, then the per-tile bias (block rows that differ within the task,
// dense and tree masks).
struct PolicyPredicate {
  const int32_t *lo, *hi, *lo2, *hi2;
  int32_t rank;
  const int32_t *glo[3], *ghi[3], *gres[3], *kc[3], *kres[3];
  bool dilated[3];
  const float* bias;  // nullptr: none
  size_t mp;

  HWY_INLINE VF Apply(VF x, size_t i, size_t j, int64_t key) const {
    const DF df;
    const hn::RebindToSigned<DF> di;
    const auto k = hn::Set(di, static_cast<int32_t>(key));
    auto hidden = hn::And(KeyOutside(k, hn::Load(di, lo + i), hn::Load(di, hi + i)),
                          KeyOutside(k, hn::Load(di, lo2 + i), hn::Load(di, hi2 + i)));
    for (int32_t a = 0; a < rank; ++a) {
      const auto c = hn::Set(di, kc[a][j]);
      hidden = hn::Or(hidden, KeyOutside(c, hn::Load(di, glo[a] + i), hn::Load(di, ghi[a] + i)));
      if (dilated[a])
        hidden = hn::Or(hidden, hn::Ne(hn::Set(di, kres[a][j]), hn::Load(di, gres[a] + i)));
    }
    x = HideKeys(df, hidden, hn::Set(df, -std::numeric_limits<float>::infinity()), x);
    if (bias != nullptr) x = hn::Add(x, hn::Load(df, bias + j * mp + i));
    return x;
  }
};

// Dense mask value of (row offset `off`, key j): 0 or -inf for a visibility mask, the additive
// value otherwise.
inline float DenseValue(const AttentionProblem::Masks& m, int64_t off, int64_t j) {
  const int64_t at = off + j * m.dense_stride[3];
  if (m.dense_dtype == DType::kF32) return static_cast<const float*>(m.dense)[at];
  return static_cast<const uint8_t*>(m.dense)[at] != 0 ? 0.0f
                                                       : -std::numeric_limits<float>::infinity();
}

// True when the dense visibility mask is the only per-tile bias and shows every key of the tile to
// every row (a byte scan per row and piece): the tile then needs no bias. Most tiles of a dense
// mask are like that (causal-like masks: all but the diagonal ones), and the scan costs a small
// fraction of the per-(key, row) fill it saves.
inline bool DenseRowsAllVisible(const AttentionProblem::Masks& m, const MaskScratch& ms,
                                int64_t rows, const TilePlan& tile) {
  if (m.dense == nullptr || m.tree_parents != nullptr || m.dense_dtype != DType::kU8 ||
      m.dense_stride[3] != 1) {
    return false;
  }
  for (int64_t r = 1; r < rows && m.blocks != nullptr; ++r) {
    if (ms.block_row[static_cast<size_t>(r)] != ms.block_row[0]) return false;
  }
  const uint8_t* dense = static_cast<const uint8_t*>(m.dense);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = dense + ms.dense_row[static_cast<size_t>(r)];
    for (size_t i = tile.first; i < tile.first + tile.count; ++i) {
      const mask::Run& piece = ms.pieces[i];
      if (std::memchr(row + piece.begin, 0, static_cast<size_t>(piece.end - piece.begin))) {
        return false;
      }
    }
  }
  return true;
}

// The keys some row of the task can see, as runs, in ms.runs: the union of the rows' intervals,
// intersected with the neighborhood box, the kept blocks and the dense mask's visible columns.
inline void TaskKeyRuns(const AttentionProblem& p, int64_t rows, int64_t k_len,
                        const int64_t* box_lo, const int64_t* box_hi, MaskScratch& ms) {
  const AttentionProblem::Masks& m = p.mask;
  mask::UnionRuns(&ms.intervals, &ms.runs);
  if (m.grid_rank != 0) {
    ms.other.clear();
    int64_t line = m.grid[m.grid_rank - 1];
    if (m.grid_rank == 1) {
      ms.other.push_back({box_lo[0], box_hi[0] + 1});
    } else if (m.grid_rank == 2) {
      for (int64_t y = box_lo[0]; y <= box_hi[0]; ++y) {
        ms.other.push_back({y * line + box_lo[1], y * line + box_hi[1] + 1});
      }
    } else {
      for (int64_t z = box_lo[0]; z <= box_hi[0]; ++z) {
        for (int64_t y = box_lo[1]; y <= box_hi[1]; ++y) {
          const int64_t row = (z * m.grid[1] + y) * line;
          ms.other.push_back({row + box_lo[2], row + box_hi[2] + 1});
        }
      }
    }
    mask::IntersectRuns(&ms.runs, ms.other, &ms.tmp);
  }
  if (m.blocks != nullptr) {
    ms.other.clear();
    const int64_t nkb = (k_len + m.block_k - 1) / m.block_k;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      bool kept = false;
      const uint8_t* last = nullptr;
      for (int64_t r = 0; r < rows && !kept; ++r) {
        const uint8_t* row = ms.block_row[static_cast<size_t>(r)];
        if (row == last) continue;  // rows of one head and block share the mask row
        last = row;
        kept = row[kb * m.block_stride[3]] != 0;
      }
      if (!kept) continue;
      const int64_t b = kb * m.block_k, e = std::min(b + m.block_k, k_len);
      if (!ms.other.empty() && ms.other.back().end == b) {
        ms.other.back().end = e;
      } else {
        ms.other.push_back({b, e});
      }
    }
    mask::IntersectRuns(&ms.runs, ms.other, &ms.tmp);
  }
  if (m.dense != nullptr) {
    ms.other.clear();
    for (const mask::Run& run : ms.runs) {
      for (int64_t j = run.begin; j < run.end; ++j) ms.seen[static_cast<size_t>(j)] = 0;
    }
    const bool bytes = m.dense_dtype == DType::kU8 && m.dense_stride[3] == 1;
    for (int64_t r = 0; r < rows; ++r) {
      for (const mask::Run& run : ms.runs) {
        if (bytes) {
          // A plain byte OR (vectorized by the compiler): nonzero means some row sees the key.
          const uint8_t* row =
              static_cast<const uint8_t*>(m.dense) + ms.dense_row[static_cast<size_t>(r)];
          for (int64_t j = run.begin; j < run.end; ++j) {
            ms.seen[static_cast<size_t>(j)] |= row[j];
          }
          continue;
        }
        for (int64_t j = run.begin; j < run.end; ++j) {
          const float v = DenseValue(m, ms.dense_row[static_cast<size_t>(r)], j);
          ms.seen[static_cast<size_t>(j)] |= v != -std::numeric_limits<float>::infinity();
        }
      }
    }
    for (const mask::Run& run : ms.runs) {
      for (int64_t j = run.begin; j < run.end; ++j) {
        if (!ms.seen[static_cast<size_t>(j)]) continue;
        if (!ms.other.empty() && ms.other.back().end == j) {
          ++ms.other.back().end;
        } else {
          ms.other.push_back({j, j + 1});
        }
      }
    }
    std::swap(ms.runs, ms.other);
  }
}

// Cuts the runs at multiples of kKeyTile (so a single run is tiled exactly as the unmasked
// kernel tiles it) and packs the pieces, in order, into tiles of at most kKeyTile keys.
inline void PlanTiles(MaskScratch& ms) {
  ms.pieces.clear();
  ms.tiles.clear();
  for (const mask::Run& run : ms.runs) {
    for (int64_t a = run.begin; a < run.end;) {
      const int64_t e = std::min(run.end, (a / flash::kKeyTile + 1) * flash::kKeyTile);
      ms.pieces.push_back({a, e});
      a = e;
    }
  }
  for (size_t i = 0; i < ms.pieces.size(); ++i) {
    const int64_t n = ms.pieces[i].end - ms.pieces[i].begin;
    if (!ms.tiles.empty() && ms.tiles.back().nkeys + n <= flash::kKeyTile) {
      TilePlan& tile = ms.tiles.back();
      tile.contiguous = tile.contiguous && ms.pieces[i - 1].end == ms.pieces[i].begin;
      ++tile.count;
      tile.nkeys += n;
    } else {
      ms.tiles.push_back(TilePlan{i, 1, n, true});
    }
  }
}

// ---- The backward: keys in lanes ---------------------------------------------------------------

// The masks of tessera/mask.h in the backward (keys in lanes): per query row of the task's GQA
// group its intervals and neighborhood box (mask_policy.h), per query tile a conservative hull to
// skip (query tile, key block) pairs no row can see, and per row of a partial tile a bias vector
// over the key lanes for the block, dense and tree masks.
struct RowMask {
  int32_t lo1, hi1, lo2, hi2;
  int32_t glo[3], ghi[3], gres[3];
  const uint8_t* block_row;  // nullptr: no block mask
  int64_t dense_row;         // element offset of the dense mask row
  int64_t node;              // tree node (the query index)
};

struct TileHull {
  int64_t lo1, hi1, lo2, hi2;
  int64_t glo[3], ghi[3];
};

struct MaskRows {
  const AttentionProblem* p;
  std::vector<RowMask> rows;    // [G][q_len]
  std::vector<TileHull> hulls;  // [G][query tiles]
  int64_t q_len = 0, tiles = 0;
  hwy::AlignedFreeUniquePtr<int32_t[]> key_ints;  // kc[3][Np], kres[3][Np]
  hwy::AlignedFreeUniquePtr<float[]> bias;        // [kQueryTile][Np]
  int32_t* kc[3];
  int32_t* kres[3];
  const RowMask* tile_rows[kQueryTile];
  const float* tile_bias[kQueryTile];
  int64_t key_lo[3], key_hi[3];  // coordinate hull of the current key block per axis

  bool Allocate(size_t np) {
    key_ints = hwy::AllocateAligned<int32_t>(6 * np);
    bias = hwy::AllocateAligned<float>(static_cast<size_t>(kQueryTile) * np);
    if (!key_ints || !bias) return false;
    for (int a = 0; a < 3; ++a) {
      kc[a] = key_ints.get() + static_cast<size_t>(a) * np;
      kres[a] = key_ints.get() + static_cast<size_t>(3 + a) * np;
    }
    return true;
  }

  // Rows and hulls of the G heads of (sequence, KV head).
  void Prepare(int64_t seq, int64_t kv_head, int64_t q_len_, int64_t k_len, int64_t delta) {
    const AttentionProblem::Masks& m = p->mask;
    q_len = q_len_;
    tiles = hwy::DivCeil(q_len, kQueryTile);
    rows.resize(static_cast<size_t>(p->group * q_len));
    hulls.resize(static_cast<size_t>(p->group * tiles));
    for (int64_t gi = 0; gi < p->group; ++gi) {
      const int64_t head = kv_head * p->group + gi;
      for (int64_t t = 0; t < tiles; ++t) {
        TileHull& h = hulls[static_cast<size_t>(gi * tiles + t)];
        h = TileHull{k_len, -1, k_len, -1, {0, 0, 0}, {-1, -1, -1}};
        for (int a = 0; a < m.grid_rank; ++a) h.glo[a] = m.grid[a];
        for (int64_t qi = t * kQueryTile; qi < std::min(q_len, (t + 1) * kQueryTile); ++qi) {
          RowMask& r = rows[static_cast<size_t>(gi * q_len + qi)];
          const int64_t pos = qi + delta;
          const mask::ClippedIntervals iv =
              mask::Clip(mask::Intervals(*p, seq, head, qi, pos, k_len), k_len);
          r.lo1 = iv.lo1;
          r.hi1 = iv.hi1;
          r.lo2 = iv.lo2;
          r.hi2 = iv.hi2;
          if (r.lo1 <= r.hi1) {
            h.lo1 = std::min<int64_t>(h.lo1, r.lo1);
            h.hi1 = std::max<int64_t>(h.hi1, r.hi1);
          }
          if (r.lo2 <= r.hi2) {
            h.lo2 = std::min<int64_t>(h.lo2, r.lo2);
            h.hi2 = std::max<int64_t>(h.hi2, r.hi2);
          }
          if (m.grid_rank != 0) {
            mask::AxisRange box[3];
            mask::NeighborhoodBox(m, pos, box);
            for (int a = 0; a < m.grid_rank; ++a) {
              r.glo[a] = static_cast<int32_t>(box[a].lo);
              r.ghi[a] = static_cast<int32_t>(box[a].hi);
              r.gres[a] = static_cast<int32_t>(box[a].residue);
              h.glo[a] = std::min(h.glo[a], box[a].lo);
              h.ghi[a] = std::max(h.ghi[a], box[a].hi);
            }
          }
          r.block_row = m.blocks == nullptr
                            ? nullptr
                            : m.blocks + seq * m.block_stride[0] + head * m.block_stride[1] +
                                  qi / m.block_q * m.block_stride[2];
          r.dense_row = seq * m.dense_stride[0] + head * m.dense_stride[1] + qi * m.dense_stride[2];
          r.node = qi;
        }
      }
    }
  }

  // Key coordinates of the key block [j0, j0 + nk) (padding lanes keep coordinate -2: hidden).
  void SetKeys(int64_t j0, int64_t nk, size_t np) {
    const AttentionProblem::Masks& m = p->mask;
    for (int a = 0; a < m.grid_rank; ++a) key_lo[a] = m.grid[a], key_hi[a] = -1;
    for (size_t j = 0; j < np; ++j) {
      int64_t c[3] = {-2, -2, -2};
      if (static_cast<int64_t>(j) < nk) mask::GridCoords(m, j0 + static_cast<int64_t>(j), c);
      for (int a = 0; a < m.grid_rank; ++a) {
        kc[a][j] = static_cast<int32_t>(c[a]);
        kres[a][j] = static_cast<int32_t>(c[a] < 0 ? -1 : c[a] % m.dilation[a]);
        if (c[a] >= 0) key_lo[a] = std::min(key_lo[a], c[a]), key_hi[a] = std::max(key_hi[a], c[a]);
      }
    }
  }

  // Whether some row of query tile `t` of head `gi` may see a key of [j0, j1) (conservative).
  bool TileMaySee(int64_t gi, int64_t t, int64_t j0, int64_t j1) const {
    const AttentionProblem::Masks& m = p->mask;
    const TileHull& h = hulls[static_cast<size_t>(gi * tiles + t)];
    const bool in1 = std::max(h.lo1, j0) <= std::min(h.hi1, j1 - 1);
    const bool in2 = std::max(h.lo2, j0) <= std::min(h.hi2, j1 - 1);
    if (!in1 && !in2) return false;
    for (int a = 0; a < m.grid_rank; ++a) {
      if (std::max(h.glo[a], key_lo[a]) > std::min(h.ghi[a], key_hi[a])) return false;
    }
    if (m.blocks != nullptr) {
      const int64_t q0 = t * kQueryTile, q1 = std::min(q_len, q0 + kQueryTile);
      bool any = false;
      for (int64_t qb = q0 / m.block_q; qb <= (q1 - 1) / m.block_q && !any; ++qb) {
        const uint8_t* row =
            rows[static_cast<size_t>(gi * q_len + std::max(q0, qb * m.block_q))].block_row;
        for (int64_t kb = j0 / m.block_k; kb <= (j1 - 1) / m.block_k && !any; ++kb) {
          any = row[kb * m.block_stride[3]] != 0;
        }
      }
      if (!any) return false;
    }
    return true;
  }

  // Whether every row of [a, e) of head gi sees every key of [j0, j1) (then no predicate runs).
  bool TileFull(int64_t gi, int64_t a, int64_t e, int64_t j0, int64_t j1) const {
    const AttentionProblem::Masks& m = p->mask;
    if (m.grid_rank != 0 || m.dense != nullptr || m.tree_parents != nullptr) return false;
    for (int64_t qi = a; qi < e; ++qi) {
      const RowMask& r = rows[static_cast<size_t>(gi * q_len + qi)];
      if (!((r.lo1 <= j0 && r.hi1 >= j1 - 1) || (r.lo2 <= j0 && r.hi2 >= j1 - 1))) return false;
      if (r.block_row != nullptr) {
        for (int64_t kb = j0 / m.block_k; kb <= (j1 - 1) / m.block_k; ++kb) {
          if (r.block_row[kb * m.block_stride[3]] == 0) return false;
        }
      }
    }
    return true;
  }

  // Points tile_rows / tile_bias at the rows [a, a + nrows) of head gi; bias vectors over the key
  // block [j0, j0 + nk) for the block, dense and tree masks (rows of one block-mask row share one).
  void SetTile(int64_t gi, int64_t a, size_t nrows, int64_t j0, int64_t nk, size_t np) {
    const AttentionProblem::Masks& m = p->mask;
    const bool per_row = m.dense != nullptr || m.tree_parents != nullptr;
    const int64_t k_base = m.tree_parents != nullptr ? p->seq_k - m.tree_size : 0;
    const uint8_t* last_block_row = nullptr;
    const float* last_bias = nullptr;
    size_t used = 0;
    for (size_t r = 0; r < nrows; ++r) {
      const RowMask& row = rows[static_cast<size_t>(gi * q_len + a) + r];
      tile_rows[r] = &row;
      tile_bias[r] = nullptr;
      if (!per_row && m.blocks == nullptr) continue;
      if (!per_row && row.block_row == last_block_row) {
        tile_bias[r] = last_bias;
        continue;
      }
      float* b = bias.get() + (used++) * np;
      for (size_t j = 0; j < np; ++j) {
        const int64_t key = j0 + static_cast<int64_t>(j);
        float v = 0.0f;
        if (static_cast<int64_t>(j) < nk) {
          if (m.blocks != nullptr && row.block_row[key / m.block_k * m.block_stride[3]] == 0) {
            v = -std::numeric_limits<float>::infinity();
          }
          if (m.dense != nullptr) {
            const int64_t at = row.dense_row + key * m.dense_stride[3];
            v += m.dense_dtype == DType::kF32 ? static_cast<const float*>(m.dense)[at]
                                              : (static_cast<const uint8_t*>(m.dense)[at] != 0
                                                     ? 0.0f
                                                     : -std::numeric_limits<float>::infinity());
          }
          if (m.tree_parents != nullptr && key >= k_base) {
            bool ancestor = false;
            for (int64_t u = row.node; u >= 0 && !ancestor; u = m.tree_parents[u]) {
              ancestor = u == key - k_base;
            }
            if (!ancestor) v = -std::numeric_limits<float>::infinity();
          }
        }
        b[j] = v;
      }
      tile_bias[r] = b;
      last_block_row = row.block_row;
      last_bias = b;
    }
  }

  // The interval and neighborhood part of the predicate for keys [j, j + kLanes) of a row.
  HWY_INLINE hn::Vec<DF> Apply(const RowMask& r, const int32_t* key, size_t j,
                               hn::Vec<DF> x) const {
    const DF df;
    const hn::RebindToSigned<DF> di;
    const auto k = hn::Load(di, key + j);
    auto hidden = hn::And(KeyOutside(k, hn::Set(di, r.lo1), hn::Set(di, r.hi1)),
                          KeyOutside(k, hn::Set(di, r.lo2), hn::Set(di, r.hi2)));
    const AttentionProblem::Masks& m = p->mask;
    for (int a = 0; a < m.grid_rank; ++a) {
      const auto c = hn::Load(di, kc[a] + j);
      hidden = hn::Or(hidden, KeyOutside(c, hn::Set(di, r.glo[a]), hn::Set(di, r.ghi[a])));
      if (m.dilation[a] > 1) {
        hidden = hn::Or(hidden, hn::Ne(hn::Load(di, kres[a] + j), hn::Set(di, r.gres[a])));
      }
    }
    return HideKeys(df, hidden, hn::Set(df, -std::numeric_limits<float>::infinity()), x);
  }
};

}  // namespace mask_impl
}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_ATTENTION_MASK_TILES_INL_H_
