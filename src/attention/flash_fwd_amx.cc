// SPDX-License-Identifier: Apache-2.0
// Exact attention forward for bf16 inputs on Intel AMX (Sapphire Rapids and later).
//
// Why: the Highway forward (flash_fwd-inl.h) converts bf16 rows to f32 and multiplies with f32
// FMAs. AMX multiplies bf16 tiles into f32 tiles at 1024 FLOP per cycle per core, 16x an
// AVX-512 FMA port pair, so both GEMMs of attention become cheap and the f32 online softmax
// (AVX-512) is what is left.
//
// What: FlashAttention-2 on tiles. A task is (sequence, KV head, block of query positions), the
// G heads of a GQA group packed as G * block rows (head-major, like the Highway kernel), at most
// kTaskRows (+ padding to 32) rows. Before the tasks, K and V of each head are packed once into
// AMX's B layouts and shared by all of the head's tasks (rounds of heads bound that buffer):
//   K  each 16 keys x 32 dims as 16 dim pairs x 16 keys (a 32-bit transpose), one 1 KiB tile;
//   V  rows 2j and 2j + 1 interleaved, so 16 interleaved rows x 16 dims form a tile.
// A task streams the keys in blocks of kBlockKeys at fixed multiples from key 0, so every row's
// reduction order is fixed by the shape: results are bitwise identical across thread counts,
// repeats and batch compositions. Per key block and group of 32 rows:
//   scores  S = Q K^T per 32-key chunk: 2 x 2 f32 accumulator tiles, Q rows (bf16, packed once
//           per task, unscaled) as A tiles, K as B tiles; stored to the group's score buffer;
//   softmax in f32 with AVX-512 in log2 units: the row max of s (min for a negative scale) times
//           scale * log2 e, running max m, P = exp2(s * scale - m) (a degree-5 polynomial),
//           rescale factor alpha, sum l; P rounded to bf16 over the start of each
//           score row (row-major: already AMX's A layout, read with the scores' row stride);
//   output  O = alpha O + P V, O kept in f32 in the task's scratch: per 32 output dims, 2 x 2
//           accumulator tiles loaded, fed every chunk of the block (P as A tiles, packed V as B
//           tiles), stored back. 256-key blocks halve this O traffic against 128 (-13% time).
// Masks are a window [lo, hi] of keys per row (causal is a window): a group of 32 rows visits
// only the 32-key chunks some row of it sees; a row masks (or skips) only where the chunk range
// is not inside its window. The output is normalized by l at the end; rows that see no key get
// O = 0 and LSE = -inf.
//
// Precision: the products are exact and accumulate in f32 (as in the Highway kernel); the one
// extra rounding is P to bf16 before P V (relative 2^-9 per weight, averaging out over the keys),
// which the naive bf16 computation of the ratio rule (docs/testing.md) also does. l sums the f32
// weights, so the LSE keeps f32 accuracy. Splitting P into two bf16 parts was not needed: the
// max error against fp64 (first 256 rows of the shape below, two seeds) is 3.4e-4 / 4.0e-4
// non-causal (PyTorch 3.4e-4 / 3.5e-4, the Highway kernel 3.1e-4 / 3.5e-4), and 7.4e-3 / 8.2e-3
// causal, as PyTorch's (the output's rounding dominates).
//
// Measured (2-core Emerald Rapids Xeon shared with other jobs, B = 1, H = 8, N = 4096, D = 128,
// bf16, 2 threads, medians of interleaved runs): 109 ms non-causal, 68 ms causal; the Highway
// kernel 496 / 280 ms; PyTorch's scaled_dot_product_attention (oneDNN AMX) 137 / 87 ms. Profile
// (1 thread): softmax ~40% of the kernel, P V ~35%, Q K^T ~25%, packing ~3%.
//
// Portability: the kernel functions carry target attributes (AMX-TILE, AMX-BF16, AVX-512), so the
// rest of the library is compiled as before; on other compilers and CPUs the file compiles to
// AmxForwardHandles() == false and never runs.
#include "attention/flash_fwd_amx.h"

#include <hwy/aligned_allocator.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/amx_tiles.h"
#include "core/parallel.h"

