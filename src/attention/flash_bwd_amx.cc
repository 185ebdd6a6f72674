// SPDX-License-Identifier: Apache-2.0
// Exact attention backward for bf16 inputs on Intel AMX (Sapphire Rapids and later).
//
// Why: the Highway backward (flash_bwd-inl.h) converts bf16 to f32 and runs its five GEMMs with
// f32 FMAs, at the fp32 rate. AMX multiplies bf16 tiles into f32 tiles at 16x that rate.
//
// What: FlashAttention-2's backward with the scores computed transposed (keys as tile rows,
// queries as columns), so that every operand is either a plain row-major block or a cheap
// packing of one:
//   S^T  = K Q^T      A: K rows of the key block;   B: Q packed transposed (32-bit transpose)
//   dP^T = V dO^T     A: V rows;                    B: dO packed transposed
//   P^T = exp2(S^T * scale log2 e - LSE log2 e), dS^T = P^T o (dP^T - Delta)   (f32, AVX-512,
//         queries in lanes: LSE, Delta and the window bounds are per-lane vectors)
//   dV  += P^T dO     A: P^T (bf16, as written);    B: dO interleaved over query pairs
//   dK  += dS^T Q     A: dS^T;                      B: Q interleaved over query pairs
//   dQ^T += K^T dS^T  A: K^T of the key block;      B: dS^T interleaved over key pairs (written
//                                                      by the element-wise step)
// Before the tasks, a pre-pass packs Q and dO of every head of a round of (sequence, KV head)
// units in both B layouts, with LSE log2 e and Delta = rowsum(dO o O) per query; all of a unit's
// tasks share them. A task is (sequence, KV head, group r of consecutive key blocks of kKeys
// keys); per key block it loops over the GQA group's heads and the query tiles of kQueries rows
// that see the block, keeping dK and dV in f32 in its scratch (one owner per key). dQ^T goes to
// the group's own f32 partial ([D][kQueries] per query tile and head); the number of groups R
// depends only on the shape, and the partials are summed in group order at the end, so every
// gradient is bitwise identical across runs and thread counts. Masks are windows [lo, hi] of keys
// per query (causal is one): tiles no query sees are skipped, and tiles that some query sees only
// in part mask P.
//
// Precision: the products are exact and accumulate in f32; P and dS are rounded to bf16 before
// the three products that consume them (as the naive bf16 computation of the ratio rule does);
// dQ, dK and dV are rounded to bf16 once, at the end.
//
// Tile sizes: 128-key blocks halve the streaming of the packs and the dQ partial per FLOP against
// 64 (-11% CPU time); 128 x 128 was measured against 64 x 256 (+28%), 256 x 128 (+12%) and
// 128 x 256 (same). The next step's packs and dQ partial are prefetched into L2 during the
// current one, and the packs and partials sit on huge pages (-9% together).
//
// Measured (2-core Emerald Rapids Xeon shared with other jobs, B = 1, H = 8, N = 4096, D = 128,
// bf16, interleaved runs, medians): 2 threads 268 ms (Highway kernel 1312 ms in the same runs),
// causal 75 ms (377 ms); 1 thread 235 ms (1241 ms). The fp32 backward of the same shape, run
// interleaved with it: 5.3x the time (causal 4.7x); PyTorch 2.15's bf16 SDPA backward, alternated
// with it from Python: 2.8x (causal 2.9x). Profile (1 thread): dV/dK products ~32%,
// S^T/dP^T ~29%, element-wise ~20%, dQ^T ~12%, packing ~5%.
//
// Portability: the kernel functions carry target attributes (AMX-TILE, AMX-BF16, AVX-512), so the
// rest of the library is compiled as before; on other compilers the file compiles to
// AmxBackwardHandles() == false and never runs.
#include "attention/flash_bwd_amx.h"

#include <hwy/aligned_allocator.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/amx_tiles.h"
#include "core/huge_pages.h"
#include "core/parallel.h"

