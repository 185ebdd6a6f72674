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

#include "attention/attention_problem.h"
#include "core/element.h"
#include "core/parallel.h"
#include "decode/decode.h"
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

constexpr size_t kTile = static_cast<size_t>(decode::kKeyTile);
#if HWY_TARGET == HWY_AVX3_DL
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif
// Code bytes per VNNI step.
constexpr size_t kCodeBlock = 64;
// Keys per step of the software pipeline (scores of the next tile, P.V of this one); a multiple
// of the 4-key score block. 16 rather than 8 since the rows are prefetched (kPrefetchKeys): half
// the accumulator loads and stores per key (in L2: f16 104 -> 100, int8 81 -> 75 cycles per key
// and KV head; 32K tokens: f16 4.77 -> 4.47 ms, int8 3.12 -> 2.96 ms, medians of alternating runs).
constexpr size_t kFuseKeys = 16;
static_assert(kFuseKeys % 4 == 0 && kTile % kFuseKeys == 0, "fuse step: 4-key blocks");
// Scoring key j prefetches the K and V rows of key j + kPrefetchKeys into L2 (prefetcht1). The
// hardware prefetcher alone runs too short a distance ahead of streams consumed at the pace of
// the arithmetic, and stops at every page of a paged cache. Measured at 32K f16 tokens on 2
// threads (KVCache on 2 MiB pages), medians of alternating runs: contiguous 6.1 -> 5.1 ms, page
// size 16 7.6 -> 6.4 ms, page size 1 10.5 -> 7.0 ms, page size 256 unchanged; 16 to 64 keys
// ahead alike, 128 worse, and into L1 (prefetcht0) 8.3 ms.
constexpr int64_t kPrefetchKeys = 32;

// The rows and scores of one key tile. A unit keeps two: the scores of tile t + 1 are computed
// while P.V reads tile t (see RunUnit).
struct TileSlot {
  uint8_t* kt;           // [kTile][row bytes] staged K rows (when not read in place)
  uint8_t* vt;           // [kTile][row bytes] staged V rows
  const uint8_t** krow;  // [kTile] the tile's K rows (in place or staged)
  const uint8_t** vrow;  // [kTile]
  float* kstep;          // [kTile] quantized rows' (step, min)
  float* kmin;
  float* vstep;
  float* vmin;
  float* st;  // [kTile][Mp] scores, then probabilities
  // Quantized V on VNNI: the weights p_j * step_j as 15-bit integers, key pairs packed in int32
  // ((key 2i) | (key 2i + 1) << 16) [kTile / 2][Mp], and each row's scale back to f32.
  int32_t* wq;
  float* wscale;  // [Mp]
  // Keys [a, a + nkeys); nk4 rounds nkeys up to the 4-key score blocks; full: every row sees
  // every key of the tile.
  int64_t a = 0;
  size_t nkeys = 0, nk4 = 0;
  bool full = false;
};

// Per-worker scratch, carved from the calling thread's Workspace (below). Per-head arrays are
// [heads][...]; `heads` is the largest head block of the schedule.
struct Scratch {
  TileSlot tile[2];
  uint8_t* zero;    // [row bytes] zeros: the padding keys of a partial tile
  float* row;       // [Dp] one query or output row
  float* acc;       // [heads][Rp][Dp] output accumulators
  float* m;         // [heads][Mp] running max
  float* l;         // [heads][Mp] running sum
  float* alpha;     // [Mp] rescale factor of the current tile
  float* tile_max;  // [Mp]
  int32_t* lo;      // [heads][Mp] visible keys [lo, hi]
  int32_t* hi;      // [heads][Mp]
  float* vbias;     // [heads][Mp] quantized V: running sum_j p_j min_j (rescaled like acc)
  float* red;       // [kLanes] reduction bounce buffer
  int32_t* iacc;    // [Rp][Dc] quantized V on VNNI: the tile's integer P.V sums

  static size_t Floats(size_t heads, size_t rp, size_t dp, size_t dc, size_t mp, size_t row_bytes) {
    const size_t ptr = sizeof(void*) / sizeof(float);
    const size_t slot = 2 * kTile * row_bytes / 4 + 2 * kTile * ptr + 4 * kTile + kTile * mp +
                        kTile / 2 * mp + mp + 2 * kLanes;
    return 2 * slot + row_bytes / 4 + dp + heads * rp * dp + heads * mp * 5 + 2 * mp + kLanes +
           rp * dc + 48 * kLanes;
  }
  void Carve(float* base, size_t heads, size_t rp, size_t dp, size_t dc, size_t mp,
             size_t row_bytes) {
    auto take = [&base](size_t floats) {
      float* p = base;
      base += hwy::DivCeil(floats, kLanes) * kLanes;  // keep every array vector-aligned
      return p;
    };
    auto bytes = [&take](size_t n) {
      return reinterpret_cast<uint8_t*>(take(hwy::DivCeil(n, sizeof(float))));
    };
    auto pointers = [&take](size_t n) {
      return reinterpret_cast<const uint8_t**>(take(n * sizeof(void*) / sizeof(float)));
    };
    for (TileSlot& t : tile) {
      t.kt = bytes(kTile * row_bytes);
      t.vt = bytes(kTile * row_bytes);
      t.krow = pointers(kTile);
      t.vrow = pointers(kTile);
      t.kstep = take(kTile);
      t.kmin = take(kTile);
      t.vstep = take(kTile);
      t.vmin = take(kTile);
      t.st = take(kTile * mp);
      t.wq = reinterpret_cast<int32_t*>(take(kTile / 2 * mp));
      t.wscale = take(mp);
    }
    zero = bytes(row_bytes);
    std::memset(zero, 0, row_bytes);
    row = take(dp);
    acc = take(heads * rp * dp);
    m = take(heads * mp);
    l = take(heads * mp);
    alpha = take(mp);
    tile_max = take(mp);
    lo = reinterpret_cast<int32_t*>(take(heads * mp));
    hi = reinterpret_cast<int32_t*>(take(heads * mp));
    vbias = take(heads * mp);
    red = take(kLanes);
    iacc = reinterpret_cast<int32_t*>(take(rp * dc));
  }
};