namespace tessera {

bool AmxForwardHandles(const AttentionProblem& p) {
  return TESSERA_AMX_KERNEL && p.dtype == DType::kBF16 && !p.varlen() && p.dim >= 32 &&
         p.dim <= 256 && p.dim % 32 == 0 && p.softcap == 0.0f && p.alibi == nullptr &&
         !p.mask.any && !p.mask.sigmoid && p.heads_q > 0 && p.seq_k < (int64_t{1} << 30);
}

#if TESSERA_AMX_KERNEL

namespace {

using amx::CompilerBarrier;
using amx::Exp2;
using amx::Row;

constexpr int64_t kTileRows = 16;   // rows of every tile
constexpr int64_t kGroupRows = 32;  // query rows per score / output step (2 tiles)
constexpr int64_t kChunk = 32;      // keys per chunk (a P tile's width), dims per Q tile
constexpr int64_t kBlockKeys = 256;
constexpr int64_t kTaskRows = 256;
constexpr int64_t kMaxDim = 256;
// A K tile: 16 rows (dim pairs) of 16 keys x 2 bf16.
constexpr int64_t kKTileElems = kTileRows * kChunk;
// Packed K and V of the heads of one round stay under this many bytes (at least one head).
constexpr int64_t kPackBudgetBytes = int64_t{64} << 20;

// A (sequence, KV head) of a round: its packed K and V, every key block of the sequence.
struct PackedHead {
  int64_t seq, kv_head;
  uint16_t* k;  // [keys_p / 16][D / 32][16][32]: B tiles of 16 keys x 32 dims
  uint16_t* v;  // [keys_p / 2][2 D]: rows 2j and 2j + 1 interleaved
};

struct Task {
  const PackedHead* head;
  int64_t q0, nq;
};

// Per-worker scratch, carved from one allocation; every region starts on a cache line.
struct Scratch {
  uint16_t* q;   // [rows_p][D] query rows, bf16
  float* o;      // [rows_p][D] output accumulator
  float* s;      // [kGroupRows][kBlockKeys] scores; the bf16 weights overwrite each row's start
  float* m;      // [rows_p] running max (log2 units)
  float* l;      // [rows_p] running sum
  float* alpha;  // [kGroupRows] rescale of the group's rows
  int64_t* lo;   // [rows_p] first visible key (lo > hi: none)
  int64_t* hi;   // [rows_p] last visible key
  int64_t* glo;  // [rows_p / 32] first key some row of the group sees
  int64_t* ghi;  // [rows_p / 32] last key some row of the group sees