namespace tessera {

bool AmxBackwardHandles(const AttentionBackwardProblem& bp) {
  const AttentionProblem& p = bp.fwd;
  return TESSERA_AMX_KERNEL && p.dtype == DType::kBF16 && !p.varlen() && p.dim >= 32 &&
         p.dim <= 256 && p.dim % 32 == 0 && p.softcap == 0.0f && p.alibi == nullptr &&
         !p.mask.any && !p.mask.sigmoid && p.heads_q > 0 && p.lse != nullptr &&
         p.seq_k < (int64_t{1} << 30) && p.seq_q < (int64_t{1} << 30);
}

#if TESSERA_AMX_KERNEL

namespace {

using amx::CompilerBarrier;
using amx::Row;

constexpr int64_t kKeys = 128;     // keys per block (rows of S^T)
constexpr int64_t kQueries = 128;  // queries per tile (columns of S^T)
constexpr int64_t kTile = 16;      // rows of every tile
// Tasks the key-block pass aims for: (sequence, KV head) units are split into groups of key
// blocks until there are about this many, whatever the thread count.
constexpr int64_t kTargetTasks = 16;
// Memory every group's dQ partials of the whole problem may take before fewer groups are used.
constexpr int64_t kMaxPartialBytes = int64_t{512} << 20;
// Packed Q / dO and the dQ partials of a round of units stay under this (at least one unit).
constexpr int64_t kRoundBytes = int64_t{256} << 20;

// Visible keys of the query tiles (the same for every sequence of a dense batch).
struct QueryTiles {
  int64_t sq_p = 0;             // queries padded to kQueries
  std::vector<int32_t> lo, hi;  // [sq_p] window of each query (lo > hi: none, and padding)
  std::vector<int64_t> min_lo, max_lo, min_hi, max_hi;  // per tile, over its queries that see keys
  std::vector<uint8_t> all;                             // every query of the tile sees some key

  void Build(const AttentionProblem& p) {
    sq_p = (p.seq_q + kQueries - 1) / kQueries * kQueries;
    const int64_t tiles = sq_p / kQueries;
    lo.assign(static_cast<size_t>(sq_p), 1);
    hi.assign(static_cast<size_t>(sq_p), 0);
    min_lo.assign(static_cast<size_t>(tiles), INT64_MAX);
    max_lo.assign(static_cast<size_t>(tiles), INT64_MIN);
    min_hi.assign(static_cast<size_t>(tiles), INT64_MAX);
    max_hi.assign(static_cast<size_t>(tiles), INT64_MIN);
    all.assign(static_cast<size_t>(tiles), 1);
    const int64_t delta = p.top_left ? 0 : p.seq_k - p.seq_q;
    for (int64_t i = 0; i < sq_p; ++i) {
      const size_t t = static_cast<size_t>(i / kQueries);
      AttentionProblem::KeyRange kr{1, 0};
      if (i < p.seq_q) kr = p.visible_keys(i + delta, p.seq_k);
      if (kr.lo > kr.hi) {
        all[t] = 0;
        continue;
      }
      lo[static_cast<size_t>(i)] = static_cast<int32_t>(kr.lo);
      hi[static_cast<size_t>(i)] = static_cast<int32_t>(kr.hi);
      min_lo[t] = std::min(min_lo[t], kr.lo);
      max_lo[t] = std::max(max_lo[t], kr.lo);
      min_hi[t] = std::min(min_hi[t], kr.hi);
      max_hi[t] = std::max(max_hi[t], kr.hi);
    }
  }
  bool Skip(int64_t t, int64_t j0) const {
    const size_t i = static_cast<size_t>(t);
    return max_hi[i] < j0 || min_lo[i] > j0 + kKeys - 1;  // also when no query sees a key
  }
  bool Full(int64_t t, int64_t j0) const {
    const size_t i = static_cast<size_t>(t);
    return all[i] && max_lo[i] <= j0 && min_hi[i] >= j0 + kKeys - 1;
  }
};

// Q and dO of one query head, packed for every query tile, with the per-query LSE and Delta.
struct HeadPack {
  uint16_t* qt;   // [sq_p / 16][D / 32][16][32]: transposed B tiles of 16 queries x 32 dims
  uint16_t* qi;   // [sq_p / 2][2 D]: query rows 2j and 2j + 1 interleaved
  uint16_t* dot;  // like qt, for dO
  uint16_t* doi;  // like qi, for dO
  float* lse2;    // [sq_p] LSE * log2 e (0 for rows that see no key, and padding)
  float* delta;   // [sq_p] rowsum(dO o O)
};

// Per-worker scratch, carved from one allocation; every region starts on a cache line.
struct Scratch {
  uint16_t* k;    // [kKeys][D] keys of the block (zero past the end)
  uint16_t* v;    // [kKeys][D] values
  uint16_t* kt;   // [D][kKeys] keys transposed
  float* dk;      // [kKeys][D] dK accumulator (unscaled)
  float* dv;      // [kKeys][D] dV accumulator
  float* st;      // [kKeys][kQueries] S^T
  float* dpt;     // [kKeys][kQueries] dP^T
  uint16_t* pt;   // [kKeys][kQueries] P^T, bf16
  uint16_t* dst;  // [kKeys][kQueries] dS^T, bf16
  uint16_t* dsi;  // [kKeys / 2][2 kQueries] dS^T with key rows 2j and 2j + 1 interleaved

