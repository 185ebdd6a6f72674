// SPDX-License-Identifier: Apache-2.0
// Tests of the fp64 reference's masks (tessera/mask.h) and sigmoid score function, on patterns
// small enough to write out by hand: the oracle every masked kernel test trusts must be checked
// against something other than itself. Patterns are rows of '#' (visible) and '.' (hidden), one
// string per query row, read off ref::MaterializeMask.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "ref/attention_ref.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Index;
using test::Rng;
using test::Tensor;
using Rows = std::vector<std::string>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Params with shape-only q / k / v views: MaterializeMask reads no tensor data.
AttentionParams MaskOnly(int64_t sq, int64_t sk, int64_t heads = 1, int64_t batch = 1) {
  AttentionParams p;
  p.q = MakeView4(nullptr, DType::kF32, batch, sq, heads, 1);
  p.k = MakeView4(nullptr, DType::kF32, batch, sk, heads, 1);
  p.v = p.k;
  p.out = p.q;
  return p;
}

int64_t Batch(const AttentionParams& p) { return p.q.shape[0]; }
int64_t Sq(const AttentionParams& p) { return p.q.shape[1]; }
int64_t Heads(const AttentionParams& p) { return p.q.shape[2]; }
int64_t Sk(const AttentionParams& p) { return p.k.shape[1]; }

// The pattern of (batch b, head h).
Rows Pattern(const AttentionParams& p, int64_t b = 0, int64_t h = 0) {
  std::vector<double> bias;
  ref::MaterializeMask(p, &bias);
  const int64_t sq = Sq(p), sk = Sk(p);
  EXPECT_EQ(static_cast<int64_t>(bias.size()), Batch(p) * Heads(p) * sq * sk);
  Rows rows;
  for (int64_t i = 0; i < sq; ++i) {
    std::string row;
    for (int64_t j = 0; j < sk; ++j) {
      const double x = bias[static_cast<size_t>(((b * Heads(p) + h) * sq + i) * sk + j)];
      row += x == -kInf ? '.' : '#';
    }
    rows.push_back(row);
  }
  return rows;
}

// Visible keys of query i as a sorted index list.
std::vector<int64_t> Keys(const Rows& rows, int64_t i) {
  std::vector<int64_t> keys;
  const std::string& row = rows[static_cast<size_t>(i)];
  for (size_t j = 0; j < row.size(); ++j) {
    if (row[j] == '#') keys.push_back(static_cast<int64_t>(j));
  }
  return keys;
}

std::vector<int64_t> Range(int64_t lo, int64_t hi) {  // [lo, hi]
  std::vector<int64_t> r;
  for (int64_t x = lo; x <= hi; ++x) r.push_back(x);
  return r;
}