// The state SoftmaxTile works on: one head's slice of the scratch.
struct HeadState {
  float* st;
  float* m;
  float* l;
  float* alpha;
  float* tile_max;
  float* pos;
  float* slope;
  int32_t* lo;
  int32_t* hi;
};

// ---- Staging rows that cannot be read in place -----------------------------------------------

// Copies `dim` elements of `elem_bytes` bytes (element stride `stride`) to dst and zero-fills
// dst up to `row_bytes`: the staged row keeps the cache's element type.
HWY_INLINE void StageRow(const uint8_t* HWY_RESTRICT row, int64_t stride, size_t dim,
                         size_t elem_bytes, size_t row_bytes, uint8_t* HWY_RESTRICT dst) {
  if (stride == 1) {
    std::memcpy(dst, row, dim * elem_bytes);
  } else {
    for (size_t c = 0; c < dim; ++c) {
      std::memcpy(dst + c * elem_bytes,
                  row + static_cast<int64_t>(c) * stride * static_cast<int64_t>(elem_bytes),
                  elem_bytes);
    }
  }
  std::memset(dst + dim * elem_bytes, 0, row_bytes - dim * elem_bytes);
}

// Unpacks int4 codes of `dim` channels (channel 2i in the low nibble of byte i) to one byte each.
HWY_INLINE void UnpackInt4(const uint8_t* HWY_RESTRICT row, size_t dim, uint8_t* HWY_RESTRICT dst) {
  const size_t bytes = (dim + 1) / 2;
  size_t i = 0;
#if HWY_TARGET != HWY_SCALAR
  const hn::ScalableTag<uint16_t> d16;
  const hn::Rebind<uint8_t, decltype(d16)> d8h;      // one byte per u16 lane
  const hn::Repartition<uint8_t, decltype(d16)> d8;  // two bytes per u16 lane
  const size_t n16 = hn::Lanes(d16);
  for (; i + n16 <= bytes; i += n16) {
    const auto x = hn::PromoteTo(d16, hn::LoadU(d8h, row + i));
    // (hi << 8) | lo: little-endian bytes lo, hi = channels 2i, 2i + 1.
    const auto y = hn::Or(hn::And(x, hn::Set(d16, 0x0F)), hn::ShiftLeft<8>(hn::ShiftRight<4>(x)));
    hn::StoreU(hn::BitCast(d8, y), d8, dst + 2 * i);
  }
#endif
  for (; i < bytes; ++i) {
    dst[2 * i] = row[i] & 0x0F;
    if (2 * i + 1 < dim) dst[2 * i + 1] = static_cast<uint8_t>(row[i] >> 4);
  }
}

// The codes of a quantized row, one byte each, zero-filled up to `row_bytes`.
HWY_INLINE void StageCodeRow(KVDType dtype, const uint8_t* HWY_RESTRICT row, size_t dim,
                             size_t row_bytes, uint8_t* HWY_RESTRICT dst) {
  if (dtype == KVDType::kInt4) {
    UnpackInt4(row, dim, dst);
  } else {
    std::memcpy(dst, row, dim);
  }
  std::memset(dst + dim, 0, row_bytes - dim);
}

// A vector of staged elements as f32: f32 as is, bf16 / f16 widened, u8 codes converted.
HWY_INLINE VF LoadAsF32(const float* p) { return hn::LoadU(DF(), p); }
HWY_INLINE VF LoadAsF32(const hwy::float16_t* p) {
  return hn::PromoteTo(DF(), hn::LoadU(hn::Rebind<hwy::float16_t, DF>(), p));
}
HWY_INLINE VF LoadAsF32(const hwy::bfloat16_t* p) {
  return hn::PromoteTo(DF(), hn::LoadU(hn::Rebind<hwy::bfloat16_t, DF>(), p));
}
HWY_INLINE VF LoadAsF32(const uint8_t* p) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  return hn::ConvertTo(df, hn::BitCast(di, hn::PromoteTo(hn::RebindToUnsigned<DF>(),
                                                         hn::LoadU(hn::Rebind<uint8_t, DF>(), p))));
}

// ---- Q.K: 4 rows x 4 keys of dot products, reduced across lanes ------------------------------

#if HWY_TARGET == HWY_SCALAR
// One lane: the accumulators are the sums.
HWY_INLINE void StoreRowSums4(VF a0, VF a1, VF a2, VF a3, float* HWY_RESTRICT,
                              float* HWY_RESTRICT out) {
  out[0] = hn::GetLane(a0);
  out[1] = hn::GetLane(a1);
  out[2] = hn::GetLane(a2);
  out[3] = hn::GetLane(a3);
}
#else
// Sums of the 4 vectors a0..a3 per 128-bit block: lane 4 * block + i = block sum of a_i.
HWY_INLINE VF BlockSums4(VF a0, VF a1, VF a2, VF a3) {
  const DF df;
  const hn::Repartition<uint64_t, DF> du64;
  const VF t01 = hn::Add(hn::InterleaveLower(df, a0, a1), hn::InterleaveUpper(df, a0, a1));
  const VF t23 = hn::Add(hn::InterleaveLower(df, a2, a3), hn::InterleaveUpper(df, a2, a3));
  const auto w01 = hn::BitCast(du64, t01), w23 = hn::BitCast(du64, t23);
  return hn::Add(hn::BitCast(df, hn::InterleaveLower(du64, w01, w23)),
                 hn::BitCast(df, hn::InterleaveUpper(du64, w01, w23)));
}