  // Bytes of the scratch for head dim `dim` and `rows_p` rows; carves it when base != nullptr.
  size_t Carve(uint8_t* base, size_t dim, size_t rows_p) {
    size_t at = 0;
    auto take = [&](auto** ptr, size_t bytes) {
      if (base != nullptr) *ptr = reinterpret_cast<std::remove_pointer_t<decltype(ptr)>>(base + at);
      at += (bytes + 63) / 64 * 64;
    };
    take(&q, rows_p * dim * 2);
    take(&o, rows_p * dim * 4);
    take(&s, static_cast<size_t>(kGroupRows * kBlockKeys) * 4);
    take(&m, rows_p * 4);
    take(&l, rows_p * 4);
    take(&alpha, static_cast<size_t>(kGroupRows) * 4);
    take(&lo, rows_p * 8);
    take(&hi, rows_p * 8);
    take(&glo, rows_p / kGroupRows * 8);
    take(&ghi, rows_p / kGroupRows * 8);
    return at;
  }
};

// x as a register value: keeps the compiler from contracting the product that produced it with a
// later subtraction into an FMA (GCC contracts across statements in C++ by default).
TESSERA_AMX_TARGET inline __m512 Rounded(__m512 x) {
  __asm__("" : "+v"(x));
  return x;
}

// Packs key block kb0 (kBlockKeys keys; keys past the end are zero) of head `h`: K into B tiles
// (tile (key tile kt, dim chunk dc) holds in row j the pairs (K[key][32 dc + 2 j],
// K[key][32 dc + 2 j + 1]) of its 16 keys), V pair-interleaved over keys (row j of the block is
// (V[2j][0], V[2j+1][0], V[2j][1], V[2j+1][1], ...), so 16 rows x 16 dims form a B tile).
TESSERA_AMX_TARGET void PackBlock(const AttentionProblem& p, const PackedHead& h, int64_t kb0) {
  alignas(64) uint16_t gathered[kTileRows][kMaxDim];
  alignas(64) static const uint16_t kZeros[kMaxDim] = {};
  const int64_t dim = p.dim, chunks = dim / kChunk;
  for (int64_t kt = 0; kt < kBlockKeys / kTileRows; ++kt) {
    const int64_t key0 = kb0 + kt * kTileRows;
    const uint16_t* src[kTileRows];
    for (int64_t n = 0; n < kTileRows; ++n) {
      src[n] = key0 + n < p.seq_k ? Row(p, p.k, p.k_stride, h.seq, key0 + n, h.kv_head, gathered[n])
                                  : kZeros;
    }
    amx::PackTransposed(src, dim, h.k + (key0 / kTileRows) * chunks * kKTileElems);
    for (int64_t n = 0; n < kTileRows; ++n) {
      src[n] = key0 + n < p.seq_k ? Row(p, p.v, p.v_stride, h.seq, key0 + n, h.kv_head, gathered[n])
                                  : kZeros;
    }
    // Row (key0 + n) / 2 of 2 D elements holds keys key0 + n and key0 + n + 1.
    for (int64_t n = 0; n < kTileRows; n += 2) {
      amx::PackInterleaved(src[n], src[n + 1], dim, h.v + (key0 + n) * dim);
    }
  }
}

// Lanes of columns [col, col + 16) inside [lo, hi] (vlo, vhi; iota = 0..15), all when `full`.
TESSERA_AMX_TARGET inline __mmask16 Visible(bool full, int64_t col, __m512i iota, __m512i vlo,
                                            __m512i vhi) {
  if (full) return 0xFFFF;
  const __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(col)));
  return _mm512_cmp_epi32_mask(key, vlo, _MM_CMPINT_NLT) &
         _mm512_cmp_epi32_mask(key, vhi, _MM_CMPINT_LE);
}

class TaskRunner {
 public:
  TaskRunner(const AttentionProblem& p, const Task& t, const Scratch& s, bool amx)
      : amx_(amx),
        p_(p),
        t_(t),
        s_(s),
        dim_(p.dim),
        k_len_(p.seq_k),
        rows_(p.group * t.nq),
        rows_p_((rows_ + kGroupRows - 1) / kGroupRows * kGroupRows),
        scale_log2_(static_cast<float>(static_cast<double>(p.scale) * 1.4426950408889634)) {}

  TESSERA_AMX_TARGET void Run();

 private:
  TESSERA_AMX_TARGET void PackQueries();
  TESSERA_AMX_TARGET void Scores(int64_t g, int64_t kb0, int64_t c0, int64_t c1);
  TESSERA_AMX_TARGET void Softmax(int64_t g, int64_t kb0, int64_t c0, int64_t c1);
  TESSERA_AMX_TARGET void Accumulate(int64_t g, int64_t kb0, int64_t c0, int64_t c1);
  TESSERA_AMX_TARGET void VectorScores(int64_t g, int64_t kb0, int64_t c0, int64_t c1);
  TESSERA_AMX_TARGET void VectorAccumulate(int64_t g, int64_t kb0, int64_t c0, int64_t c1);
  TESSERA_AMX_TARGET void Rescale(int64_t g);
  TESSERA_AMX_TARGET void Finish();

  const bool amx_;  // AMX tiles, else AVX512-BF16 vectors
  const AttentionProblem& p_;
  const Task& t_;
  const Scratch& s_;
  const int64_t dim_;
  const int64_t k_len_;
  const int64_t rows_;
  const int64_t rows_p_;
  const float scale_log2_;
};

