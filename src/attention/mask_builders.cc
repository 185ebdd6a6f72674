// SPDX-License-Identifier: Apache-2.0
// Block-mask builders (tessera/mask.h): S2-Attention's per-head shards, Radial attention's static
// video mask, and content-based block selection (SeerAttention / MoBA / VMoBA / BiFormer style).
//
// The first two are pure index formulas (docs/algorithms.md §4.3, §4.6), built once per model
// shape. SelectBlocks runs on every call in front of the block-sparse kernel, so its cost must stay
// a small fraction of the attention it prunes (target: <= 10% at density 0.05):
//   1. pool K per key block (mean over block_k tokens, f32), one task per (batch, key block)
//      covering every KV head (a token's heads are adjacent: the pass streams through memory),
//      stored transposed [D][num_k_blocks] so that step 2's inner loop runs over contiguous key
//      blocks (independent outputs: the compiler vectorizes it with no reassociation);
//   2. one task per (batch, query block): pool the query block for every head, then per head
//      one gate row g[J] = scale * q_I . k_J (a GEMV, num_k_blocks * D multiply-adds), softmax
//      over the allowed key blocks, and top-k or cumulative-threshold selection on sort keys
//      packed into integers.
// Bytes moved: q and k once each (B * (Sq * Hq + Sk * Hkv) * D elements) plus the pooled K
// (num_k_blocks * Hkv * D floats per batch); FLOPs 2 * B * Hq * nqb * nkb * D for the gates, i.e.
// 2 / (block_q * block_k) of the dense attention's. Every task reduces in a fixed order and
// writes only its own output row, so the mask is identical across runs and thread counts.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "tessera/context.h"
#include "tessera/mask.h"

namespace tessera {
namespace {

constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();

// x mod m in [0, m) for m > 0 (never forms x % m + m, which overflows for m near INT64_MAX).
int64_t Mod(int64_t x, int64_t m) {
  const int64_t r = x % m;
  return r < 0 ? r + m : r;
}

// (a + b) mod m for a, b in [0, m), without forming a + b.
int64_t AddMod(int64_t a, int64_t b, int64_t m) { return a >= m - b ? a - (m - b) : a + b; }

bool IsMaskDType(DType d) { return d == DType::kU8 || d == DType::kBool; }

// A uint8 / bool block mask output of exactly `shape` (rank 4).
Status CheckMaskOutput(const char* name, const TensorView& out, const int64_t* shape) {
  const std::string what = "a writable u8 or bool block mask of shape [" +
                           std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + ", " +
                           std::to_string(shape[2]) + ", " + std::to_string(shape[3]) + "]";
  Status s = CheckShape(name, out, 4, shape, what, true);
  if (!s.ok()) return s;
  if (!IsMaskDType(out.dtype)) {
    return Status::InvalidArgument(Expected(name, "dtype u8 or bool", DTypeName(out.dtype)));
  }
  return Status::Ok();
}

uint8_t* MaskAt(const TensorView& out, int64_t a, int64_t b, int64_t c, int64_t d) {
  return static_cast<uint8_t*>(out.data) + a * out.strides[0] + b * out.strides[1] +
         c * out.strides[2] + d * out.strides[3];
}

// Blocks hold at most 2^30 tokens: any larger block covers every sequence (2^31 - 1 tokens at
// most) the same way, and block index * block size stays far from overflow.
constexpr int64_t kMaxBlock = int64_t{1} << 30;

Status CheckBlockSize(const char* name, int64_t block) {
  if (block <= 0 || block % 16 != 0 || block > kMaxBlock) {
    return Status::InvalidArgument(
        Expected(name, "a positive multiple of 16 up to 2^30", std::to_string(block)));
  }
  return Status::Ok();
}

// Number of bits of x > 0 (Python's int.bit_length).
int64_t BitLength(int64_t x) {
  int64_t n = 0;
  for (; x > 0; x >>= 1) ++n;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Radial attention.

// The token-level rule of Radial attention for frames at distance `dist`: whether the frame pair
// takes part at all and, when it does, the half-width of its band of in-frame offsets (a pair
// with dist <= 1 is dense: width = tokens_per_frame).
struct FramePair {
  bool kept;
  int64_t width;
};

FramePair RadialFramePair(const RadialMaskParams& p, int64_t dist) {
  if (dist <= 1) return {true, p.tokens_per_frame};
  // The band's base half-width 2^bit_length(n_f) / 2^g halves each time the distance doubles.
  const double base =
      std::ldexp(1.0, static_cast<int>(BitLength(p.tokens_per_frame) - BitLength(dist)));
  const double width = std::max(base * p.decay_factor, static_cast<double>(p.block));
  // Below 128 tokens the band is too thin for a 128-token block, so the reference generator keeps
  // only every floor(128 / base)-th frame distance instead (with the full band width).
  constexpr double kSplitThreshold = 128.0;
  bool kept = true;
  if (base < kSplitThreshold) {
    const int64_t split = static_cast<int64_t>(std::floor(kSplitThreshold / base));
    kept = dist % split == 0;
  }
  // |r - c| <= width for integers r, c is |r - c| <= floor(width); clamp so the sum below cannot
  // overflow.
  const double clamped = std::min(std::floor(width), static_cast<double>(kMaxTokens));
  return {kept, static_cast<int64_t>(clamped)};
}

// ---------------------------------------------------------------------------------------------
// Block selection.

// 16-bit floats to f32 for the pooling loops: bf16 is a shift; f16 goes through a table (one
// load per element, exact: filled by tessera::F16ToFloat) because its subnormal / special-case
// branches would keep the loop scalar.
const float* F16Table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t x = 0; x < 65536; ++x) t[x] = F16ToFloat(static_cast<uint16_t>(x));
    return t;
  }();
  return table.data();
}