// out[i] = sum of the lanes of a_i for i < 4, through a transposing shuffle tree and a bounce
// buffer of kLanes floats for the final sum across 128-bit blocks.
HWY_INLINE void StoreRowSums4(VF a0, VF a1, VF a2, VF a3, float* HWY_RESTRICT bounce,
                              float* HWY_RESTRICT out) {
  const hn::CappedTag<float, 4> d4;
  hn::Store(BlockSums4(a0, a1, a2, a3), DF(), bounce);
  auto s = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) s = hn::Add(s, hn::Load(d4, bounce + b));
  hn::StoreU(s, d4, out);
}
#endif

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
// Block j of r (the 4 row scores of key j) to st + j * mp: one store when the keys' scores are
// contiguous (mp == 4).
HWY_INLINE void StoreKeyBlocks(__m512 r, float* HWY_RESTRICT st, size_t mp) {
  if (mp == 4) {
    _mm512_storeu_ps(st, r);
    return;
  }
  _mm_storeu_ps(st, _mm512_castps512_ps128(r));
  _mm_storeu_ps(st + mp, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(st + 2 * mp, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(st + 3 * mp, _mm512_extractf32x4_ps(r, 3));
}
#endif

// St[j][i] (j < 4 keys at st + j * mp, i < 4 rows) = the lane sums of a[j][i].
HWY_INLINE void StoreSums4x4(const VF (&a)[4][4], float* HWY_RESTRICT st, size_t mp,
                             float* HWY_RESTRICT bounce) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  // AVX-512: per-block row sums of each key (BlockSums4), then one 4 x 4 block transpose-add
  // leaves key j's 4 row sums in block j: 9 shuffles and adds for the 4 keys, one store when the
  // 4 keys' scores are contiguous (mp == 4).
  __m512 u[4];
  for (int j = 0; j < 4; ++j) u[j] = BlockSums4(a[j][0], a[j][1], a[j][2], a[j][3]).raw;
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  StoreKeyBlocks(r, st, mp);
  (void)bounce;
#else
  for (int j = 0; j < 4; ++j)
    StoreRowSums4(a[j][0], a[j][1], a[j][2], a[j][3], bounce, st + j * mp);
#endif
}

// St[j][r0 + i] = q_i . k_j for i < 4 rows (q rows at q + i * dp) and j < 4 keys (rows
// k[0..3]); dp channels (a multiple of kLanes; kDp > 0 fixes it at compile time).
template <size_t kDp, class T>
HWY_INLINE void DotBlock4x4(const float* HWY_RESTRICT q, size_t dp, const uint8_t* const* k,
                            float* HWY_RESTRICT st, size_t mp, float* HWY_RESTRICT bounce) {
  const DF df;
  if (kDp != 0) dp = kDp;
  VF a[4][4];
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < 4; ++i) a[j][i] = hn::Zero(df);
  }
  for (size_t c = 0; c < dp; c += kLanes) {
    VF qv[4], kv[4];
    for (int i = 0; i < 4; ++i) qv[i] = hn::Load(df, q + i * dp + c);
    for (int j = 0; j < 4; ++j) kv[j] = LoadAsF32(reinterpret_cast<const T*>(k[j]) + c);
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < 4; ++i) a[j][i] = hn::MulAdd(qv[i], kv[j], a[j][i]);
    }
  }
  StoreSums4x4(a, st, mp, bounce);
}

#if HWY_TARGET == HWY_AVX3_DL
// Offset of query code (row r of a 4-row group, channel c) in the group's VNNI layout: 16-channel
// chunks of the 4 rows, [dc / 16][4][16], so one 64-byte vector holds a chunk of every row.
HWY_INLINE size_t GroupCodeIndex(size_t r, size_t c) { return (c / 16) * 64 + r * 16 + c % 16; }