TESSERA_AMX_TARGET void TaskRunner::PackQueries() {
  const int64_t delta = p_.top_left ? 0 : p_.seq_k - p_.seq_q;
  const PackedHead& h = *t_.head;
  for (int64_t r = 0; r < rows_p_; ++r) {
    uint16_t* dst = s_.q + r * dim_;
    s_.m[r] = -std::numeric_limits<float>::infinity();
    s_.l[r] = 0.0f;
    std::memset(s_.o + r * dim_, 0, static_cast<size_t>(dim_) * sizeof(float));
    if (r >= rows_) {
      std::memset(dst, 0, static_cast<size_t>(dim_) * sizeof(uint16_t));
      s_.lo[r] = 1;
      s_.hi[r] = 0;
      continue;
    }
    const int64_t head = h.kv_head * p_.group + r / t_.nq;
    const int64_t qi = t_.q0 + r % t_.nq;
    const AttentionProblem::KeyRange kr = p_.visible_keys(qi + delta, k_len_);
    s_.lo[r] = kr.lo;
    s_.hi[r] = kr.hi;
    const uint16_t* src = Row(p_, p_.q, p_.q_stride, h.seq, qi, head, dst);
    if (src != dst) std::memcpy(dst, src, static_cast<size_t>(dim_) * sizeof(uint16_t));
  }
}

// Scores of group g's 32 rows against chunks [c0, c1) of key block kb0, into s (f32, unscaled).
TESSERA_AMX_TARGET void TaskRunner::Scores(int64_t g, int64_t kb0, int64_t c0, int64_t c1) {
  const int64_t chunks = dim_ / kChunk;
  const uint16_t* q0 = s_.q + g * kGroupRows * dim_;
  const uint16_t* q1 = q0 + kTileRows * dim_;
  const uint16_t* kb = t_.head->k + kb0 * dim_;
  const long q_stride = static_cast<long>(dim_ * 2);
  const long s_stride = static_cast<long>(kBlockKeys * 4);
  CompilerBarrier();
  for (int64_t c = c0; c < c1; ++c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* k0 = kb + 2 * c * chunks * kKTileElems;
    const uint16_t* k1 = k0 + chunks * kKTileElems;
    for (int64_t dc = 0; dc < chunks; ++dc) {
      _tile_loadd(4, q0 + dc * kChunk, q_stride);
      _tile_loadd(5, q1 + dc * kChunk, q_stride);
      _tile_loadd(6, k0 + dc * kKTileElems, 64);
      _tile_loadd(7, k1 + dc * kKTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* s = s_.s + c * kChunk;
    _tile_stored(0, s, s_stride);
    _tile_stored(1, s + kTileRows, s_stride);
    _tile_stored(2, s + kTileRows * kBlockKeys, s_stride);
    _tile_stored(3, s + kTileRows * kBlockKeys + kTileRows, s_stride);
  }
}

// Online softmax of group g's rows over chunks [c0, c1) of key block kb0: updates m and l, writes
// each row's bf16 weights over the start of its scores (weight of column c at bf16 index c, which
// only overwrites scores already read) and its rescale factor to alpha.
TESSERA_AMX_TARGET void TaskRunner::Softmax(int64_t g, int64_t kb0, int64_t c0, int64_t c1) {
  const float kInf = std::numeric_limits<float>::infinity();
  const int64_t col0 = c0 * kChunk, col1 = c1 * kChunk;
  const int64_t first = kb0 + col0, last = kb0 + col1 - 1;
  const __m512 scale = _mm512_set1_ps(scale_log2_);
  // The row max of scale * s is scale times the max of s (the min for a negative scale): rounding
  // is monotonic.
  const bool negative = scale_log2_ < 0.0f;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < kGroupRows; ++i) {
    const int64_t r = g * kGroupRows + i;
    float* srow = s_.s + i * kBlockKeys;
    uint16_t* prow = reinterpret_cast<uint16_t*>(srow);
    const int64_t lo = s_.lo[r], hi = s_.hi[r];
    s_.alpha[i] = 1.0f;
    if (lo > hi || hi < first || lo > last) {
      std::memset(prow + col0, 0, static_cast<size_t>(col1 - col0) * sizeof(uint16_t));
      continue;
    }
    const bool full = lo <= first && hi >= last;
    // Window bounds relative to the block, clamped into int32; `visible` masks 16 columns.
    const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(std::max<int64_t>(lo - kb0, -1)));
    const __m512i vhi =
        _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(hi - kb0, kBlockKeys)));
    float extreme;
    if (negative) {
      __m512 v = _mm512_set1_ps(kInf);
      for (int64_t col = col0; col < col1; col += 16) {
        v = _mm512_mask_min_ps(v, Visible(full, col, iota, vlo, vhi), v,
                               _mm512_load_ps(srow + col));
      }
      extreme = _mm512_reduce_min_ps(v);
    } else {
      __m512 v = _mm512_set1_ps(-kInf);
      for (int64_t col = col0; col < col1; col += 16) {
        v = _mm512_mask_max_ps(v, Visible(full, col, iota, vlo, vhi), v,
                               _mm512_load_ps(srow + col));
      }
      extreme = _mm512_reduce_max_ps(v);
    }
    const float block_max = extreme * scale_log2_;
    const float m_old = s_.m[r];
    const float m_new = block_max > m_old ? block_max : m_old;
    const float m_use = m_new == -kInf ? 0.0f : m_new;
    const __m512 vm = _mm512_set1_ps(m_use);
    const float alpha =
        m_old == m_use ? 1.0f : _mm512_cvtss_f32(Exp2(_mm512_set1_ps(m_old - m_use)));
    // The logit is rounded before m is subtracted (Rounded: no FMA): the max then gives exactly
    // 2^0, also where logits are so large that their f32 rounding exceeds 1 (an FMA's exact
    // residual reaches 2^+-512 at 1e10).
    __m512 sum = _mm512_setzero_ps();
    for (int64_t col = col0; col < col1; col += 32) {
      const __m512 x0 = _mm512_load_ps(srow + col);
      const __m512 x1 = _mm512_load_ps(srow + col + 16);
      const __m512 p0 =
          _mm512_maskz_mov_ps(Visible(full, col, iota, vlo, vhi),
                              Exp2(_mm512_sub_ps(Rounded(_mm512_mul_ps(x0, scale)), vm)));
      const __m512 p1 =
          _mm512_maskz_mov_ps(Visible(full, col + 16, iota, vlo, vhi),
                              Exp2(_mm512_sub_ps(Rounded(_mm512_mul_ps(x1, scale)), vm)));
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      const __m512bh bf = _mm512_cvtne2ps_pbh(p1, p0);
      _mm512_store_si512(prow + col, reinterpret_cast<const __m512i&>(bf));
    }
    s_.l[r] = s_.l[r] * alpha + _mm512_reduce_add_ps(sum);
    s_.m[r] = m_new;
    s_.alpha[i] = alpha;
  }
}

