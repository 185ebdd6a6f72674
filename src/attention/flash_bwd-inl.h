// Exact attention backward: FlashAttention-2's backward on a CPU, SIMD body (one copy per Highway
// target).
//
// What it computes: dQ, dK, dV of O = softmax(scale*QK^T + softcap/ALiBi, masked) V, recomputing
// the scores tile by tile from the forward's LSE, never the Sq x Sk matrix:
//   P = exp(S - LSE),  dP = dO V^T,  Delta_i = sum_d dO_id O_id,  dS = P o (dP - Delta)
//   (softcap: dS o= 1 - (s/c)^2),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
//
// Partition (deterministic, no atomics): a pre-pass computes Delta per query row; then
//   pass Q: one task = (sequence, KV head, block of query positions), exactly the forward's
//     partition, owns dQ of its rows: per key tile it recomputes S^T and dP^T with the query rows
//     in SIMD lanes and accumulates dQ^T[d][i] += sum_j K[j][d] dS^T[j][i];
//   pass KV: one task = (sequence, KV head, block of kKeyBlock keys) owns dK and dV of its keys,
//     summed over the G query heads of the group: per tile of query rows it recomputes S and dP
//     with the keys in SIMD lanes and accumulates dV^T += dO^T P and dK^T += Q^T dS.
// Both passes reduce in a fixed order (ascending tiles with fixed boundaries), so gradients are
// bitwise identical across runs and thread counts. The two passes recompute S and dP twice
// (7 tile GEMMs against the 5 of a single pass with dQ atomics), the price of determinism.
//
// Bytes moved: like the forward, each task streams the other side's rows (K/V for pass Q,
// Q/dO for pass KV) once per task. Extra memory: Delta (Sq * Hq floats) plus per-worker tiles.
//
// Masks, softcap and ALiBi are applied exactly as in the forward (same window per query
// position, same order: softcap, ALiBi, mask); tiles no row can see are skipped.

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

#include "attention/attention_problem.h"
#include "attention/flash_fwd.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "simd/fast_exp-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace flash_bwd_impl {

namespace hn = hwy::HWY_NAMESPACE;

// Keys per pass-KV task (SIMD lanes of its tiles) and query rows per inner tile of that task.
// Tile boundaries are fixed multiples of these from 0, which fixes every reduction order.
constexpr int64_t kKeyBlock = 96;
constexpr int64_t kQueryTile = 128;
constexpr float kLog2e = 1.4426950408889634f;

struct Task {
  int64_t seq;
  int64_t kv_head;
  int64_t first;  // first query position (pass Q) or key (pass KV) of the block, per sequence
  int64_t count;  // positions in the block
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
  if (rows <= 0) return feed;  // no next tile: `offset` may point past the tensor
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  feed.prefetch = RowPrefetcher{static_cast<const char*>(base) + offset * elem, row_stride * elem,
                                RowBytes(dtype, dim, elem_stride), rows};
  return feed;
}

// Visible key range [lo, hi] of query position `pos` (lo > hi: none), as in the forward.
struct KeyRange {
  int64_t lo, hi;
};
inline KeyRange VisibleKeys(const AttentionProblem& p, int64_t pos, int64_t k_len) {
  return KeyRange{std::max<int64_t>(pos - p.window_left, 0),
                  std::min<int64_t>(pos + p.window_right, k_len - 1)};
}

// dS from recomputed scores. x: raw scaled logit; returns dS and writes P. `hidden` masks.
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
// Pass Q: query rows in lanes (the forward's layout).

struct ScratchQ {
  float* qt;     // [D][Mp] scaled queries, transposed
  float* dot;    // [D][Mp] dO, transposed
  float* dqt;    // [D][Mp] dQ accumulator, transposed
  float* st;     // [kKeyTile][Mp] scores, then P
  float* dpt;    // [kKeyTile][Mp] dP, then dS
  float* kt;     // [kKeyTile][D] K tile (converted dtypes or strides)
  float* vt;     // [kKeyTile][D] V tile
  float* lse;    // [Mp] LSE (0 for rows with no visible key)
  float* delta;  // [Mp]
  float* ones;   // [Mp] 1.0: accumulate without rescaling
  float* pos;    // [Mp]
  float* slope;  // [Mp]
  int32_t* lo;   // [Mp]
  int32_t* hi;   // [Mp]