// sum[d] += x(d) for d in [0, dim), x(d) the element at index d * stride; the unit-stride case
// gets its own loop so that it vectorizes.
template <typename LoadFn>
void Accumulate(int64_t stride, int64_t dim, float* sum, LoadFn x) {
  if (stride == 1) {
    for (int64_t d = 0; d < dim; ++d) sum[d] += x(d);
  } else {
    for (int64_t d = 0; d < dim; ++d) sum[d] += x(d * stride);
  }
}

// sum[d] += row[d] for one token row of `dim` elements at `src` with element stride `stride`.
void AddRow(DType dtype, const void* src, int64_t stride, int64_t dim, const float* f16_table,
            float* sum) {
  if (dtype == DType::kF32) {
    const float* x = static_cast<const float*>(src);
    Accumulate(stride, dim, sum, [x](int64_t i) { return x[i]; });
    return;
  }
  const uint16_t* x = static_cast<const uint16_t*>(src);
  if (dtype == DType::kBF16) {
    Accumulate(stride, dim, sum, [x](int64_t i) {
      const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      return f;
    });
    return;
  }
  Accumulate(stride, dim, sum, [x, f16_table](int64_t i) { return f16_table[x[i]]; });
}

// Means over tokens [t0, t1) of every head of a [B, S, H, D] view, batch b, into
// mean[h * D + d]. Token by token, all heads at once: a token's heads are adjacent in the usual
// layout, so the view streams through memory (head by head, each pass would touch 1 / H of every
// cache page and run several times slower).
void PoolBlock(const TensorView& t, int64_t b, int64_t t0, int64_t t1, const float* f16_table,
               float* mean) {
  const int64_t heads = t.shape[2], dim = t.shape[3];
  std::fill(mean, mean + heads * dim, 0.0f);
  const int64_t elem = static_cast<int64_t>(DTypeSize(t.dtype));
  const char* base = static_cast<const char*>(t.data);
  for (int64_t s = t0; s < t1; ++s) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t offset = b * t.strides[0] + s * t.strides[1] + h * t.strides[2];
      AddRow(t.dtype, base + offset * elem, t.strides[3], dim, f16_table, mean + h * dim);
    }
  }
  const float inv = 1.0f / static_cast<float>(t1 - t0);
  for (int64_t e = 0; e < heads * dim; ++e) mean[e] *= inv;
}

