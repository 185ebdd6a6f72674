// SPDX-License-Identifier: Apache-2.0
// Decode: a few query rows per sequence over a long KV cache, SIMD body (one copy per target).
//
// What it computes: for every (sequence, query head, query row) the exact attention over the
// sequence's cached keys (masks, softcap and ALiBi as in the forward), plus the natural-log LSE.
//
// Bytes moved: decode reads every K/V byte once and does ~2 FLOPs per byte per query row, so it
// is bound by memory bandwidth when done right. Two things make that possible on a CPU:
//  - The G*Q query rows of a GQA group (G heads x Q queries) share each K/V row: a tile of
//    kKeyTile keys is read and converted once for all of them.
//  - The arithmetic per K/V element is small: with only a handful of rows the forward's
//    rows-in-lanes layout would waste most of each vector, so decode keeps channels in lanes.
//    Scores are dot products over D, computed for 4 rows x 4 keys at once (16 vector
//    accumulators) and reduced across lanes with a transposing shuffle tree; P.V broadcasts one
//    probability per (row, key) against V rows (4 rows x 4 vectors of channels in registers).
//    The online softmax then runs on the small score tile St[key][rows] with rows in lanes
//    (SoftmaxTile, shared with the forward), or, with at most 4 rows, on a packed [key][4]
//    tile where one vector holds 4 keys x 4 rows (SoftmaxNarrow).
//
// Work units are (sequence, split of split_tokens keys, block of KV heads), see decode.cc. A
// unit walks its heads one after the other and each head's split tile by tile (kKeyTile keys),
// keeping the head's running state (m, l, output accumulator) across the tiles. The cache is
// head-major, so a head's keys are consecutive rows of each page and a split is read as one
// sequential stream per tensor (token-major walks and staging copies measured slower;
// docs/decode.md). The tiles are software-pipelined: the scores of tile t + 1 are computed
// kFuseKeys keys at a time, alternating with P.V over tile t, so the K and the V stream are both
// read at a steady pace (a tile's K and then its V in bursts leaves each stream idle half the
// time). Every row is prefetched into L2 kPrefetchKeys keys ahead of its scores, across page
// boundaries too (int8 on VNNI, in whole-tile steps: V rows by P.V, two tiles ahead).
//
// K/V dtypes: f32 / bf16 / f16 / int8 rows are read in place and widened in registers. Rows that
// cannot be (int4, a head-dim stride, a head dim that is not a multiple of the vector width, or
// of 64 for the int8 VNNI path) are first copied into a staged tile. int8 / int4 rows hold codes
// of the channel-separable token-wise format (kv_cache.h): with n the channel normalizers and
// (step_j, min_j) the row's scales,
//   q.k^_j = min_j * sum_c q'_c + step_j * sum_c q'_c code_jc,   q' = q * n,
// and q' is quantized to int8 per row (sigma = max|q'| / 127, q8 = round(q' / sigma)), so the
// code dot product is an exact integer: VNNI (vpdpbusd) on targets that have it, exact f32
// arithmetic elsewhere (|partial sums| < 2^24), hence bitwise equal results on every target. The
// VNNI scores broadcast 16 key codes against 16 codes of each of 4 rows (CodeDotBlock4x4), so
// they need one block-sum step per 4 keys instead of the shuffle tree.
// V is dequantized through P: out_c = n_c * (sum_j (p_j step_j) code_jc + sum_j p_j min_j) / l,
// the weights p_j step_j formed in the softmax step and the second sum kept per row (vbias). On
// VNNI targets the first sum runs in 16-bit integers on weights rounded to 15 bits per tile
// (PvCodesVnni; the one step whose result differs between targets, within a documented bound).
//
// Files: decode_tile-inl.h (pipeline constants, tile slots and scratch, staging), decode_dot-inl.h
// (Q.K), decode_pv-inl.h (P.V, VNNI included), decode_softmax-inl.h (SoftmaxNarrow); this one
// prepares the query rows, runs a unit's pipeline (RunUnit) and the whole call (DecodeKernel).

#if defined(TESSERA_DECODE_DECODE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_DECODE_DECODE_INL_H_
#undef TESSERA_DECODE_DECODE_INL_H_
#else
#define TESSERA_DECODE_DECODE_INL_H_
#endif

