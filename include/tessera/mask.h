// SPDX-License-Identifier: Apache-2.0
// tessera: programmable masks and sparse attention.
//
// Every mask here is a field of AttentionParams::mask and runs through the one tiled forward
// kernel: the kernel asks the mask, per tile of (query rows x keys), whether the tile is empty
// (skipped, never read), full (the unmasked path) or partial (a vector predicate per key), so
// the work is proportional to what is visible. Pictures of each pattern: docs/masks.md.
//
// Positions. Query i sits at position pos(i) = i + Sk - Sq (bottom-right, the default) or i
// (top-left), as for causal. The masks below combine with causal, the window, softcap and ALiBi
// by AND:
//   visible(i, j) = base(i, j) AND block(i, j) AND neighborhood(i, j) AND document(i, j)
//                   AND tree(i, j) AND dense(i, j)
//   base(i, j)    = window(i, j) OR (j < sink_tokens AND j <= pos(i) + window_right)
//                   OR j < prefix_len
// where window(i, j) is the causal / sliding-window test, evaluated inside the token groups (and
// in rolled coordinates for shifted heads) when group_size is set. A row that sees no key gets
// output 0 and LSE = -inf. The masks other than causal / window require a dense batch (no
// cu_seqlens).
#pragma once

#include <cstdint>
#include <optional>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

enum class MaskAlign : int32_t {
  kBottomRight = 0,  // query i at position i + Sk - Sq (FlashAttention >= 2.1, FlashInfer)
  kTopLeft = 1,      // query i at position i (PyTorch is_causal)
};

// Neighborhood attention (NATTEN / Generalized Neighborhood Attention) over a grid of 1 to 3 axes;
// tokens are laid out in row-major order of the grid (the last axis fastest), and queries and keys
// share the grid (Sq == Sk == the product of the axis lengths). Per axis of length L, window K,
// dilation d, stride s (docs/algorithms.md §4.2): a query and a key interact only within the same
// dilation group (x mod d); non-causal, the window of K keys is centred on the query's stride
// leader and shifted (not shrunk) at the borders, so every query sees exactly K keys per axis;
// causal, a query sees the K keys ending at its stride leader, never beyond itself. stride = 1 is
// the sliding window, stride = K the blocked (Swin-window) form.
struct NeighborhoodMask {
  int32_t rank = 0;                        // 0: off; else the number of axes, 1..3
  int64_t grid[3] = {1, 1, 1};             // axis lengths L
  int64_t window[3] = {1, 1, 1};           // K, 1 <= K and K * dilation <= L
  int64_t dilation[3] = {1, 1, 1};         // d >= 1
  int64_t stride[3] = {1, 1, 1};           // 1 <= s <= K
  bool causal[3] = {false, false, false};  // per axis
};

// How a visible logit s becomes a weight.
enum class ScoreFunction : int32_t {
  kSoftmax = 0,  // exp(s - LSE): rows sum to 1
  kSigmoid = 1,  // FlashSigmoid: 1 / (1 + exp(-(s + sigmoid_bias))), no normalization, no LSE
};

struct MaskParams {
  // Block-sparse (FlashAttention's block-sparse mode): uint8 or bool, nonzero = the block is
  // computed, [Bm, Hm, ceil(Sq / block_q), ceil(Sk / block_k)] with Bm in {1, B}, Hm in {1, Hq};
  // block_q and block_k multiples of 16 up to 2^30. Query block I holds queries
  // [I * block_q, ...), key block J keys [J * block_k, ...) (indices, not positions).
  // data == nullptr: off.
  TensorView blocks;
  int64_t block_q = 0;
  int64_t block_k = 0;

  NeighborhoodMask neighborhood;

  // Attention sinks (StreamingLLM, SinkLoRA): keys [0, sink_tokens) stay visible past the left
  // bound of the window and of the token groups; causal / window_right still applies.
  int64_t sink_tokens = 0;
  // Prefix-LM: keys [0, prefix_len) are visible to every query (a bidirectional prefix; with
  // causal, the suffix is causal).
  int64_t prefix_len = 0;

  // Documents packed in one sequence: int32 [Bm, Sk], Bm in {1, B}, non-decreasing along the keys.
  // Key j is visible to query i only if doc[j] == doc[pos(i)] (a query at a position outside
  // [0, Sk) sees nothing). data == nullptr: off.
  TensorView document_ids;

  // Token groups (LongLoRA's shifted sparse attention, S^2-Attn): positions in groups of
  // group_size, attention only within a group. With shift_half_heads, heads [Hq/2, Hq) are rolled
  // by group_size / 2 first (the last half group wraps around to join the first one) and causal
  // and the window are evaluated in the rolled order (with a single head, Hq = 1, that head is
  // shifted). Requires Sq == Sk and a group_size dividing Sk, even with shift_half_heads. 0: off.
  int64_t group_size = 0;
  bool shift_half_heads = true;

  // Tree verification (speculative decoding): the Sq queries are the nodes of a draft tree and
  // also the last Sq keys, in the same order; i32 [Sq] (unit stride, the tree size is shape[0]),
  // parents[t] in [-1, t) (-1: attached to the prefix). Node t sees every prefix key
  // (j < Sk - Sq) and its ancestors and itself. Requires Sq <= Sk. data == nullptr: off.
  TensorView tree_parents;