  static size_t Floats(size_t dim, size_t mp) {
    return 3 * dim * mp + static_cast<size_t>(flash::kKeyTile) * (2 * mp + 2 * dim) + 7 * mp;
  }
  void Carve(float* base, size_t dim, size_t mp) {
    qt = base;
    dot = qt + dim * mp;
    dqt = dot + dim * mp;
    st = dqt + dim * mp;
    dpt = st + flash::kKeyTile * mp;
    kt = dpt + flash::kKeyTile * mp;
    vt = kt + flash::kKeyTile * dim;
    lse = vt + flash::kKeyTile * dim;
    delta = lse + mp;
    ones = delta + mp;
    pos = ones + mp;
    slope = pos + mp;
    lo = reinterpret_cast<int32_t*>(slope + mp);
    hi = lo + mp;
  }
};

// St (scores) and dPt (dP) of a key tile, lanes = query rows: dPt <- dS, St <- P.
inline void GradTileQueryLanes(const AttentionProblem& p, const GradMath& g, ScratchQ& s,
                               size_t nkeys, size_t mp, int64_t key0, bool partial) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const bool alibi = p.alibi != nullptr;
  for (size_t i = 0; i < mp; i += kLanes) {
    const auto lse = hn::Load(df, s.lse + i);
    const auto delta = hn::Load(df, s.delta + i);
    const auto pos = hn::Load(df, s.pos + i);
    const auto slope = hn::Load(df, s.slope + i);
    const auto lo = hn::Load(di, s.lo + i);
    const auto hi = hn::Load(di, s.hi + i);
    for (size_t j = 0; j < nkeys; ++j) {
      const int64_t key = key0 + static_cast<int64_t>(j);
      auto x = hn::Load(df, s.st + j * mp + i);
      auto capped = x;
      if (g.softcap) x = capped = hn::Mul(g.cap, hn::Tanh(df, hn::Mul(x, g.inv_cap)));
      if (alibi) {
        const auto dist = hn::Abs(hn::Sub(pos, hn::Set(df, static_cast<float>(key))));
        x = hn::NegMulAdd(slope, dist, x);
      }
      if (partial) {
        const auto k = hn::Set(di, static_cast<int32_t>(key));
        const auto hidden = hn::Or(hn::Lt(k, lo), hn::Gt(k, hi));
        x = hn::IfThenElse(hn::RebindMask(df, hidden), g.neg_inf, x);
      }
      const auto prob = FastExp2(df, hn::Mul(hn::Sub(x, lse), g.log2e));
      auto ds = hn::Mul(prob, hn::Sub(hn::Load(df, s.dpt + j * mp + i), delta));
      if (g.softcap) {
        const auto t = hn::Mul(capped, g.inv_cap);
        ds = hn::Mul(ds, hn::NegMulAdd(t, t, hn::Set(df, 1.0f)));
      }
      hn::Store(ds, df, s.dpt + j * mp + i);
    }
  }
}