// The same over int8 query codes and u8 key codes with vpdpbusd: exact integer dot products,
// converted to f32 (exact, |sum| < 2^24), so the result equals DotBlock4x4's bits. The 16 codes
// of a key chunk are broadcast to both 128-bit halves of a 256-bit vector and multiplied with the
// chunk of rows 0-1 and of rows 2-3 (q4, GroupCodeIndex layout): block i of a key's two
// accumulators holds row i's partial sums, so no lane is idle and the reduction is one
// block-sum step for 4 keys (not a 16-vector tree). 256-bit rather than 512-bit vectors: on Zen 4
// a 128-bit broadcast load into a 512-bit register costs a shuffle besides the load, into a
// 256-bit one it is a plain load, and two 256-bit vpdpbusd issue per cycle (scores in L1: 12.0 ->
// 8.7 cycles per key and 4 rows). Highway 1.0.3's AVX3_DL target string names only the VEX form
// (avxvnni), but its CPU check requires AVX512-VNNI; vpdpbusd is written in asm, so no function
// needs the extra feature (one that did could not be inlined here). kDc > 0 fixes dc.
template <size_t kDc>
HWY_INLINE void CodeDotBlock4x4(const int8_t* HWY_RESTRICT q4, size_t dc, const uint8_t* const* k,
                                float* HWY_RESTRICT st, size_t mp) {
  if (kDc != 0) dc = kDc;
  // Named accumulators (rows 0-1 and 2-3 of each key) and vpdpbusd in asm: GCC 12 copies the
  // accumulator before every vpdpbusd intrinsic, and an accumulator array tied to asm operands
  // stays in memory.
  __m256i a01 = _mm256_setzero_si256(), a23 = a01, b01 = a01, b23 = a01, c01 = a01, c23 = a01,
          d01 = a01, d23 = a01;
  const uint8_t *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  auto dot = [](__m256i& rows01, __m256i& rows23, const uint8_t* key, __m256i q01, __m256i q23) {
    const __m256i kv =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(key)));
    asm("vpdpbusd %2, %1, %0" : "+v"(rows01) : "v"(kv), "v"(q01));
    asm("vpdpbusd %2, %1, %0" : "+v"(rows23) : "v"(kv), "v"(q23));
  };
  for (size_t c = 0; c < dc; c += 16) {
    const __m256i q01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + c * 4));
    const __m256i q23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q4 + c * 4 + 32));
    dot(a01, a23, k0 + c, q01, q23);
    dot(b01, b23, k1 + c, q01, q23);
    dot(c01, c23, k2 + c, q01, q23);
    dot(d01, d23, k3 + c, q01, q23);
  }
  auto join = [](__m256i rows01, __m256i rows23) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(rows01), rows23, 1);
  };
  const __m512i u[4] = {join(a01, a23), join(b01, b23), join(c01, c23), join(d01, d23)};
  // Block sums: lane 4 * i + j = row i's score of key j, then transposed to key-major blocks.
  const __m512i t01 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]));
  const __m512i t23 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(u[2], u[3]), _mm512_unpackhi_epi32(u[2], u[3]));
  const __m512i rows =
      _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
  const __m512i to_keys = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  StoreKeyBlocks(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(to_keys, rows)), st, mp);
}
#endif

// ---- P.V: acc[i] (+)= sum_j p[j][i] * v_j for up to 4 rows ------------------------------------

// Rows i < kRows of one head, channels [c0, c0 + kVecs * kLanes), keys j < nkeys (rows v[j]);
// with kRescale the accumulators are first multiplied by alpha[i] (the tile's first step).
// Quantized rows (T = uint8_t codes) accumulate the codes: the softmax step has already folded
// the rows' steps into the probabilities (and their minimums into the row offset vbias).
template <int kRows, int kVecs, bool kRescale, class T>
HWY_INLINE void AccumulateBlock(const uint8_t* const* v, size_t nkeys, size_t c0,
                                const float* HWY_RESTRICT pt, size_t mp, const float* alpha,
                                float* HWY_RESTRICT acc, size_t dp) {
  const DF df;
  VF o[kRows][kVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kVecs; ++c) {
      o[i][c] = hn::Load(df, acc + i * dp + c0 + c * kLanes);
      if (kRescale) o[i][c] = hn::Mul(hn::Set(df, alpha[i]), o[i][c]);
    }
  }
  for (size_t j = 0; j < nkeys; ++j) {
    const T* row = reinterpret_cast<const T*>(v[j]) + c0;
    VF x[kVecs];
    for (int c = 0; c < kVecs; ++c) x[c] = LoadAsF32(row + c * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const VF p = hn::Set(df, pt[j * mp + static_cast<size_t>(i)]);
      for (int c = 0; c < kVecs; ++c) o[i][c] = hn::MulAdd(p, x[c], o[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kVecs; ++c) hn::Store(o[i][c], df, acc + i * dp + c0 + c * kLanes);
  }
}

template <int kRows, size_t kDp, bool kRescale, class T>
HWY_INLINE void AccumulateRows(const uint8_t* const* v, size_t nkeys, const float* pt, size_t mp,
                               const float* alpha, float* acc, size_t dp) {
  if (kDp != 0) dp = kDp;
  size_t c = 0;
  for (; c + 4 * kLanes <= dp; c += 4 * kLanes) {
    AccumulateBlock<kRows, 4, kRescale, T>(v, nkeys, c, pt, mp, alpha, acc, dp);
  }
  for (; c < dp; c += kLanes) {
    AccumulateBlock<kRows, 1, kRescale, T>(v, nkeys, c, pt, mp, alpha, acc, dp);
  }
}

template <size_t kDp, bool kRescale, class T>
HWY_INLINE void AccumulateHead(int64_t rows, const uint8_t* const* v, size_t nkeys, const float* pt,
                               size_t mp, const float* alpha, float* acc, size_t dp) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* p = pt + r0;
    const float* a = alpha + r0;
    float* o = acc + static_cast<size_t>(r0) * (kDp != 0 ? kDp : dp);
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1:
        AccumulateRows<1, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      case 2:
        AccumulateRows<2, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      case 3:
        AccumulateRows<3, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
      default:
        AccumulateRows<4, kDp, kRescale, T>(v, nkeys, p, mp, a, o, dp);
        break;
    }
  }
}