NeighborhoodMask Neighborhood1D(int64_t L, int64_t K, int64_t dilation = 1, int64_t stride = 1,
                                bool causal = false) {
  NeighborhoodMask n;
  n.rank = 1;
  n.grid[0] = L;
  n.window[0] = K;
  n.dilation[0] = dilation;
  n.stride[0] = stride;
  n.causal[0] = causal;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Neighborhood attention (tessera/mask.h).

TEST(MaskRef, NeighborhoodInteriorQueryWithOddWindowSeesItsCentredWindow) {
  for (int64_t K : {1, 3, 5, 7}) {
    AttentionParams p = MaskOnly(15, 15);
    p.mask.neighborhood = Neighborhood1D(15, K);
    const Rows rows = Pattern(p);
    for (int64_t x = K / 2; x < 15 - K / 2; ++x) {
      EXPECT_EQ(Keys(rows, x), Range(x - K / 2, x + K / 2)) << "K " << K << " x " << x;
    }
  }
}

TEST(MaskRef, NeighborhoodWindowShiftsAtTheBorders) {
  AttentionParams p = MaskOnly(7, 7);
  p.mask.neighborhood = Neighborhood1D(7, 3);
  EXPECT_EQ(Pattern(p),
            (Rows{"###....", "###....", ".###...", "..###..", "...###.", "....###", "....###"}));
  // Even K = 4: wl = 2, wr = 1.
  p.mask.neighborhood = Neighborhood1D(7, 4);
  EXPECT_EQ(Pattern(p),
            (Rows{"####...", "####...", "####...", ".####..", "..####.", "...####", "...####"}));
}

TEST(MaskRef, NeighborhoodEveryNonCausalQuerySeesTheProductOfTheWindows) {
  struct Case {
    int rank;
    int64_t grid[3], window[3], dilation[3], stride[3];
  };
  const Case cases[] = {
      {1, {11, 1, 1}, {4, 1, 1}, {2, 1, 1}, {1, 1, 1}},
      {2, {5, 6}, {3, 4}, {1, 1}, {1, 1}},
      {2, {5, 6}, {3, 3}, {1, 2}, {1, 2}},
      {2, {7, 9}, {2, 3}, {3, 3}, {2, 3}},
      {3, {3, 4, 5}, {3, 2, 3}, {1, 2, 1}, {1, 1, 2}},
  };
  for (const Case& c : cases) {
    NeighborhoodMask n;
    n.rank = c.rank;
    int64_t tokens = 1, expected = 1;
    for (int a = 0; a < c.rank; ++a) {
      n.grid[a] = c.grid[a];
      n.window[a] = c.window[a];
      n.dilation[a] = c.dilation[a];
      n.stride[a] = c.stride[a];
      tokens *= c.grid[a];
      expected *= c.window[a];
    }
    AttentionParams p = MaskOnly(tokens, tokens);
    p.mask.neighborhood = n;
    const Rows rows = Pattern(p);
    for (int64_t i = 0; i < tokens; ++i) {
      EXPECT_EQ(static_cast<int64_t>(Keys(rows, i).size()), expected)
          << "rank " << c.rank << " query " << i;
    }
  }
}

TEST(MaskRef, NeighborhoodDilationGroupsNeverMix) {
  // L = 8, d = 2: groups {0,2,4,6} and {1,3,5,7}, each of length 4, K = 3 inside a group.
  AttentionParams p = MaskOnly(8, 8);
  p.mask.neighborhood = Neighborhood1D(8, 3, 2);
  const Rows rows = Pattern(p);
  EXPECT_EQ(Keys(rows, 0), (std::vector<int64_t>{0, 2, 4}));  // border: shifted window
  EXPECT_EQ(Keys(rows, 3), (std::vector<int64_t>{1, 3, 5}));
  EXPECT_EQ(Keys(rows, 4), (std::vector<int64_t>{2, 4, 6}));
  EXPECT_EQ(Keys(rows, 7), (std::vector<int64_t>{3, 5, 7}));
  // L = 7, d = 2: group 0 is {0,2,4,6} (length 4), group 1 is {1,3,5} (length 3).
  p = MaskOnly(7, 7);
  p.mask.neighborhood = Neighborhood1D(7, 3, 2);
  const Rows odd = Pattern(p);
  EXPECT_EQ(Keys(odd, 5), (std::vector<int64_t>{1, 3, 5}));
  EXPECT_EQ(Keys(odd, 6), (std::vector<int64_t>{2, 4, 6}));
  for (int64_t i = 0; i < 7; ++i) {
    for (int64_t j : Keys(odd, i)) EXPECT_EQ(i % 2, j % 2) << i << " sees " << j;
  }
}

TEST(MaskRef, NeighborhoodCausalSeesTheWindowEndingAtItsLeader) {
  AttentionParams p = MaskOnly(6, 6);
  p.mask.neighborhood = Neighborhood1D(6, 3, 1, 1, true);
  EXPECT_EQ(Pattern(p), (Rows{"#.....", "##....", "###...", ".###..", "..###.", "...###"}));
  // Stride 2: the leader is the last token of the query's stride group, never beyond itself.
  p.mask.neighborhood = Neighborhood1D(6, 3, 1, 2, true);
  EXPECT_EQ(Pattern(p), (Rows{"#.....", "##....", ".##...", ".###..", "...##.", "...###"}));
}

TEST(MaskRef, NeighborhoodCausalityIsPerAxis) {
  // 3 x 4 grid, causal along axis 0 (time, K = 2), bidirectional along axis 1 (K = 3).
  NeighborhoodMask n;
  n.rank = 2;
  n.grid[0] = 3;
  n.grid[1] = 4;
  n.window[0] = 2;
  n.window[1] = 3;
  n.causal[0] = true;
  AttentionParams p = MaskOnly(12, 12);
  p.mask.neighborhood = n;
  const Rows rows = Pattern(p);
  // Query (t=1, x=0) = token 4: times {0, 1}, columns {0, 1, 2}.
  EXPECT_EQ(Keys(rows, 4), (std::vector<int64_t>{0, 1, 2, 4, 5, 6}));
  // Query (t=2, x=3) = token 11: times {1, 2}, columns {1, 2, 3}.
  EXPECT_EQ(Keys(rows, 11), (std::vector<int64_t>{5, 6, 7, 9, 10, 11}));
  // Query (t=0, x=2) = token 2: time 0 only.
  EXPECT_EQ(Keys(rows, 2), (std::vector<int64_t>{1, 2, 3}));
}

TEST(MaskRef, NeighborhoodStrideEqualToTheWindowIsBlockDiagonal) {
  AttentionParams p = MaskOnly(6, 6);
  p.mask.neighborhood = Neighborhood1D(6, 3, 1, 3);
  EXPECT_EQ(Pattern(p), (Rows{"###...", "###...", "###...", "...###", "...###", "...###"}));
  // 2-D 4 x 4 with 2 x 2 windows and strides: Swin windows, tokens in row-major order.
  NeighborhoodMask n;
  n.rank = 2;
  for (int a = 0; a < 2; ++a) n.grid[a] = 4, n.window[a] = 2, n.stride[a] = 2;
  p = MaskOnly(16, 16);
  p.mask.neighborhood = n;
  const Rows rows = Pattern(p);
  for (int64_t i = 0; i < 16; ++i) {
    for (int64_t j = 0; j < 16; ++j) {
      const bool same_window = (i / 4) / 2 == (j / 4) / 2 && (i % 4) / 2 == (j % 4) / 2;
      EXPECT_EQ(rows[static_cast<size_t>(i)][static_cast<size_t>(j)], same_window ? '#' : '.')
          << i << ", " << j;
    }
  }
}

TEST(MaskRef, NeighborhoodWindowEqualToTheAxisIsFullAttention) {
  NeighborhoodMask n;
  n.rank = 2;
  n.grid[0] = 3;
  n.grid[1] = 5;
  n.window[0] = 3;
  n.window[1] = 5;
  AttentionParams p = MaskOnly(15, 15);
  p.mask.neighborhood = n;
  EXPECT_EQ(Pattern(p), Rows(15, std::string(15, '#')));
}

// ---------------------------------------------------------------------------------------------
// Token groups: LongLoRA's shifted sparse attention and SinkLoRA.

TEST(MaskRef, LongLoraUnshiftedHeadIsCausalInsideGroups) {
  AttentionParams p = MaskOnly(16, 16, 2);
  p.causal = true;
  p.mask.group_size = 8;
  const Rows rows = Pattern(p, 0, 0);
  for (int64_t i = 0; i < 16; ++i) {
    EXPECT_EQ(Keys(rows, i), Range(i / 8 * 8, i)) << i;
  }
}

TEST(MaskRef, LongLoraShiftedHeadWrapsTheLastHalfGroupToTheFirst) {
  AttentionParams p = MaskOnly(16, 16, 2);
  p.causal = true;
  p.mask.group_size = 8;
  const Rows rows = Pattern(p, 0, 1);
  // Rolled by -4: original x sits at rolled (x - 4) mod 16, so original 12..15, 0..3 form the
  // first rolled group and causality runs in that order.
  EXPECT_EQ(Keys(rows, 1), (std::vector<int64_t>{0, 1, 12, 13, 14, 15}));
  EXPECT_EQ(Keys(rows, 12), (std::vector<int64_t>{12}));
  EXPECT_EQ(Keys(rows, 15), (std::vector<int64_t>{12, 13, 14, 15}));
  EXPECT_EQ(Keys(rows, 3), (std::vector<int64_t>{0, 1, 2, 3, 12, 13, 14, 15}));
  EXPECT_EQ(Keys(rows, 4), (std::vector<int64_t>{4}));
  EXPECT_EQ(Keys(rows, 11), Range(4, 11));
  // The same through the roll permutation: shifted(i, j) = unshifted(rho(i), rho(j)).
  const Rows unshifted = Pattern(p, 0, 0);
  for (int64_t i = 0; i < 16; ++i) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t ri = (i + 12) % 16, rj = (j + 12) % 16;
      EXPECT_EQ(rows[static_cast<size_t>(i)][static_cast<size_t>(j)],
                unshifted[static_cast<size_t>(ri)][static_cast<size_t>(rj)])
          << i << ", " << j;
    }
  }
}