  size_t Carve(uint8_t* base, size_t dim) {
    size_t at = 0;
    auto take = [&](auto** ptr, size_t bytes) {
      if (base != nullptr) *ptr = reinterpret_cast<std::remove_pointer_t<decltype(ptr)>>(base + at);
      at += (bytes + 63) / 64 * 64;
    };
    const size_t keys = static_cast<size_t>(kKeys), tile = keys * static_cast<size_t>(kQueries);
    take(&k, keys * dim * 2);
    take(&v, keys * dim * 2);
    take(&kt, keys * dim * 2);
    take(&dk, keys * dim * 4);
    take(&dv, keys * dim * 4);
    take(&st, tile * 4);
    take(&dpt, tile * 4);
    take(&pt, tile * 2);
    take(&dst, tile * 2);
    take(&dsi, tile * 2);
    return at;
  }
};

// Packs query tile `t` (kQueries rows) of `head` of sequence b into `h`, and computes its LSE and
// Delta rows. Rows past the sequence are zero.
TESSERA_AMX_TARGET void PackQueryTile(const AttentionBackwardProblem& bp, int64_t b, int64_t head,
                                      int64_t t, const HeadPack& h) {
  const AttentionProblem& p = bp.fwd;
  const int64_t dim = p.dim;
  alignas(64) static const uint16_t kZeros[256] = {};
  alignas(64) uint16_t q_tmp[kTile][256];
  alignas(64) uint16_t do_tmp[kTile][256];
  alignas(64) uint16_t o_tmp[256];
  const float kLog2e = 1.4426950408889634f;
  for (int64_t q16 = t * kQueries; q16 < (t + 1) * kQueries; q16 += kTile) {
    const uint16_t* qs[kTile];
    const uint16_t* dos[kTile];
    for (int64_t n = 0; n < kTile; ++n) {
      const int64_t token = q16 + n;
      const size_t at = static_cast<size_t>(token);
      if (token >= p.seq_q) {
        qs[n] = dos[n] = kZeros;
        h.lse2[at] = 0.0f;
        h.delta[at] = 0.0f;
        continue;
      }
      qs[n] = Row(p, p.q, p.q_stride, b, token, head, q_tmp[n]);
      dos[n] = Row(p, bp.dout, bp.dout_stride, b, token, head, do_tmp[n]);
      const uint16_t* o = Row(p, p.out, p.out_stride, b, token, head, o_tmp);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + d))),
            16));
        const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dos[n] + d))),
            16));
        sum = _mm512_fmadd_ps(x, y, sum);
      }
      h.delta[at] = _mm512_reduce_add_ps(sum);
      const float l = p.lse[p.lse_offset(b, head, token)];
      h.lse2[at] = std::isinf(l) && l < 0.0f ? 0.0f : l * kLog2e;
    }
    amx::PackTransposed(qs, dim, h.qt + q16 * dim);
    amx::PackTransposed(dos, dim, h.dot + q16 * dim);
    for (int64_t n = 0; n < kTile; n += 2) {
      amx::PackInterleaved(qs[n], qs[n + 1], dim, h.qi + (q16 + n) * dim);
      amx::PackInterleaved(dos[n], dos[n + 1], dim, h.doi + (q16 + n) * dim);
    }
  }
}

// Prefetches the next step's packs and dQ partial into L2 a few cache lines at a time, spread
// over the tile products of the current step (a burst would fill the queues the tile loads need).
struct Prefetch {
  static constexpr int kRegions = 5;
  const char* at[kRegions] = {};
  const char* end[kRegions] = {};
  int region = kRegions;