#if HWY_TARGET == HWY_AVX3_DL
// ---- Quantized V on VNNI: P.V over the codes in 16-bit integers ------------------------------
//
// The f32 P.V widens every code (two instructions per 16 codes) and does 4 FMAs per vector of
// codes. On VNNI targets the tile's weights w_j = p_j * step_j are instead rounded to 15-bit
// integers per row, W_j = round(w_j * 32767 / max_j w_j), and vpdpwssd sums W_j * code_j for a
// pair of keys in one instruction: a third fewer cycles per key (22 against 36 in L1). The sums
// are exact int32 (32 keys x 32767 x 255 < 2^31) and go back to f32 once per tile. The rounding
// adds at most 32 keys x 255 / (2 x 32767) of a row's largest weight per tile, i.e. at most 1/8
// of the largest V quantization step n_c * step_j (int4: 1/140) to an output element
// (docs/decode.md); the f32 path is exact.

// Weight packing for t's keys [0, nk4): wq[pair][row] and wscale[row] (see TileSlot). A row whose
// weights are not all finite gets wscale = NaN (its output is NaN, as on the f32 path). With at
// most 4 rows SoftmaxNarrow packs the weights itself.
HWY_INLINE void PackWeights(TileSlot& t, size_t mp) {
  const size_t pairs = t.nk4 / 2;
  for (size_t r = 0; r < mp; ++r) {
    float wmax = 0.0f, total = 0.0f;
    for (size_t j = 0; j < t.nk4; ++j) {
      wmax = std::max(wmax, t.st[j * mp + r]);
      total += t.st[j * mp + r];
    }
    const bool finite = std::isfinite(total);
    const float inv = finite && wmax > 0.0f ? 32767.0f / wmax : 0.0f;
    t.wscale[r] = finite ? wmax / 32767.0f : std::numeric_limits<float>::quiet_NaN();
    for (size_t i = 0; i < pairs; ++i) {
      const int32_t lo = static_cast<int32_t>(std::nearbyint(t.st[2 * i * mp + r] * inv));
      const int32_t hi = static_cast<int32_t>(std::nearbyint(t.st[(2 * i + 1) * mp + r] * inv));
      t.wq[i * mp + r] =
          static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
    }
  }
}

