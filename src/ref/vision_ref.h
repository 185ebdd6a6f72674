// SPDX-License-Identifier: Apache-2.0
// fp64 references for the vision operators (tessera/vision.h, docs/vision.md): direct sums in
// double written from each paper's definition, sharing no code with src/vision or with the
// attention reference (HaloNet's and the strips' key windows are written as boxes of the image,
// not through NeighborhoodMask, so a test can check the neighborhood call against them).
#pragma once

#include <cstdint>
#include <functional>

#include "tessera/types.h"
#include "tessera/vision.h"

namespace tessera {
namespace ref {

// DaViT channel attention in fp64 from the formula of tessera/vision.h, from the (strided) views
// of `params` (valid: ChannelAttention's validation passed); params.out is not read or written.
// out: contiguous [B, N, H, dh]. magnitude (may be nullptr): sum_c' A[c, c'] |v[b, n, h, c']|,
// contiguous like out: the size of the terms behind each output, the scale of the fp32
// relative-error rule (tests/tolerances.h).
void ChannelAttentionF64(const ChannelAttentionParams& params, double* out, double* magnitude);

// The keys a query sees on a grid_h x grid_w image: rows [y0, y0 + rows) x columns [x0, x0 + cols).
struct KeyBox {
  int64_t y0 = 0, rows = 0, x0 = 0, cols = 0;
};
// The box of the query at row y, column x of head h.
using KeyBoxFn = std::function<KeyBox(int64_t h, int64_t y, int64_t x)>;

// Softmax attention over boxes of the image in fp64: q, k, v [B, S, H, D] (any strides, f32 /
// bf16 / f16, one dtype; the S tokens are the pixels in row-major order, grid_w per row; the same
// H for q and k): query (b, y * grid_w + x, h) attends to the keys of box(h, y, x) with logits
// scale * q.k. out: contiguous [B, S, H, D].
void BoxAttentionF64(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                     int64_t grid_w, const KeyBoxFn& box, double* out);

// HaloNet (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
// Backbones", CVPR 2021): the image in blocks of block x block pixels; the queries of a block
// attend to the block extended by `halo` pixels on each side, a window of block + 2 halo per
// axis. HaloNet zero-pads the image there; here the window is shifted inward at the image's
// border (start clamped to [0, L - window]), so it always holds block + 2 halo real rows and
// columns (requires block + 2 halo <= each side). A last block cut by the border is a block too.
KeyBox HaloBox(int64_t grid_h, int64_t grid_w, int64_t block, int64_t halo, int64_t y, int64_t x);

// Strip attention (CSWin's cross-shaped windows): a horizontal strip is a band of `strip` rows
// across the full width, [y / strip * strip, + strip), shifted up to end at the last row
// when the band would leave the image; a vertical strip the same over columns.
KeyBox HorizontalStripBox(int64_t grid_h, int64_t grid_w, int64_t strip, int64_t y, int64_t x);
KeyBox VerticalStripBox(int64_t grid_h, int64_t grid_w, int64_t strip, int64_t y, int64_t x);

// One softmax attention head, every query over every key, in fp64 (SHViT's single-head attention,
// S2AFormer's attention over reduced keys): q [B, N, d_qk], k [B, Nk, d_qk], v [B, Nk, d_v]
// (rank 3, any strides, f32), logits scale * q.k. out: contiguous [B, N, d_v].
void SingleHeadAttentionF64(const TensorView& q, const TensorView& k, const TensorView& v,
                            double scale, double* out);

}  // namespace ref
}  // namespace tessera