  void Set(int i, const void* p, size_t bytes) {
    at[i] = static_cast<const char*>(p);
    end[i] = at[i] + bytes;
    region = 0;
  }
  TESSERA_AMX_TARGET void Lines(int n) {
    for (; n > 0 && region < kRegions; --n) {
      if (at[region] >= end[region]) {
        ++region;
        continue;
      }
      _mm_prefetch(at[region], _MM_HINT_T1);
      at[region] += 64;
    }
  }
};
constexpr int kPrefetchLines = 12;  // per inner step of a product (~320 per query tile)

// c[kKeys][kQueries] (f32) = a[kKeys][D] (bf16 rows) times the transposed B tiles `b` of
// kQueries rows (PackTransposed, kQueries / 16 groups of D / 32 tiles).
TESSERA_AMX_TARGET void ScoresT(const uint16_t* a, const uint16_t* b, int64_t dim, float* c,
                                Prefetch& pf) {
  const int64_t chunks = dim / 32;
  const long a_stride = static_cast<long>(dim * 2);
  const long c_stride = static_cast<long>(kQueries * 4);
  for (int64_t k0 = 0; k0 < kKeys; k0 += 2 * kTile) {
    for (int64_t q0 = 0; q0 < kQueries; q0 += 2 * kTile) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* a0 = a + k0 * dim;
      const uint16_t* a1 = a0 + kTile * dim;
      const uint16_t* b0 = b + q0 * dim;  // q0 / 16 groups of chunks * 512 elements
      const uint16_t* b1 = b0 + kTile * dim;
      for (int64_t dc = 0; dc < chunks; ++dc) {
        _tile_loadd(4, a0 + dc * 32, a_stride);
        _tile_loadd(5, a1 + dc * 32, a_stride);
        _tile_loadd(6, b0 + dc * 512, 64);
        _tile_loadd(7, b1 + dc * 512, 64);
        pf.Lines(kPrefetchLines);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* c0 = c + k0 * kQueries + q0;
      float* c1 = c0 + kTile * kQueries;
      _tile_stored(0, c0, c_stride);
      _tile_stored(1, c0 + kTile, c_stride);
      _tile_stored(2, c1, c_stride);
      _tile_stored(3, c1 + kTile, c_stride);
    }
  }
}

// acc[kKeys][D] (f32) += a[kKeys][kQueries] (bf16 rows) times b, kQueries rows of D interleaved
// in pairs (PackInterleaved: [kQueries / 2][2 D]).
TESSERA_AMX_TARGET void AccumulateKeys(const uint16_t* a, const uint16_t* b, int64_t dim,
                                       float* acc, Prefetch& pf) {
  const long acc_stride = static_cast<long>(dim * 4);
  const long a_stride = static_cast<long>(kQueries * 2);
  const long b_stride = static_cast<long>(dim * 4);
  for (int64_t k0 = 0; k0 < kKeys; k0 += 2 * kTile) {
    for (int64_t d0 = 0; d0 < dim; d0 += 32) {
      float* c0 = acc + k0 * dim + d0;
      float* c1 = c0 + kTile * dim;
      _tile_loadd(0, c0, acc_stride);
      _tile_loadd(1, c0 + kTile, acc_stride);
      _tile_loadd(2, c1, acc_stride);
      _tile_loadd(3, c1 + kTile, acc_stride);
      for (int64_t qc = 0; qc < kQueries; qc += 32) {
        const uint16_t* bb = b + qc * dim + 2 * d0;  // row qc / 2 of 2 D elements
        _tile_loadd(4, a + k0 * kQueries + qc, a_stride);
        _tile_loadd(5, a + (k0 + kTile) * kQueries + qc, a_stride);
        _tile_loadd(6, bb, b_stride);
        _tile_loadd(7, bb + 32, b_stride);
        pf.Lines(kPrefetchLines);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, acc_stride);
      _tile_stored(1, c0 + kTile, acc_stride);
      _tile_stored(2, c1, acc_stride);
      _tile_stored(3, c1 + kTile, acc_stride);
    }
  }
}