TEST(MaskRef, LongLoraShiftsTheSecondHalfOfTheHeadsOnly) {
  for (int64_t heads : {1, 3, 4}) {
    AttentionParams p = MaskOnly(8, 8, heads);
    p.mask.group_size = 4;  // non-causal: whole groups
    for (int64_t h = 0; h < heads; ++h) {
      const Rows rows = Pattern(p, 0, h);
      const bool shifted = h >= heads / 2;
      EXPECT_EQ(Keys(rows, 0), shifted ? (std::vector<int64_t>{0, 1, 6, 7}) : Range(0, 3))
          << "heads " << heads << " h " << h;
    }
    p.mask.shift_half_heads = false;
    for (int64_t h = 0; h < heads; ++h) EXPECT_EQ(Keys(Pattern(p, 0, h), 0), Range(0, 3));
  }
}

TEST(MaskRef, SinkLoraGroupsWithSinks) {
  AttentionParams p = MaskOnly(12, 12, 2);
  p.causal = true;
  p.mask.group_size = 4;
  p.mask.shift_half_heads = false;
  p.mask.sink_tokens = 2;
  for (int64_t h = 0; h < 2; ++h) {
    const Rows rows = Pattern(p, 0, h);
    EXPECT_EQ(Keys(rows, 0), (std::vector<int64_t>{0}));  // causal still applies to sinks
    EXPECT_EQ(Keys(rows, 5), (std::vector<int64_t>{0, 1, 4, 5}));
    EXPECT_EQ(Keys(rows, 11), (std::vector<int64_t>{0, 1, 8, 9, 10, 11}));
  }
}

// ---------------------------------------------------------------------------------------------
// Sinks, prefix-LM, documents, trees.

TEST(MaskRef, SinksStayVisiblePastTheWindow) {
  AttentionParams p = MaskOnly(8, 8);
  p.causal = true;
  p.window_left = 2;
  p.mask.sink_tokens = 2;
  EXPECT_EQ(Pattern(p), (Rows{"#.......", "##......", "###.....", "####....", "#####...",
                              "##.###..", "##..###.", "##...###"}));
  // More sinks than the query position: the right bound (causal) still hides the later sinks.
  p.window_left = 1;
  p.mask.sink_tokens = 4;
  const Rows rows = Pattern(p);
  EXPECT_EQ(Keys(rows, 1), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(Keys(rows, 6), (std::vector<int64_t>{0, 1, 2, 3, 5, 6}));
  // A two-sided window: the sinks obey window_right, not causality.
  p.causal = false;
  p.window_left = 0;
  p.window_right = 1;
  p.mask.sink_tokens = 3;
  EXPECT_EQ(Keys(Pattern(p), 0), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(Keys(Pattern(p), 5), (std::vector<int64_t>{0, 1, 2, 5, 6}));
}

TEST(MaskRef, PrefixLmPrefixIsBidirectional) {
  AttentionParams p = MaskOnly(6, 6);
  p.causal = true;
  p.mask.prefix_len = 3;
  EXPECT_EQ(Pattern(p), (Rows{"###...", "###...", "###...", "####..", "#####.", "######"}));
  // Bottom-right with Sq < Sk: query i at position i + 3.
  p = MaskOnly(3, 6);
  p.causal = true;
  p.mask.prefix_len = 5;
  EXPECT_EQ(Pattern(p), (Rows{"#####.", "#####.", "######"}));
  // Prefix beyond the window.
  p = MaskOnly(5, 5);
  p.causal = true;
  p.window_left = 0;
  p.mask.prefix_len = 2;
  EXPECT_EQ(Pattern(p), (Rows{"##...", "##...", "###..", "##.#.", "##..#"}));
}

TEST(MaskRef, DocumentsAreBlockDiagonal) {
  std::vector<int32_t> ids = {0, 0, 0, 1, 1, 2, 2, 2};
  const int64_t shape[2] = {1, 8};
  AttentionParams p = MaskOnly(8, 8);
  p.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, shape);
  EXPECT_EQ(Pattern(p), (Rows{"###.....", "###.....", "###.....", "...##...", "...##...",
                              ".....###", ".....###", ".....###"}));
  p.causal = true;
  EXPECT_EQ(Pattern(p), (Rows{"#.......", "##......", "###.....", "...#....", "...##...",
                              ".....#..", ".....##.", ".....###"}));
}

TEST(MaskRef, DocumentOfAQueryIsTheDocumentAtItsPosition) {
  std::vector<int32_t> ids = {0, 0, 1, 1, 1, 2};
  const int64_t shape[2] = {1, 6};
  // Bottom-right, Sq = 3 < Sk = 6: queries at positions 3, 4, 5.
  AttentionParams p = MaskOnly(3, 6);
  p.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, shape);
  EXPECT_EQ(Pattern(p), (Rows{"..###.", "..###.", ".....#"}));
  // Top-left, Sq = 8 > Sk = 6: queries 6 and 7 sit outside [0, Sk) and see nothing.
  p = MaskOnly(8, 6);
  p.align = MaskAlign::kTopLeft;
  p.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, shape);
  const Rows rows = Pattern(p);
  EXPECT_EQ(rows[0], "##....");
  EXPECT_EQ(rows[5], ".....#");
  EXPECT_EQ(rows[6], "......");
  EXPECT_EQ(rows[7], "......");
}