// iacc[r][c] (+)= sum over key pairs i < npairs of W_2i[r] * v_2i[c] + W_2i+1[r] * v_2i+1[c] for
// rows in groups of 4 (row_groups) and channels c < dc (a multiple of 64; codes are u8 <= 255);
// `first` starts the sums at 0. wq: the pairs' packed weights [pair][mp]. With `flush` (the
// tile's last keys, and rows of dc floats in acc) the sums go straight to the f32 accumulator as
// in FlushCodeSums (all row_groups * 4 rows) instead of back to iacc.
struct CodeSumsFlush {
  float* acc;
  const float* alpha;
  const float* wscale;
};
HWY_NOINLINE void PvCodesVnni(const uint8_t* const* v, size_t npairs,
                              const int32_t* HWY_RESTRICT wq, size_t mp, size_t row_groups,
                              int32_t* HWY_RESTRICT iacc, size_t dc, bool first,
                              const CodeSumsFlush* flush, int64_t prefetch_offset = 0) {
  // Output q (16 channels of a 64-channel block) interleaves key 2i's and key 2i + 1's codes of
  // channels 16q + m as the two zero-extended 16-bit halves of int32 lane m.
  alignas(64) static constexpr uint8_t kIndex[4][64] = {
#define TESSERA_PAIR(q, m) (16 * (q) + (m)), 0, (64 + 16 * (q) + (m)), 0
#define TESSERA_PAIRS(q)                                                               \
  {TESSERA_PAIR(q, 0),  TESSERA_PAIR(q, 1),  TESSERA_PAIR(q, 2),  TESSERA_PAIR(q, 3),  \
   TESSERA_PAIR(q, 4),  TESSERA_PAIR(q, 5),  TESSERA_PAIR(q, 6),  TESSERA_PAIR(q, 7),  \
   TESSERA_PAIR(q, 8),  TESSERA_PAIR(q, 9),  TESSERA_PAIR(q, 10), TESSERA_PAIR(q, 11), \
   TESSERA_PAIR(q, 12), TESSERA_PAIR(q, 13), TESSERA_PAIR(q, 14), TESSERA_PAIR(q, 15)}
      TESSERA_PAIRS(0), TESSERA_PAIRS(1), TESSERA_PAIRS(2), TESSERA_PAIRS(3)};
#undef TESSERA_PAIRS
#undef TESSERA_PAIR
  const __mmask64 low_bytes = 0x5555555555555555ull;
  const __m512i i0 = _mm512_load_si512(kIndex[0]), i1 = _mm512_load_si512(kIndex[1]);
  const __m512i i2 = _mm512_load_si512(kIndex[2]), i3 = _mm512_load_si512(kIndex[3]);
  for (size_t g = 0; g < row_groups; ++g) {
    for (size_t cb = 0; cb < dc; cb += 64) {
      int32_t* o = iacc + 4 * g * dc + cb;
      // Named accumulators and vpdpwssd in asm: GCC 12 copies the accumulator before every
      // intrinsic, and keeps an accumulator array tied to asm operands in memory.
#define TESSERA_ROW(i)                                                                    \
  __m512i o##i##0 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc);      \
  __m512i o##i##1 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 16); \
  __m512i o##i##2 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 32); \
  __m512i o##i##3 = first ? _mm512_setzero_si512() : _mm512_loadu_si512(o + (i)*dc + 48);
      TESSERA_ROW(0)
      TESSERA_ROW(1)
      TESSERA_ROW(2)
      TESSERA_ROW(3)
#undef TESSERA_ROW
      for (size_t i = 0; i < npairs; ++i) {
        if (prefetch_offset != 0 && g == 0 && cb == 0) {
          // The rows prefetch_offset bytes on, spread over the pairs.
          for (size_t line = 0; line < dc; line += 64) {
            __builtin_prefetch(v[2 * i] + prefetch_offset + line, 0, 2);
            __builtin_prefetch(v[2 * i + 1] + prefetch_offset + line, 0, 2);
          }
        }
        const __m512i r0 = _mm512_loadu_si512(v[2 * i] + cb);
        const __m512i r1 = _mm512_loadu_si512(v[2 * i + 1] + cb);
        const __m512i x0 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i0, r1);
        const __m512i x1 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i1, r1);
        const __m512i x2 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i2, r1);
        const __m512i x3 = _mm512_maskz_permutex2var_epi8(low_bytes, r0, i3, r1);
        const int32_t* w = wq + i * mp + 4 * g;
#define TESSERA_ROW(i)                                             \
  {                                                                \
    const __m512i wi = _mm512_set1_epi32(w[i]);                    \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##0) : "v"(x0), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##1) : "v"(x1), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##2) : "v"(x2), "v"(wi)); \
    asm("vpdpwssd %2, %1, %0" : "+v"(o##i##3) : "v"(x3), "v"(wi)); \
  }
        TESSERA_ROW(0)
        TESSERA_ROW(1)
        TESSERA_ROW(2)
        TESSERA_ROW(3)
#undef TESSERA_ROW
      }
      if (flush != nullptr) {
        // acc = alpha * acc + wscale * float(sums), row by row: FlushCodeSums' arithmetic, written
        // out again on purpose (through a shared helper, int8 decode from memory measured 9-16%
        // slower; docs/decode.md).
        auto to_acc = [&](size_t row, __m512i x0, __m512i x1, __m512i x2, __m512i x3) {
          const __m512 a = _mm512_set1_ps(flush->alpha[row]);
          const __m512 w = _mm512_set1_ps(flush->wscale[row]);
          float* f = flush->acc + row * dc + cb;
          const __m512i x[4] = {x0, x1, x2, x3};
          for (int k = 0; k < 4; ++k) {
            _mm512_storeu_ps(f + 16 * k,
                             _mm512_fmadd_ps(w, _mm512_cvtepi32_ps(x[k]),
                                             _mm512_mul_ps(a, _mm512_loadu_ps(f + 16 * k))));
          }
        };
        to_acc(4 * g, o00, o01, o02, o03);
        to_acc(4 * g + 1, o10, o11, o12, o13);
        to_acc(4 * g + 2, o20, o21, o22, o23);
        to_acc(4 * g + 3, o30, o31, o32, o33);
        continue;
      }
#define TESSERA_ROW(i)                           \
  _mm512_storeu_si512(o + (i)*dc, o##i##0);      \
  _mm512_storeu_si512(o + (i)*dc + 16, o##i##1); \
  _mm512_storeu_si512(o + (i)*dc + 32, o##i##2); \
  _mm512_storeu_si512(o + (i)*dc + 48, o##i##3);
      TESSERA_ROW(0)
      TESSERA_ROW(1)
      TESSERA_ROW(2)
      TESSERA_ROW(3)
#undef TESSERA_ROW
    }
  }
}

// acc[r][c] = alpha[r] * acc[r][c] + wscale[r] * iacc[r][c]: the tile's integer sums back in f32
// (rows < rows, channels < dp; iacc rows are dc apart).
HWY_INLINE void FlushCodeSums(const int32_t* HWY_RESTRICT iacc, size_t dc, const float* alpha,
                              const float* wscale, int64_t rows, float* HWY_RESTRICT acc,
                              size_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]), w = _mm512_set1_ps(wscale[r]);
    float* o = acc + static_cast<size_t>(r) * dp;
    const int32_t* x = iacc + static_cast<size_t>(r) * dc;
    for (size_t c = 0; c < dp; c += 16) {
      _mm512_storeu_ps(o + c, _mm512_fmadd_ps(w, _mm512_cvtepi32_ps(_mm512_loadu_si512(x + c)),
                                              _mm512_mul_ps(a, _mm512_loadu_ps(o + c))));
    }
  }
}
#endif

// ---- Online softmax for at most 4 rows --------------------------------------------------------