// dqt[D][kQueries] (f32) += kt[D][kKeys] (bf16 rows) times dsi (dS^T with key rows interleaved
// in pairs: [kKeys / 2][2 kQueries]).
TESSERA_AMX_TARGET void AccumulateQueries(const uint16_t* kt, const uint16_t* dsi, int64_t dim,
                                          float* dqt, Prefetch& pf) {
  constexpr int64_t ld = kQueries;
  const long c_stride = static_cast<long>(ld * 4);
  const long a_stride = static_cast<long>(kKeys * 2);
  const long b_stride = static_cast<long>(kQueries * 4);
  for (int64_t d0 = 0; d0 < dim; d0 += 2 * kTile) {
    for (int64_t q0 = 0; q0 < kQueries; q0 += 2 * kTile) {
      float* c0 = dqt + d0 * ld + q0;
      float* c1 = c0 + kTile * ld;
      _tile_loadd(0, c0, c_stride);
      _tile_loadd(1, c0 + kTile, c_stride);
      _tile_loadd(2, c1, c_stride);
      _tile_loadd(3, c1 + kTile, c_stride);
      for (int64_t kc = 0; kc < kKeys; kc += 32) {
        const uint16_t* bb = dsi + kc * kQueries + 2 * q0;  // row kc / 2 of 2 kQueries elements
        _tile_loadd(4, kt + d0 * kKeys + kc, a_stride);
        _tile_loadd(5, kt + (d0 + kTile) * kKeys + kc, a_stride);
        _tile_loadd(6, bb, b_stride);
        _tile_loadd(7, bb + 32, b_stride);
        pf.Lines(kPrefetchLines);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, c_stride);
      _tile_stored(1, c0 + kTile, c_stride);
      _tile_stored(2, c1, c_stride);
      _tile_stored(3, c1 + kTile, c_stride);
    }
  }
}

// P^T and dS^T of a (key block at j0, query tile) from S^T and dP^T, queries in lanes; masks
// keys outside each query's window unless `full`. Writes pt, dst and dsi (bf16). Per 16 queries
// (their LSE, Delta and windows in registers), the key rows go in pairs: one conversion packs
// rows k and k + 1, which is already the pair that dsi interleaves.
TESSERA_AMX_TARGET void Gradients(const Scratch& s, const float* lse2, const float* delta,
                                  const int32_t* lo, const int32_t* hi, int64_t j0, bool full,
                                  float scale_log2) {
  alignas(64) static constexpr uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                      21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                      11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512 scale = _mm512_set1_ps(scale_log2);
  const __m512i pairs = _mm512_load_si512(kPairs);
  for (int64_t q = 0; q < kQueries; q += 16) {
    const __m512 vl = _mm512_loadu_ps(lse2 + q);
    const __m512 vd = _mm512_loadu_ps(delta + q);
    const __m512i vlo = _mm512_loadu_si512(lo + q);
    const __m512i vhi = _mm512_loadu_si512(hi + q);
    for (int64_t k = 0; k < kKeys; k += 2) {
      __m512 pr[2], ds[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t row = k + h;
        const __m512 x = _mm512_load_ps(s.st + row * kQueries + q);
        pr[h] = amx::Exp2(_mm512_fmsub_ps(x, scale, vl));
        if (!full) {
          const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(j0 + row));
          const __mmask16 visible = _mm512_cmp_epi32_mask(vlo, key, _MM_CMPINT_LE) &
                                    _mm512_cmp_epi32_mask(vhi, key, _MM_CMPINT_NLT);
          pr[h] = _mm512_maskz_mov_ps(visible, pr[h]);
        }
        ds[h] = _mm512_mul_ps(pr[h], _mm512_sub_ps(_mm512_load_ps(s.dpt + row * kQueries + q), vd));
      }
      // Lanes 0..15: row k, 16..31: row k + 1.
      const __m512bh pb = _mm512_cvtne2ps_pbh(pr[1], pr[0]);
      const __m512bh db = _mm512_cvtne2ps_pbh(ds[1], ds[0]);
      const __m512i pi = reinterpret_cast<const __m512i&>(pb);
      const __m512i di = reinterpret_cast<const __m512i&>(db);
      uint16_t* p0 = s.pt + k * kQueries + q;
      uint16_t* d0 = s.dst + k * kQueries + q;
      _mm256_store_si256(reinterpret_cast<__m256i*>(p0), _mm512_castsi512_si256(pi));
      _mm256_store_si256(reinterpret_cast<__m256i*>(p0 + kQueries),
                         _mm512_extracti64x4_epi64(pi, 1));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d0), _mm512_castsi512_si256(di));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d0 + kQueries),
                         _mm512_extracti64x4_epi64(di, 1));
      // Row k / 2 of dsi, queries q .. q + 15.
      _mm512_store_si512(s.dsi + k * kQueries + 2 * q, _mm512_permutexvar_epi16(pairs, di));
    }
  }
}

