// SPDX-License-Identifier: Apache-2.0
// tessera: approximate and sub-quadratic attention. Each method trades a stated error against
// exact softmax attention (tessera/attention.h) for less than quadratic time; each is built on
// the engines the exact ops use (the tiled exact kernel, MergeStates, the chunked linear engine)
// and documented, with its measured speed and error, in docs/approx.md.
//
//   WERSA      wavelet-gated random-feature linear attention (linear time)
//   Hyper      HyperAttention: sortLSH blocks + sampled keys, merged by LSE (~N log N)
//   Performer  FAVOR+ positive orthogonal random features through the linear engine
//   Agent      Agent Attention: n agent tokens pooled from Q, two softmax stages (linear in N)
//   Routing    Routing Transformer: online k-means clusters, exact attention inside each cluster
//   HiLo       LITv2's HiLo: local windows on a 2-D grid (Hi-Fi heads) + pooled keys (Lo-Fi)
//
// One entry point, ApproxAttention, with the method's options in its own struct; the method
// picks the fields it reads and rejects options that do not apply to it (InvalidArgument naming
// the field). Shapes (layout [batch, seq, heads, head_dim]; any strides, in elements):
//   q    [B, S, Hq, D]      f32
//   k    [B, S, Hkv, D]     f32; Hq % Hkv == 0 (GQA)
//   v    [B, S, Hkv, D]     f32
//   out  [B, S, Hq, D]      f32, written
//   lse  [B, Hq, S]         f32, optional, written by the methods whose output is a softmax over
//                           a set of keys (Hyper, Routing, HiLo; others: InvalidArgument if set)
// Random draws (projections, LSH directions, samples) come from `seed` unless the caller gives
// the matrix; the same seed gives the same result, bitwise, for every thread count.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

enum class ApproxMethod : int32_t {
  kWersa = 0,
  kHyper = 1,
  kPerformer = 2,
  kAgent = 3,
  kRouting = 4,
  kHiLo = 5,
};

// "wersa", "hyper", "performer", "agent", "routing", "hilo".
const char* ApproxMethodName(ApproxMethod method);
// The method of a name above; false for any other string.
bool ParseApproxMethod(const std::string& name, ApproxMethod* method);

// ---------------------------------------------------------------------------------------------
// WERSA: Wavelet-Enhanced Random Spectral Attention. q and k pass a gated multi-level Haar
// transform along the sequence, x~ = A_L x + sum_l level_weight_l gate_{b,t,l} (A_{l-1} x - A_l x)
// with A_l x the mean over token t's level-l window (non-causal: blocks of 2^l cut at S; causal:
// the trailing 2^l tokens, past only), then random features relu((x~ / bandwidth) W) / sqrt(r)
// and normalized linear attention (docs/approx.md). params.scale is not read: relu features are
// positively homogeneous, so any positive scale (and the bandwidth) cancels in the normalization.
struct WersaOptions {
  int64_t levels = 2;        // Haar decomposition levels, 1..30
  TensorView gates;          // optional f32 [B, S, levels]: per-token gate of each level (unset: 1)
  TensorView level_weights;  // optional f32 [levels]: per-level weight (unset: 1)
  int64_t features = 256;    // r random features, 1..8192 (over 512: needs D < 512)
  float bandwidth = 1.0f;    // > 0, finite: x / bandwidth before the projection
  TensorView projection;     // optional f32 [D, features] Gaussian W (unset: drawn from seed)
};

// ---------------------------------------------------------------------------------------------
// Performer FAVOR+: positive orthogonal random features phi(x) = exp(w_i . x' - |x'|^2 / 2) /
// sqrt(m), x' = sqrt(scale) x (scale > 0), with max stabilizers (per query row; per batch and KV
// head for keys) that cancel in the normalization, then normalized linear attention.
struct PerformerOptions {
  int64_t features = 256;  // m random features, 1..8192 (over 512: needs D < 512)
  TensorView projection;   // optional f32 [features, D] rows w_i (unset: blocks of D orthogonal
                           // Gaussian rows with chi-distributed norms, drawn from seed)
};

// ---------------------------------------------------------------------------------------------
// HyperAttention. Queries and keys sorted by their sortLSH bucket (Gray-code rank of the signs of
// r Gaussian projections of each head); query block i attends exactly to key block i of the
// sorted order, plus m keys sampled uniformly outside that block with weight n_outside / m.
// Causal: recursive halving, exact on pieces of at most max(min_seq_len, block) rows. Has an LSE.
struct HyperOptions {
  int64_t block = 256;         // rows of the diagonal blocks in sorted order: a multiple of 16
  int64_t samples = 256;       // m sampled keys per query block, >= 0 (0: blocks only)
  int64_t lsh_bits = 7;        // r random projections of sortLSH, 1..16
  int64_t min_seq_len = 4096;  // >= 0; a non-causal call (or causal half) with fewer query rows
                               // is exact, and so is a causal piece of at most this many rows
};