#if HWY_TARGET != HWY_SCALAR
// With at most 4 rows per head (GQA group x queries), St is [key][4] and one vector holds
// kLanes / 4 keys x 4 rows: the online-softmax step of SoftmaxTile on that packed layout, so no
// lane is padding. Lane l is row l % 4 of key l / 4. `kstep` / `kmin` (quantized K: the logit is
// qa * step_j * dot + qb * min_j first) may be null. Keys nkeys .. (next multiple of 4) are
// padding and get probability 0. With `wq` (quantized V on VNNI targets) the weights
// p_j * step_j go straight to PvCodesVnni's 15-bit integers (wq, wscale; see PackWeights), scaled
// by an upper bound of their maximum rather than the maximum itself, so no second pass is needed.
void SoftmaxNarrow(const AttentionProblem& p, const HeadState& hs, const float* qa, const float* qb,
                   const float* kstep, const float* kmin, const float* vstep, const float* vmin,
                   float* vbias, size_t nkeys, int64_t key0, bool partial,
                   float* HWY_RESTRICT bounce, int32_t* HWY_RESTRICT wq = nullptr,
                   float* HWY_RESTRICT wscale = nullptr) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::CappedTag<float, 4> d4;
  constexpr size_t kKeysPerVec = kLanes / 4;
  const size_t nk4 = hwy::DivCeil(nkeys, size_t{4}) * 4;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  const VF log2e = hn::Set(df, 1.4426950408889634f);
  const bool softcap = p.softcap > 0.0f;
  const bool alibi = p.alibi != nullptr;
  const bool quant = kstep != nullptr;
  const VF cap = hn::Set(df, p.softcap);
  const VF inv_cap = hn::Set(df, softcap ? 1.0f / p.softcap : 0.0f);
  // Per-lane row values: the 4 rows repeated in every 128-bit block.
  const VF pos = hn::LoadDup128(df, hs.pos);
  const VF slope = hn::LoadDup128(df, hs.slope);
  const auto lo = hn::LoadDup128(di, hs.lo);
  const auto hi = hn::LoadDup128(di, hs.hi);
  const VF a4 = quant ? hn::LoadDup128(df, qa) : hn::Zero(df);
  const VF b4 = quant ? hn::LoadDup128(df, qb) : hn::Zero(df);
  // Key offset of each lane within its vector: l / 4; per-key values are spread to their 4
  // lanes with one table lookup.
  const auto lane_key = hn::ShiftRight<2>(hn::Iota(di, 0));
  const auto spread = hn::IndicesFromVec(df, lane_key);
  auto per_key = [&](const float* values, size_t j) {
    return hn::TableLookupLanes(hn::LoadDup128(df, values + j), spread);
  };
  const bool tail = nk4 > nkeys;
  VF mx = neg_inf;
  for (size_t j = 0; j < nk4; j += kKeysPerVec) {
    float* col = hs.st + 4 * j;
    VF x = hn::Load(df, col);
    const auto key = hn::Add(lane_key, hn::Set(di, static_cast<int32_t>(key0 + int64_t(j))));
    if (quant) x = hn::MulAdd(hn::Mul(a4, per_key(kstep, j)), x, hn::Mul(b4, per_key(kmin, j)));
    if (softcap) x = SoftcapScore(df, x, cap, inv_cap);
    if (alibi) x = AlibiScore(x, slope, pos, hn::ConvertTo(df, key));
    if (partial || tail) {
      auto hidden = KeyOutside(key, lo, hi);
      const auto end = hn::Set(di, static_cast<int32_t>(key0 + static_cast<int64_t>(nkeys)));
      hidden = hn::Or(hidden, hn::Not(hn::Lt(key, end)));
      x = HideKeys(df, hidden, neg_inf, x);
    }
    hn::Store(x, df, col);
    mx = hn::Max(mx, x);
  }
  // Fold the keys of a vector: the max per row over the 128-bit blocks.
  hn::Store(mx, df, bounce);
  auto tile_max = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) tile_max = hn::Max(tile_max, hn::Load(d4, bounce + b));
  const auto m_old = hn::Load(d4, hs.m);
  const auto m4 = hn::Max(m_old, tile_max);
  // A row that has seen no visible key keeps m = -inf; subtracting 0 instead keeps its
  // probabilities exp(-inf) = 0 and avoids (-inf) - (-inf).
  const auto m_safe =
      hn::IfThenZeroElse(hn::Eq(m4, hn::Set(d4, -std::numeric_limits<float>::infinity())), m4);
  const auto alpha =
      FastExp2(d4, hn::Mul(hn::Sub(m_old, m_safe), hn::Set(d4, 1.4426950408889634f)));
  hn::Store(m_safe, d4, bounce);
  const VF m = hn::LoadDup128(df, bounce);
  VF sum = hn::Zero(df), bias = hn::Zero(df);
#if HWY_TARGET == HWY_AVX3_DL
  if (wq != nullptr) {
    // Every weight e_j * step_j of row i is at most max_j step_j * exp(tile max_i - m_i): W =
    // round(w * 32767 / that bound) fits 15 bits (clamped, should the exp round up), and
    // PackWeights' bound on the rounding error still holds (the bound is at most l_i * max step).
    float step_max = 0.0f;
    for (size_t j = 0; j < nk4; ++j) step_max = std::max(step_max, vstep[j]);
    const auto bound =
        hn::Mul(hn::Set(d4, step_max),
                FastExp2(d4, hn::Mul(hn::Sub(tile_max, m_safe), hn::Set(d4, 1.4426950408889634f))));
    const auto positive = hn::Gt(bound, hn::Zero(d4));
    const auto inv4 = hn::IfThenElseZero(positive, hn::Div(hn::Set(d4, 32767.0f), bound));
    hn::Store(inv4, d4, bounce);
    const __m512 inv = _mm512_broadcast_f32x4(_mm_loadu_ps(bounce));
    const __m512i w_max = _mm512_set1_epi32(32767);
    // Words (4 * key + row) -> int32 (row) of key pair (0, 1), then of pair (2, 3).
    const __m256i to_pairs =
        _mm256_setr_epi16(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    VF wsum = hn::Zero(df);
    for (size_t j = 0; j < nk4; j += kKeysPerVec) {
      const VF e = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, hs.st + 4 * j), m), log2e));
      sum = hn::Add(sum, e);
      bias = hn::MulAdd(e, per_key(vmin, j), bias);
      const VF w = hn::Mul(e, per_key(vstep, j));
      wsum = hn::Add(wsum, w);
      const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w.raw, inv)), w_max);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + j / 2 * 4),
                          _mm256_permutexvar_epi16(to_pairs, _mm512_cvtepi32_epi16(q)));
    }
    // A row whose weights are not all finite gets wscale = NaN (its output is NaN).
    hn::Store(wsum, df, bounce);
    auto w4 = hn::Load(d4, bounce);
    for (size_t b = 4; b < kLanes; b += 4) w4 = hn::Add(w4, hn::Load(d4, bounce + b));
    const auto finite = hn::Eq(hn::Sub(w4, w4), hn::Zero(d4));
    hn::Store(hn::IfThenElse(finite, hn::Mul(bound, hn::Set(d4, 1.0f / 32767.0f)),
                             hn::Set(d4, std::numeric_limits<float>::quiet_NaN())),
              d4, wscale);
  } else