// Rounds `n` f32 values times `scale` to bf16 and stores them `stride` elements apart.
TESSERA_AMX_TARGET void StoreRow(const float* src, int64_t n, float scale, uint16_t* dst,
                                 int64_t stride) {
  alignas(64) uint16_t tmp[256];
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < n; d += 16) {
    const __m256bh bf = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), vs));
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + d), reinterpret_cast<const __m256i&>(bf));
  }
  if (stride == 1) {
    std::memcpy(dst, tmp, static_cast<size_t>(n) * sizeof(uint16_t));
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d * stride] = tmp[d];
  }
}

struct Plan {
  const AttentionBackwardProblem* bp;
  const QueryTiles* tiles;
  int64_t groups;  // R
  int64_t blocks;  // key blocks of a sequence
  float scale_log2;
};

// Task: unit (sequence b, KV head kvh), key blocks [block_begin, block_end); `packs` are the
// group's heads, `dqt` their dQ^T partials of this task's group ([sq_p / kQueries][D][kQueries]
// each).
TESSERA_AMX_TARGET void RunTask(const Plan& plan, int64_t b, int64_t kvh, int64_t block_begin,
                                int64_t block_end, const HeadPack* packs, float* const* dqt,
                                const Scratch& s) {
  const AttentionBackwardProblem& bp = *plan.bp;
  const AttentionProblem& p = bp.fwd;
  const QueryTiles& qt = *plan.tiles;
  const int64_t dim = p.dim;
  const int64_t q_tiles = qt.sq_p / kQueries;
  amx::TileConfig config;
  CompilerBarrier();
  _tile_loadconfig(&config);
  alignas(64) uint16_t tmp[256];
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t j0 = block * kKeys;
    const int64_t nk = std::min(kKeys, p.seq_k - j0);
    for (int64_t j = 0; j < kKeys; ++j) {
      uint16_t* kd = s.k + j * dim;
      uint16_t* vd = s.v + j * dim;
      if (j >= nk) {
        std::memset(kd, 0, static_cast<size_t>(dim) * sizeof(uint16_t));
        std::memset(vd, 0, static_cast<size_t>(dim) * sizeof(uint16_t));
        continue;
      }
      std::memcpy(kd, Row(p, p.k, p.k_stride, b, j0 + j, kvh, tmp),
                  static_cast<size_t>(dim) * sizeof(uint16_t));
      std::memcpy(vd, Row(p, p.v, p.v_stride, b, j0 + j, kvh, tmp),
                  static_cast<size_t>(dim) * sizeof(uint16_t));
    }
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t j = 0; j < kKeys; ++j) s.kt[d * kKeys + j] = s.k[j * dim + d];
    }
    std::memset(s.dk, 0, static_cast<size_t>(kKeys * dim) * sizeof(float));
    std::memset(s.dv, 0, static_cast<size_t>(kKeys * dim) * sizeof(float));
    CompilerBarrier();
    for (int64_t gi = 0; gi < p.group; ++gi) {
      const HeadPack& h = packs[gi];
      for (int64_t t = 0; t < q_tiles; ++t) {
        if (qt.Skip(t, j0)) continue;
        const int64_t q0 = t * kQueries;
        // The next step's operands: the next tile of this head, or the first of the next one.
        Prefetch pf;
        int64_t ng = gi, nt = t + 1;
        while (ng < p.group && (nt >= q_tiles || qt.Skip(nt, j0))) {
          if (nt >= q_tiles) {
            ++ng;
            nt = 0;
          } else {
            ++nt;
          }
        }
        if (ng < p.group) {
          const HeadPack& n = packs[ng];
          const int64_t n0 = nt * kQueries;
          const size_t pack_bytes = static_cast<size_t>(kQueries * dim) * sizeof(uint16_t);
          pf.Set(0, n.qt + n0 * dim, pack_bytes);
          pf.Set(1, n.dot + n0 * dim, pack_bytes);
          pf.Set(2, n.doi + n0 * dim, pack_bytes);
          pf.Set(3, n.qi + n0 * dim, pack_bytes);
          pf.Set(4, dqt[ng] + n0 * dim, 2 * pack_bytes);
        }
        ScoresT(s.k, h.qt + q0 * dim, dim, s.st, pf);
        ScoresT(s.v, h.dot + q0 * dim, dim, s.dpt, pf);
        CompilerBarrier();
        Gradients(s, h.lse2 + q0, h.delta + q0, qt.lo.data() + q0, qt.hi.data() + q0, j0,
                  qt.Full(t, j0), plan.scale_log2);
        CompilerBarrier();
        AccumulateKeys(s.pt, h.doi + q0 * dim, dim, s.dv, pf);
        AccumulateKeys(s.dst, h.qi + q0 * dim, dim, s.dk, pf);
        AccumulateQueries(s.kt, s.dsi, dim, dqt[gi] + q0 * dim, pf);
        CompilerBarrier();
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      StoreRow(s.dk + j * dim, dim, p.scale,
               static_cast<uint16_t*>(bp.dk) + bp.dk_offset(b, j0 + j, kvh), bp.dk_stride[3]);
      StoreRow(s.dv + j * dim, dim, 1.0f,
               static_cast<uint16_t*>(bp.dv) + bp.dv_offset(b, j0 + j, kvh), bp.dv_stride[3]);
    }
  }
  _tile_release();
}