TEST(MaskRef, DocumentIdsPerBatch) {
  std::vector<int32_t> ids = {0, 0, 1, 1,  //
                              5, 6, 6, 6};
  const int64_t shape[2] = {2, 4};
  AttentionParams p = MaskOnly(4, 4, 1, 2);
  p.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, shape);
  EXPECT_EQ(Pattern(p, 0), (Rows{"##..", "##..", "..##", "..##"}));
  EXPECT_EQ(Pattern(p, 1), (Rows{"#...", ".###", ".###", ".###"}));
}

TEST(MaskRef, TreeChainEqualsCausalOnTheTreePart) {
  const std::vector<int32_t> chain = {-1, 0, 1, 2};
  AttentionParams tree = MaskOnly(4, 7);
  tree.mask.tree_parents = test::I32View(chain);
  AttentionParams causal = MaskOnly(4, 7);
  causal.causal = true;
  EXPECT_EQ(Pattern(tree), Pattern(causal));
  EXPECT_EQ(Pattern(tree), (Rows{"####...", "#####..", "######.", "#######"}));
}

TEST(MaskRef, TreeNodesSeeThePrefixTheirAncestorsAndThemselves) {
  // Prefix of 2 keys, then node 0 with children 1 and 2; node 3 under 1, node 4 under 2.
  const std::vector<int32_t> parents = {-1, 0, 0, 1, 2};
  AttentionParams p = MaskOnly(5, 7);
  p.mask.tree_parents = test::I32View(parents);
  EXPECT_EQ(Pattern(p), (Rows{"###....", "####...", "###.#..", "####.#.", "###.#.#"}));
  // A second root attached to the prefix.
  const std::vector<int32_t> forest = {-1, -1, 1};
  p = MaskOnly(3, 3);
  p.mask.tree_parents = test::I32View(forest);
  EXPECT_EQ(Pattern(p), (Rows{"#..", ".#.", ".##"}));
}

// ---------------------------------------------------------------------------------------------
// Block masks and the dense fallback.

TEST(MaskRef, BlockMaskIndexesQueryAndKeyIndicesNotPositions) {
  // Sq = 40, Sk = 48, blocks 16 x 16: 3 x 3 blocks per head, one mask per head (Hm = 2).
  const int64_t sq = 40, sk = 48;
  std::vector<uint8_t> blocks = {1, 0, 1, 0, 1, 0, 1, 1, 0,   // head 0
                                 0, 0, 1, 1, 0, 0, 0, 1, 1};  // head 1
  for (DType dtype : {DType::kU8, DType::kBool}) {
    AttentionParams p = MaskOnly(sq, sk, 2, 2);
    p.mask.blocks = MakeView4(blocks.data(), dtype, 1, 2, 3, 3);
    p.mask.block_q = 16;
    p.mask.block_k = 16;
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t h = 0; h < 2; ++h) {
        const Rows rows = Pattern(p, b, h);
        for (int64_t i = 0; i < sq; ++i) {
          for (int64_t j = 0; j < sk; ++j) {
            const bool on = blocks[static_cast<size_t>((h * 3 + i / 16) * 3 + j / 16)] != 0;
            ASSERT_EQ(rows[static_cast<size_t>(i)][static_cast<size_t>(j)], on ? '#' : '.')
                << "b " << b << " h " << h << " i " << i << " j " << j;
          }
        }
      }
    }
  }
}

TEST(MaskRef, BlockMaskAndCausalCombineByAnd) {
  std::vector<uint8_t> blocks = {1, 0, 1, 1};  // [1, 1, 2, 2], 16 x 16 blocks, Sq = Sk = 32
  AttentionParams p = MaskOnly(32, 32);
  p.causal = true;
  p.mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 2, 2);
  p.mask.block_q = 16;
  p.mask.block_k = 16;
  const Rows rows = Pattern(p);
  for (int64_t i = 0; i < 32; ++i) {
    EXPECT_EQ(Keys(rows, i), Range(0, i)) << i;  // the zero block lies above the diagonal
  }
  blocks[2] = 0;  // hide rows 16..31 x keys 0..15
  const Rows hidden = Pattern(p);
  EXPECT_EQ(Keys(hidden, 20), Range(16, 20));
}