#endif
    for (size_t j = 0; j < nk4; j += kKeysPerVec) {
      float* col = hs.st + 4 * j;
      const VF e = FastExp2(df, hn::Mul(hn::Sub(hn::Load(df, col), m), log2e));
      sum = hn::Add(sum, e);
      if (vstep != nullptr) {
        // Quantized V: P.V sums the codes weighted by p_j * step_j; sum_j p_j * min_j is the row
        // offset.
        bias = hn::MulAdd(e, per_key(vmin, j), bias);
        hn::Store(hn::Mul(e, per_key(vstep, j)), df, col);
      } else {
        hn::Store(e, df, col);
      }
    }
  hn::Store(sum, df, bounce);
  auto s4 = hn::Load(d4, bounce);
  for (size_t b = 4; b < kLanes; b += 4) s4 = hn::Add(s4, hn::Load(d4, bounce + b));
  if (vstep != nullptr) {
    hn::Store(bias, df, bounce);
    auto b4_sum = hn::Load(d4, bounce);
    for (size_t b = 4; b < kLanes; b += 4) b4_sum = hn::Add(b4_sum, hn::Load(d4, bounce + b));
    hn::Store(hn::MulAdd(alpha, hn::Load(d4, vbias), b4_sum), d4, vbias);
  }
  hn::Store(m4, d4, hs.m);
  hn::Store(hn::MulAdd(alpha, hn::Load(d4, hs.l), s4), d4, hs.l);
  hn::Store(alpha, d4, hs.alpha);
}
#endif

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

// Fills q with sequence b's rows for KV head h (padding rows zero).
HWY_INLINE void PrepareQueries(const AttentionProblem& p, const decode::KvSource& kv, size_t dp,
                               size_t dc, size_t mp, size_t rp, int64_t b, int64_t h,
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
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t head = h * p.group + r / q_len;
    const int64_t qi = r % q_len;
    q.pos[r] = static_cast<float>(qi + delta);
    if (p.alibi != nullptr) q.slope[r] = p.alibi_slope(b, head);
    float* row = q.qf + static_cast<size_t>(r) * dp;
    LoadRow(p.dtype, p.q, p.q_offset(b, q_begin + qi, head), p.q_stride[3], dim, row);
    if (!quant) {
      for (size_t c = 0; c < dim; ++c) row[c] = p.scale * row[c];
      continue;
    }
    // q' = q * n, quantized to int8 per row; the scale is applied after the integer dot.
    const float* norm = kv.k_norm + h * kv.dim;
    float amax = 0.0f;
    for (size_t c = 0; c < dim; ++c) {
      row[c] *= norm[c];
      amax = std::max(amax, std::fabs(row[c]));
    }
    // A NaN or inf query poisons the row, as it would the float path.
    const bool finite = std::isfinite(amax);
    const float sigma = amax / 127.0f;
    float code_sum = 0.0f;
    for (size_t c = 0; c < dim; ++c) {
      const float code = sigma > 0.0f && finite ? std::nearbyint(row[c] / sigma) : 0.0f;
      row[c] = code;
#if HWY_TARGET == HWY_AVX3_DL
      if (vnni) {
        q.q8[static_cast<size_t>(r / 4) * 4 * dc + GroupCodeIndex(static_cast<size_t>(r % 4), c)] =
            static_cast<int8_t>(code);
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
HWY_INLINE void GatherTile(const decode::KvSource& kv, const UnitShape& sh, int64_t b, int64_t a,
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
    const decode::KvSource::Row row = kv.locate(b, key);
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

// T: the element type of the rows (float, hwy::float16_t, hwy::bfloat16_t, or uint8_t codes).
template <size_t kDp, class T>
void RunUnit(const AttentionProblem& p, const decode::KvSource& kv, const decode::DecodeUnit& u,
             const UnitShape& sh, const PreparedQueries& queries, Scratch& s, float* partial_out,
             double* partial_lse) {
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
                const decode::KvSource::Row row = kv.locate(b, key);
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
          AccumulateHead<kDp, true, T>(rows, t.vrow, j_end, pt, mp, s.alpha, acc, dp);
        } else {
          AccumulateHead<kDp, false, T>(rows, t.vrow + j_begin, j_end - j_begin, pt, mp, s.alpha,
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
bool DecodeKernel(const AttentionProblem& p, const decode::KvSource& kv,
                  const internal::DecodeSchedule& sched, bool fast) {
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
  ParallelFor(workers, p.batch * p.heads_kv, [&](int64_t task, int32_t) {
    const int64_t b = task / p.heads_kv, h = task % p.heads_kv;
    PrepareQueries(p, kv, dp, dc, mp, rp, b, h, queries.at(b, h));
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
      RunUnit<kDp, T>(p, kv, cur, shape, queries, s, po, pl);
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
      run_dim(hwy::bfloat16_t());
      break;
    case KVDType::kF16:
      run_dim(hwy::float16_t());
      break;
    default:
      run_dim(uint8_t());
      break;
  }
  if (sched.num_slots == 0) return true;

  // Merge: one task per (multi-split sequence, query head), splits in ascending order (as
  // MergeStates).
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
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_INL_H_
