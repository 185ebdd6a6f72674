// SPDX-License-Identifier: Apache-2.0
// Internal, SIMD-free: the scalar half of the mask policy of the exact forward.
//
// A task of the forward owns a set of query rows; the mask answers for it
//   1. which keys any of its rows can see, as ascending runs [begin, end) (keys outside are
//      never read),
//   2. per row, the data of the vector predicate of partial tiles: up to two visible key
//      intervals (window / causal, token groups, sinks, prefix, documents, tree bound), a box per
//      grid axis (neighborhood attention), the row of the block mask and of the dense mask.
// The SIMD half (the predicates and the tile classification) is in mask_tiles-inl.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/attention_problem.h"

namespace tessera {
namespace mask {

// A run of keys [begin, end).
struct Run {
  int64_t begin, end;
};

// Visible keys of one row: [lo1, hi1] U [lo2, hi2] (an interval with lo > hi is empty).
struct RowIntervals {
  int64_t lo1, hi1, lo2, hi2;
};

// Neighborhood box of one query on one grid axis: keys with coordinate c visible iff
// lo <= c <= hi and c mod dilation == residue.
struct AxisRange {
  int64_t lo, hi, residue;
};

// The query's window on one axis of length L (docs/algorithms.md §4.2), in key coordinates.
inline AxisRange NeighborhoodAxis(int64_t x, int64_t L, int64_t K, int64_t d, int64_t S,
                                  bool causal) {
  const int64_t g = x % d, xg = x / d;
  const int64_t lg = L / d + (g < L % d ? 1 : 0);  // length of the dilation group
  int64_t lo, hi;
  if (causal) {
    const int64_t leader = std::min(xg / S * S + S - 1, lg - 1);
    lo = std::max<int64_t>(0, leader - K + 1);
    hi = xg;
  } else {
    const int64_t wl = K / 2, wr = K / 2 + K % 2 - 1;
    const int64_t leader = std::min(xg / S * S + S / 2, lg - 1);
    const int64_t centre = std::clamp(leader, wl, lg - 1 - wr);
    lo = centre - wl;
    hi = centre + wr;
  }
  return AxisRange{lo * d + g, hi * d + g, g};
}

// Coordinates of token t on the axes of a row-major grid.
inline void GridCoords(const AttentionProblem::Masks& m, int64_t t, int64_t* c) {
  for (int a = m.grid_rank - 1; a >= 0; --a) {
    c[a] = t % m.grid[a];
    t /= m.grid[a];
  }
}

// The query's box on every axis of the grid (the query and key grids coincide).
inline void NeighborhoodBox(const AttentionProblem::Masks& m, int64_t pos, AxisRange* box) {
  int64_t c[3];
  GridCoords(m, pos, c);
  for (int a = 0; a < m.grid_rank; ++a) {
    box[a] = NeighborhoodAxis(c[a], m.grid[a], m.window[a], m.dilation[a], m.stride[a],
                              m.axis_causal[a]);
  }
}

// A row's intervals clipped to the keys [0, k_len) in 32 bits, as the vector predicates read
// them; an empty interval stays empty (lo > hi) even when there are no keys.
struct ClippedIntervals {
  int32_t lo1, hi1, lo2, hi2;
};

inline RowIntervals Intersect(RowIntervals r, int64_t lo, int64_t hi) {
  r.lo1 = std::max(r.lo1, lo);
  r.hi1 = std::min(r.hi1, hi);
  r.lo2 = std::max(r.lo2, lo);
  r.hi2 = std::min(r.hi2, hi);
  return r;
}

// Visible-key intervals of the query at index qi (position pos) of head `head` in sequence b with
// k_len keys: the window (inside its token group, in rolled coordinates for shifted heads), the
// sink and prefix exemptions, the document and the tree bound. Neighborhood, block and dense
// masks are applied by the predicate on top of these.
inline RowIntervals Intervals(const AttentionProblem& p, int64_t b, int64_t head, int64_t qi,
                              int64_t pos, int64_t k_len) {
  const AttentionProblem::Masks& m = p.mask;
  RowIntervals r{1, 0, 1, 0};
  if (m.group_size == 0) {
    const auto w = p.visible_keys(pos, k_len);
    r.lo1 = w.lo;
    r.hi1 = w.hi;
  } else {
    const int64_t n = k_len, g = m.group_size;
    const bool shifted = m.shift_half_heads && head >= p.heads_q / 2;
    const int64_t shift = shifted ? g / 2 : 0;
    const int64_t t = ((pos - shift) % n + n) % n;  // rolled index of the query
    const int64_t group_lo = t / g * g;
    const int64_t lo = std::max(group_lo, t - p.window_left);
    const int64_t hi = std::min(group_lo + g - 1, t + p.window_right);
    if (pos >= 0 && pos < n && lo <= hi) {
      // Back to original positions: x = t + shift, wrapping past the end to the front.
      const int64_t a = lo + shift, e = hi + shift;
      if (e < n) {
        r.lo1 = a;
        r.hi1 = e;
      } else if (a >= n) {
        r.lo1 = a - n;
        r.hi1 = e - n;
      } else {
        r.lo1 = a;
        r.hi1 = n - 1;
        r.lo2 = 0;
        r.hi2 = e - n;
      }
    }
  }
  // Keys exempt from the window's left bound (sinks) or from everything (prefix): a second
  // interval starting at key 0, merged with the wrapped part of a shifted group.
  int64_t front = r.lo2 == 0 ? r.hi2 : -1;
  if (m.sink_tokens > 0) {
    front = std::max(front, std::min(m.sink_tokens - 1, pos + p.window_right));
  }
  if (m.prefix_len > 0) front = std::max(front, m.prefix_len - 1);
  if (front >= 0) {
    r.lo2 = 0;
    r.hi2 = std::min(front, k_len - 1);
  }
  if (m.doc != nullptr) {
    if (pos < 0 || pos >= k_len) return RowIntervals{1, 0, 1, 0};
    const int32_t* ids = m.doc + b * m.doc_stride[0];
    const int64_t st = m.doc_stride[1];
    const int32_t id = ids[pos * st];
    // The document is the run of equal ids around pos (ids are non-decreasing).
    int64_t lo = 0, hi = pos;
    while (lo < hi) {  // first key with ids >= id
      const int64_t mid = (lo + hi) / 2;
      if (ids[mid * st] < id)
        lo = mid + 1;
      else
        hi = mid;
    }
    const int64_t doc_lo = lo;
    lo = pos;
    hi = k_len - 1;
    while (lo < hi) {  // last key with ids <= id
      const int64_t mid = (lo + hi + 1) / 2;
      if (ids[mid * st] > id)
        hi = mid - 1;
      else
        lo = mid;
    }
    r = Intersect(r, doc_lo, lo);
  }
  if (m.tree_parents != nullptr) r = Intersect(r, 0, k_len - m.tree_size + qi);
  return r;
}

inline ClippedIntervals Clip(const RowIntervals& r, int64_t k_len) {
  const auto lo = [&](int64_t x) { return static_cast<int32_t>(std::clamp<int64_t>(x, 0, k_len)); };
  const auto hi = [&](int64_t x) {
    return static_cast<int32_t>(std::clamp<int64_t>(x, -1, k_len - 1));
  };
  return ClippedIntervals{lo(r.lo1), hi(r.hi1), lo(r.lo2), hi(r.hi2)};
}

// Appends the union of `intervals` (any order, empty ones ignored) as sorted disjoint runs.
inline void UnionRuns(std::vector<Run>* intervals, std::vector<Run>* out) {
  out->clear();
  std::sort(intervals->begin(), intervals->end(),
            [](const Run& a, const Run& b) { return a.begin < b.begin; });
  for (const Run& r : *intervals) {
    if (r.begin >= r.end) continue;
    if (!out->empty() && r.begin <= out->back().end) {
      out->back().end = std::max(out->back().end, r.end);
    } else {
      out->push_back(r);
    }
  }
}

// a <- a intersected with b (both sorted and disjoint).
inline void IntersectRuns(std::vector<Run>* a, const std::vector<Run>& b, std::vector<Run>* tmp) {
  tmp->clear();
  size_t i = 0, j = 0;
  while (i < a->size() && j < b.size()) {
    const int64_t lo = std::max((*a)[i].begin, b[j].begin);
    const int64_t hi = std::min((*a)[i].end, b[j].end);
    if (lo < hi) tmp->push_back(Run{lo, hi});
    if ((*a)[i].end < b[j].end)
      ++i;
    else
      ++j;
  }
  std::swap(*a, *tmp);
}

}  // namespace mask
}  // namespace tessera