// dQ rows of query tile t of `head` of sequence b: scale * (partial 0 + partial 1 + ...), the
// tile's partials transposed ([D][kQueries] each, `stride` floats apart).
TESSERA_AMX_TARGET void ReduceDq(const AttentionBackwardProblem& bp, int64_t b, int64_t head,
                                 int64_t t, const float* part, int64_t stride, int64_t groups) {
  const AttentionProblem& p = bp.fwd;
  const int64_t dim = p.dim;
  alignas(64) float rows[kTile][256];
  for (int64_t q16 = t * kQueries; q16 < (t + 1) * kQueries && q16 < p.seq_q; q16 += kTile) {
    for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const float* src = part + (d0 + i) * kQueries + (q16 - t * kQueries);
        __m512 sum = _mm512_loadu_ps(src);
        for (int64_t g = 1; g < groups; ++g)
          sum = _mm512_add_ps(sum, _mm512_loadu_ps(src + g * stride));
        r[i] = _mm512_castps_si512(sum);
      }
      amx::Transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(rows[i] + d0, _mm512_castsi512_ps(r[i]));
    }
    for (int64_t n = 0; n < kTile && q16 + n < p.seq_q; ++n) {
      StoreRow(rows[n], dim, p.scale,
               static_cast<uint16_t*>(bp.dq) + bp.dq_offset(b, q16 + n, head), bp.dq_stride[3]);
    }
  }
}

}  // namespace