// O = alpha O + P V for group g over chunks [c0, c1) of key block kb0.
TESSERA_AMX_TARGET void TaskRunner::Accumulate(int64_t g, int64_t kb0, int64_t c0, int64_t c1) {
  float* o = s_.o + g * kGroupRows * dim_;
  Rescale(g);
  CompilerBarrier();
  const long o_stride = static_cast<long>(dim_ * 4);
  const long p_stride = static_cast<long>(kBlockKeys * 4);  // weights overlay the scores
  const long v_stride = static_cast<long>(dim_ * 4);
  const uint16_t* p0 = reinterpret_cast<const uint16_t*>(s_.s);
  const uint16_t* p1 = reinterpret_cast<const uint16_t*>(s_.s + kTileRows * kBlockKeys);
  const uint16_t* vb = t_.head->v + kb0 * dim_;
  for (int64_t d = 0; d < dim_; d += kChunk) {
    float* o0 = o + d;
    float* o1 = o0 + kTileRows * dim_;
    _tile_loadd(0, o0, o_stride);
    _tile_loadd(1, o0 + kTileRows, o_stride);
    _tile_loadd(2, o1, o_stride);
    _tile_loadd(3, o1 + kTileRows, o_stride);
    for (int64_t c = c0; c < c1; ++c) {
      const uint16_t* v = vb + c * kChunk * dim_ + 2 * d;
      _tile_loadd(4, p0 + c * kChunk, p_stride);
      _tile_loadd(5, p1 + c * kChunk, p_stride);
      _tile_loadd(6, v, v_stride);
      _tile_loadd(7, v + kChunk, v_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, o0, o_stride);
    _tile_stored(1, o0 + kTileRows, o_stride);
    _tile_stored(2, o1, o_stride);
    _tile_stored(3, o1 + kTileRows, o_stride);
  }
}

// O = alpha O for group g's rows, before P V adds the block's terms.
TESSERA_AMX_TARGET void TaskRunner::Rescale(int64_t g) {
  float* o = s_.o + g * kGroupRows * dim_;
  for (int64_t i = 0; i < kGroupRows; ++i) {
    const float alpha = s_.alpha[i];
    if (alpha == 1.0f) continue;
    const __m512 va = _mm512_set1_ps(alpha);
    float* row = o + i * dim_;
    for (int64_t d = 0; d < dim_; d += 16) {
      _mm512_store_ps(row + d, _mm512_mul_ps(_mm512_load_ps(row + d), va));
    }
  }
}

// The AVX512-BF16 engine: the same products on the same packed layouts, in zmm registers.
// vdpbf16ps adds a[2n] b[2n] + a[2n + 1] b[2n + 1] into f32 lane n, so a lane pairs two bf16
// values of the reduced axis: the dims for the scores (a key tile of K packed for AMX is D/2 rows
// of 16 keys x one dim pair), the keys for P V (packed V rows are key pairs, P rows hold
// consecutive keys). Register blocks of 4 rows x kCols vectors: per step kCols loads and 4
// broadcasts feed 4 kCols products.

// A 32-bit broadcast of the bf16 pair at `pair`.
TESSERA_AMX_TARGET inline __m512bh PairBroadcast(const uint16_t* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(bits));
}