TEST(MaskRef, DenseMaskBroadcastsItsUnitDims) {
  const int64_t B = 2, H = 3, sq = 2, sk = 3;
  // [Sq, Sk] f32: the additive value itself is reported; -inf hides.
  std::vector<float> d2 = {0.5f, -static_cast<float>(kInf), -2.0f, 1.0f,
                           0.0f, -static_cast<float>(kInf)};
  AttentionParams p = MaskOnly(sq, sk, H, B);
  const int64_t shape2[2] = {sq, sk};
  p.mask.dense = MakeContiguousView(d2.data(), DType::kF32, 2, shape2);
  std::vector<double> bias;
  ref::MaterializeMask(p, &bias);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t e = 0; e < sq * sk; ++e) {
      EXPECT_EQ(bias[static_cast<size_t>(bh * sq * sk + e)], d2[static_cast<size_t>(e)]);
    }
  }
  // [1, H, Sq, Sk] u8 and [B, 1, Sq, Sk] bool, the latter with strides that skip elements.
  std::vector<uint8_t> per_head(static_cast<size_t>(H * sq * sk));
  for (size_t e = 0; e < per_head.size(); ++e) per_head[e] = (e % 4) != 1;
  p.mask.dense = MakeView4(per_head.data(), DType::kU8, 1, H, sq, sk);
  ref::MaterializeMask(p, &bias);
  for (int64_t b = 0; b < B; ++b) {
    for (size_t e = 0; e < per_head.size(); ++e) {
      EXPECT_EQ(bias[static_cast<size_t>(b * H * sq * sk) + e], per_head[e] ? 0.0 : -kInf);
    }
  }
  std::vector<uint8_t> per_batch(static_cast<size_t>(B * sq * sk * 2), 7);
  TensorView strided = MakeView4(per_batch.data(), DType::kBool, B, 1, sq, sk);
  strided.strides[0] = sq * sk * 2;
  strided.strides[2] = sk * 2;
  strided.strides[3] = 2;
  per_batch[static_cast<size_t>(1 * sq * sk * 2 + 1 * sk * 2 + 2 * 2)] = 0;  // b 1, i 1, j 2
  per_batch[1] = 0;                                                          // a gap: not read
  p.mask.dense = strided;
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_EQ(Pattern(p, 0, h), (Rows{"###", "###"}));
    EXPECT_EQ(Pattern(p, 1, h), (Rows{"###", "##."}));
  }
}

TEST(MaskRef, EveryMaskCombinesByAnd) {
  // Each AND-ed mask alone (with causal as the base) against all of them together.
  const int64_t n = 16, heads = 2;
  std::vector<uint8_t> blocks = {1, 1, 0, 1};
  std::vector<int32_t> ids(n);
  for (int64_t j = 0; j < n; ++j) ids[static_cast<size_t>(j)] = static_cast<int32_t>(j / 6);
  std::vector<int32_t> parents(n);
  for (int64_t t = 0; t < n; ++t) parents[static_cast<size_t>(t)] = static_cast<int32_t>(t / 2 - 1);
  std::vector<uint8_t> dense(n * n);
  for (size_t e = 0; e < dense.size(); ++e) dense[e] = (e * 7) % 5 != 0;
  const int64_t ids_shape[2] = {1, n}, dense_shape[2] = {n, n};

  std::vector<std::function<void(AttentionParams*)>> parts = {
      [&](AttentionParams* p) {
        p->mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 2, 2);
        p->mask.block_q = 8;  // the reference takes any block size (the API: multiples of 16)
        p->mask.block_k = 8;
      },
      [&](AttentionParams* p) { p->mask.neighborhood = Neighborhood1D(n, 5, 2); },
      [&](AttentionParams* p) {
        p->mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, ids_shape);
      },
      [&](AttentionParams* p) { p->mask.tree_parents = test::I32View(parents); },
      [&](AttentionParams* p) {
        p->mask.dense = MakeContiguousView(dense.data(), DType::kU8, 2, dense_shape);
      },
  };
  AttentionParams all = MaskOnly(n, n, heads);
  all.causal = true;
  for (auto& part : parts) part(&all);
  std::vector<double> together;
  ref::MaterializeMask(all, &together);
  std::vector<double> product(together.size(), 0.0);
  for (auto& part : parts) {
    AttentionParams one = MaskOnly(n, n, heads);
    one.causal = true;
    part(&one);
    std::vector<double> alone;
    ref::MaterializeMask(one, &alone);
    for (size_t e = 0; e < alone.size(); ++e) {
      if (alone[e] == -kInf) product[e] = -kInf;
    }
  }
  EXPECT_EQ(together, product);
  size_t visible = 0;
  for (double x : together) visible += x == 0.0;
  EXPECT_GT(visible, static_cast<size_t>(n));  // not everything hidden
}

// ---------------------------------------------------------------------------------------------
// The forward and backward under masks.

struct Inputs {
  Tensor q, k, v, dout;
};

Inputs MakeInputs(int64_t batch, int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t dim,
                  uint64_t seed) {
  Inputs in{Tensor(DType::kF32, {batch, sq, hq, dim}), Tensor(DType::kF32, {batch, sk, hkv, dim}),
            Tensor(DType::kF32, {batch, sk, hkv, dim}), Tensor(DType::kF32, {batch, sq, hq, dim})};
  Rng rng(seed);
  // Multiples of 2^-6 in [-4, 4]: q +- 2^-9 stays exact for the finite differences below.
  for (Tensor* t : {&in.q, &in.k, &in.v, &in.dout}) {
    t->FillNormal(rng);
    t->ForEach([&](const Index& i) {
      t->Set(i, std::clamp(std::round(t->Get(i) * 64.0) / 64.0, -4.0, 4.0));
    });
  }
  return in;
}

AttentionParams WithInputs(const Inputs& in) {
  AttentionParams p;
  p.q = in.q.view();
  p.k = in.k.view();
  p.v = in.v.view();
  return p;
}

std::vector<double> Forward(const AttentionParams& p, std::vector<double>* lse = nullptr) {
  std::vector<double> out(static_cast<size_t>(p.q.numel()), 0.0);
  std::vector<double> l(static_cast<size_t>(p.q.shape[0] * p.q.shape[1] * p.q.shape[2]), 7.0);
  ref::AttentionForwardF64(p, out.data(), l.data());
  if (lse != nullptr) *lse = l;
  return out;
}