// ---------------------------------------------------------------------------------------------
// Agent Attention (non-causal; no lse). Agent i is the mean of query rows
// [floor(i S / n), floor((i + 1) S / n)) of its head; stage 1: the agents attend to K/V, stage 2:
// the queries attend to the agents (their keys) and the stage-1 outputs (their values).
struct AgentOptions {
  int64_t agents = 64;    // n agent tokens (average-pooled from Q over n segments), 1 <= n <= S
  TensorView agent_bias;  // optional f32 [1 or Hq, n, S]: added to the agents' logits on the keys
  TensorView query_bias;  // optional f32 [1 or Hq, S, n]: added to the queries' logits on agents
  TensorView dwc;         // optional f32 [B, S, Hq, D]: the depthwise-conv term, added to out
};

// ---------------------------------------------------------------------------------------------
// Routing attention (Routing Transformer). q and k rows are L2-normalized and scored against
// their query head's centroids (score = x / |x| . centroid; keys from the KV head); cluster c
// takes the w queries and the w keys of highest score (ties to the earlier token), and its
// queries attend exactly to its keys, causal on the original positions when params.causal. A
// query in several clusters gets the LSE merge of its states; a query in none (or, causal, whose
// clusters hold no key at or before it) gets out = 0 and lse = -inf.
struct RoutingOptions {
  int64_t clusters = 16;  // C, 1 <= C <= S
  int64_t window = 0;     // w tokens routed to each cluster (top-w by score), 0..S; 0: S / C
  TensorView centroids;   // f32 [Hq, C, D], read (required)
  // Optional f32 [Hq, C, D], written (may not overlap centroids): online k-means, each
  // normalized q and k row to its nearest centroid (highest score), centroid <- ema * centroid
  // + (1 - ema) * the mean of its rows over the batch; a centroid with no rows is copied.
  TensorView updated_centroids;
  float ema = 0.999f;  // in [0, 1)
};

// ---------------------------------------------------------------------------------------------
// HiLo (LITv2), non-causal, over tokens on a grid_h x grid_w grid (S = grid_h * grid_w, row-major).
// Windows are the s x s cells of the grid from its top-left corner; where a side is not a
// multiple of s the last cells along it are partial (cut at the edge, never shifted or padded).
// Hi-Fi heads attend within their token's window; Lo-Fi heads attend to one pooled token per
// window (the mean of its keys and values). lse: over the keys each head attended.
struct HiLoOptions {
  int64_t grid_h = 0, grid_w = 0;  // the grid; both >= 1 and grid_h * grid_w == S
  int64_t window = 2;              // s >= 1: Hi-Fi windows and Lo-Fi pooling are s x s
  int64_t lofi_heads = 0;          // the last lofi_heads of the Hq heads are Lo-Fi, 0..Hq
};

struct ApproxParams {
  ApproxMethod method = ApproxMethod::kPerformer;
  TensorView q;    // [B, S, Hq, D]
  TensorView k;    // [B, S, Hkv, D]
  TensorView v;    // [B, S, Hkv, D]
  TensorView out;  // [B, S, Hq, D], written
  TensorView lse;  // [B, Hq, S], optional (see above)
  // Softmax (or kernel) scale; default 1/sqrt(D). Must be finite.
  std::optional<float> scale;
  bool causal = false;
  uint64_t seed = 0;

  WersaOptions wersa;
  PerformerOptions performer;
  HyperOptions hyper;
  AgentOptions agent;
  RoutingOptions routing;
  HiLoOptions hilo;
};

// Runs params.method. Validates every argument before any work; on error nothing is written.
Status ApproxAttention(const ApproxParams& params, const Context& ctx);

// Gradients of ApproxAttention with respect to q, k and v for the methods that have a backward
// (WERSA and Performer; the others return Unimplemented), with the same random draws.
struct ApproxBackwardParams {
  ApproxParams forward;  // the forward call (its out and lse are not read)
  TensorView dout;       // [B, S, Hq, D]
  TensorView dq;         // [B, S, Hq, D], written
  TensorView dk;         // [B, S, Hkv, D], written (summed over each GQA group)
  TensorView dv;         // [B, S, Hkv, D], written (summed over each GQA group)
};
Status ApproxAttentionBackward(const ApproxBackwardParams& params, const Context& ctx);

}  // namespace tessera