// Scores of 4 query rows (bf16, `dim` apart) against kCols key tiles of packed K (`tile_elems`
// apart), into 4 rows of s (`s_stride` floats apart), kCols x 16 columns.
template <int kCols>
TESSERA_AMX_TARGET inline void VectorScoreBlock(const uint16_t* q, int64_t dim, const uint16_t* k,
                                                int64_t tile_elems, float* s, int64_t s_stride) {
  __m512 acc[4][kCols];
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < kCols; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t pair = 0; pair < dim / 2; ++pair) {
    __m512bh kv[kCols];
    for (int t = 0; t < kCols; ++t) {
      kv[t] = reinterpret_cast<__m512bh>(_mm512_load_si512(k + t * tile_elems + pair * 32));
    }
    for (int r = 0; r < 4; ++r) {
      const __m512bh qb = PairBroadcast(q + r * dim + 2 * pair);
      for (int t = 0; t < kCols; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qb, kv[t]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < kCols; ++t) _mm512_store_ps(s + r * s_stride + t * 16, acc[r][t]);
  }
}

// O (4 rows, `o_stride` floats apart, kCols x 16 dims) += P V over `pairs` key pairs: P rows bf16,
// `p_stride` elements apart; packed V rows (key pairs) `v_stride` elements apart.
template <int kCols>
TESSERA_AMX_TARGET inline void VectorPvBlock(const uint16_t* p, int64_t p_stride, const uint16_t* v,
                                             int64_t v_stride, int64_t pairs, float* o,
                                             int64_t o_stride) {
  __m512 acc[4][kCols];
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < kCols; ++t) acc[r][t] = _mm512_load_ps(o + r * o_stride + t * 16);
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh vv[kCols];
    for (int t = 0; t < kCols; ++t) {
      vv[t] = reinterpret_cast<__m512bh>(_mm512_load_si512(v + j * v_stride + t * 32));
    }
    for (int r = 0; r < 4; ++r) {
      const __m512bh pb = PairBroadcast(p + r * p_stride + 2 * j);
      for (int t = 0; t < kCols; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], pb, vv[t]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < kCols; ++t) _mm512_store_ps(o + r * o_stride + t * 16, acc[r][t]);
  }
}

// Scores of group g's 32 rows against chunks [c0, c1) of key block kb0 (as Scores).
TESSERA_AMX_TARGET void TaskRunner::VectorScores(int64_t g, int64_t kb0, int64_t c0, int64_t c1) {
  const int64_t tile_elems = dim_ / 2 * 32;  // a key tile of packed K
  const uint16_t* kb = t_.head->k + kb0 * dim_;
  const int64_t t0 = 2 * c0, t1 = 2 * c1;  // key tiles of 16 keys
  for (int64_t i = 0; i < kGroupRows; i += 4) {
    const uint16_t* q = s_.q + (g * kGroupRows + i) * dim_;
    float* s = s_.s + i * kBlockKeys;
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) {
      VectorScoreBlock<4>(q, dim_, kb + t * tile_elems, tile_elems, s + t * 16, kBlockKeys);
    }
    if (t < t1)
      VectorScoreBlock<2>(q, dim_, kb + t * tile_elems, tile_elems, s + t * 16, kBlockKeys);
  }
}

