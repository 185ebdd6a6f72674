// SPDX-License-Identifier: Apache-2.0
// Tile GEMM building blocks for the attention kernels (one copy per Highway target).
//
// Both products keep the output's contiguous dimension in SIMD lanes ("panel" columns, mp of
// them, a multiple of the vector width) and broadcast single elements of the other operand, so
// neither operand needs a transposed copy:
//   RowPanelProduct:            C[n][mp]   = A[n][dim] * B[dim][mp]  (or +=; + column max of C)
//   TransposedPanelAccumulate:  C[dim][mp] = alpha[mp] o C + A[n][dim]^T * B[n][mp]
// A is read row by row with any row stride (in place from the caller's tensor for f32 rows that
// are contiguous), B and C are packed panels. Register tile: kTileRows broadcast rows x kTileVecs
// vectors of lanes.
//
// The TileFeed passed along carries work on later tiles (prefetching rows into L2, converting
// rows to f32) that the loops interleave with their FMAs.

#if defined(TESSERA_SIMD_TILE_GEMM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_SIMD_TILE_GEMM_INL_H_
#undef TESSERA_SIMD_TILE_GEMM_INL_H_
#else
#define TESSERA_SIMD_TILE_GEMM_INL_H_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "simd/convert-inl.h"
#include "tessera/types.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
constexpr size_t kLanes = hn::MaxLanes(DF());

// Register tile: kTileRows broadcast rows x kTileVecs vectors of panel lanes.
// 8 x 3 = 24 accumulators on 32-register targets (12 x 2, 8 x 2 and 6 x 4 measured 2-7% slower
// on Zen 4), 4 x 3 on 16-register ones.
constexpr int kTileRows = HWY_TARGET <= HWY_AVX3 ? 8 : 4;
constexpr int kTileVecs = 3;

