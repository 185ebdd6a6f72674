// SPDX-License-Identifier: Apache-2.0
// tessera: attention operators of vision transformers that are not a mask of the exact kernel.
// The others (HaloNet, strip attention, SHViT, HiLo) are calls of AttentionForward with a
// neighborhood mask or on channel-sliced views, or of ApproxAttention: docs/vision.md maps each
// paper to its call.
//
// DaViT's channel attention (Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022,
// arXiv:2204.03645): the dh channels of a head are the tokens and the N spatial positions are
// their features. Per sequence b and head h, with q, k, v [B, N, H, dh]:
//
//   A[c, c']     = softmax over c' of ( scale * sum_n q[b, n, h, c] k[b, n, h, c'] )   (dh x dh)
//   out[b,n,h,c] = sum_c' A[c, c'] v[b, n, h, c']
//
// i.e. exact attention with dh queries and dh keys of head dim N: AttentionForward on the views
// of q, k, v as [B, dh, H, N] (token and channel strides swapped, no copy) computes the same,
// but its head dim is bounded (512) and real images have N in the thousands, so this is its own
// kernel: the dh x dh logits accumulated over N in fp32 (O(B H N dh^2)), a softmax per row,
// then the product with v (O(B H N dh^2)); memory O(dh^2) per (b, h) in flight, at most 64 MiB
// of partial sums in all.
//
// Scale: DaViT divides by sqrt(C_g), C_g the channels of a group (here dh), so the default is
// 1 / sqrt(dh). Its reference code names the projections differently (logits from k and v,
// applied to q: attention = softmax(scale * k^T v), out = attention q^T); pass its k as q, its v
// as k and its q as v to reproduce it.
#pragma once

#include <cstdint>
#include <optional>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// Channels per head ChannelAttention accepts (the dh x dh matrix of a head).
inline constexpr int64_t kMaxChannelAttentionDim = 1024;

struct ChannelAttentionParams {
  TensorView q;    // [B, N, H, dh], f32, bf16 or f16; 1 <= dh <= kMaxChannelAttentionDim
  TensorView k;    // [B, N, H, dh], dtype of q
  TensorView v;    // [B, N, H, dh], dtype of q
  TensorView out;  // [B, N, H, dh], dtype of q, written
  // Softmax scale; default 1 / sqrt(dh). Must be finite.
  std::optional<float> scale;
};

// Computes DaViT's channel attention; any strides. fp32 accumulation whatever the input dtype
// (16-bit inputs are widened exactly; the output is rounded once). N = 0 writes nothing. A NaN or
// inf in q, k or v reaches every output of its (b, h). Validates every argument before any work;
// on error nothing is written. Bitwise-identical across runs and thread counts (each logit is
// summed over N in an order fixed by the shape). ctx.path is not read.
Status ChannelAttention(const ChannelAttentionParams& params, const Context& ctx);

}  // namespace tessera