// O = alpha O + P V for group g over chunks [c0, c1) of key block kb0 (as Accumulate).
TESSERA_AMX_TARGET void TaskRunner::VectorAccumulate(int64_t g, int64_t kb0, int64_t c0,
                                                     int64_t c1) {
  Rescale(g);
  const int64_t p_stride = 2 * kBlockKeys;  // bf16 weights overlay the f32 score rows
  const uint16_t* p0 = reinterpret_cast<const uint16_t*>(s_.s) + c0 * kChunk;
  const uint16_t* v0 = t_.head->v + kb0 * dim_ + c0 * kChunk * dim_;  // key pair 16 c0
  const int64_t pairs = (c1 - c0) * kChunk / 2;
  for (int64_t i = 0; i < kGroupRows; i += 4) {
    float* o = s_.o + (g * kGroupRows + i) * dim_;
    const uint16_t* p = p0 + i * p_stride;
    int64_t d = 0;
    for (; d + 64 <= dim_; d += 64) {
      VectorPvBlock<4>(p, p_stride, v0 + 2 * d, 2 * dim_, pairs, o + d, dim_);
    }
    if (d < dim_) VectorPvBlock<2>(p, p_stride, v0 + 2 * d, 2 * dim_, pairs, o + d, dim_);
  }
}

// Normalizes the rows and writes out (bf16) and the LSE (natural log).
TESSERA_AMX_TARGET void TaskRunner::Finish() {
  alignas(64) uint16_t tmp[kMaxDim];
  const PackedHead& h = *t_.head;
  for (int64_t r = 0; r < rows_; ++r) {
    const int64_t head = h.kv_head * p_.group + r / t_.nq;
    const int64_t token = t_.q0 + r % t_.nq;
    // l is 0 only for a row with no visible key; a NaN l (NaN inputs) must stay NaN.
    const float l = s_.l[r];
    const bool none_visible = l <= 0.0f;
    const __m512 inv = _mm512_set1_ps(none_visible ? 0.0f : 1.0f / l);
    const float* row = s_.o + r * dim_;
    for (int64_t d = 0; d < dim_; d += 16) {
      const __m256bh bf = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(row + d), inv));
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + d), reinterpret_cast<const __m256i&>(bf));
    }
    uint16_t* out = static_cast<uint16_t*>(p_.out) + p_.out_offset(h.seq, token, head);
    if (p_.out_stride[3] == 1) {
      std::memcpy(out, tmp, static_cast<size_t>(dim_) * sizeof(uint16_t));
    } else {
      for (int64_t d = 0; d < dim_; ++d) out[d * p_.out_stride[3]] = tmp[d];
    }
    if (p_.lse != nullptr) {
      p_.lse[p_.lse_offset(h.seq, head, token)] =
          none_visible ? -std::numeric_limits<float>::infinity()
                       : static_cast<float>(static_cast<double>(s_.m[r]) * 0.69314718055994531 +
                                            std::log(static_cast<double>(l)));
    }
  }
}

TESSERA_AMX_TARGET void TaskRunner::Run() {
  amx::TileConfig config;  // tiles 0-3 accumulators, 4-5 A, 6-7 B
  CompilerBarrier();
  if (amx_) _tile_loadconfig(&config);
  PackQueries();
  // Each group's key range (the union of its rows' windows) and the task's.
  const int64_t groups = rows_p_ / kGroupRows;
  int64_t task_lo = INT64_MAX, task_hi = -1;
  int64_t* glo = s_.glo;
  int64_t* ghi = s_.ghi;
  for (int64_t g = 0; g < groups; ++g) glo[g] = INT64_MAX, ghi[g] = -1;
  for (int64_t r = 0; r < rows_; ++r) {
    if (s_.lo[r] > s_.hi[r]) continue;
    const int64_t g = r / kGroupRows;
    glo[g] = std::min(glo[g], s_.lo[r]);
    ghi[g] = std::max(ghi[g], s_.hi[r]);
    task_lo = std::min(task_lo, s_.lo[r]);
    task_hi = std::max(task_hi, s_.hi[r]);
  }
  for (int64_t kb0 = task_hi < 0 ? 0 : task_lo / kBlockKeys * kBlockKeys; kb0 <= task_hi;
       kb0 += kBlockKeys) {
    const int64_t kb1 = kb0 + kBlockKeys - 1;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t a = std::max(glo[g], kb0);
      const int64_t e = std::min(ghi[g], kb1);
      if (a > e) continue;
      const int64_t c0 = (a - kb0) / kChunk, c1 = (e - kb0) / kChunk + 1;
      if (amx_) {
        Scores(g, kb0, c0, c1);
        Softmax(g, kb0, c0, c1);
        Accumulate(g, kb0, c0, c1);
      } else {
        VectorScores(g, kb0, c0, c1);
        Softmax(g, kb0, c0, c1);
        VectorAccumulate(g, kb0, c0, c1);
      }
    }
  }
  if (amx_) _tile_release();
  Finish();
}

}  // namespace