#include <hwy/aligned_allocator.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/attention_problem.h"
#include "core/element.h"
#include "core/parallel.h"
#include "decode/decode.h"
#include "decode/decode_dot-inl.h"
#include "decode/decode_pv-inl.h"
#include "decode/decode_softmax-inl.h"
#include "decode/decode_tile-inl.h"
#include "decode/merge_row.h"
#include "simd/convert-inl.h"
#include "simd/online_softmax-inl.h"
#include "simd/score_mod-inl.h"
#include "simd/tile_gemm-inl.h"

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#include <immintrin.h>
#endif

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace decode_impl {

namespace hn = hwy::HWY_NAMESPACE;

// ---- Query rows, prepared once per call ---------------------------------------------------------

// The query rows of one (sequence, KV head): row r is query head (h * G + r / q_len), query
// r % q_len. Prepared once per call and read by every unit of the sequence (with 512-token splits
// a 32K context had 64, and quantizing the rows in each cost ~5% of an int8 decode).
struct QueryRows {
  float* qf;     // [Rp][Dp] scaled f32 rows, or their int8 codes as f32 (quantized K)
  int8_t* q8;    // [Rp / 4][4 * Dc] int8 codes in groups of 4 rows (GroupCodeIndex; VNNI)
  float* qa;     // [Mp] quantized: scale * sigma
  float* qb;     // [Mp] quantized: scale * sigma * sum of the codes
  float* pos;    // [Mp] query position (ALiBi)
  float* slope;  // [Mp] ALiBi slope
};

// Every (sequence, KV head)'s QueryRows in one buffer.
struct PreparedQueries {
  float* base = nullptr;
  size_t heads_kv = 0, rp = 0, dp = 0, dc = 0, mp = 0;

  static size_t Round(size_t floats) { return hwy::DivCeil(floats, kLanes) * kLanes; }
  size_t Stride() const { return Round(rp * dp) + Round(rp * dc / 4) + 4 * Round(mp); }
  size_t Floats(int64_t batch) const { return static_cast<size_t>(batch) * heads_kv * Stride(); }
  QueryRows at(int64_t b, int64_t h) const {
    float* x = base + (static_cast<size_t>(b) * heads_kv + static_cast<size_t>(h)) * Stride();
    QueryRows q;
    q.qf = x;
    x += Round(rp * dp);
    q.q8 = reinterpret_cast<int8_t*>(x);
    x += Round(rp * dc / 4);
    q.qa = x;
    q.qb = x + Round(mp);
    q.pos = x + 2 * Round(mp);
    q.slope = x + 3 * Round(mp);
    return q;
  }
};

// Fills q with sequence b's rows for KV head h (padding rows zero); `paired`: the channels in
// the order of Bf16Pairs rows (PairedChannel).
HWY_INLINE void PrepareQueries(const AttentionProblem& p, const decode::KVSource& kv, size_t dp,
                               size_t dc, size_t mp, size_t rp, bool paired, int64_t b, int64_t h,
                               const QueryRows& q) {
  const size_t dim = static_cast<size_t>(p.dim);
  const int64_t q_len = p.q_len(b), q_begin = p.q_begin(b);
  const int64_t rows = p.group * q_len;
  const int64_t delta = p.top_left ? 0 : kv.len(b) - q_len;
  const bool quant = KVDTypeIsQuantized(kv.dtype);
  const bool vnni = quant && kVnni;
  for (size_t r = 0; r < mp; ++r) q.qa[r] = q.qb[r] = q.pos[r] = q.slope[r] = 0.0f;
  std::memset(q.qf, 0, rp * dp * sizeof(float));
  if (vnni) std::memset(q.q8, 0, rp * dc);
  std::vector<float> in_order(paired ? dim : 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = h * p.group + r / q_len;
    const int64_t qi = r % q_len;
    q.pos[r] = static_cast<float>(qi + delta);
    if (p.alibi != nullptr) q.slope[r] = p.alibi_slope(b, head);
    float* row = q.qf + static_cast<size_t>(r) * dp;
    LoadRow(p.dtype, p.q, p.q_offset(b, q_begin + qi, head), p.q_stride[3], dim, row);
    if (!quant && paired) {
      std::copy(row, row + dim, in_order.begin());
      for (size_t c = 0; c < dim; ++c) row[PairedChannel(c)] = p.scale * in_order[c];
      continue;
    }
    if (!quant) {
      for (size_t c = 0; c < dim; ++c) row[c] = p.scale * row[c];
      continue;
    }
    // q' = q * n, quantized to int8 per row; the scale is applied after the integer dot.
    const float* norm = kv.k_norm + h * kv.dim;
    float amax = 0.0f;
    bool finite = true;
    for (size_t c = 0; c < dim; ++c) {
      row[c] *= norm[c];
      amax = std::max(amax, std::fabs(row[c]));
      // Tested per element: std::max skips a NaN, and NaN / sigma must never reach the int8 cast.
      finite = finite && std::isfinite(row[c]);
    }
    // A NaN or inf query (or channel normalizer) poisons the row, as it would the float path.
    const float sigma = amax / 127.0f;
    float code_sum = 0.0f;
    for (size_t c = 0; c < dim; ++c) {
      const float code = sigma > 0.0f && finite ? std::nearbyint(row[c] / sigma) : 0.0f;
      row[c] = code;
#if HWY_TARGET == HWY_AVX3_DL
      // |code| <= 127 but for a subnormal sigma, whose rounding can take the largest code past
      // it (an int8 cast of such a float is undefined); clamped for the integer dot only.
      if (vnni) {
        q.q8[static_cast<size_t>(r / 4) * 4 * dc + GroupCodeIndex(static_cast<size_t>(r % 4), c)] =
            static_cast<int8_t>(std::min(std::max(code, -127.0f), 127.0f));
      }
#endif
      code_sum += code;
    }
    const float poison = finite ? 1.0f : std::numeric_limits<float>::quiet_NaN();
    q.qa[r] = p.scale * sigma * poison;
    q.qb[r] = p.scale * sigma * code_sum * poison;
  }
}

// ---- One unit ----------------------------------------------------------------------------------

struct UnitShape {
  size_t dim, dp, dc, mp, rp;
  size_t row_bytes;  // bytes per staged row: Dp elements, or Dc codes
  bool in_place;     // rows are read where they are (else staged)
  bool narrow;       // at most 4 rows: St is [key][4] (mp = 4), SoftmaxNarrow
};

// Fills slot t with head h's keys [a, a + nkeys): points krow / vrow at the rows (zero rows up
// to the next multiple of 4), staging them first where they cannot be read in place, and
// gathers the quantized rows' scales.
HWY_INLINE void GatherTile(const decode::KVSource& kv, const UnitShape& sh, int64_t b, int64_t a,
                           size_t nkeys, int64_t h, const uint8_t* zero, TileSlot& t) {
  const bool quant = KVDTypeIsQuantized(kv.dtype);
  const size_t elem = kv.dtype == KVDType::kF32 ? 4 : 2;
  t.a = a;
  t.nkeys = nkeys;
  t.nk4 = hwy::DivCeil(nkeys, size_t{4}) * 4;
  for (size_t j = nkeys; j < t.nk4; ++j) {
    t.krow[j] = t.vrow[j] = zero;
    t.kstep[j] = t.kmin[j] = t.vstep[j] = t.vmin[j] = 0.0f;
  }
  // Run by run of keys that share a page: one page lookup per run, then fixed strides.
  for (size_t j = 0; j < nkeys;) {
    const int64_t key = a + static_cast<int64_t>(j);
    const decode::KVSource::Row row = kv.locate(b, key);
    const size_t run =
        static_cast<size_t>(std::min<int64_t>(kv.same_page(key), static_cast<int64_t>(nkeys - j)));
    const uint8_t* krow = kv.k + kv.k_offset(row, h);
    const uint8_t* vrow = kv.v + kv.v_offset(row, h);
    if (quant) {
      // (step, min) pairs to separate arrays, a vector of rows at a time.
      const float* ks = kv.k_scales + 2 * kv.scale_index(row, h);
      const float* vs = kv.v_scales + 2 * kv.scale_index(row, h);
      size_t i = 0;
#if HWY_TARGET != HWY_SCALAR
      const DF df;
      for (; i + kLanes <= run; i += kLanes) {
        VF step, min;
        hn::LoadInterleaved2(df, ks + 2 * i, step, min);
        hn::StoreU(step, df, t.kstep + j + i);
        hn::StoreU(min, df, t.kmin + j + i);
        hn::LoadInterleaved2(df, vs + 2 * i, step, min);
        hn::StoreU(step, df, t.vstep + j + i);
        hn::StoreU(min, df, t.vmin + j + i);
      }
#endif
      for (; i < run; ++i) {
        t.kstep[j + i] = ks[2 * i];
        t.kmin[j + i] = ks[2 * i + 1];
        t.vstep[j + i] = vs[2 * i];
        t.vmin[j + i] = vs[2 * i + 1];
      }
    }
    if (sh.in_place) {
      for (size_t i = 0; i < run; ++i) {
        t.krow[j + i] = krow + static_cast<int64_t>(i) * kv.k_token_stride;
        t.vrow[j + i] = vrow + static_cast<int64_t>(i) * kv.v_token_stride;
      }
      j += run;
      continue;
    }
    for (size_t i = 0; i < run; ++i, ++j) {
      const uint8_t* kr = krow + static_cast<int64_t>(i) * kv.k_token_stride;
      const uint8_t* vr = vrow + static_cast<int64_t>(i) * kv.v_token_stride;
      uint8_t* kdst = t.kt + j * sh.row_bytes;
      uint8_t* vdst = t.vt + j * sh.row_bytes;
      if (quant) {
        StageCodeRow(kv.dtype, kr, sh.dim, sh.row_bytes, kdst);
        StageCodeRow(kv.dtype, vr, sh.dim, sh.row_bytes, vdst);
      } else {
        StageRow(kr, kv.k_dim_stride, sh.dim, elem, sh.row_bytes, kdst);
        StageRow(vr, kv.v_dim_stride, sh.dim, elem, sh.row_bytes, vdst);
      }
      t.krow[j] = kdst;
      t.vrow[j] = vdst;
    }
  }
}

// DecodeStats: the logits of a scored tile (before softmax_step turns them into probabilities),
// dequantized for quantized K as softmax_step does, into each row's record (StatsRecord).
HWY_INLINE void RecordLogits(const decode::StatsRecord& rec, int64_t b, int64_t h, int64_t group,
                             int64_t q_len, int64_t rows, size_t mp, bool quant, const QueryRows& q,
                             const TileSlot& t) {
  auto row_of = [&](int64_t r) {
    const int64_t head = h * group + r / q_len, qi = r % q_len;
    return rec.logits + b * rec.logit_stride[0] + head * rec.logit_stride[1] +
           qi * rec.logit_stride[2] + t.a;
  };
  auto logit = [&](int64_t r, size_t j) {
    const float x = t.st[j * mp + static_cast<size_t>(r)];
    return quant ? q.qa[r] * t.kstep[j] * x + q.qb[r] * t.kmin[j] : x;
  };
  size_t vector_end = 0;
#if HWY_TARGET != HWY_SCALAR
  // A [key][4] tile (at most 4 rows): whole vectors of keys, de-interleaved once for all rows.
  if (mp == 4 && kLanes >= 4) {
    const DF df;
    float* dst[4];
    for (int64_t r = 0; r < rows; ++r) dst[r] = row_of(r);
    for (; vector_end + kLanes <= t.nkeys; vector_end += kLanes) {
      const size_t j = vector_end;
      VF v[4];
      hn::LoadInterleaved4(df, t.st + j * 4, v[0], v[1], v[2], v[3]);
      for (int64_t r = 0; r < rows; ++r) {
        VF x = v[r];
        if (quant) {
          x = hn::MulAdd(hn::Mul(hn::Set(df, q.qa[r]), hn::LoadU(df, t.kstep + j)), x,
                         hn::Mul(hn::Set(df, q.qb[r]), hn::LoadU(df, t.kmin + j)));
        }
        hn::StoreU(x, df, dst[r] + j);
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = row_of(r);
    for (size_t j = vector_end; j < t.nkeys; ++j) dst[j] = logit(r, j);
  }
}

// T: the element type of the rows (float, hwy::float16_t, hwy::bfloat16_t, or uint8_t codes).
template <size_t kDp, class T>
void RunUnit(const AttentionProblem& p, const decode::KVSource& kv, const decode::DecodeUnit& u,
             const UnitShape& sh, const PreparedQueries& queries, Scratch& s, float* partial_out,
             double* partial_lse, const decode::StatsRecord* rec) {
  const DF df;
  const size_t dim = sh.dim, dp = kDp != 0 ? kDp : sh.dp, dc = sh.dc, mp = sh.mp, rp = sh.rp;
  const int64_t b = u.seq;
  const int64_t group = p.group;
  const int64_t q_len = p.q_len(b), k_len = kv.len(b), q_begin = p.q_begin(b);
  const int64_t rows = group * q_len;
  const int64_t delta = p.top_left ? 0 : k_len - q_len;
  const int64_t heads = u.head_end - u.head_begin;
  const bool quant = KVDTypeIsQuantized(kv.dtype);
  // VNNI arithmetic on code rows (quantized caches): a compile-time constant, so the f32 / f16 /
  // bf16 instantiations do not carry that code.
  constexpr bool vnni = std::is_same<T, uint8_t>::value && kVnni;
  // Quantized V on VNNI: P.V in 16-bit integers over the code rows (PvCodesVnni).
  const bool vnni_pv = vnni && sh.row_bytes == dc;
  (void)vnni;
  (void)vnni_pv;
  (void)dc;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // Per head: the running state, and each row's visible keys within the unit.
  int64_t union_lo = u.key_end, union_hi = u.key_begin - 1, max_lo = u.key_begin,
          min_hi = u.key_end - 1;
  for (int64_t hh = 0; hh < heads; ++hh) {
    const size_t so = static_cast<size_t>(hh) * mp;
    for (size_t r = 0; r < mp; ++r) {
      s.m[so + r] = kNegInf;
      s.l[so + r] = 0.0f;
      s.lo[so + r] = 1;
      s.hi[so + r] = 0;
      s.vbias[so + r] = 0.0f;
    }
    std::memset(s.acc + static_cast<size_t>(hh) * rp * dp, 0, rp * dp * sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
      auto [lo, hi] = p.visible_keys(r % q_len + delta, k_len);
      lo = std::max(lo, u.key_begin);
      hi = std::min(hi, u.key_end - 1);
      s.lo[so + r] = static_cast<int32_t>(std::min(lo, u.key_end));
      s.hi[so + r] = static_cast<int32_t>(std::max(hi, u.key_begin - 1));
      max_lo = std::max(max_lo, lo);
      min_hi = std::min(min_hi, hi);
      if (lo <= hi) {
        union_lo = std::min(union_lo, lo);
        union_hi = std::max(union_hi, hi);
      }
    }
  }

  if (union_lo <= union_hi) {
    const size_t row_groups = hwy::DivCeil(static_cast<size_t>(rows), size_t{4});
    const int64_t first_tile =
        u.key_begin + (union_lo - u.key_begin) / decode::kKeyTile * decode::kKeyTile;
    // Bytes of a row in the cache, prefetched whole; 0: the rows are strided, not prefetched.
    const int64_t src_row_bytes =
        kv.k_dim_stride == 1 && kv.v_dim_stride == 1 ? KVRowBytes(kv.dtype, kv.dim) : 0;
    // Head by head: a head's keys are consecutive rows of each (head-major) page, so the tiles
    // of one head are read as two sequential streams, K and V.
    for (int64_t hh = 0; hh < heads; ++hh) {
      const int64_t h = u.head_begin + hh;
      const size_t so = static_cast<size_t>(hh) * mp;
      const QueryRows q = queries.at(b, h);
      const float* qf = q.qf;
#if HWY_TARGET == HWY_AVX3_DL
      const int8_t* q8 = q.q8;
#endif
      float* acc = s.acc + static_cast<size_t>(hh) * rp * dp;

      // The tile of keys [c0, c0 + kKeyTile) clipped to the visible union, gathered into t.
      auto gather = [&](int64_t c0, TileSlot& t) {
        const int64_t a = std::max(c0, union_lo);
        const int64_t e = std::min({c0 + decode::kKeyTile, u.key_end, union_hi + 1});
        GatherTile(kv, sh, b, a, static_cast<size_t>(e - a), h, s.zero, t);
        t.full = max_lo <= a && min_hi >= e - 1;
      };
      // Code rows on VNNI step whole tiles, so the score loop's prefetches all came in the scores'
      // half. Instead P.V over a full tile t prefetches the V rows 2 * kPrefetchKeys keys on (both
      // tiles on t's page), spread over its key pairs, and the next tile's scores only K rows
      // (int8 32K: 2.82 -> 2.54 ms on 2 threads, 5.38 -> 4.76 ms at 256K on 1; alike in L2).
      auto pv_prefetches_v = [&](const TileSlot& t) {
        return vnni_pv && sh.in_place && kDp != 0 && src_row_bytes == static_cast<int64_t>(dc) &&
               kv.v_token_stride == static_cast<int64_t>(dc) && t.nkeys == kTile &&
               kv.same_page(t.a) > 3 * kPrefetchKeys && t.a + 3 * kPrefetchKeys <= k_len;
      };
      // Scores St[j][r] of t's 4-key blocks [j_begin, j_end), 4 keys x 4 rows at a time;
      // `alongside`: the tile whose P.V runs in the same steps, if any.
      auto score = [&](const TileSlot& t, size_t j_begin, size_t j_end, const TileSlot* alongside) {
        const bool skip_v = alongside != nullptr && pv_prefetches_v(*alongside);
        for (size_t g = 0; g < row_groups; ++g) {
          for (size_t j0 = j_begin; j0 < j_end; j0 += 4) {
            // Prefetch into L2 the K and V rows (and quantized scales) of the block's keys plus
            // kPrefetchKeys, a few rows per block (a burst would fill the miss queues). Written
            // out here: in a lambda of its own GCC 12 dropped the call (the prefetches count as
            // free of side effects).
            for (size_t j = j0; g == 0 && src_row_bytes > 0 && j < std::min(j0 + 4, t.nkeys); ++j) {
              const int64_t key = t.a + static_cast<int64_t>(j) + kPrefetchKeys;
              if (key >= k_len) break;
              const char* kr;
              const char* vr;
              if (sh.in_place && kv.same_page(key - kPrefetchKeys) > kPrefetchKeys) {
                // Same page: kPrefetchKeys rows on from the row in the tile.
                kr = reinterpret_cast<const char*>(t.krow[j]) + kPrefetchKeys * kv.k_token_stride;
                vr = reinterpret_cast<const char*>(t.vrow[j]) + kPrefetchKeys * kv.v_token_stride;
              } else {
                const decode::KVSource::Row row = kv.locate(b, key);
                kr = reinterpret_cast<const char*>(kv.k + kv.k_offset(row, h));
                vr = reinterpret_cast<const char*>(kv.v + kv.v_offset(row, h));
              }
              // Unrolled where the row size is known at compile time, one prefetch instruction
              // per line of a row: with a loop over the lines, decode from memory ran up to 30%
              // slower in some builds than in others of the same code (docs/decode.md).
              constexpr int64_t kRowBytes = static_cast<int64_t>(kDp * sizeof(T));
              // (K only as a branch of its own: one loop with `if (!skip_v)` around V's prefetch
              // measured int8 4-6% slower from memory.)
              if (kDp != 0 && src_row_bytes == kRowBytes && skip_v) {
#pragma GCC unroll 16
                for (int64_t off = 0; off < kRowBytes; off += 64) {
                  __builtin_prefetch(kr + off, 0, 2);
                }
              } else if (kDp != 0 && src_row_bytes == kRowBytes) {
#pragma GCC unroll 16
                for (int64_t off = 0; off < kRowBytes; off += 64) {
                  __builtin_prefetch(kr + off, 0, 2);
                  __builtin_prefetch(vr + off, 0, 2);
                }
              } else {
                for (int64_t off = 0; off < src_row_bytes; off += 64) {
                  __builtin_prefetch(kr + off, 0, 2);
                  __builtin_prefetch(vr + off, 0, 2);
                }
              }
              if (quant && (j == j0 || key % 8 == 0)) {
                const int64_t scale = 2 * kv.scale_index(kv.locate(b, key), h);
                __builtin_prefetch(kv.k_scales + scale, 0, 2);
                __builtin_prefetch(kv.v_scales + scale, 0, 2);
              }
            }
#if HWY_TARGET == HWY_AVX3_DL
            if (vnni) {
              CodeDotBlock4x4<kDp>(q8 + 4 * g * dc, dc, t.krow + j0, t.st + j0 * mp + 4 * g, mp);
              continue;
            }
#endif
            DotBlock4x4<kDp, T>(qf + 4 * g * dp, dp, t.krow + j0, t.st + j0 * mp + 4 * g, mp,
                                s.red);
          }
        }
      };
      // The online-softmax step on t's scores: probabilities in t.st, the accumulator's rescale
      // factor in s.alpha.
      auto softmax_step = [&](const TileSlot& t) {
        HeadState hs{t.st,  s.m + so, s.l + so,  s.alpha,  s.tile_max,
                     q.pos, q.slope,  s.lo + so, s.hi + so};
#if HWY_TARGET != HWY_SCALAR
        if (sh.narrow) {
          SoftmaxNarrow(p, hs, q.qa, q.qb, quant ? t.kstep : nullptr, quant ? t.kmin : nullptr,
                        quant ? t.vstep : nullptr, quant ? t.vmin : nullptr, s.vbias + so, t.nkeys,
                        t.a, !t.full, s.red, vnni_pv ? t.wq : nullptr,
                        vnni_pv ? t.wscale : nullptr);
          return;
        }
#endif
        if (quant) {
          // Logit = scale * (sigma * step_j * dot + sigma * sum(q8) * min_j).
          for (size_t i = 0; i < mp; i += kLanes) {
            const VF qa = hn::Load(df, q.qa + i), qb = hn::Load(df, q.qb + i);
            for (size_t j = 0; j < t.nkeys; ++j) {
              const VF x = hn::Load(df, t.st + j * mp + i);
              hn::Store(hn::MulAdd(hn::Mul(qa, hn::Set(df, t.kstep[j])), x,
                                   hn::Mul(qb, hn::Set(df, t.kmin[j]))),
                        df, t.st + j * mp + i);
            }
          }
        }
        // Without modifiers or a mask SoftmaxTile takes the tile max from tile_max.
        if (t.full && p.softcap <= 0.0f && p.alibi == nullptr) {
          for (size_t i = 0; i < mp; i += kLanes) {
            VF mx = hn::Set(df, kNegInf);
            for (size_t j = 0; j < t.nkeys; ++j) {
              mx = hn::Max(mx, hn::Load(df, t.st + j * mp + i));
            }
            hn::Store(mx, df, s.tile_max + i);
          }
        }
        SoftmaxTile(p, hs, t.nkeys, mp, t.a, !t.full);
        if (quant) {
          // Quantized V: P.V sums the codes weighted by p_j * step_j; sum_j p_j * min_j is the
          // row offset (rescaled like the accumulator).
          for (size_t i = 0; i < mp; i += kLanes) {
            VF bias = hn::Mul(hn::Load(df, s.alpha + i), hn::Load(df, s.vbias + so + i));
            for (size_t j = 0; j < t.nkeys; ++j) {
              const VF pj = hn::Load(df, t.st + j * mp + i);
              bias = hn::MulAdd(pj, hn::Set(df, t.vmin[j]), bias);
              hn::Store(hn::Mul(pj, hn::Set(df, t.vstep[j])), df, t.st + j * mp + i);
            }
            hn::Store(bias, df, s.vbias + so + i);
          }
        }
      };
      auto softmax = [&](TileSlot& t) {
        if (rec != nullptr) RecordLogits(*rec, b, h, group, q_len, rows, mp, quant, q, t);
        softmax_step(t);
#if HWY_TARGET == HWY_AVX3_DL
        if (vnni_pv && !sh.narrow) PackWeights(t, mp);
#endif
      };
      // P.V over t's keys [j_begin, j_end); the first block also rescales the accumulator.
      auto accumulate = [&](const TileSlot& t, size_t j_begin, size_t j_end) {
#if HWY_TARGET == HWY_AVX3_DL
        if (vnni_pv) {
          // Key pairs (j_begin is even; a last odd key pairs with a zero-weight padding key);
          // the tile's integer sums go to the f32 accumulator after its last keys.
          const size_t pairs = (std::min(j_end + 1, t.nk4) - j_begin) / 2;
          const bool last = j_end == t.nkeys;
          // Rows of dp == dc floats: the last call flushes the sums itself.
          const CodeSumsFlush flush{acc, s.alpha, t.wscale};
          PvCodesVnni(t.vrow + j_begin, pairs, t.wq + j_begin / 2 * mp, mp, row_groups, s.iacc, dc,
                      j_begin == 0, last && dp == dc ? &flush : nullptr,
                      pv_prefetches_v(t) ? 2 * kPrefetchKeys * kv.v_token_stride : 0);
          if (last && dp != dc) FlushCodeSums(s.iacc, dc, s.alpha, t.wscale, rows, acc, dp);
          return;
        }
#endif
        const float* pt = t.st + j_begin * mp;
        if (j_begin == 0) {
          AccumulatePvHead<kDp, true, T>(rows, t.vrow, j_end, pt, mp, s.alpha, acc, dp);
        } else {
          AccumulatePvHead<kDp, false, T>(rows, t.vrow + j_begin, j_end - j_begin, pt, mp, s.alpha,
                                          acc, dp);
        }
      };

      // Software pipeline over the tiles: the scores of tile t + 1 are computed in blocks of
      // kFuseKeys keys alternating with P.V over the same keys of tile t, so the K and V
      // streams are read side by side at a steady pace. Reading a tile's K and then its V in
      // bursts left each stream idle half the time, and the hardware prefetcher only runs a
      // short distance ahead of a stream in use (measured: 32K f16, ~30% slower).
      TileSlot* cur = &s.tile[0];
      TileSlot* next = &s.tile[1];
      gather(first_tile, *cur);
      score(*cur, 0, cur->nk4, nullptr);
      softmax(*cur);
      for (int64_t c0 = first_tile;; c0 += decode::kKeyTile) {
        const bool more = c0 + decode::kKeyTile <= union_hi;
        if (more) gather(c0 + decode::kKeyTile, *next);
        const size_t next4 = more ? next->nk4 : 0;
        // Code rows on VNNI step whole tiles: one PvCodesVnni call per tile keeps its integer sums
        // in registers and flushes them itself (in L2: 66.5 -> 62.7 cycles per key; 32K tokens on
        // 1 thread 5.26 -> 4.99 ms, on 2 threads alike).
        constexpr size_t kFuse = vnni ? kTile : kFuseKeys;
        for (size_t j = 0; j < std::max(cur->nkeys, next4); j += kFuse) {
          if (j < next4) score(*next, j, std::min(j + kFuse, next4), cur);
          if (j < cur->nkeys) accumulate(*cur, j, std::min(j + kFuse, cur->nkeys));
        }
        if (!more) break;
        softmax(*next);
        std::swap(cur, next);
      }
    }
  }

  // Normalize; rows with no visible key get O = 0 and LSE = -inf.
  for (int64_t hh = 0; hh < heads; ++hh) {
    const int64_t h = u.head_begin + hh;
    const size_t so = static_cast<size_t>(hh) * mp;
    const float* acc = s.acc + static_cast<size_t>(hh) * rp * dp;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t head = h * group + r / q_len;
      const int64_t qi = r % q_len;
      const float l = s.l[so + r];
      // l is 0 only for a row with no visible key; a NaN l (NaN inputs) must stay NaN.
      const bool none_visible = l <= 0.0f;
      const float inv = none_visible ? 0.0f : 1.0f / l;
      const float lse = none_visible ? kNegInf : s.m[so + r] + std::log(l);
      const float* src = acc + static_cast<size_t>(r) * dp;
      float* row = s.row;
      if (quant) {
        const float* norm = kv.v_norm + h * kv.dim;
        const float bias = s.vbias[so + r];
        for (size_t c = 0; c < dim; ++c) row[c] = (src[c] + bias) * inv * norm[c];
      } else if (std::is_same<T, Bf16Pairs>::value) {
        for (size_t c = 0; c < dim; ++c) row[c] = src[PairedChannel(c)] * inv;
      } else {
        for (size_t c = 0; c < dim; ++c) row[c] = src[c] * inv;
      }
      if (partial_out != nullptr) {
        // Partial slot layout [Hq][Q][D] and [Hq][Q].
        const int64_t idx = head * q_len + qi;
        std::memcpy(partial_out + idx * static_cast<int64_t>(dim), row, dim * sizeof(float));
        // In double: the merge weights are differences of LSEs, which f32 would round by
        // ~1e-3 near |LSE| = 2e4.
        partial_lse[idx] = none_visible ? -std::numeric_limits<double>::infinity()
                                        : double(s.m[so + r]) + std::log(double(l));
        continue;
      }
      const int64_t token = q_begin + qi;
      StoreStridedScaled(p.dtype, row, 1, dim, 1.0f, p.out, p.out_offset(b, token, head),
                         p.out_stride[3]);
      if (p.lse != nullptr) p.lse[p.lse_offset(b, head, token)] = lse;
    }
  }
}

}  // namespace decode_impl

// Merge: one task per (multi-split sequence, query head), splits in ascending order (as
// MergeStates).
void MergeSplits(const AttentionProblem& p, const internal::DecodeSchedule& sched, size_t dim,
                 size_t slot_rows, const float* partial_out, const double* partial_lse) {
  const int32_t workers = sched.threads;
  std::vector<int64_t> multi;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (sched.first_slot[static_cast<size_t>(b)] >= 0) multi.push_back(b);
  }
  const int64_t merge_tasks = static_cast<int64_t>(multi.size()) * p.heads_q;
  ParallelFor(workers, merge_tasks, [&](int64_t task, int32_t) {
    const int64_t b = multi[static_cast<size_t>(task / p.heads_q)];
    const int64_t head = task % p.heads_q;
    const int64_t nsplit = sched.splits[static_cast<size_t>(b)];
    const size_t first = static_cast<size_t>(sched.first_slot[static_cast<size_t>(b)]);
    const int64_t q_len = p.q_len(b);
    std::vector<float> acc(dim);
    std::vector<double> lse_r(static_cast<size_t>(nsplit));
    for (int64_t qi = 0; qi < q_len; ++qi) {
      const size_t idx = static_cast<size_t>(head * q_len + qi);
      for (int64_t r = 0; r < nsplit; ++r) {
        lse_r[static_cast<size_t>(r)] =
            partial_lse[(first + static_cast<size_t>(r)) * slot_rows + idx];
      }
      const float lse = MergeStateRow(
          nsplit, lse_r.data(), dim,
          [&](int64_t r, float*) {
            return static_cast<const float*>(
                partial_out + ((first + static_cast<size_t>(r)) * slot_rows + idx) * dim);
          },
          nullptr, acc.data());
      const int64_t token = p.q_begin(b) + qi;
      StoreStridedScaled(p.dtype, acc.data(), 1, dim, 1.0f, p.out, p.out_offset(b, token, head),
                         p.out_stride[3]);
      if (p.lse != nullptr) p.lse[p.lse_offset(b, head, token)] = lse;
    }
  });
}

