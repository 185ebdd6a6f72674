// SPDX-License-Identifier: Apache-2.0
// Decode's key tiles (one copy per target): the constants of the software pipeline, the two tile
// slots and the per-worker scratch of a unit, the per-head softmax state, and the staging of rows
// that cannot be read in place (int4, strided, or not whole vectors) into a slot. The first of the
// files decode-inl.h is split into (its file comment has the design); the others build on these.

#if defined(TESSERA_DECODE_DECODE_TILE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_DECODE_DECODE_TILE_INL_H_
#undef TESSERA_DECODE_DECODE_TILE_INL_H_
#else
#define TESSERA_DECODE_DECODE_TILE_INL_H_
#endif

// The includes decode-inl.h had before the split, in their order (more than this file needs): the
// translation unit keeps its definitions in the order they had, hence the same code placement.
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

// bf16 rows widened in pairs (the element type of bf16 caches whose padded head dim is a multiple
// of 4 vectors, on little-endian machines): one vector's worth of 32-bit words holds 2 * kLanes
// channels, the even ones in the low halves (widened by one shift) and the odd ones in the high
// halves (one mask), where widening kLanes channels in order takes two instructions (zero-extend,
// shift): 16 fewer of the ~110 vector instructions of a key's scores and P.V at D = 128 (in L2
// on the Xeon, 1 thread: 96 -> 89 cycles per key). The kernel's f32 channels are then ordered
// per block of 2 * kLanes: the even channels, then the odd ones (PairedChannel); the query rows
// are stored so and the output is put back in order. The widened values are exact either way;
// the scores sum the same products in another order.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kLittleEndian = true;
#else
constexpr bool kLittleEndian = false;
#endif
struct Bf16Pairs {
  uint16_t bits;
};

// Position of channel c in that order.
HWY_INLINE size_t PairedChannel(size_t c) {
  const size_t block = 2 * kLanes;
  return c / block * block + (c % 2) * kLanes + c % block / 2;
}

// Vector c / kLanes of a row (c a multiple of kLanes): the elements at row + c, or for
// Bf16Pairs the even (c / kLanes even) or odd channels of the pair block holding c.
template <class T>
HWY_INLINE VF LoadVecAsF32(const T* row, size_t c) {
  return LoadAsF32(row + c);
}
HWY_INLINE VF LoadVecAsF32(const Bf16Pairs* row, size_t c) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const auto w =
      hn::LoadU(du, reinterpret_cast<const uint32_t*>(row + c / (2 * kLanes) * 2 * kLanes));
  return (c / kLanes) % 2 == 0 ? hn::BitCast(df, hn::ShiftLeft<16>(w))
                               : hn::BitCast(df, hn::And(w, hn::Set(du, 0xFFFF0000u)));
}

}  // namespace decode_impl
}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_DECODE_DECODE_TILE_INL_H_