TEST(MaskRef, StructuredMaskEqualsItsMaterializedDenseMask) {
  const Inputs in = MakeInputs(2, 12, 12, 4, 2, 8, 11);
  std::vector<int32_t> ids = {0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2};
  const int64_t ids_shape[2] = {1, 12};
  AttentionParams structured = WithInputs(in);
  structured.causal = true;
  structured.softcap = 2.0f;
  structured.mask.neighborhood = Neighborhood1D(12, 5);
  structured.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, ids_shape);
  structured.mask.sink_tokens = 1;

  std::vector<double> bias;
  ref::MaterializeMask(structured, &bias);
  std::vector<float> bias_f32(bias.begin(), bias.end());
  AttentionParams dense = WithInputs(in);
  dense.softcap = 2.0f;
  dense.mask.dense = MakeView4(bias_f32.data(), DType::kF32, 2, 4, 12, 12);
  std::vector<double> lse_s, lse_d;
  EXPECT_EQ(Forward(structured, &lse_s), Forward(dense, &lse_d));
  EXPECT_EQ(lse_s, lse_d);
}

TEST(MaskRef, DenseAdditiveMaskIsAddedAfterSoftcapAndAlibi) {
  // One query, two keys, q.k = 0 and 1, scale 1, softcap 0.5, ALiBi slope 0.25, additive mask
  // [0.75, -1.5]: s_j = 0.5 tanh(qk_j / 0.5) - 0.25 |1 - j| + m_j.
  Tensor q(DType::kF32, {1, 1, 1, 1}), k(DType::kF32, {1, 2, 1, 1}), v(DType::kF32, {1, 2, 1, 1});
  q.FromVector({1.0});
  k.FromVector({0.0, 1.0});
  v.FromVector({3.0, -5.0});
  std::vector<float> slopes = {0.25f}, mask = {0.75f, -1.5f};
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.scale = 1.0f;
  p.softcap = 0.5f;
  p.alibi_slopes = MakeView1(slopes.data(), DType::kF32, 1);
  const int64_t shape[2] = {1, 2};
  p.mask.dense = MakeContiguousView(mask.data(), DType::kF32, 2, shape);
  const double s0 = 0.5 * std::tanh(0.0) - 0.25 + 0.75, s1 = 0.5 * std::tanh(2.0) - 1.5;
  const double m = std::max(s0, s1);
  const double e0 = std::exp(s0 - m), e1 = std::exp(s1 - m);
  std::vector<double> lse;
  const std::vector<double> out = Forward(p, &lse);
  EXPECT_NEAR(out[0], (3.0 * e0 - 5.0 * e1) / (e0 + e1), test::kFiniteDifferenceCeiling.atol);
  EXPECT_NEAR(lse[0], m + std::log(e0 + e1), test::kFiniteDifferenceCeiling.atol);
}

TEST(MaskRef, SigmoidForwardIsTheUnnormalizedSigmoidWeightedSum) {
  const int64_t B = 1, sq = 5, sk = 7, hq = 2, hkv = 1, dim = 4;
  const Inputs in = MakeInputs(B, sq, sk, hq, hkv, dim, 5);
  AttentionParams p = WithInputs(in);
  p.causal = true;
  p.softcap = 3.0f;
  p.mask.score = ScoreFunction::kSigmoid;
  p.mask.sigmoid_bias = -std::log(7.0f);
  std::vector<double> lse;
  const std::vector<double> out = Forward(p, &lse);
  const double scale = static_cast<float>(1.0 / std::sqrt(4.0));
  const double bias = p.mask.sigmoid_bias;
  for (int64_t h = 0; h < hq; ++h) {
    for (int64_t i = 0; i < sq; ++i) {
      for (int64_t d = 0; d < dim; ++d) {
        double expected = 0.0;
        for (int64_t j = 0; j <= i + sk - sq; ++j) {
          double dot = 0.0;
          for (int64_t e = 0; e < dim; ++e) dot += in.q.Get({0, i, h, e}) * in.k.Get({0, j, 0, e});
          const double s = 3.0 * std::tanh(scale * dot / 3.0);
          expected += in.v.Get({0, j, 0, d}) / (1.0 + std::exp(-(s + bias)));
        }
        EXPECT_NEAR(out[static_cast<size_t>((i * hq + h) * dim + d)], expected,
                    test::kFiniteDifferenceCeiling.atol)
            << h << " " << i << " " << d;
      }
    }
  }
  for (double x : lse) EXPECT_EQ(x, 0.0);  // documented: no LSE with sigmoid
}

TEST(MaskRef, SigmoidRowWithoutKeysIsZero) {
  const Inputs in = MakeInputs(1, 4, 2, 1, 1, 3, 9);
  AttentionParams p = WithInputs(in);
  p.causal = true;  // bottom-right, Sq > Sk: rows 0 and 1 see nothing
  p.mask.score = ScoreFunction::kSigmoid;
  const std::vector<double> out = Forward(p);
  for (int64_t e = 0; e < 6; ++e) EXPECT_EQ(out[static_cast<size_t>(e)], 0.0);
  EXPECT_NE(out[6], 0.0);
}

// Loss = sum out * dout of the fp64 forward; its gradient by the shared finite-difference oracle
// (test_util.h).
std::vector<double> FiniteDifferences(const AttentionParams& p, const Tensor& dout, Tensor* x) {
  const std::vector<double> g = dout.ToVector();
  auto loss = [&] {
    const std::vector<double> out = Forward(p);
    double l = 0.0;
    for (size_t e = 0; e < out.size(); ++e) l += out[e] * g[e];
    return l;
  };
  return test::FiniteDifferenceGradient(x, loss);
}