// DecodeStats after the merge: p = exp(logit' - lse) with logit' the recorded logit after softcap
// and ALiBi, 0 for a key the row does not see; probs written, and the sum over the group's rows
// (heads, then queries, in order) added to accumulated. One task per (sequence, KV head), keys in
// lanes, the same score modifiers as the kernel (simd/score_mod-inl.h). A decode row's visible
// keys are one interval (causal / window_left), so no lane needs a mask.
void FinishStats(const AttentionProblem& p, const decode::KVSource& kv,
                 const decode::StatsRecord& rec, int32_t workers) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  int64_t max_len = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_len = std::max(max_len, kv.len(b));
  // Per worker: the key sums and a row of probabilities, allocated once per call (per task, the
  // page faults of fresh buffers cost more than the pass).
  const size_t per_worker = 2 * hwy::DivCeil(static_cast<size_t>(max_len), lanes) * lanes;
  auto scratch = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!scratch) throw std::bad_alloc();
  ParallelFor(workers, p.batch * p.heads_kv, [&](int64_t task, int32_t worker) {
    const int64_t b = task / p.heads_kv, hkv = task % p.heads_kv;
    const int64_t len = kv.len(b), q_len = p.q_len(b);
    if (len == 0) return;
    const size_t padded = hwy::DivCeil(static_cast<size_t>(len), lanes) * lanes;
    float* const sums = scratch.get() + per_worker * static_cast<size_t>(worker);
    float* const row = sums + per_worker / 2;
    std::fill(sums, sums + padded, 0.0f);
    const VF cap = hn::Set(df, p.softcap);
    const VF inv_cap = hn::Set(df, p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f);
    // exp(x - lse) = 2^(x log2(e) - lse log2(e)), through the kernels' exp2.
    constexpr float kLog2e = 1.44269504088896341f;
    const VF log2e = hn::Set(df, kLog2e);
    const int64_t delta = p.top_left ? 0 : len - q_len;
    // Copied out of p and rec: the loops store floats, which may alias p's float members.
    const bool softcap = p.softcap > 0.0f, alibi = p.alibi != nullptr;
    const bool accumulate = rec.accumulated != nullptr;
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t head = hkv * p.group + g;
      const VF slope = hn::Set(df, p.alibi != nullptr ? p.alibi_slope(b, head) : 0.0f);
      for (int64_t qi = 0; qi < q_len; ++qi) {
        const float* logits = rec.logits + b * rec.logit_stride[0] + head * rec.logit_stride[1] +
                              qi * rec.logit_stride[2];
        const float lse = p.lse[p.lse_offset(b, head, p.q_begin(b) + qi)];
        const int64_t pos = qi + delta;
        const AttentionProblem::KeyRange keys = p.visible_keys(pos, len);
        const VF lse2 = hn::Set(df, lse * kLog2e), pos_v = hn::Set(df, static_cast<float>(pos));
        // Probabilities go straight to probs when its keys are contiguous (over the logits
        // recorded there), else through `row`.
        float* const probs = rec.probs == nullptr
                                 ? nullptr
                                 : rec.probs + b * rec.probs_stride[0] +
                                       head * rec.probs_stride[1] + qi * rec.probs_stride[2];
        const bool direct = probs != nullptr && rec.probs_stride[3] == 1;
        // Without probs (accumulated only) nothing is stored per row.
        float* const dst = direct ? probs : probs != nullptr ? row : nullptr;
        // The visible keys are one interval [begin, end): hidden keys get 0 without a logit read
        // (their logits were never recorded), visible ones exp2 in whole vectors plus one tail.
        const int64_t begin = std::min(keys.lo, len);
        const int64_t end = keys.lo <= keys.hi ? keys.hi + 1 : begin;
        if (dst != nullptr) {
          std::fill(dst, dst + begin, 0.0f);
          std::fill(dst + end, dst + len, 0.0f);
        }
        auto prob_of = [&](VF x, int64_t j) {
          if (softcap) x = SoftcapScore(df, x, cap, inv_cap);
          if (alibi) {
            x = AlibiScore(x, slope, pos_v, hn::Iota(df, static_cast<float>(j)));
          }
          return FastExp2(df, hn::MulSub(x, log2e, lse2));
        };
        int64_t j = begin;
        for (; j + static_cast<int64_t>(lanes) <= end; j += static_cast<int64_t>(lanes)) {
          const VF prob = prob_of(hn::LoadU(df, logits + j), j);
          if (dst != nullptr) hn::StoreU(prob, df, dst + j);
          if (accumulate) hn::StoreU(hn::Add(hn::LoadU(df, sums + j), prob), df, sums + j);
        }
        if (j < end) {
          const size_t n = static_cast<size_t>(end - j);
          HWY_ALIGN float tail[hn::MaxLanes(df)] = {};
          std::copy(logits + j, logits + end, tail);
          hn::Store(prob_of(hn::Load(df, tail), j), df, tail);
          if (dst != nullptr) std::copy(tail, tail + n, dst + j);
          if (rec.accumulated != nullptr) {
            for (size_t i = 0; i < n; ++i) sums[static_cast<size_t>(j) + i] += tail[i];
          }
        }
        if (probs != nullptr && !direct) {
          const int64_t stride = rec.probs_stride[3];
          for (int64_t k = 0; k < len; ++k) probs[k * stride] = row[k];
        }
      }
    }
    if (rec.accumulated != nullptr) {
      float* acc = rec.accumulated + b * rec.acc_stride[0] + hkv * rec.acc_stride[1];
      for (int64_t j = 0; j < len; ++j) acc[j * rec.acc_stride[2]] += sums[j];
    }
  });
}

