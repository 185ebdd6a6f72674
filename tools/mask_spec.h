// SPDX-License-Identifier: Apache-2.0
// The --mask option of `tessera run` and `tessera bench`: a one-line description of a
// programmable mask (tessera/mask.h), parsed into a MaskParams plus the buffers it points to.
//
// Grammar (components joined by '+', each one field of MaskParams; AxB lists have one entry per
// axis; block sizes BQxBK are multiples of 16):
//
//   block:FILE.npy:BQxBK         uint8 / bool block mask [nqb, nkb] or [B|1, H|1, nqb, nkb]
//   block-random:RHO[:BQxBK]     bench only: per head, each query-block row keeps round(RHO * nkb)
//                                random key blocks, the diagonal one always (causal: only blocks
//                                at or below the diagonal); --seed; default 128x128
//   nbhd1d:L:K                   neighborhood attention over a grid of L tokens, window K
//   nbhd2d:HxW:KHxKW             ... over an H x W grid (row-major), window KH x KW
//   nbhd3d:DxHxW:KDxKHxKW        ... over a D x H x W grid
//       each optionally followed by :dil=AxB, :stride=AxB, :causal=0x1 (one value per axis)
//   sink:S:W                     S attention-sink tokens + a causal window of W tokens (self
//                                included): window_left = W - 1
//   prefix:P                     prefix-LM: keys [0, P) visible to all, causal after
//   doc:L1,L2,...                packed documents of these lengths (summing to Sk)
//   shift:G                      LongLoRA S^2-Attn: causal groups of G, half the heads shifted
//   group-sink:G:S               SinkLoRA: causal groups of G (unshifted) + S sink tokens
//   s2:BLOCK:LOCAL:VSTRIDE       S2-Attention's per-head block mask (BuildS2BlockMask), causal
//   radial:FRAMES:TPF[:BLOCK]    Radial attention's video block mask (BuildRadialBlockMask)
//   select:topk=K[:BQxBK]        content-based block selection (SelectBlocks) on the actual q, k:
//   select:thr=T[:BQxBK]         top-K key blocks, or the smallest set of mass >= T; 64x64
//   tree:FILE.npy                speculative-decoding tree: int32 parent array [Sq]
//   tree-chain:T                 a chain of T nodes (parents t - 1)
//   dense:FILE.npy               bool / uint8 (nonzero = visible) or float32 (additive) mask
//                                [Sq, Sk] or [B|1, H|1, Sq, Sk]
//   sigmoid[:BIAS]               sigmoid score function (FlashSigmoid), no log-sum-exp; BIAS 0
//
// Forms marked causal above turn on causal attention. Errors name the spec, what was expected
// and what was given; the library validates the combination once more.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "npy.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/mask.h"
#include "tessera/status.h"

namespace tessera {
namespace cli {

// The problem a spec is built for: the shapes of q [B, Sq, Hq, D] and k [B, Sk, Hkv, D] and
// the command's own flags.
struct MaskProblem {
  int64_t batch = 1;
  int64_t seq_q = 0;
  int64_t seq_k = 0;
  int64_t heads_q = 1;
  bool causal = false;        // --causal (block-random only draws blocks a causal row can see)
  uint64_t seed = 42;         // block-random
  bool allow_random = false;  // block-random is a benchmark tool, not a reproducible input
};

// The grammar above, for the --help footer of run and bench.
const char* MaskSpecHelp();

class MaskSpec {
 public:
  MaskSpec() = default;
  // params.mask points into this object's buffers: neither copied nor moved.
  MaskSpec(const MaskSpec&) = delete;
  MaskSpec& operator=(const MaskSpec&) = delete;

  // Parses `text` (see the grammar above), loads its files and builds its block masks. False
  // with *error set ("--mask 'TEXT': ...") on any problem.
  bool Parse(const std::string& text, const MaskProblem& problem, std::string* error);

  // Sets params->mask and the options the forms imply (causal; the window of sink:). False with
  // *error set when an implied option conflicts with one already set (sink: with --window).
  bool Apply(AttentionParams* params, std::string* error) const;

  // select: needs q and k; Select fills the block mask that Apply pointed params.mask.blocks at.
  bool needs_selection() const { return select_; }
  // Runs SelectBlocks on params.q and params.k with params' causal flag, alignment and scale.
  Status Select(const AttentionParams& params, const Context& ctx);

  bool sigmoid() const { return mask_.score == ScoreFunction::kSigmoid; }
  bool empty() const { return text_.empty(); }
  const std::string& text() const { return text_; }

 private:
  // Component parsers: `fields` is the component split at ':' (fields[0] the form's name).
  bool ParseBlockFile(const std::vector<std::string>& fields, std::string* error);
  bool ParseBlockRandom(const std::vector<std::string>& fields, std::string* error);
  bool ParseNeighborhood(const std::vector<std::string>& fields, int rank, std::string* error);
  bool ParseSelect(const std::vector<std::string>& fields, std::string* error);
  bool ParseTreeFile(const std::string& file, std::string* error);
  bool ParseDenseFile(const std::string& file, std::string* error);
  bool BuildRandomBlocks(bool causal, std::string* error);
  // A uint8 block mask of [b, h, ceil(Sq / bq), ceil(Sk / bk)] in blocks_, zeroed.
  void AllocateBlocks(int64_t b, int64_t h, int64_t bq, int64_t bk);

  std::string text_;
  MaskProblem problem_;
  MaskParams mask_;
  bool causal_ = false;       // implied by sink, prefix, shift, group-sink, s2
  int64_t window_left_ = -1;  // sink:S:W
  bool select_ = false;
  int64_t select_top_k_ = 0;
  float select_threshold_ = 0.0f;
  bool random_blocks_ = false;
  double random_density_ = 0.0;

  NpyArray block_file_, dense_file_, tree_file_;
  std::vector<uint8_t> blocks_;
  std::vector<int32_t> document_ids_;
  std::vector<int32_t> tree_parents_;
};

}  // namespace cli
}  // namespace tessera