void CheckBackwardAgainstFiniteDifferences(const std::function<void(AttentionParams*)>& configure,
                                           int64_t sq, int64_t sk, uint64_t seed) {
  Inputs in = MakeInputs(1, sq, sk, 2, 1, 4, seed);
  AttentionParams p = WithInputs(in);
  configure(&p);
  AttentionBackwardParams bp;
  bp.forward = p;
  bp.dout = in.dout.view();
  std::vector<double> dq(static_cast<size_t>(in.q.numel())), dk(static_cast<size_t>(in.k.numel())),
      dv(static_cast<size_t>(in.v.numel()));
  ref::AttentionBackwardF64(bp, dq.data(), dk.data(), dv.data());
  EXPECT_TRUE(test::CheckClose(dq, FiniteDifferences(p, in.dout, &in.q),
                               test::kFiniteDifferenceCeiling, "dq vs finite differences"));
  EXPECT_TRUE(test::CheckClose(dk, FiniteDifferences(p, in.dout, &in.k),
                               test::kFiniteDifferenceCeiling, "dk vs finite differences"));
  EXPECT_TRUE(test::CheckClose(dv, FiniteDifferences(p, in.dout, &in.v),
                               test::kFiniteDifferenceCeiling, "dv vs finite differences"));
  double largest = 0.0;
  for (double x : dq) largest = std::max(largest, std::fabs(x));
  EXPECT_GT(largest, 1e-2);  // not a case that tests nothing
}

TEST(MaskRef, SigmoidBackwardMatchesFiniteDifferences) {
  CheckBackwardAgainstFiniteDifferences(
      [](AttentionParams* p) {
        p->causal = true;
        p->mask.score = ScoreFunction::kSigmoid;
        p->mask.sigmoid_bias = -1.25f;
      },
      5, 7, 21);
  CheckBackwardAgainstFiniteDifferences(
      [](AttentionParams* p) {
        p->softcap = 1.5f;
        p->mask.score = ScoreFunction::kSigmoid;
      },
      6, 6, 22);
}

TEST(MaskRef, MaskedSoftmaxBackwardMatchesFiniteDifferences) {
  static std::vector<float> additive;
  additive.assign(36, 0.0f);
  for (size_t e = 0; e < additive.size(); ++e) {
    additive[e] = e % 7 == 3 ? -std::numeric_limits<float>::infinity()
                             : static_cast<float>(e % 5) * 0.25f - 0.5f;
  }
  CheckBackwardAgainstFiniteDifferences(
      [](AttentionParams* p) {
        p->mask.neighborhood = Neighborhood1D(6, 3);
        p->mask.prefix_len = 1;
        const int64_t shape[2] = {6, 6};
        p->mask.dense = MakeContiguousView(additive.data(), DType::kF32, 2, shape);
      },
      6, 6, 23);
  CheckBackwardAgainstFiniteDifferences(
      [](AttentionParams* p) {
        p->causal = true;
        p->mask.group_size = 2;
      },
      6, 6, 24);
}

// ---------------------------------------------------------------------------------------------
// The pictures of docs/masks.md. Disabled on purpose: it asserts nothing (the masks it draws are
// checked cell by cell by the tests above); it only regenerates the documentation. Run with
//   tessera_tests --gtest_also_run_disabled_tests --gtest_filter='MaskRef.DISABLED_DocPictures'
// and paste each block under its section. Block masks from the builders are drawn one character
// per block (MaterializeMask with 1 x 1 blocks: rows = query blocks, columns = key blocks).

void Picture(const char* title, const AttentionParams& p, int64_t h = 0) {
  std::printf("%s\n", title);
  for (const std::string& row : Pattern(p, 0, h)) std::printf("    %s\n", row.c_str());
  std::printf("\n");
}

// A [1, heads, rows, cols] block mask drawn block by block.
void BlockPicture(const char* title, std::vector<uint8_t>* blocks, int64_t heads, int64_t rows,
                  int64_t cols, int64_t h) {
  AttentionParams p = MaskOnly(rows, cols, heads);
  p.mask.blocks = MakeView4(blocks->data(), DType::kU8, 1, heads, rows, cols);
  p.mask.block_q = 1;
  p.mask.block_k = 1;
  Picture(title, p, h);
}