// Scratch and partial-state buffers, kept per calling thread and reused by its next calls:
// allocating and faulting in the partial states on every call cost ~0.3 ms of a 32K decode
// (then 64 splits x 32 heads x 128 floats). Buffers over kMaxKeptBytes are freed after the call.
struct Workspace {
  static constexpr size_t kMaxKeptBytes = size_t{64} << 20;
  hwy::AlignedFreeUniquePtr<float[]> scratch, partial_out, queries;
  hwy::AlignedFreeUniquePtr<double[]> partial_lse;
  size_t scratch_n = 0, out_n = 0, lse_n = 0, queries_n = 0;

  template <class V>
  static bool Grow(hwy::AlignedFreeUniquePtr<V[]>& buf, size_t& have, size_t need) {
    if (need <= have && buf) return true;
    buf = hwy::AllocateAligned<V>(std::max<size_t>(need, 1));
    have = buf ? std::max<size_t>(need, 1) : 0;
    return static_cast<bool>(buf);
  }
  bool Reserve(size_t scratch_floats, size_t out_floats, size_t lse_doubles, size_t query_floats) {
    return Grow(scratch, scratch_n, scratch_floats) && Grow(partial_out, out_n, out_floats) &&
           Grow(partial_lse, lse_n, lse_doubles) && Grow(queries, queries_n, query_floats);
  }
  // Drops what is too large to keep between calls.
  void Trim() {
    if (scratch_n * sizeof(float) > kMaxKeptBytes) scratch.reset(), scratch_n = 0;
    if (out_n * sizeof(float) > kMaxKeptBytes) partial_out.reset(), out_n = 0;
    if (lse_n * sizeof(double) > kMaxKeptBytes) partial_lse.reset(), lse_n = 0;
    if (queries_n * sizeof(float) > kMaxKeptBytes) queries.reset(), queries_n = 0;
  }
};