  // Dense fallback: bool / uint8 (nonzero = visible) or f32 additive (added to the logit after
  // softcap and ALiBi; -inf hides the key), [Sq, Sk] or [Bm, Hm, Sq, Sk] with Bm in {1, B},
  // Hm in {1, Hq}. data == nullptr: off.
  TensorView dense;

  ScoreFunction score = ScoreFunction::kSoftmax;
  float sigmoid_bias = 0.0f;  // the scalar b of FlashSigmoid (the paper suggests -log(Sk))

  // True when any field other than score is set.
  bool any() const {
    return blocks.data != nullptr || neighborhood.rank != 0 || sink_tokens != 0 ||
           prefix_len != 0 || document_ids.data != nullptr || group_size != 0 ||
           tree_parents.data != nullptr || dense.data != nullptr;
  }
};

// ---------------------------------------------------------------------------------------------
// Block-mask builders: each writes a uint8 block mask for MaskParams::blocks.

// S2-Attention's heterogeneous context sharding (docs/algorithms.md §4.3): with sigma =
// max(1, vert_stride / heads), head h keeps key block kb of query block qb iff qb >= kb (causal)
// and (qb - kb < local_blocks or (kb + h * sigma + offset) mod vert_stride == 0). With
// causal = false the local test is two-sided (|qb - kb| < local_blocks) and the stripe test is
// (max(0, qb - kb - local_blocks + 1) + max(0, kb - qb - local_blocks + 1) + h * sigma + offset)
// mod vert_stride == 0 (docs/algorithms.md's distance form, with a per-head term so heads differ).
// The union over heads covers every allowed block when heads >= vert_stride.
// out: uint8 [1, heads, num_q_blocks, num_k_blocks].
struct S2MaskParams {
  int64_t heads = 1;
  int64_t num_q_blocks = 0;
  int64_t num_k_blocks = 0;
  int64_t local_blocks = 1;  // >= 1
  int64_t vert_stride = 1;   // >= 1
  int64_t offset = 0;
  bool causal = true;
  TensorView out;  // u8 / bool [1, heads, num_q_blocks, num_k_blocks], written
};
// Rows (head, query block) are spread over ctx.num_threads workers.
Status BuildS2BlockMask(const S2MaskParams& params, const Context& ctx);

// Radial attention's static video mask (docs/algorithms.md §4.6, the HunyuanVideo form): frames x
// tokens_per_frame tokens, frame-major. Frame pairs at distance <= 1 are dense; a farther pair at
// distance dist, with base = 2^bit_length(tokens_per_frame) / 2^bit_length(dist) (the band halves
// each time the distance doubles), takes part only if base >= 128 or dist mod floor(128 / base)
// == 0, and keeps in-frame offsets |o_r - o_c| <= max(base * decay_factor, block). The token mask
// is then reduced to blocks of `block` tokens: a block is kept when more than 60% of its non-empty
// key columns have more than 1/3 of its query rows visible.
// out: uint8 [1, 1, ceil(n / block), ceil(n / block)], n = frames * tokens_per_frame.
struct RadialMaskParams {
  int64_t frames = 0;
  int64_t tokens_per_frame = 0;
  int64_t block = 128;        // multiple of 16, at most 2^30
  double decay_factor = 1.0;  // > 0
  TensorView out;             // u8 / bool [1, 1, nb, nb], nb = ceil(n / block), written
};
// Rows of query blocks are spread over ctx.num_threads workers.
Status BuildRadialBlockMask(const RadialMaskParams& params, const Context& ctx);

// Content-based block selection (SeerAttention's gate without learned weights, MoBA, VMoBA,
// BiFormer's routing): queries and keys are mean-pooled per block (block_q / block_k tokens), the
// gate score of (query block I, key block J) is scale * mean(Q_I) . mean(K_J) for each query head
// (the KV head of its GQA group), softmax-normalized over the allowed key blocks, and each query
// block keeps either its top_k key blocks or the smallest set whose normalized mass reaches
// `threshold` (cumulative, largest first; ties go to the lower block index). With causal, key
// block J is allowed for query block I iff its first key <= the position of I's last query, the
// last allowed (diagonal) block is always kept and counts as one of the top_k (MoBA), and a query
// block whose last position is negative keeps nothing. block_q and block_k are multiples of 16
// up to 2^30.
// User scores are used as given (no scale). The result does not depend on the thread count.
struct BlockSelectParams {
  TensorView q;  // [B, Sq, Hq, D], f32 / bf16 / f16
  TensorView k;  // [B, Sk, Hkv, D], dtype of q
  // Optional: the user's own gate scores, f32 [B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)], used
  // in place of the pooled q.k (q and k may then be empty views with only their shapes read).
  TensorView scores;
  int64_t block_q = 64;
  int64_t block_k = 64;
  int64_t top_k = 0;           // > 0: keep this many per query block (fewer when fewer allowed)
  float threshold = 0.0f;      // used when top_k == 0: cumulative mass in (0, 1]
  std::optional<float> scale;  // default 1/sqrt(D)
  bool causal = false;
  MaskAlign align = MaskAlign::kBottomRight;
  TensorView out;  // uint8 [B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)], written
};
Status SelectBlocks(const BlockSelectParams& params, const Context& ctx);

}  // namespace tessera
