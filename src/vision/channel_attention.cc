// SPDX-License-Identifier: Apache-2.0
// DaViT channel attention (tessera/vision.h): validation, the blocked fp32 products (one SIMD copy
// per Highway target) and the driver.
//
// How: per (b, h), the dh x dh logits S = Q^T K (Q, K the [N, dh] slices) are summed over the
// tokens in chunks of a length fixed by the shape, one task per (b, h, chunk), each chunk's
// partial sum in its own buffer; one task per (b, h) then adds the partials in chunk order and
// takes the softmax of each row; one task per (b, h, block of tokens) computes the block's rows
// of out = V A^T. Tasks gather their rows of q, k, v (any strides and dtype) into contiguous f32
// scratch, so the products read unit-stride memory. Every sum runs in an order fixed by the shape,
// so the result does not depend on the thread count.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "vision/channel_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows of c per register block; each row takes two column vectors at a time.
constexpr int64_t kBlockRows = 4;

int64_t ChannelLanes() { return static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>())); }

// c[i, j] = (accumulate ? c[i, j] : 0) + sum_{p < depth} x[i * ldx + p] y[p * ldy + j] for
// i < rows, j < cols, with cols, ldy and ldc multiples of the lane count. Each element is summed
// over p in ascending order, one multiply-add at a time, whatever the blocking.
void ChannelMatMulRows(const float* x, int64_t ldx, const float* y, int64_t ldy, int64_t rows,
                       int64_t depth, int64_t cols, bool accumulate, float* c, int64_t ldc) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t i0 = 0; i0 < rows; i0 += kBlockRows) {
    const int64_t nr = std::min(kBlockRows, rows - i0);
    int64_t j = 0;
    for (; j + 2 * lanes <= cols; j += 2 * lanes) {
      V a0[kBlockRows], a1[kBlockRows];
      for (int64_t r = 0; r < kBlockRows; ++r) {
        const bool load = accumulate && r < nr;
        a0[r] = load ? hn::LoadU(d, c + (i0 + r) * ldc + j) : hn::Zero(d);
        a1[r] = load ? hn::LoadU(d, c + (i0 + r) * ldc + j + lanes) : hn::Zero(d);
      }
      const float* xr = x + i0 * ldx;
      if (nr == kBlockRows) {
        for (int64_t p = 0; p < depth; ++p) {
          const V y0 = hn::LoadU(d, y + p * ldy + j);
          const V y1 = hn::LoadU(d, y + p * ldy + j + lanes);
          for (int64_t r = 0; r < kBlockRows; ++r) {
            const V xv = hn::Set(d, xr[r * ldx + p]);
            a0[r] = hn::MulAdd(xv, y0, a0[r]);
            a1[r] = hn::MulAdd(xv, y1, a1[r]);
          }
        }
      } else {
        for (int64_t p = 0; p < depth; ++p) {
          const V y0 = hn::LoadU(d, y + p * ldy + j);
          const V y1 = hn::LoadU(d, y + p * ldy + j + lanes);
          for (int64_t r = 0; r < nr; ++r) {
            const V xv = hn::Set(d, xr[r * ldx + p]);
            a0[r] = hn::MulAdd(xv, y0, a0[r]);
            a1[r] = hn::MulAdd(xv, y1, a1[r]);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        hn::StoreU(a0[r], d, c + (i0 + r) * ldc + j);
        hn::StoreU(a1[r], d, c + (i0 + r) * ldc + j + lanes);
      }
    }
    for (; j < cols; j += lanes) {
      V a0[kBlockRows];
      for (int64_t r = 0; r < kBlockRows; ++r) {
        a0[r] = accumulate && r < nr ? hn::LoadU(d, c + (i0 + r) * ldc + j) : hn::Zero(d);
      }
      const float* xr = x + i0 * ldx;
      for (int64_t p = 0; p < depth; ++p) {
        const V y0 = hn::LoadU(d, y + p * ldy + j);
        for (int64_t r = 0; r < nr; ++r) a0[r] = hn::MulAdd(hn::Set(d, xr[r * ldx + p]), y0, a0[r]);
      }
      for (int64_t r = 0; r < nr; ++r) hn::StoreU(a0[r], d, c + (i0 + r) * ldc + j);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "tessera/vision.h"

namespace tessera {

HWY_EXPORT(ChannelLanes);
HWY_EXPORT(ChannelMatMulRows);

namespace {

// Tokens per chunk of the logit sums (the unit of parallel work over N), unless the partial sums
// would exceed kPartialFloats.
constexpr int64_t kChunkTokens = 1024;
// Floats of partial logit sums and probabilities held at once (64 MiB): (b, h) pairs run in waves
// that fit.
constexpr int64_t kPartialFloats = int64_t{1} << 24;
// Tokens per task of the product with v.
constexpr int64_t kProductTokens = 256;
// Tokens per block of the logit sums: each block's sum starts from zero and is then added to the
// chunk's, so a logit carries the rounding of sums of kBlockTokens + N / kBlockTokens terms, not
// of one sum of N terms (N runs to thousands; the logits are not small).
constexpr int64_t kBlockTokens = 64;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }
size_t Idx(int64_t i) { return static_cast<size_t>(i); }

// dst[i * dst_stride] = element (offset + i * stride) of base, widened to f32, for i < count.
void LoadStrided(DType dtype, const void* base, int64_t offset, int64_t stride, int64_t count,
                 float* dst, int64_t dst_stride) {
  if (dtype == DType::kF32) {
    const float* src = static_cast<const float*>(base) + offset;
    if (stride == 1 && dst_stride == 1) {
      std::memcpy(dst, src, sizeof(float) * Idx(count));
      return;
    }
    for (int64_t i = 0; i < count; ++i) dst[i * dst_stride] = src[i * stride];
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    dst[i * dst_stride] = LoadElement(dtype, base, offset + i * stride);
  }
}

// Element (offset + i * stride) of base = src[i], rounded to dtype, for i < count.
void StoreStrided(DType dtype, void* base, int64_t offset, int64_t stride, int64_t count,
                  const float* src) {
  if (dtype == DType::kF32) {
    float* dst = static_cast<float*>(base) + offset;
    for (int64_t i = 0; i < count; ++i) dst[i * stride] = src[i];
    return;
  }
  for (int64_t i = 0; i < count; ++i) StoreElement(dtype, base, offset + i * stride, src[i]);
}

// Offset of element [b, n, h, 0] of a [B, N, H, dh] view.
int64_t RowOffset(const TensorView& t, int64_t b, int64_t n, int64_t h) {
  return b * t.strides[0] + n * t.strides[1] + h * t.strides[2];
}

struct Plan {
  int64_t B = 0, N = 0, H = 0, dh = 0;
  int64_t ld = 0;         // dh rounded up to the lane count: padded rows of the products
  int64_t chunk_len = 0;  // tokens per chunk of the logit sums
  int64_t chunks = 0;     // chunks per (b, h)
  int64_t wave = 0;       // (b, h) pairs per wave
  float scale = 0.0f;
};

Plan MakePlan(const ChannelAttentionParams& p) {
  Plan s;
  s.B = p.q.shape[0];
  s.N = p.q.shape[1];
  s.H = p.q.shape[2];
  s.dh = p.q.shape[3];
  s.ld = RoundUp(s.dh, HWY_DYNAMIC_DISPATCH(ChannelLanes)());
  const int64_t dh2 = s.dh * s.dh;
  // At least one chunk, and room for the probabilities beside the partials of one (b, h).
  const int64_t max_chunks = std::max<int64_t>(1, kPartialFloats / dh2 - 1);
  s.chunks = std::min(CeilDiv(s.N, kChunkTokens), max_chunks);
  s.chunk_len = CeilDiv(s.N, s.chunks);
  s.chunks = CeilDiv(s.N, s.chunk_len);  // no empty chunk
  s.wave = std::clamp<int64_t>(kPartialFloats / ((s.chunks + 1) * dh2), 1, s.B * s.H);
  s.scale = p.scale.has_value() ? *p.scale : 1.0f / std::sqrt(static_cast<float>(s.dh));
  return s;
}

// Per-worker scratch, grown on first use.
struct Scratch {
  std::vector<float> a, b, c;
};

float* Grow(std::vector<float>* v, int64_t n) {
  if (static_cast<int64_t>(v->size()) < n) v->resize(Idx(n));
  return v->data();
}

// The logits of chunk `chunk` of pair (b, h): sum over its tokens of q[n, c] k[n, c'], into
// `out` [dh, dh], in blocks of kBlockTokens tokens.
void ChunkLogits(const ChannelAttentionParams& p, const Plan& s, int64_t b, int64_t h,
                 int64_t chunk, Scratch* scratch, float* out) {
  const int64_t n_begin = chunk * s.chunk_len;
  const int64_t n_end = std::min(s.N, n_begin + s.chunk_len);
  const int64_t g = kBlockTokens, ld = s.ld, dh = s.dh;
  float* qt = Grow(&scratch->a, dh * g);        // [dh, g]: q transposed
  float* kb = Grow(&scratch->b, g * ld);        // [g, ld]: k rows, zero-padded
  float* acc = Grow(&scratch->c, 2 * dh * ld);  // [dh, ld]: the chunk's sum
  float* block = acc + dh * ld;                 // [dh, ld]: one block's sum
  std::fill(acc, acc + dh * ld, 0.0f);
  const DType dt = p.q.dtype;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += g) {
    const int64_t rows = std::min(g, n_end - n0);
    for (int64_t i = 0; i < rows; ++i) {
      LoadStrided(dt, p.q.data, RowOffset(p.q, b, n0 + i, h), p.q.strides[3], dh, qt + i, g);
      float* krow = kb + i * ld;
      LoadStrided(dt, p.k.data, RowOffset(p.k, b, n0 + i, h), p.k.strides[3], dh, krow, 1);
      std::fill(krow + dh, krow + ld, 0.0f);
    }
    HWY_DYNAMIC_DISPATCH(ChannelMatMulRows)(qt, g, kb, ld, dh, rows, ld, false, block, ld);
    for (int64_t i = 0; i < dh * ld; ++i) acc[i] += block[i];
  }
  for (int64_t c = 0; c < dh; ++c) {
    std::memcpy(out + c * dh, acc + c * ld, sizeof(float) * Idx(dh));
  }
}

// Adds the chunk partials of one pair in chunk order, scales, and writes the row softmax
// transposed: probs_t[c', c] = A[c, c'].
void Softmax(const Plan& s, const float* partials, float* row, float* probs_t) {
  const int64_t dh = s.dh, dh2 = dh * dh;
  for (int64_t c = 0; c < dh; ++c) {
    for (int64_t j = 0; j < dh; ++j) row[j] = partials[c * dh + j];
    for (int64_t chunk = 1; chunk < s.chunks; ++chunk) {
      const float* part = partials + chunk * dh2 + c * dh;
      for (int64_t j = 0; j < dh; ++j) row[j] += part[j];
    }
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < dh; ++j) {
      row[j] *= s.scale;
      max = std::max(max, row[j]);
    }
    // std::max skips a NaN logit, but its exp is NaN and so is the sum: the row becomes NaN.
    float sum = 0.0f;
    for (int64_t j = 0; j < dh; ++j) {
      row[j] = std::exp(row[j] - max);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < dh; ++j) probs_t[j * dh + c] = row[j] * inv;
  }
}

// Tokens [n0, n0 + rows) of pair (b, h): out[n, c] = sum_c' v[n, c'] A[c, c'].
void Product(const ChannelAttentionParams& p, const Plan& s, int64_t b, int64_t h, int64_t n0,
             int64_t rows, const float* probs_t, Scratch* scratch) {
  const int64_t dh = s.dh, ld = s.ld;
  float* at = Grow(&scratch->a, dh * ld);    // [dh, ld]: A^T, zero-padded
  float* vb = Grow(&scratch->b, rows * dh);  // [rows, dh]
  float* ob = Grow(&scratch->c, rows * ld);  // [rows, ld]
  for (int64_t j = 0; j < dh; ++j) {
    std::memcpy(at + j * ld, probs_t + j * dh, sizeof(float) * Idx(dh));
    std::fill(at + j * ld + dh, at + (j + 1) * ld, 0.0f);
  }
  const DType dt = p.q.dtype;
  for (int64_t i = 0; i < rows; ++i) {
    LoadStrided(dt, p.v.data, RowOffset(p.v, b, n0 + i, h), p.v.strides[3], dh, vb + i * dh, 1);
  }
  HWY_DYNAMIC_DISPATCH(ChannelMatMulRows)(vb, dh, at, ld, rows, dh, ld, false, ob, ld);
  for (int64_t i = 0; i < rows; ++i) {
    StoreStrided(dt, p.out.data, RowOffset(p.out, b, n0 + i, h), p.out.strides[3], dh, ob + i * ld);
  }
}

void Run(const ChannelAttentionParams& p, int32_t threads) {
  const Plan s = MakePlan(p);
  const int64_t pairs = s.B * s.H, dh2 = s.dh * s.dh;
  const int64_t blocks = CeilDiv(s.N, kProductTokens);
  std::vector<float> partials(Idx(s.wave * s.chunks * dh2));
  std::vector<float> probs_t(Idx(s.wave * dh2));
  std::vector<Scratch> scratch(Idx(std::max(threads, 1)));
  for (int64_t first = 0; first < pairs; first += s.wave) {
    const int64_t count = std::min(s.wave, pairs - first);
    ParallelFor(threads, count * s.chunks, [&](int64_t task, int32_t worker) {
      const int64_t pair = first + task / s.chunks;
      ChunkLogits(p, s, pair / s.H, pair % s.H, task % s.chunks, &scratch[Idx(worker)],
                  partials.data() + task * dh2);
    });
    ParallelFor(threads, count, [&](int64_t task, int32_t worker) {
      float* row = Grow(&scratch[Idx(worker)].a, s.dh);
      Softmax(s, partials.data() + task * s.chunks * dh2, row, probs_t.data() + task * dh2);
    });
    ParallelFor(threads, count * blocks, [&](int64_t task, int32_t worker) {
      const int64_t pair = first + task / blocks;
      const int64_t n0 = task % blocks * kProductTokens;
      Product(p, s, pair / s.H, pair % s.H, n0, std::min(kProductTokens, s.N - n0),
              probs_t.data() + (task / blocks) * dh2, &scratch[Idx(worker)]);
    });
  }
}

Status Validate(const ChannelAttentionParams& p, const Context& ctx) {
  const int64_t any4[4] = {-1, -1, -1, -1};
  Status s = CheckShape("q", p.q, 4, any4, "rank 4 [B, N, H, dh]", false);
  if (!s.ok()) return s;
  if (!IsSupportedDType(p.q.dtype)) {
    return Status::InvalidArgument(Expected("q", "dtype f32, bf16 or f16", DTypeName(p.q.dtype)));
  }
  const int64_t shape[4] = {p.q.shape[0], p.q.shape[1], p.q.shape[2], p.q.shape[3]};
  const std::string like_q = "shape " + ShapeString(p.q) + " (the shape of q)";
  struct Named {
    const char* name;
    const TensorView* view;
    bool writable;
  };
  const Named others[] = {{"k", &p.k, false}, {"v", &p.v, false}, {"out", &p.out, true}};
  for (const Named& t : others) {
    s = CheckShape(t.name, *t.view, 4, shape, like_q, t.writable);
    if (!s.ok()) return s;
    if (t.view->dtype != p.q.dtype) {
      return Status::InvalidArgument(Expected(
          t.name, std::string("dtype ") + DTypeName(p.q.dtype) + " (the dtype of q)",
          IsSupportedDType(t.view->dtype) ? DTypeName(t.view->dtype) : "an unknown dtype"));
    }
  }
  if (shape[3] > kMaxChannelAttentionDim) {
    return Status::InvalidArgument(
        Expected("q", "dh <= " + std::to_string(kMaxChannelAttentionDim) + " channels per head",
                 ShapeString(p.q)));
  }
  if (p.scale.has_value() && !std::isfinite(*p.scale)) {
    return Status::InvalidArgument(Expected("scale", "a finite value", std::to_string(*p.scale)));
  }
  if (ctx.num_threads < 0) {
    return Status::InvalidArgument(
        Expected("ctx.num_threads", "a value >= 0", std::to_string(ctx.num_threads)));
  }
  return CheckDisjoint({ViewRegion("out", p.out)},
                       {ViewRegion("q", p.q), ViewRegion("k", p.k), ViewRegion("v", p.v)});
}

}  // namespace

Status ChannelAttention(const ChannelAttentionParams& params, const Context& ctx) try {
  Status s = Validate(params, ctx);
  if (!s.ok()) return s;
  if (params.out.numel() == 0) return Status::Ok();
  Run(params, ResolveThreads(ctx));
  return Status::Ok();
}
TESSERA_CATCH_ALL("ChannelAttention")

}  // namespace tessera
#endif  // HWY_ONCE