template <int kD>
void RunTaskQ(const AttentionBackwardProblem& bp, const float* delta_rows, const Task& t,
              ScratchQ& s) {
  const AttentionProblem& p = bp.fwd;
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(p.dim);
  const int64_t group = p.group;
  const int64_t rows = group * t.count;
  const size_t mp = hwy::DivCeil(static_cast<size_t>(rows), kLanes) * kLanes;
  const int64_t q_len = p.q_len(t.seq), k_len = p.k_len(t.seq);
  const int64_t q_begin = p.q_begin(t.seq), k_begin = p.k_begin(t.seq);
  const int64_t delta = p.top_left ? 0 : k_len - q_len;
  const int64_t row_base = p.varlen() ? 0 : t.seq * p.seq_q;

  std::memset(s.qt, 0, dim * mp * sizeof(float));
  std::memset(s.dot, 0, dim * mp * sizeof(float));
  std::memset(s.dqt, 0, dim * mp * sizeof(float));
  for (size_t r = 0; r < mp; ++r) {
    s.lse[r] = 0.0f;
    s.delta[r] = 0.0f;
    s.ones[r] = 1.0f;
    s.pos[r] = 0.0f;
    s.slope[r] = 0.0f;
    s.lo[r] = 1;
    s.hi[r] = 0;
  }
  int64_t union_lo = k_len, union_hi = -1, max_lo = 0, min_hi = k_len;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.count;
    const int64_t qi = t.first + r % t.count;
    const int64_t token = q_begin + qi;
    const KeyRange range = VisibleKeys(p, qi + delta, k_len);
    s.lo[r] = static_cast<int32_t>(std::min(range.lo, k_len));
    s.hi[r] = static_cast<int32_t>(std::max<int64_t>(range.hi, -1));
    max_lo = std::max(max_lo, range.lo);
    min_hi = std::min(min_hi, range.hi);
    if (range.lo <= range.hi) {
      union_lo = std::min(union_lo, range.lo);
      union_hi = std::max(union_hi, range.hi);
    }
    s.pos[r] = static_cast<float>(qi + delta);
    if (p.alibi != nullptr) s.slope[r] = p.alibi_slope(t.seq, head);
    const float lse = p.lse[p.lse_offset(t.seq, head, token)];
    s.lse[r] = std::isinf(lse) && lse < 0.0f ? 0.0f : lse;
    s.delta[r] = delta_rows[(row_base + token) * p.heads_q + head];
    float* row = s.kt;
    LoadRow(p.dtype, p.q, p.q_offset(t.seq, token, head), p.q_stride[3], dim, row);
    for (size_t d = 0; d < dim; ++d) s.qt[d * mp + static_cast<size_t>(r)] = p.scale * row[d];
    LoadRow(p.dtype, bp.dout, bp.dout_offset(t.seq, token, head), bp.dout_stride[3], dim, row);
    for (size_t d = 0; d < dim; ++d) s.dot[d * mp + static_cast<size_t>(r)] = row[d];
  }

  const GradMath g(p);
  const bool direct_k = p.dtype == DType::kF32 && p.k_stride[3] == 1;
  const bool direct_v = p.dtype == DType::kF32 && p.v_stride[3] == 1;
  TileFeed none;
  if (union_lo <= union_hi) {
    const int64_t first_tile = union_lo / flash::kKeyTile * flash::kKeyTile;
    for (int64_t c0 = first_tile; c0 <= union_hi; c0 += flash::kKeyTile) {
      const int64_t a = std::max(c0, union_lo);
      const int64_t e = std::min({c0 + flash::kKeyTile, k_len, union_hi + 1});
      const size_t nkeys = static_cast<size_t>(e - a);
      const bool full = max_lo <= a && min_hi >= e - 1;
      const int64_t key0 = k_begin + a;
      const float* kt = s.kt;
      const float* vt = s.vt;
      size_t ldk = dim, ldv = dim;
      if (direct_k) {
        kt = static_cast<const float*>(p.k) + p.k_offset(t.seq, key0, t.kv_head);
        ldk = static_cast<size_t>(p.k_stride[1]);
      } else {
        ConvertRows(p.dtype, p.k, p.k_offset(t.seq, key0, t.kv_head), p.k_stride[1], p.k_stride[3],
                    nkeys, dim, RowBytes(p.dtype, dim, p.k_stride[3]), s.kt);
      }
      if (direct_v) {
        vt = static_cast<const float*>(p.v) + p.v_offset(t.seq, key0, t.kv_head);
        ldv = static_cast<size_t>(p.v_stride[1]);
      } else {
        ConvertRows(p.dtype, p.v, p.v_offset(t.seq, key0, t.kv_head), p.v_stride[1], p.v_stride[3],
                    nkeys, dim, RowBytes(p.dtype, dim, p.v_stride[3]), s.vt);
      }
      // The next tile's K rows stream in during this tile's first product, its V rows during
      // the second.
      const int64_t next = c0 + flash::kKeyTile;
      const int64_t next_rows = std::min({next + flash::kKeyTile, k_len, union_hi + 1}) - next;
      TileFeed next_k = PrefetchFeed(p.dtype, p.k, p.k_offset(t.seq, k_begin + next, t.kv_head),
                                     p.k_stride[1], p.k_stride[3], dim, next_rows);
      TileFeed next_v = PrefetchFeed(p.dtype, p.v, p.v_offset(t.seq, k_begin + next, t.kv_head),
                                     p.v_stride[1], p.v_stride[3], dim, next_rows);
      RowPanelProduct<kD>(kt, ldk, nkeys, dim, s.qt, mp, s.st, nullptr, next_k);
      RowPanelProduct<kD>(vt, ldv, nkeys, dim, s.dot, mp, s.dpt, nullptr, next_v);
      GradTileQueryLanes(p, g, s, nkeys, mp, a, !full);
      TransposedPanelAccumulate<kD>(kt, ldk, nkeys, dim, s.dpt, mp, s.ones, s.dqt, none);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = t.kv_head * group + r / t.count;
    const int64_t token = q_begin + t.first + r % t.count;
    StoreStridedScaled(p.dtype, s.dqt + r, mp, dim, p.scale, bp.dq,
                       bp.dq_offset(t.seq, token, head), bp.dq_stride[3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass KV: keys in lanes.

struct ScratchKV {
  float* kt;      // [D][Np] scaled keys, transposed
  float* vt;      // [D][Np] values, transposed
  float* dkt;     // [D][Np] dK accumulator (unscaled), transposed
  float* dvt;     // [D][Np] dV accumulator, transposed
  float* st;      // [kQueryTile][Np] scores, then P
  float* dpt;     // [kQueryTile][Np] dP, then dS
  float* qrows;   // [kQueryTile][D] Q rows (converted dtypes or strides)
  float* dorows;  // [kQueryTile][D] dO rows
  float* ones;    // [Np]
  float* keyf;    // [Np] key index as float (ALiBi)
  int32_t* key;   // [Np] key index (mask)

  static size_t Floats(size_t dim, size_t np) {
    return 4 * dim * np + static_cast<size_t>(kQueryTile) * (2 * np + 2 * dim) + 3 * np;
  }
  void Carve(float* base, size_t dim, size_t np) {
    kt = base;
    vt = kt + dim * np;
    dkt = vt + dim * np;
    dvt = dkt + dim * np;
    st = dvt + dim * np;
    dpt = st + kQueryTile * np;
    qrows = dpt + kQueryTile * np;
    dorows = qrows + kQueryTile * dim;
    ones = dorows + kQueryTile * dim;
    keyf = ones + np;
    key = reinterpret_cast<int32_t*>(keyf + np);
  }
};

// St (scores) and dPt (dP) of a tile of query rows, lanes = keys: dPt <- dS, St <- P.
inline void GradTileKeyLanes(const AttentionProblem& p, const GradMath& g, ScratchKV& s,
                             size_t nrows, size_t np, const float* lse, const float* delta,
                             const float* pos, const KeyRange* range, float slope, bool partial) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const bool alibi = p.alibi != nullptr;
  for (size_t r = 0; r < nrows; ++r) {
    const auto row_lse = hn::Set(df, lse[r]);
    const auto row_delta = hn::Set(df, delta[r]);
    const auto row_pos = hn::Set(df, pos[r]);
    const auto lo = hn::Set(di, static_cast<int32_t>(std::max<int64_t>(range[r].lo, -1)));
    const auto hi = hn::Set(di, static_cast<int32_t>(std::max<int64_t>(range[r].hi, -1)));
    float* srow = s.st + r * np;
    float* dprow = s.dpt + r * np;
    for (size_t j = 0; j < np; j += kLanes) {
      auto x = hn::Load(df, srow + j);
      auto capped = x;
      if (g.softcap) x = capped = hn::Mul(g.cap, hn::Tanh(df, hn::Mul(x, g.inv_cap)));
      if (alibi) {
        const auto dist = hn::Abs(hn::Sub(row_pos, hn::Load(df, s.keyf + j)));
        x = hn::NegMulAdd(hn::Set(df, slope), dist, x);
      }
      if (partial) {
        const auto k = hn::Load(di, s.key + j);
        const auto hidden = hn::Or(hn::Lt(k, lo), hn::Gt(k, hi));
        x = hn::IfThenElse(hn::RebindMask(df, hidden), g.neg_inf, x);
      }
      const auto prob = FastExp2(df, hn::Mul(hn::Sub(x, row_lse), g.log2e));
      auto ds = hn::Mul(prob, hn::Sub(hn::Load(df, dprow + j), row_delta));
      if (g.softcap) {
        const auto t = hn::Mul(capped, g.inv_cap);
        ds = hn::Mul(ds, hn::NegMulAdd(t, t, hn::Set(df, 1.0f)));
      }
      hn::Store(prob, df, srow + j);
      hn::Store(ds, df, dprow + j);
    }
  }
}

template <int kD>
void RunTaskKV(const AttentionBackwardProblem& bp, const float* delta_rows, const Task& t,
               ScratchKV& s) {
  const AttentionProblem& p = bp.fwd;
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(p.dim);
  const int64_t nk = t.count;
  const size_t np = hwy::DivCeil(static_cast<size_t>(nk), kLanes) * kLanes;
  const int64_t q_len = p.q_len(t.seq), k_len = p.k_len(t.seq);
  const int64_t q_begin = p.q_begin(t.seq), k_begin = p.k_begin(t.seq);
  const int64_t delta = p.top_left ? 0 : k_len - q_len;
  const int64_t row_base = p.varlen() ? 0 : t.seq * p.seq_q;
  const int64_t j0 = t.first, j1 = t.first + nk;

  for (float* panel : {s.kt, s.vt, s.dkt, s.dvt}) std::memset(panel, 0, dim * np * sizeof(float));
  float* row = s.qrows;
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t token = k_begin + j0 + j;
    LoadRow(p.dtype, p.k, p.k_offset(t.seq, token, t.kv_head), p.k_stride[3], dim, row);
    for (size_t d = 0; d < dim; ++d) s.kt[d * np + static_cast<size_t>(j)] = p.scale * row[d];
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
  // p - wl <= j1 - 1 and p + wr >= j0.
  const int64_t i_lo = std::max<int64_t>(0, j0 - p.window_right - delta);
  const int64_t i_hi = std::min<int64_t>(q_len - 1, j1 - 1 + p.window_left - delta);
  const GradMath g(p);
  const bool direct_q = p.dtype == DType::kF32 && p.q_stride[3] == 1;
  const bool direct_do = p.dtype == DType::kF32 && bp.dout_stride[3] == 1;
  TileFeed none;
  float lse[kQueryTile], dlt[kQueryTile], pos[kQueryTile];
  KeyRange range[kQueryTile];
  for (int64_t gi = 0; gi < p.group && i_lo <= i_hi; ++gi) {
    const int64_t head = t.kv_head * p.group + gi;
    const float slope = p.alibi != nullptr ? p.alibi_slope(t.seq, head) : 0.0f;
    for (int64_t q0 = i_lo / kQueryTile * kQueryTile; q0 <= i_hi; q0 += kQueryTile) {
      const int64_t a = std::max(q0, i_lo), e = std::min(q0 + kQueryTile, i_hi + 1);
      const size_t nrows = static_cast<size_t>(e - a);
      bool full = true;
      for (size_t r = 0; r < nrows; ++r) {
        const int64_t qi = a + static_cast<int64_t>(r);
        const int64_t token = q_begin + qi;
        range[r] = VisibleKeys(p, qi + delta, k_len);
        full = full && range[r].lo <= j0 && range[r].hi >= j1 - 1;
        const float l = p.lse[p.lse_offset(t.seq, head, token)];
        lse[r] = std::isinf(l) && l < 0.0f ? 0.0f : l;
        dlt[r] = delta_rows[(row_base + token) * p.heads_q + head];
        pos[r] = static_cast<float>(qi + delta);
      }
      // Padding lanes (keys past nk) are unmasked in a full tile; they only touch their own
      // lanes of the accumulators, which are never written out.
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
      TileFeed next_q = PrefetchFeed(p.dtype, p.q, p.q_offset(t.seq, q_begin + next, head),
                                     p.q_stride[1], p.q_stride[3], dim, next_rows);
      TileFeed next_do = PrefetchFeed(p.dtype, bp.dout, bp.dout_offset(t.seq, q_begin + next, head),
                                      bp.dout_stride[1], bp.dout_stride[3], dim, next_rows);
      RowPanelProduct<kD>(qr, ldq, nrows, dim, s.kt, np, s.st, nullptr, next_q);
      RowPanelProduct<kD>(dor, ldo, nrows, dim, s.vt, np, s.dpt, nullptr, next_do);
      GradTileKeyLanes(p, g, s, nrows, np, lse, dlt, pos, range, slope, !full);
      TransposedPanelAccumulate<kD>(dor, ldo, nrows, dim, s.st, np, s.ones, s.dvt, none);
      TransposedPanelAccumulate<kD>(qr, ldq, nrows, dim, s.dpt, np, s.ones, s.dkt, none);
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

}  // namespace flash_bwd_impl

// Runs the backward: Delta pre-pass, pass Q (dQ), pass KV (dK, dV). Returns false when scratch
// could not be allocated.
bool FlashBackward(const AttentionBackwardProblem& bp, int32_t threads, bool fast) {
  using namespace flash_bwd_impl;  // NOLINT
  const AttentionProblem& p = bp.fwd;
  if (p.heads_q == 0 || p.batch == 0) return true;
  const size_t dim = static_cast<size_t>(p.dim);

  // Delta_i = sum_d dO_id * O_id per (query token, head), row-major [rows][Hq].
  const int64_t q_rows = p.varlen() ? p.seq_q : p.batch * p.seq_q;
  auto delta =
      hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(q_rows, 1) * p.heads_q));
  if (!delta) return false;
  // Rows of the token axis (dense: B * Sq, batch-major; varlen: the packed tokens, of which
  // those outside every sequence are computed but never read).
  const int64_t chunk = 64;
  ParallelFor(threads, hwy::DivCeil(q_rows, chunk), [&](int64_t task, int32_t) {
    HWY_ALIGN float o_row[flash::kMaxHeadDim];
    HWY_ALIGN float do_row[flash::kMaxHeadDim];
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

  // Pass Q tasks: the forward's partition.
  const int64_t block = flash::QueryBlock(p.group);
  std::vector<Task> q_tasks, kv_tasks;
  int64_t max_nq = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = p.q_len(b), k_len = p.k_len(b);
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      for (int64_t q0 = 0; q0 < q_len; q0 += block) {
        q_tasks.push_back(Task{b, kvh, q0, std::min(block, q_len - q0)});
        max_nq = std::max(max_nq, std::min(block, q_len - q0));
      }
      for (int64_t k0 = 0; k0 < k_len; k0 += kKeyBlock) {
        kv_tasks.push_back(Task{b, kvh, k0, std::min(kKeyBlock, k_len - k0)});
      }
    }
  }
  // Longest tasks first under causal masks (later queries, earlier keys).
  std::reverse(q_tasks.begin(), q_tasks.end());

  const size_t mp = hwy::DivCeil(static_cast<size_t>(p.group * max_nq), kLanes) * kLanes;
  const size_t np = hwy::DivCeil(static_cast<size_t>(kKeyBlock), kLanes) * kLanes;
  const size_t per_worker =
      hwy::DivCeil(std::max(ScratchQ::Floats(dim, mp), ScratchKV::Floats(dim, np)), size_t{16}) *
      16;
  const int32_t workers = std::max<int32_t>(1, threads);
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;

  auto run = [&](auto dim_tag) {
    constexpr int kD = decltype(dim_tag)::value;
    ParallelFor(workers, static_cast<int64_t>(q_tasks.size()), [&](int64_t task, int32_t w) {
      ScratchQ s;
      s.Carve(storage.get() + per_worker * static_cast<size_t>(w), dim, mp);
      RunTaskQ<kD>(bp, delta.get(), q_tasks[static_cast<size_t>(task)], s);
    });
    ParallelFor(workers, static_cast<int64_t>(kv_tasks.size()), [&](int64_t task, int32_t w) {
      ScratchKV s;
      s.Carve(storage.get() + per_worker * static_cast<size_t>(w), dim, np);
      RunTaskKV<kD>(bp, delta.get(), kv_tasks[static_cast<size_t>(task)], s);
    });
  };
  if (fast && p.dim == 64) {
    run(std::integral_constant<int, 64>());
  } else if (fast && p.dim == 128) {
    run(std::integral_constant<int, 128>());
  } else if (fast && p.dim == 256) {
    run(std::integral_constant<int, 256>());
  } else {
    run(std::integral_constant<int, 0>());
  }
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_ATTENTION_FLASH_BWD_INL_H_