bool AmxForward(const AttentionProblem& p, int32_t threads, Bf16Dot engine) {
  if (engine == Bf16Dot::kNone) return false;
  threads = std::max(threads, 1);
  const int64_t block = std::max<int64_t>(1, kTaskRows / p.group);
  const int64_t max_rows = p.group * std::min(block, p.seq_q);
  const size_t rows_p = static_cast<size_t>((max_rows + kGroupRows - 1) / kGroupRows * kGroupRows);
  const int64_t keys_p = (p.seq_k + kBlockKeys - 1) / kBlockKeys * kBlockKeys;
  const int64_t blocks = keys_p / kBlockKeys;
  const int64_t head_elems = keys_p * p.dim;  // of K, and of V
  const int64_t heads = p.batch * p.heads_kv;
  const int64_t round_heads = std::clamp<int64_t>(kPackBudgetBytes / (4 * head_elems), 1, heads);
  Scratch layout;
  const size_t per_worker = layout.Carve(nullptr, static_cast<size_t>(p.dim), rows_p);
  // No more workers than the largest ParallelFor of a round has units.
  const int64_t qblocks = (p.seq_q + block - 1) / block;
  threads =
      static_cast<int32_t>(std::min<int64_t>(threads, round_heads * std::max(qblocks, blocks)));
  auto scratch = hwy::AllocateAligned<uint8_t>(per_worker * static_cast<size_t>(threads));
  auto packed = hwy::AllocateAligned<uint16_t>(static_cast<size_t>(2 * round_heads * head_elems));
  if (!scratch || !packed) return false;
  std::vector<PackedHead> round(static_cast<size_t>(round_heads));
  std::vector<Task> tasks;
  // Rounds of heads: pack their K and V (shared by every task of the head: the query blocks and
  // the GQA group's heads), then run their tasks, last query blocks first (under a causal mask
  // they are the longest, and running them first balances the dynamic schedule).
  for (int64_t h0 = 0; h0 < heads; h0 += round_heads) {
    const int64_t n = std::min(round_heads, heads - h0);
    for (int64_t i = 0; i < n; ++i) {
      round[static_cast<size_t>(i)] =
          PackedHead{(h0 + i) / p.heads_kv, (h0 + i) % p.heads_kv,
                     packed.get() + 2 * i * head_elems, packed.get() + (2 * i + 1) * head_elems};
    }
    ParallelFor(threads, n * blocks, [&](int64_t unit, int32_t) {
      PackBlock(p, round[static_cast<size_t>(unit / blocks)], unit % blocks * kBlockKeys);
    });
    tasks.clear();
    for (int64_t q0 = (p.seq_q - 1) / block * block; q0 >= 0; q0 -= block) {
      for (int64_t i = 0; i < n; ++i) {
        tasks.push_back(Task{&round[static_cast<size_t>(i)], q0, std::min(block, p.seq_q - q0)});
      }
    }
    ParallelFor(threads, static_cast<int64_t>(tasks.size()), [&](int64_t task, int32_t worker) {
      Scratch s;
      s.Carve(scratch.get() + per_worker * static_cast<size_t>(worker), static_cast<size_t>(p.dim),
              rows_p);
      TaskRunner(p, tasks[static_cast<size_t>(task)], s, engine == Bf16Dot::kAmx).Run();
    });
  }
  return true;
}

#else  // !TESSERA_AMX_KERNEL

bool AmxForward(const AttentionProblem&, int32_t, Bf16Dot) { return false; }

#endif  // TESSERA_AMX_KERNEL

}  // namespace tessera