TEST(MaskRef, DISABLED_DocPictures) {
  {
    std::vector<uint8_t> blocks = {1, 0, 0, 1, 1, 0, 0, 1, 1};
    AttentionParams p = MaskOnly(12, 12);
    p.mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 3, 3);
    p.mask.block_q = 4;  // 16 in the API; 4 here so that the picture stays small
    p.mask.block_k = 4;
    Picture("block-sparse: 3 x 3 blocks of 4 x 4, mask [[1,0,0],[1,1,0],[0,1,1]]", p);
  }
  {
    AttentionParams p = MaskOnly(12, 12);
    p.mask.neighborhood = Neighborhood1D(12, 5);
    Picture("neighborhood 1-D, L 12, K 5", p);
    p.mask.neighborhood = Neighborhood1D(12, 3, 2);
    Picture("neighborhood 1-D, L 12, K 3, dilation 2", p);
    p.mask.neighborhood = Neighborhood1D(12, 3, 1, 3);
    Picture("neighborhood 1-D, L 12, K 3, stride 3 (blocked)", p);
    p.mask.neighborhood = Neighborhood1D(12, 4, 1, 1, true);
    Picture("neighborhood 1-D, L 12, K 4, causal", p);
    p.mask.neighborhood = Neighborhood1D(12, 4, 1, 2, true);
    Picture("neighborhood 1-D, L 12, K 4, stride 2, causal", p);
    NeighborhoodMask n;
    n.rank = 2;
    n.grid[0] = 4;
    n.grid[1] = 4;
    n.window[0] = 3;
    n.window[1] = 3;
    p = MaskOnly(16, 16);
    p.mask.neighborhood = n;
    Picture("neighborhood 2-D, grid 4 x 4, K 3 x 3", p);
    n.rank = 3;
    n.grid[0] = 2;
    n.grid[1] = 3;
    n.grid[2] = 3;
    n.window[0] = 2;
    n.window[1] = 2;
    n.window[2] = 3;
    n.causal[0] = true;
    p = MaskOnly(18, 18);
    p.mask.neighborhood = n;
    Picture("neighborhood 3-D, grid 2 x 3 x 3, K 2 x 2 x 3, causal in time", p);
  }
  {
    AttentionParams p = MaskOnly(12, 12);
    p.causal = true;
    p.window_left = 3;
    p.mask.sink_tokens = 2;
    Picture("sinks 2 + causal window_left 3", p);
  }
  {
    AttentionParams p = MaskOnly(16, 16, 2);
    p.causal = true;
    p.mask.group_size = 8;
    Picture("LongLoRA: N 16, G 8, causal, unshifted head", p, 0);
    Picture("LongLoRA: N 16, G 8, causal, shifted head", p, 1);
    p.mask.shift_half_heads = false;
    p.mask.group_size = 4;
    p.mask.sink_tokens = 2;
    Picture("SinkLoRA: G 4 unshifted, sinks 2, causal", p);
  }
  {
    S2MaskParams s2;
    s2.heads = 4;
    s2.num_q_blocks = 16;
    s2.num_k_blocks = 16;
    s2.local_blocks = 2;
    s2.vert_stride = 4;
    std::vector<uint8_t> blocks(4 * 16 * 16);
    s2.out = MakeView4(blocks.data(), DType::kU8, 1, 4, 16, 16);
    ASSERT_TRUE(BuildS2BlockMask(s2, Context()).ok());
    BlockPicture("S2: heads 4, local 2, vert_stride 4, causal, head 0", &blocks, 4, 16, 16, 0);
    BlockPicture("S2: head 1", &blocks, 4, 16, 16, 1);
    s2.causal = false;
    ASSERT_TRUE(BuildS2BlockMask(s2, Context()).ok());
    BlockPicture("S2: bidirectional, head 0", &blocks, 4, 16, 16, 0);
  }
  {
    RadialMaskParams radial;
    radial.frames = 12;
    radial.tokens_per_frame = 256;
    radial.block = 128;
    const int64_t nb = 24;
    std::vector<uint8_t> blocks(nb * nb);
    radial.out = MakeView4(blocks.data(), DType::kU8, 1, 1, nb, nb);
    ASSERT_TRUE(BuildRadialBlockMask(radial, Context()).ok());
    BlockPicture("radial: 12 frames x 256 tokens, blocks of 128", &blocks, 1, nb, nb, 0);
  }
  {
    AttentionParams p = MaskOnly(12, 12);
    p.causal = true;
    p.mask.prefix_len = 4;
    Picture("prefix-LM: prefix 4, causal", p);
  }
  {
    std::vector<int32_t> ids = {0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2};
    const int64_t shape[2] = {1, 12};
    AttentionParams p = MaskOnly(12, 12);
    p.causal = true;
    p.mask.document_ids = MakeContiguousView(ids.data(), DType::kI32, 2, shape);
    Picture("documents 5 + 3 + 4, causal", p);
  }
  {
    const std::vector<int32_t> parents = {-1, 0, 0, 1, 1, 2};
    AttentionParams p = MaskOnly(6, 10);
    p.mask.tree_parents = test::I32View(parents);
    Picture("tree: prefix 4, parents [-1, 0, 0, 1, 1, 2]", p);
  }
  {
    // Keys and queries drawn around 4 random directions, one per 16-token block: the gate
    // favours blocks of the same direction.
    const int64_t n = 192, D = 16, blocks_per_side = n / 16;
    Tensor q(DType::kF32, {1, n, 1, D}), k(DType::kF32, {1, n, 1, D});
    Rng rng(3);
    std::vector<double> centres(4 * D);
    for (double& c : centres) c = 2.0 * rng.Normal();
    for (Tensor* t : {&q, &k}) {
      t->ForEach([&](const Index& i) {
        const int64_t cluster = (i[1] / 16 * 7) % 4;
        t->Set(i, centres[static_cast<size_t>(cluster * D + i[3])] + rng.Normal());
      });
    }
    std::vector<uint8_t> blocks(blocks_per_side * blocks_per_side);
    BlockSelectParams sel;
    sel.q = q.view();
    sel.k = k.view();
    sel.block_q = 16;
    sel.block_k = 16;
    sel.top_k = 3;
    sel.causal = true;
    sel.out = MakeView4(blocks.data(), DType::kU8, 1, 1, blocks_per_side, blocks_per_side);
    ASSERT_TRUE(SelectBlocks(sel, Context()).ok());
    BlockPicture("SelectBlocks: 12 x 12 blocks of 16, top_k 3, causal", &blocks, 1, blocks_per_side,
                 blocks_per_side, 0);
  }
  {
    std::vector<uint8_t> dense(12 * 12);
    for (int64_t i = 0; i < 12; ++i) {
      for (int64_t j = 0; j < 12; ++j) dense[static_cast<size_t>(i * 12 + j)] = (i + 2 * j) % 5 < 2;
    }
    const int64_t shape[2] = {12, 12};
    AttentionParams p = MaskOnly(12, 12);
    p.mask.dense = MakeContiguousView(dense.data(), DType::kU8, 2, shape);
    Picture("dense u8: (i + 2j) mod 5 < 2", p);
  }
  {
    AttentionParams p = MaskOnly(8, 8);
    p.causal = true;
    p.window_left = 2;
    p.mask.score = ScoreFunction::kSigmoid;
    Picture("sigmoid: the mask is unchanged (causal, window_left 2)", p);
  }
}

}  // namespace
}  // namespace tessera