// C[r][c] = sum_d A[r][d] * B[d][c] (kAcc: C[r][c] += ...) for r < R rows, c < C vectors (kt =
// A, qt = B, st = C); colmax[c], when given, also takes the max over these rows (the forward's
// tile max for free).
template <int R, int C, int kD, bool kAcc>
HWY_INLINE void ProductBlock(const float* HWY_RESTRICT kt, size_t ldk, size_t dim,
                             const float* HWY_RESTRICT qt, size_t mp, float* HWY_RESTRICT st,
                             float* HWY_RESTRICT colmax) {
  const DF df;
  VF acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = kAcc ? hn::Load(df, st + r * mp + c * kLanes) : hn::Zero(df);
    }
  }
  const size_t n = kD != 0 ? static_cast<size_t>(kD) : dim;
  for (size_t d = 0; d < n; ++d) {
    VF q[C];
    for (int c = 0; c < C; ++c) q[c] = hn::Load(df, qt + d * mp + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const VF k = hn::Set(df, kt[r * ldk + d]);
      for (int c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(k, q[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) hn::Store(acc[r][c], df, st + r * mp + c * kLanes);
  }
  if (colmax == nullptr) return;
  for (int c = 0; c < C; ++c) {
    VF m = acc[0][c];
    for (int r = 1; r < R; ++r) m = hn::Max(m, acc[r][c]);  // NaN in acc propagates (2nd operand)
    hn::Store(hn::Max(hn::Load(df, colmax + c * kLanes), m), df, colmax + c * kLanes);
  }
}

// C[r][c] = alpha[c] * C[r][c] + sum_j A[j][r] * B[j][c] for r < R, j < nkeys (vt = A, pt = B,
// ot = C).
template <int R, int C>
HWY_INLINE void TransposedAccumulateBlock(const float* HWY_RESTRICT vt, size_t ldv,
                                          const float* HWY_RESTRICT pt, size_t mp,
                                          const float* HWY_RESTRICT alpha, size_t nkeys,
                                          float* HWY_RESTRICT ot) {
  const DF df;
  VF acc[R][C];
  for (int c = 0; c < C; ++c) {
    const VF a = hn::Load(df, alpha + c * kLanes);
    for (int r = 0; r < R; ++r) acc[r][c] = hn::Mul(a, hn::Load(df, ot + r * mp + c * kLanes));
  }
  for (size_t j = 0; j < nkeys; ++j) {
    VF p[C];
    for (int c = 0; c < C; ++c) p[c] = hn::Load(df, pt + j * mp + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const VF v = hn::Set(df, vt[j * ldv + r]);
      for (int c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(v, p[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) hn::Store(acc[r][c], df, ot + r * mp + c * kLanes);
  }
}

// Run-time vector count c in [1, C] to the compile-time register tile.
template <int R, int kD, bool kAcc, int C = kTileVecs>
HWY_INLINE void ProductBlockC(size_t c, const float* kt, size_t ldk, size_t dim, const float* qt,
                              size_t mp, float* st, float* colmax) {
  if constexpr (C > 1) {
    if (c < C) return ProductBlockC<R, kD, kAcc, C - 1>(c, kt, ldk, dim, qt, mp, st, colmax);
  }
  ProductBlock<R, C, kD, kAcc>(kt, ldk, dim, qt, mp, st, colmax);
}

template <int R, int C = kTileVecs>
HWY_INLINE void TransposedAccumulateBlockC(size_t c, const float* vt, size_t ldv, const float* pt,
                                           size_t mp, const float* alpha, size_t nkeys, float* ot) {
  if constexpr (C > 1) {
    if (c < C) return TransposedAccumulateBlockC<R, C - 1>(c, vt, ldv, pt, mp, alpha, nkeys, ot);
  }
  TransposedAccumulateBlock<R, C>(vt, ldv, pt, mp, alpha, nkeys, ot);
}

// Tails of the broadcast dimension: rows in [1, R] left.
template <int kD, bool kAcc, int R = kTileRows - 1>
void ProductTail(size_t rows, size_t c, const float* kt, size_t ldk, size_t dim, const float* qt,
                 size_t mp, float* st, float* colmax) {
  if constexpr (R > 1) {
    if (rows < R) return ProductTail<kD, kAcc, R - 1>(rows, c, kt, ldk, dim, qt, mp, st, colmax);
  }
  ProductBlockC<R, kD, kAcc>(c, kt, ldk, dim, qt, mp, st, colmax);
}

template <int R = kTileRows - 1>
void TransposedAccumulateTail(size_t rows, size_t c, const float* vt, size_t ldv, const float* pt,
                              size_t mp, const float* alpha, size_t nkeys, float* ot) {
  if constexpr (R > 1) {
    if (rows < R)
      return TransposedAccumulateTail<R - 1>(rows, c, vt, ldv, pt, mp, alpha, nkeys, ot);
  }
  TransposedAccumulateBlockC<R>(c, vt, ldv, pt, mp, alpha, nkeys, ot);
}

// Brings the rows of a later K or V tile into L2 a few rows at a time, interleaved with the
// GEMM of the current tile (a burst of a thousand prefetches would overflow the miss queues).
struct RowPrefetcher {
  const char* row = nullptr;
  int64_t step = 0;       // bytes between rows
  int64_t row_bytes = 0;  // bytes spanned by one row
  int64_t rows_left = 0;

  HWY_INLINE void Next(int64_t n) {
    for (; n > 0 && rows_left > 0; --n, --rows_left, row += step) {
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    }
  }
};

// Converts the rows of the next K or V tile to f32 a few rows at a time, interleaved with the
// GEMM of the current tile, so the loads and conversions overlap the FMAs instead of stalling
// between tiles. The rows were prefetched into L2 one tile earlier.
struct RowConverter {
  DType dtype = DType::kF32;
  const void* base = nullptr;
  int64_t offset = 0;       // element offset of the first row
  int64_t row_stride = 0;   // elements between rows
  int64_t elem_stride = 1;  // elements between the entries of a row
  size_t dim = 0;
  float* dst = nullptr;  // [rows][dim]
  size_t rows = 0;
  size_t done = 0;

  HWY_INLINE void Next(int64_t n) {
    for (; n > 0 && done < rows; --n, ++done) {
      LoadRow(dtype, base, offset + static_cast<int64_t>(done) * row_stride, elem_stride, dim,
              dst + done * dim);
    }
  }
  void Finish() { Next(static_cast<int64_t>(rows)); }
};

// The work on later tiles that the GEMM loops of the current tile carry along.
struct TileFeed {
  RowPrefetcher prefetch;
  RowConverter convert;
  HWY_INLINE void Next(int64_t n) {
    prefetch.Next(n);
    convert.Next(n);
  }
};

// The columns [0, c * kLanes) (c <= kTileVecs vectors) of C[0..nkeys) = A[nkeys][dim] *
// B[dim][.] (kt = A with row stride ldk, qt = B and st = C with row stride mp, both offset to the
// strip's first column), and their max over the rows in colmax (when not null).
template <int kD, bool kAcc = false>
HWY_INLINE void RowStripProduct(const float* kt, size_t ldk, size_t nkeys, size_t dim,
                                const float* qt, size_t mp, size_t c, float* st, float* colmax,
                                TileFeed& next_k) {
  for (size_t i = 0; colmax != nullptr && i < c * kLanes; i += kLanes) {
    hn::Store(hn::Set(DF(), -std::numeric_limits<float>::infinity()), DF(), colmax + i);
  }
  size_t j = 0;
  for (; j + kTileRows <= nkeys; j += kTileRows) {
    next_k.Next(kTileRows);
    ProductBlockC<kTileRows, kD, kAcc>(c, kt + j * ldk, ldk, dim, qt, mp, st + j * mp, colmax);
  }
  if (j < nkeys)
    ProductTail<kD, kAcc>(nkeys - j, c, kt + j * ldk, ldk, dim, qt, mp, st + j * mp, colmax);
}

// C[0..nkeys)[0..mp) = A[nkeys][dim] * B[dim][mp] (kt = A with row stride ldk, qt = B, st = C),
// and colmax[0..mp) = the max of C over its rows when colmax is not null.
template <int kD, bool kAcc = false>
HWY_NOINLINE void RowPanelProduct(const float* kt, size_t ldk, size_t nkeys, size_t dim,
                                  const float* qt, size_t mp, float* st, float* colmax,
                                  TileFeed& next_k) {
  const size_t nvec = mp / kLanes;
  for (size_t v0 = 0; v0 < nvec; v0 += kTileVecs) {
    const size_t i0 = v0 * kLanes;
    RowStripProduct<kD, kAcc>(kt, ldk, nkeys, dim, qt + i0, mp,
                              std::min<size_t>(kTileVecs, nvec - v0), st + i0,
                              colmax ? colmax + i0 : nullptr, next_k);
  }
}

// The columns [0, c * kLanes) (c <= kTileVecs vectors) of C[dim][.] = alpha o C + A[nkeys][dim]^T
// * B[nkeys][.] (vt = A with row stride ldv; pt = B, alpha and ot = C offset to the strip's first
// column, B and C with row stride mp).
template <int kD>
HWY_INLINE void TransposedStripAccumulate(const float* vt, size_t ldv, size_t nkeys, size_t dim,
                                          const float* pt, size_t mp, size_t c, const float* alpha,
                                          float* ot, TileFeed& next_v) {
  const size_t n = kD != 0 ? static_cast<size_t>(kD) : dim;
  const int64_t prefetch_rows = static_cast<int64_t>(kTileRows * nkeys / n) + 1;
  size_t d = 0;
  for (; d + kTileRows <= n; d += kTileRows) {
    next_v.Next(prefetch_rows);
    TransposedAccumulateBlockC<kTileRows>(c, vt + d, ldv, pt, mp, alpha, nkeys, ot + d * mp);
  }
  if (d < n) TransposedAccumulateTail(n - d, c, vt + d, ldv, pt, mp, alpha, nkeys, ot + d * mp);
}

// C[dim][mp] = alpha o C + A[nkeys][dim]^T * B[nkeys][mp] (vt = A with row stride ldv, pt = B,
// ot = C).
template <int kD>
HWY_NOINLINE void TransposedPanelAccumulate(const float* vt, size_t ldv, size_t nkeys, size_t dim,
                                            const float* pt, size_t mp, const float* alpha,
                                            float* ot, TileFeed& next_v) {
  const size_t nvec = mp / kLanes;
  for (size_t v0 = 0; v0 < nvec; v0 += kTileVecs) {
    const size_t i0 = v0 * kLanes;
    TransposedStripAccumulate<kD>(vt, ldv, nkeys, dim, pt + i0, mp,
                                  std::min<size_t>(kTileVecs, nvec - v0), alpha + i0, ot + i0,
                                  next_v);
  }
}

HWY_INLINE const char* BytePtr(const void* base, int64_t offset, int64_t elem) {
  return static_cast<const char*>(base) + offset * elem;
}

// dst[j][0..dim) = row j of a tensor (rows `row_stride` elements apart from `offset`), as f32.
// The rows were prefetched into L2 during the previous tile; each is pulled into L1 a few rows
// ahead of its conversion so the loads do not wait on L2 one row at a time.
inline void ConvertRows(DType dtype, const void* base, int64_t offset, int64_t row_stride,
                        int64_t elem_stride, size_t rows, size_t dim, int64_t row_bytes,
                        float* HWY_RESTRICT dst) {
  constexpr size_t kAhead = 4;
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  for (size_t j = 0; j < rows; ++j) {
    if (j + kAhead < rows) {
      const char* ahead =
          BytePtr(base, offset + static_cast<int64_t>(j + kAhead) * row_stride, elem);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
    }
    LoadRow(dtype, base, offset + static_cast<int64_t>(j) * row_stride, elem_stride, dim,
            dst + j * dim);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_SIMD_TILE_GEMM_INL_H_