bool AmxBackward(const AttentionBackwardProblem& bp, int32_t threads) {
  const AttentionProblem& p = bp.fwd;
  threads = std::max(threads, 1);
  QueryTiles tiles;
  tiles.Build(p);
  const int64_t sq_p = tiles.sq_p;
  const int64_t q_tiles = sq_p / kQueries;
  const int64_t dim = p.dim;
  const int64_t blocks = (p.seq_k + kKeys - 1) / kKeys;
  const int64_t units = p.batch * p.heads_kv;
  // Key-block groups per unit: a function of the shape only (never of the thread count), which
  // fixes the dQ summation order.
  // One head's dQ^T partial of one group: [sq_p / kQueries][D][kQueries], a block per tile.
  const int64_t partial_floats = dim * sq_p;
  const int64_t group_bytes = p.batch * p.heads_q * partial_floats * 4;
  const int64_t groups = std::max<int64_t>(
      1, std::min({blocks, (kTargetTasks + units - 1) / units, kMaxPartialBytes / group_bytes}));
  const int64_t head_pack_bytes = sq_p * dim * 2 * 4 + sq_p * 4 * 2;
  const int64_t unit_bytes = p.group * (head_pack_bytes + groups * partial_floats * 4);
  const int64_t round_units = std::clamp<int64_t>(kRoundBytes / unit_bytes, 1, units);
  const int64_t round_heads = round_units * p.group;

  Plan plan{&bp, &tiles, groups, blocks,
            static_cast<float>(static_cast<double>(p.scale) * 1.4426950408889634)};
  Scratch layout;
  const size_t per_worker = layout.Carve(nullptr, static_cast<size_t>(dim));
  const int32_t workers = static_cast<int32_t>(
      std::min<int64_t>(threads, std::max(round_units * groups, round_heads * q_tiles)));
  auto scratch = hwy::AllocateAligned<uint8_t>(per_worker * static_cast<size_t>(workers));
  // The packs and partials are streamed through by tile loads 16 rows at a time: huge pages
  // spare the TLB walks (and most page faults).
  PageBytes pack_mem = AllocatePages(static_cast<size_t>(round_heads * head_pack_bytes));
  PageBytes partial_mem =
      AllocatePages(static_cast<size_t>(round_heads * groups * partial_floats) * sizeof(float));
  if (!scratch || !pack_mem || !partial_mem) return false;
  float* const partials = reinterpret_cast<float*>(partial_mem.get());
  std::vector<HeadPack> packs(static_cast<size_t>(round_heads));
  for (int64_t i = 0; i < round_heads; ++i) {
    uint8_t* base = pack_mem.get() + i * head_pack_bytes;
    HeadPack& h = packs[static_cast<size_t>(i)];
    const int64_t elems = sq_p * dim;
    h.qt = reinterpret_cast<uint16_t*>(base);
    h.qi = h.qt + elems;
    h.dot = h.qi + elems;
    h.doi = h.dot + elems;
    h.lse2 = reinterpret_cast<float*>(h.doi + elems);
    h.delta = h.lse2 + sq_p;
  }
  // Partial g of round head i: partials + (g * round_heads + i) * partial_floats.
  const int64_t group_stride = round_heads * partial_floats;

  for (int64_t u0 = 0; u0 < units; u0 += round_units) {
    const int64_t n = std::min(round_units, units - u0);
    const int64_t heads = n * p.group;
    // Pre-pass: pack Q and dO, LSE and Delta; zero the dQ partials.
    ParallelFor(workers, heads * q_tiles, [&](int64_t unit, int32_t) {
      const int64_t i = unit / q_tiles, t = unit % q_tiles;
      const int64_t u = u0 + i / p.group;
      const int64_t b = u / p.heads_kv;
      const int64_t head = (u % p.heads_kv) * p.group + i % p.group;
      PackQueryTile(bp, b, head, t, packs[static_cast<size_t>(i)]);
      for (int64_t g = 0; g < groups; ++g) {
        std::memset(partials + g * group_stride + i * partial_floats + t * kQueries * dim, 0,
                    static_cast<size_t>(kQueries * dim) * sizeof(float));
      }
    });
    // Key-block tasks, group 0 first (under a bottom-right causal mask the first keys are seen by
    // the most queries: the longest tasks start first).
    ParallelFor(workers, n * groups, [&](int64_t task, int32_t worker) {
      const int64_t g = task / n, i = task % n;
      const int64_t u = u0 + i;
      Scratch s;
      s.Carve(scratch.get() + per_worker * static_cast<size_t>(worker), static_cast<size_t>(dim));
      std::vector<float*> dqt(static_cast<size_t>(p.group));
      for (int64_t gi = 0; gi < p.group; ++gi) {
        dqt[static_cast<size_t>(gi)] =
            partials + g * group_stride + (i * p.group + gi) * partial_floats;
      }
      RunTask(plan, u / p.heads_kv, u % p.heads_kv, g * blocks / groups, (g + 1) * blocks / groups,
              packs.data() + i * p.group, dqt.data(), s);
    });
    // dQ = scale * sum of the partials, in group order.
    ParallelFor(workers, heads * q_tiles, [&](int64_t unit, int32_t) {
      const int64_t i = unit / q_tiles, t = unit % q_tiles;
      const int64_t u = u0 + i / p.group;
      const int64_t head = (u % p.heads_kv) * p.group + i % p.group;
      ReduceDq(bp, u / p.heads_kv, head, t, partials + i * partial_floats + t * kQueries * dim,
               group_stride, groups);
    });
  }
  return true;
}

#else  // !TESSERA_AMX_KERNEL

bool AmxBackward(const AttentionBackwardProblem&, int32_t) { return false; }

#endif  // TESSERA_AMX_KERNEL

}  // namespace tessera