// Gate scores are ranked through one sortable integer per key block: the high 32 bits order the
// scores descending (NaN ranks with -inf, so that the order is total), the low 32 bits hold the
// key-block index, so that ties go to the lower index. Sorting plain integers avoids an
// indirect, branchy comparator: the selection of a 256-block row costs a few microseconds.
uint64_t SortKey(float g, int64_t j) {
  if (std::isnan(g)) g = -std::numeric_limits<float>::infinity();
  if (g == 0.0f) g = 0.0f;  // -0 and +0 tie
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof(bits));
  // Monotone map float -> uint32 (negative floats reversed), then complemented: descending.
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint64_t>(j);
}

int64_t IndexOf(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// Per-worker scratch of the selection step.
struct SelectScratch {
  std::vector<float> pooled;    // [H * D]: a pooled query block (step 2) or key block (step 1)
  std::vector<float> gate;      // [num_k_blocks]
  std::vector<uint64_t> order;  // [num_k_blocks]
  std::vector<double> mass;     // [num_k_blocks], unnormalized
};

// Chooses the key blocks of one query block from its gate row g[0, allowed) (the key blocks a
// causal query block may see; `forced` is the diagonal block kept in any case, or -1) and writes
// the row: 1 for the chosen blocks, 0 for every other of the num_k_blocks.
void SelectRow(const BlockSelectParams& p, const float* g, int64_t allowed, int64_t forced,
               int64_t num_k_blocks, SelectScratch* s, uint8_t* row, int64_t row_stride) {
  for (int64_t j = 0; j < num_k_blocks; ++j) row[j * row_stride] = 0;
  if (allowed == 0) return;
  uint64_t* order = s->order.data();
  int64_t n = 0;
  for (int64_t j = 0; j < allowed; ++j) {
    if (j != forced) order[n++] = SortKey(g[j], j);
  }
  if (forced >= 0) row[forced * row_stride] = 1;

  if (p.top_k > 0) {
    const int64_t want = std::min(p.top_k - (forced >= 0 ? 1 : 0), n);
    if (want <= 0) return;
    if (want < n) std::nth_element(order, order + (want - 1), order + n);
    for (int64_t r = 0; r < want; ++r) row[IndexOf(order[r]) * row_stride] = 1;
    return;
  }

  // Softmax over the allowed blocks, with +-inf handled so that no NaN appears: an +inf score
  // takes all the mass, all -inf scores leave every mass at 0. The masses are summed in double:
  // the cumulative test compares a sum of many of them against the threshold.
  const float inf = std::numeric_limits<float>::infinity();
  float top = -inf;
  for (int64_t j = 0; j < allowed; ++j) {
    if (!std::isnan(g[j])) top = std::max(top, g[j]);
  }
  double* mass = s->mass.data();
  double total = 0.0;
  for (int64_t j = 0; j < allowed; ++j) {
    const float x = g[j];
    double w;
    if (std::isnan(x)) {
      w = 0.0;
    } else if (std::isinf(top)) {
      w = top > 0 && x == top ? 1.0 : 0.0;
    } else {
      w = std::exp(x - top);
    }
    mass[j] = w;
    total += w;
  }
  if (!(total > 0.0)) return;  // every allowed score is -inf or NaN: nothing carries mass
  const double inv_total = 1.0 / total;
  std::sort(order, order + n);
  double cumulative = forced >= 0 ? mass[forced] * inv_total : 0.0;
  for (int64_t r = 0; r < n && cumulative < static_cast<double>(p.threshold); ++r) {
    const int64_t j = IndexOf(order[r]);
    // Blocks come in descending mass: once one adds nothing, none of the rest can either.
    if (mass[j] <= 0.0) break;
    row[j * row_stride] = 1;
    cumulative += mass[j] * inv_total;
  }
}

Status ValidateSelect(const BlockSelectParams& p) {
  Status s = CheckBlockSize("block_q", p.block_q);
  if (!s.ok()) return s;
  s = CheckBlockSize("block_k", p.block_k);
  if (!s.ok()) return s;
  if (p.top_k < 0) {
    return Status::InvalidArgument(Expected("top_k", ">= 0", std::to_string(p.top_k)));
  }
  if (p.top_k == 0 && !(p.threshold > 0.0f && p.threshold <= 1.0f)) {
    return Status::InvalidArgument(Expected("threshold", "a cumulative mass in (0, 1] (top_k is 0)",
                                            std::to_string(p.threshold)));
  }
  if (p.scale.has_value() && !std::isfinite(*p.scale)) {
    return Status::InvalidArgument(Expected("scale", "a finite value", std::to_string(*p.scale)));
  }
  if (p.align != MaskAlign::kBottomRight && p.align != MaskAlign::kTopLeft) {
    return Status::InvalidArgument(
        Expected("align", "kBottomRight or kTopLeft", std::to_string(static_cast<int>(p.align))));
  }
  const bool user_scores = p.scores.data != nullptr;
  if (p.q.rank != 4) {
    return Status::InvalidArgument(
        Expected("q", "rank 4 [B, Sq, Hq, D]", "rank " + std::to_string(p.q.rank)));
  }
  if (p.k.rank != 4) {
    return Status::InvalidArgument(
        Expected("k", "rank 4 [B, Sk, Hkv, D]", "rank " + std::to_string(p.k.rank)));
  }
  const int64_t B = p.q.shape[0], Sq = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Sk = p.k.shape[1], Hkv = p.k.shape[2];
  for (int i = 0; i < 4; ++i) {
    if (p.q.shape[i] < 0 || p.k.shape[i] < 0) {
      return Status::InvalidArgument(Expected(p.q.shape[i] < 0 ? "q" : "k", "non-negative shape",
                                              ShapeString(p.q.shape[i] < 0 ? p.q : p.k)));
    }
  }
  if (Sq > kMaxTokens || Sk > kMaxTokens) {
    return Status::InvalidArgument(Expected(Sq > kMaxTokens ? "q" : "k",
                                            "at most 2^31 - 1 tokens per sequence axis",
                                            std::to_string(std::max(Sq, Sk))));
  }
  if (p.k.shape[0] != B) {
    return Status::InvalidArgument(
        Expected("k", "batch " + std::to_string(B) + " (the batch of q)", ShapeString(p.k)));
  }
  const int64_t nqb = CeilDiv(Sq, p.block_q), nkb = CeilDiv(Sk, p.block_k);
  if (user_scores) {
    const int64_t shape[4] = {B, Hq, nqb, nkb};
    s = CheckShape("scores", p.scores, 4, shape,
                   "f32 gate scores of shape [" + std::to_string(B) + ", " + std::to_string(Hq) +
                       ", " + std::to_string(nqb) + ", " + std::to_string(nkb) + "]",
                   false);
    if (!s.ok()) return s;
    if (p.scores.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected("scores", "dtype f32", DTypeName(p.scores.dtype)));
    }
  } else {
    s = CheckRankAndStrides("q", p.q, false);
    if (!s.ok()) return s;
    s = CheckRankAndStrides("k", p.k, false);
    if (!s.ok()) return s;
    if (!IsSupportedDType(p.q.dtype)) {
      return Status::InvalidArgument(Expected("q", "dtype f32, bf16 or f16", DTypeName(p.q.dtype)));
    }
    if (p.k.dtype != p.q.dtype) {
      return Status::InvalidArgument(
          Expected("k", std::string("dtype ") + DTypeName(p.q.dtype) + " (the dtype of q)",
                   DTypeName(p.k.dtype)));
    }
    if (p.k.shape[3] != D) {
      return Status::InvalidArgument(Expected(
          "k", "head dim " + std::to_string(D) + " (the head dim of q)", ShapeString(p.k)));
    }
    if (Hkv < 1 || Hq % Hkv != 0) {
      return Status::InvalidArgument(
          Expected("k", "a KV head count >= 1 dividing the " + std::to_string(Hq) + " query heads",
                   std::to_string(Hkv) + " KV heads"));
    }
    if (D < 1) {
      return Status::InvalidArgument(Expected("q", "head dim D >= 1", ShapeString(p.q)));
    }
  }
  const int64_t out_shape[4] = {B, Hq, nqb, nkb};
  s = CheckMaskOutput("out", p.out, out_shape);
  if (!s.ok()) return s;
  if (!user_scores) {
    // The pooled scratch: B * Hkv * D * nkb floats of pooled keys, max(Hq, Hkv) * D per worker.
    int64_t pooled = 0;
    if (!CheckedMul(B, Hkv, &pooled) || !CheckedMul(pooled, D, &pooled) ||
        !CheckedMul(pooled, nkb, &pooled) || !CheckedMul(std::max(Hq, Hkv), D, &pooled)) {
      return Status::InvalidArgument(
          Expected("q", "a shape whose pooled blocks B * H * D * ceil(Sk / block_k) fit in int64",
                   ShapeString(p.q) + " with k " + ShapeString(p.k)));
    }
  }
  return CheckDisjoint({ViewRegion("out", p.out)}, {ViewRegion("q", p.q), ViewRegion("k", p.k),
                                                    ViewRegion("scores", p.scores)});
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Status BuildS2BlockMask(const S2MaskParams& p, const Context& ctx) try {
  const TensorView& out = p.out;
  if (p.heads < 1) {
    return Status::InvalidArgument(Expected("heads", ">= 1", std::to_string(p.heads)));
  }
  if (p.num_q_blocks < 0) {
    return Status::InvalidArgument(
        Expected("num_q_blocks", ">= 0", std::to_string(p.num_q_blocks)));
  }
  if (p.num_k_blocks < 0) {
    return Status::InvalidArgument(
        Expected("num_k_blocks", ">= 0", std::to_string(p.num_k_blocks)));
  }
  if (p.local_blocks < 1) {
    return Status::InvalidArgument(
        Expected("local_blocks", ">= 1", std::to_string(p.local_blocks)));
  }
  if (p.vert_stride < 1) {
    return Status::InvalidArgument(Expected("vert_stride", ">= 1", std::to_string(p.vert_stride)));
  }
  const int64_t shape[4] = {1, p.heads, p.num_q_blocks, p.num_k_blocks};
  Status s = CheckMaskOutput("out", out, shape);
  if (!s.ok()) return s;
  if (out.numel() == 0) return Status::Ok();  // no block to write (heads may still be huge)

  const int64_t V = p.vert_stride;
  // A local band at least as wide as the mask keeps every block either way; narrowed to that, the
  // distances below cannot overflow for local_blocks near INT64_MAX.
  const int64_t L = std::min(p.local_blocks, std::max(p.num_q_blocks, p.num_k_blocks));
  // Head sliding step: with fewer heads than the stride the heads' stripes spread over it.
  const int64_t step = std::max<int64_t>(1, V / p.heads);
  // One task per row (head, query block); heads * num_q_blocks fits: the output's size does.
  ParallelFor(ResolveThreads(ctx), p.heads * p.num_q_blocks, [&](int64_t task, int32_t) {
    const int64_t h = task / p.num_q_blocks, qb = task % p.num_q_blocks;
    // Reduced mod V term by term (offset may be any int64, V up to INT64_MAX); h * step < V.
    const int64_t head_shift = AddMod(Mod(h * step, V), Mod(p.offset, V), V);
    for (int64_t kb = 0; kb < p.num_k_blocks; ++kb) {
      bool keep;
      if (p.causal) {
        keep = qb >= kb && (qb - kb < L || AddMod(Mod(kb, V), head_shift, V) == 0);
      } else {
        // Bidirectional: local_blocks on each side; the stripe is counted in block distance
        // past the local band on either side, shifted per head like the causal stripes.
        const int64_t dist =
            std::max<int64_t>(0, qb - kb - L + 1) + std::max<int64_t>(0, kb - qb - L + 1);
        keep = (qb - kb < L && kb - qb < L) || AddMod(Mod(dist, V), head_shift, V) == 0;
      }
      *MaskAt(out, 0, h, qb, kb) = keep ? 1 : 0;
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("BuildS2BlockMask")

Status BuildRadialBlockMask(const RadialMaskParams& p, const Context& ctx) try {
  const TensorView& out = p.out;
  if (p.frames < 0) {
    return Status::InvalidArgument(Expected("frames", ">= 0", std::to_string(p.frames)));
  }
  if (p.tokens_per_frame < 0) {
    return Status::InvalidArgument(
        Expected("tokens_per_frame", ">= 0", std::to_string(p.tokens_per_frame)));
  }
  if (p.tokens_per_frame > 0 && p.frames > kMaxTokens / p.tokens_per_frame) {
    return Status::InvalidArgument(
        Expected("frames * tokens_per_frame", "at most 2^31 - 1 tokens",
                 std::to_string(p.frames) + " * " + std::to_string(p.tokens_per_frame)));
  }
  Status s = CheckBlockSize("block", p.block);
  if (!s.ok()) return s;
  if (!(p.decay_factor > 0.0) || !std::isfinite(p.decay_factor)) {
    return Status::InvalidArgument(
        Expected("decay_factor", "a finite value > 0", std::to_string(p.decay_factor)));
  }
  const int64_t n = p.frames * p.tokens_per_frame;
  const int64_t nb = CeilDiv(n, p.block);
  const int64_t shape[4] = {1, 1, nb, nb};
  s = CheckMaskOutput("out", out, shape);
  if (!s.ok()) return s;
  if (nb == 0) return Status::Ok();  // no token (frames may still be 2^31 - 1)

  const int64_t nf = p.tokens_per_frame;
  std::vector<FramePair> pairs(static_cast<size_t>(p.frames));
  for (int64_t dist = 0; dist < p.frames; ++dist) {
    pairs[static_cast<size_t>(dist)] = RadialFramePair(p, dist);
  }
  // Block (I, J) is kept when more than 60% of its non-empty key columns have more than 1/3 of
  // the block's query rows visible. A column's count is summed over the frames the query block
  // overlaps, each contributing the overlap of its rows with the band around the column's offset.
  ParallelFor(ResolveThreads(ctx), nb, [&](int64_t I, int32_t) {
    const int64_t r0 = I * p.block, r1 = std::min(n, r0 + p.block);
    const int64_t rows = r1 - r0;
    for (int64_t J = 0; J < nb; ++J) {
      const int64_t c0 = J * p.block, c1 = std::min(n, c0 + p.block);
      int64_t non_empty = 0, dense = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t fc = c / nf, co = c % nf;
        int64_t count = 0;
        for (int64_t fr = r0 / nf; fr * nf < r1; ++fr) {
          const FramePair& pair = pairs[static_cast<size_t>(std::llabs(fr - fc))];
          if (!pair.kept) continue;
          // Rows of frame fr inside the block, as in-frame offsets [lo, hi).
          const int64_t lo = std::max(r0, fr * nf) - fr * nf;
          const int64_t hi = std::min(r1, (fr + 1) * nf) - fr * nf;
          const int64_t band_lo = std::max(lo, co - pair.width);
          const int64_t band_hi = std::min(hi, co + pair.width + 1);
          count += std::max<int64_t>(0, band_hi - band_lo);
        }
        non_empty += count > 0;
        dense += 3 * count > rows;  // density > 1/3, exactly
      }
      *MaskAt(out, 0, 0, I, J) = 5 * dense > 3 * non_empty ? 1 : 0;  // > 60%, exactly
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("BuildRadialBlockMask")

Status SelectBlocks(const BlockSelectParams& p, const Context& ctx) try {
  Status st = ValidateSelect(p);
  if (!st.ok()) return st;

  const int64_t B = p.q.shape[0], Sq = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Sk = p.k.shape[1], Hkv = p.k.shape[2];
  const int64_t nqb = CeilDiv(Sq, p.block_q), nkb = CeilDiv(Sk, p.block_k);
  if (B == 0 || Hq == 0 || nqb == 0 || nkb == 0) return Status::Ok();
  const bool user_scores = p.scores.data != nullptr;
  const int32_t threads = ResolveThreads(ctx);
  // Only computed gates use the scale (and they require D >= 1); with user scores D may be 0.
  const float scale = p.scale.has_value() ? *p.scale
                      : D > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))
                              : 0.0f;
  const float* f16_table = p.q.dtype == DType::kF16 && !user_scores ? F16Table() : nullptr;

  std::vector<SelectScratch> scratch(static_cast<size_t>(std::max<int32_t>(threads, 1)));
  for (SelectScratch& s : scratch) {
    s.pooled.resize(static_cast<size_t>(user_scores ? 0 : std::max(Hq, Hkv) * D));
    s.gate.resize(static_cast<size_t>(nkb));
    s.order.resize(static_cast<size_t>(nkb));
    s.mass.resize(static_cast<size_t>(nkb));
  }

  // Step 1: pooled keys, [B][Hkv][D][nkb], one task per (batch, key block).
  std::vector<float> k_pooled;
  if (!user_scores) {
    k_pooled.assign(static_cast<size_t>(B * Hkv * D * nkb), 0.0f);
    ParallelFor(threads, B * nkb, [&](int64_t task, int32_t worker) {
      const int64_t b = task / nkb, J = task % nkb;
      float* mean = scratch[static_cast<size_t>(worker)].pooled.data();
      PoolBlock(p.k, b, J * p.block_k, std::min(Sk, (J + 1) * p.block_k), f16_table, mean);
      for (int64_t h = 0; h < Hkv; ++h) {
        float* dst = k_pooled.data() + (b * Hkv + h) * D * nkb + J;
        for (int64_t d = 0; d < D; ++d) dst[d * nkb] = mean[h * D + d];
      }
    });
  }

  // Step 2: one task per (batch, query block): pool the block's queries (every head), then per
  // head one gate row and one selection.
  const int64_t group = user_scores ? 1 : Hq / Hkv;
  const int64_t shift = p.align == MaskAlign::kTopLeft ? 0 : Sk - Sq;
  ParallelFor(threads, B * nqb, [&](int64_t task, int32_t worker) {
    SelectScratch& s = scratch[static_cast<size_t>(worker)];
    const int64_t b = task / nqb, I = task % nqb;
    if (!user_scores) {
      PoolBlock(p.q, b, I * p.block_q, std::min(Sq, (I + 1) * p.block_q), f16_table,
                s.pooled.data());
    }
    int64_t allowed = nkb, forced = -1;
    if (p.causal) {
      // Key block J starts at key J * block_k; the block's last query sits at `last`.
      const int64_t last = std::min(Sq, (I + 1) * p.block_q) - 1 + shift;
      allowed = last < 0 ? 0 : std::min(nkb, last / p.block_k + 1);
      forced = allowed - 1;
    }
    float* g = s.gate.data();
    for (int64_t h = 0; h < Hq; ++h) {
      if (user_scores) {
        const float* src = static_cast<const float*>(p.scores.data) + b * p.scores.strides[0] +
                           h * p.scores.strides[1] + I * p.scores.strides[2];
        for (int64_t J = 0; J < nkb; ++J) g[J] = src[J * p.scores.strides[3]];
      } else {
        // g[J] = scale * q_I . k_J, as rank-1 updates over d: the inner loop runs over
        // contiguous, independent outputs and vectorizes without reassociating any sum.
        const float* qm = s.pooled.data() + h * D;
        const float* kt = k_pooled.data() + (b * Hkv + h / group) * D * nkb;
        std::fill(g, g + nkb, 0.0f);
        for (int64_t d = 0; d < D; ++d) {
          const float x = scale * qm[d];
          const float* krow = kt + d * nkb;
          for (int64_t J = 0; J < nkb; ++J) g[J] += x * krow[J];
        }
      }
      SelectRow(p, g, allowed, forced, nkb, &s, MaskAt(p.out, b, h, I, 0), p.out.strides[3]);
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("SelectBlocks")

}  // namespace tessera