inline Workspace& CallerWorkspace() {
  static thread_local Workspace ws;
  return ws;
}

// Runs every unit of the schedule, then merges the partial states of multi-split sequences in
// split order. Returns false when scratch could not be allocated.
bool DecodeKernel(const AttentionProblem& p, const decode::KVSource& kv,
                  const internal::DecodeSchedule& sched, bool fast,
                  const decode::StatsRecord* stats) {
  using namespace decode_impl;  // NOLINT
  if (sched.units.empty()) return true;
  const size_t dim = static_cast<size_t>(p.dim);
  const size_t dp = hwy::DivCeil(dim, kLanes) * kLanes;
  const size_t dc = hwy::DivCeil(dim, kCodeBlock) * kCodeBlock;
  int64_t max_q = 0, max_heads = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_q = std::max(max_q, p.q_len(b));
  for (const auto& u : sched.units) max_heads = std::max(max_heads, u.head_end - u.head_begin);
  if (max_q == 0) return true;
  const size_t rows = static_cast<size_t>(p.group * max_q);
  const size_t rp = hwy::DivCeil(rows, size_t{4}) * 4;
  // At most 4 rows per head (e.g. GQA 4, one query): scores packed [key][4] (SoftmaxNarrow).
  const bool narrow = rp == 4 && kLanes >= 4 && kLanes % 4 == 0;
  const size_t mp = narrow ? 4 : hwy::DivCeil(rp, kLanes) * kLanes;
  const size_t heads = static_cast<size_t>(max_heads);
  const bool quant = KVDTypeIsQuantized(kv.dtype);
  const size_t elem = kv.dtype == KVDType::kF32 ? 4 : 2;
  // In place: unit channel stride and whole vectors (whole 64-byte code blocks for VNNI).
  const bool in_place = quant ? (kv.dtype == KVDType::kInt8 && dim == dc && dim == dp)
                              : (kv.k_dim_stride == 1 && kv.v_dim_stride == 1 && dim == dp);
  const UnitShape shape{dim, dp, dc, mp, rp, quant ? dc : dp * elem, in_place, narrow};
  const int32_t workers = sched.threads;
  const size_t per_worker =
      hwy::DivCeil(Scratch::Floats(heads, rp, dp, dc, mp, shape.row_bytes), size_t{16}) * 16;
  // Partial states: [slot][Hq][Q][D] and [slot][Hq][Q]; every row of every slot is written by
  // the unit of its (split, head), so the buffers need no clearing.
  const size_t slot_rows = static_cast<size_t>(p.heads_q * max_q);
  Workspace& ws = CallerWorkspace();
  struct TrimOnExit {
    Workspace& ws;
    ~TrimOnExit() { ws.Trim(); }
  } trim{ws};
  PreparedQueries queries;
  queries.heads_kv = static_cast<size_t>(p.heads_kv);
  queries.rp = rp;
  queries.dp = dp;
  queries.dc = dc;
  queries.mp = mp;
  if (!ws.Reserve(per_worker * static_cast<size_t>(workers),
                  static_cast<size_t>(sched.num_slots) * slot_rows * dim,
                  static_cast<size_t>(sched.num_slots) * slot_rows, queries.Floats(p.batch))) {
    return false;
  }
  float* const storage = ws.scratch.get();
  float* const partial_out = ws.partial_out.get();
  double* const partial_lse = ws.partial_lse.get();
  queries.base = ws.queries.get();
  // bf16 rows widened in pairs (Bf16Pairs) where the padded head dim holds whole 4-vector P.V
  // blocks (no single-vector tail splits a pair).
  const bool paired = kLittleEndian && HWY_TARGET != HWY_SCALAR && kv.dtype == KVDType::kBF16 &&
                      dp % (4 * kLanes) == 0;
  ParallelFor(workers, p.batch * p.heads_kv, [&](int64_t task, int32_t) {
    const int64_t b = task / p.heads_kv, h = task % p.heads_kv;
    PrepareQueries(p, kv, dp, dc, mp, rp, paired, b, h, queries.at(b, h));
  });

  auto run = [&](auto dp_tag, auto elem_tag) {
    constexpr size_t kDp = decltype(dp_tag)::value;
    using T = decltype(elem_tag);
    // Units are claimed dynamically (ParallelFor hands out tasks in order); the scratch belongs to
    // the worker, and a unit's result does not depend on which worker ran it.
    ParallelFor(workers, static_cast<int64_t>(sched.units.size()), [&](int64_t i, int32_t worker) {
      Scratch s;
      s.Carve(storage + per_worker * static_cast<size_t>(worker), heads, rp, dp, dc, mp,
              shape.row_bytes);
      const decode::DecodeUnit& u = sched.units[static_cast<size_t>(i)];
      float* po = nullptr;
      double* pl = nullptr;
      // A plan stays valid while each sequence keeps its number of splits: the last split
      // ends at the sequence's current length.
      decode::DecodeUnit cur = u;
      cur.key_end =
          std::max(u.key_begin, std::min(kv.len(u.seq), u.key_begin + sched.split_tokens));
      if (u.slot >= 0) {
        po = partial_out + static_cast<size_t>(u.slot) * slot_rows * dim;
        pl = partial_lse + static_cast<size_t>(u.slot) * slot_rows;
      }
      RunUnit<kDp, T>(p, kv, cur, shape, queries, s, po, pl, stats);
    });
  };
  // Compile-time head dims x row element types.
  auto run_dim = [&](auto elem_tag) {
#if !TESSERA_DECODE_RUNTIME_DIM_ONLY
    if (fast && dp == 64) return run(std::integral_constant<size_t, 64>(), elem_tag);
    if (fast && dp == 128) return run(std::integral_constant<size_t, 128>(), elem_tag);
    if (fast && dp == 256) return run(std::integral_constant<size_t, 256>(), elem_tag);
#else
    // Sanitizer builds: the compile-time head dims are the same code with constant bounds; one
    // instantiation keeps the instrumented build of this file short.
    (void)fast;
#endif
    run(std::integral_constant<size_t, 0>(), elem_tag);
  };
  switch (kv.dtype) {
    case KVDType::kF32:
      run_dim(float());
      break;
    case KVDType::kBF16:
      if (paired) {
        run_dim(Bf16Pairs());
      } else {
        run_dim(hwy::bfloat16_t());
      }
      break;
    case KVDType::kF16:
      run_dim(hwy::float16_t());
      break;
    default:
      run_dim(uint8_t());
      break;
  }
  if (sched.num_slots != 0) MergeSplits(p, sched, dim, slot_rows, partial_out, partial_lse);
  if (stats != nullptr) FinishStats(p, kv, *stats, workers);
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_INL_H_
