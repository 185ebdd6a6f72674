// SPDX-License-Identifier: Apache-2.0
// Regressions of the bad-input audit: sizes whose products or sums overflow int64, windows far
// past the sequence, empty work that must cost nothing, outputs that alias inputs or each other,
// non-finite merge LSEs and exceptions that must come back as a Status. Every case here failed
// (wrong result, crash, hang or escaped exception) before its fix.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_cases.h"
#include "core/check.h"
#include "core/checked_math.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "tessera/tessera.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr double kSentinel = -7.25;

Tensor Input(DType dtype, std::vector<int64_t> shape, uint64_t seed) {
  Tensor t(dtype, std::move(shape));
  Rng rng(seed);
  t.FillNormal(rng);
  return t;
}

Tensor Output(DType dtype, std::vector<int64_t> shape) {
  Tensor t(dtype, std::move(shape));
  t.FillSlots(kSentinel);
  t.Snapshot();
  return t;
}

bool Names(const Status& s, const std::string& arg) {
  return s.message().find(arg) != std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// Checked arithmetic.

TEST(CheckedMath, MulAddAndCeilDiv) {
  int64_t r = 0;
  EXPECT_TRUE(CheckedMul(int64_t{1} << 31, int64_t{1} << 31, &r));
  EXPECT_EQ(r, int64_t{1} << 62);
  EXPECT_FALSE(CheckedMul(int64_t{1} << 32, int64_t{1} << 32, &r));
  EXPECT_FALSE(CheckedMul(kMax, 2, &r));
  EXPECT_TRUE(CheckedMul(kMax, 0, &r));
  EXPECT_EQ(r, 0);
  EXPECT_TRUE(CheckedAdd(kMax - 1, 1, &r));
  EXPECT_EQ(r, kMax);
  EXPECT_FALSE(CheckedAdd(kMax, 1, &r));
  EXPECT_EQ(CeilDiv(kMax, 16), kMax / 16 + 1);
  EXPECT_EQ(CeilDiv(int64_t{9223372036854775792}, 16), int64_t{576460752303423487});
  EXPECT_EQ(CeilDiv(0, 16), 0);
}

TEST(CheckedMath, NumelSaturatesInsteadOfWrapping) {
  const TensorView t = MakeView4(nullptr, DType::kF32, int64_t{1} << 32, 1, int64_t{1} << 32, 1);
  EXPECT_EQ(t.numel(), kMax);  // was 0: 2^64 wraps
  const TensorView empty = MakeView4(nullptr, DType::kF32, kMax, 0, kMax, 1);
  EXPECT_EQ(empty.numel(), 0);
}

// A dim of extent 1 may carry any stride: AttentionForward's decode route (few queries) formed
// stride * element size for K and V, which overflowed for a stride near INT64_MAX. The result
// equals the contiguous call's, bitwise.
TEST(BadInput, HugeStrideOfAnExtentOneDimIsHarmless) {
  Tensor q = Input(DType::kF32, {1, 2, 2, 8}, 121), k = Input(DType::kF32, {1, 20, 1, 8}, 122),
         v = Input(DType::kF32, {1, 20, 1, 8}, 123);
  Tensor want = Output(DType::kF32, {1, 2, 2, 8}), got = Output(DType::kF32, {1, 2, 2, 8});
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = want.view();
  ASSERT_TRUE(AttentionForward(p, Context()).ok());
  p.k.strides[0] = kMax - 1;  // batch and head dims of extent 1
  p.v.strides[0] = kMax - 1;
  p.k.strides[2] = kMax / 2;
  p.v.strides[2] = kMax / 3;
  p.out = got.view();
  const Status s = AttentionForward(p, Context());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(got.BitwiseEqual(want));
}

// SelectBlocks with user scores takes only the sizes of q and k, so their head dim may be 0: the
// default scale 1 / sqrt(D) (unused there) was a division by zero. The mask equals the one from
// the same scores with D = 8.
TEST(BadInput, SelectBlocksWithScoresAndNoHeadDim) {
  Tensor scores = Input(DType::kF32, {1, 2, 2, 2}, 131);
  std::vector<uint8_t> want(8, 7), got(8, 7);
  BlockSelectParams p;
  p.scores = scores.view();
  p.block_q = p.block_k = 16;
  p.top_k = 1;
  p.q = MakeView4(nullptr, DType::kF32, 1, 32, 2, 8);
  p.k = MakeView4(nullptr, DType::kF32, 1, 32, 1, 8);
  p.out = MakeView4(want.data(), DType::kU8, 1, 2, 2, 2);
  ASSERT_TRUE(SelectBlocks(p, Context()).ok());
  p.q.shape[3] = p.k.shape[3] = 0;
  p.out = MakeView4(got.data(), DType::kU8, 1, 2, 2, 2);
  const Status s = SelectBlocks(p, Context());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(got, want);
}

// A view holds 4 dims: a rank of 5 is rejected, and the error (worded before the rank check in
// the backward) and numel() read no shape[4] (UBSan: index 4 out of bounds).
TEST(BadInput, RankFiveViewsAreRejectedWithoutReadingPastTheShape) {
  TensorView five = MakeView4(nullptr, DType::kF32, 1, 2, 3, 4);
  five.rank = 5;
  EXPECT_EQ(ShapeString(five), "[1, 2, 3, 4, ...]");
  EXPECT_EQ(five.numel(), 24);
  const int64_t shape[5] = {1, 2, 3, 4, 5};
  const TensorView made = MakeContiguousView(nullptr, DType::kF32, 5, shape);
  EXPECT_EQ(made.rank, 5);
  EXPECT_EQ(made.strides[3], 1);

  const int64_t B = 1, S = 8, H = 1, D = 16;
  Tensor q = Input(DType::kF32, {B, S, H, D}, 111), dout = Input(DType::kF32, {B, S, H, D}, 112);
  Tensor out = Output(DType::kF32, {B, S, H, D}), lse = Output(DType::kF32, {B, H, S});
  AttentionBackwardParams bp;
  bp.forward.q = q.view();
  bp.forward.k = q.view();
  bp.forward.v = q.view();
  bp.forward.out = out.view();
  bp.forward.lse = lse.view();
  ASSERT_TRUE(AttentionForward(bp.forward, Context()).ok());
  Tensor dq = Output(DType::kF32, {B, S, H, D}), dk = Output(DType::kF32, {B, S, H, D}),
         dv = Output(DType::kF32, {B, S, H, D});
  bp.dout = dout.view();
  bp.dq = dq.view();
  bp.dk = dk.view();
  bp.dv = dv.view();
  bp.dq.rank = 5;
  Status s = AttentionBackward(bp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "dq") && Names(s, "...")) << s.message();
  EXPECT_TRUE(dq.Unchanged() && dk.Unchanged() && dv.Unchanged());

  Tensor out2 = Output(DType::kF32, {B, S, H, D});
  AttentionParams p = bp.forward;
  p.lse = TensorView();
  p.out = out2.view();
  p.q.rank = 5;
  s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "q")) << s.message();
  EXPECT_TRUE(out2.Unchanged());
}

// ---------------------------------------------------------------------------------------------
// Attention: shapes whose element count or byte extent overflows.

TEST(BadInput, AttentionShapeWhoseNumelWrapsIsRejected) {
  const int64_t big = int64_t{1} << 32;
  AttentionParams p;
  p.q = MakeView4(nullptr, DType::kF32, big, 1, big, 1);
  p.k = MakeView4(nullptr, DType::kF32, big, 1, big, 1);
  p.v = p.k;
  p.out = p.q;
  const Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "q")) << s.message();
}

TEST(BadInput, StridesWhoseByteExtentOverflowsAreRejected) {
  Tensor q = Input(DType::kF32, {1, 2, 1, 8}, 1), k = Input(DType::kF32, {1, 2, 1, 8}, 2);
  Tensor out = Output(DType::kF32, {1, 2, 1, 8});
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = k.view();
  p.out = out.view();
  p.k.strides[1] = kMax / 2;  // key 1 sits 2^62 elements (2^64 bytes) away
  const Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "k")) << s.message();
  EXPECT_TRUE(out.Unchanged());
}

// A token stride that fits the view (one query: its extent is 0) but not one more tile: the
// backward computed the next query tile's offset before learning there was none (fuzz finding
// 17, signed overflow under UBSan). The result equals the contiguous call.
TEST(BadInput, HugeTokenStrideOfASingleQueryBackward) {
  const int64_t H = 1, D = 16;
  Tensor q = Input(DType::kF32, {1, 1, H, D}, 121), k = Input(DType::kF32, {1, 5, H, D}, 122);
  Tensor dout = Input(DType::kF32, {1, 1, H, D}, 123);
  Tensor out = Output(DType::kF32, {1, 1, H, D}), lse = Output(DType::kF32, {1, H, 1});
  AttentionBackwardParams bp;
  bp.forward.q = q.view();
  bp.forward.k = k.view();
  bp.forward.v = k.view();
  bp.forward.out = out.view();
  bp.forward.lse = lse.view();
  ASSERT_TRUE(AttentionForward(bp.forward, Context()).ok());
  bp.dout = dout.view();
  std::vector<std::vector<double>> grads;
  for (const int64_t stride : {D, kMax / 4}) {
    Tensor dq = Output(DType::kF32, {1, 1, H, D}), dk = Output(DType::kF32, {1, 5, H, D}),
           dv = Output(DType::kF32, {1, 5, H, D});
    bp.forward.q.strides[1] = bp.dout.strides[1] = stride;
    bp.dq = dq.view();
    bp.dk = dk.view();
    bp.dv = dv.view();
    const Status s = AttentionBackward(bp, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::vector<double> all;
    for (const Tensor* t : {&dq, &dk, &dv}) {
      const std::vector<double> values = t->ToVector();
      all.insert(all.end(), values.begin(), values.end());
    }
    grads.push_back(all);
  }
  EXPECT_EQ(grads[0], grads[1]);
}

// Linear attention with Dk = 1: the element stride of q and k is free (the dim's extent is 0),
// and the prefetch of the next rows multiplied it by Dk and the element size (fuzz finding 18:
// signed overflow, and a loop over that many bytes). The result equals the contiguous call.
TEST(BadInput, HugeElementStrideOfAOneWideLinearHead) {
  const int64_t S = 70, Dv = 3;
  Tensor q = Input(DType::kF32, {1, S, 1, 1}, 131), k = Input(DType::kF32, {1, S, 1, 1}, 132);
  Tensor v = Input(DType::kF32, {1, S, 1, Dv}, 133);
  std::vector<std::vector<double>> outs;
  for (const int64_t stride : {int64_t{1}, kMax / 4}) {
    Tensor out = Output(DType::kF32, {1, S, 1, Dv});
    LinearAttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.out = out.view();
    p.q.strides[3] = p.k.strides[3] = stride;
    p.chunk_size = 16;
    const Status s = LinearAttentionForward(p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    outs.push_back(out.ToVector());
  }
  EXPECT_EQ(outs[0], outs[1]);
}

// ---------------------------------------------------------------------------------------------
// Windows far past the sequence mean "unbounded" on every route.

struct WindowCase {
  int64_t sq, sk;
  bool causal;
  MaskAlign align;
};

void ExpectHugeWindowsMatchUnbounded(const WindowCase& c, Path path) {
  SCOPED_TRACE("Sq " + std::to_string(c.sq) + " Sk " + std::to_string(c.sk) + " path " +
               PathName(path));
  const int64_t B = 2, H = 2, D = 16;
  Tensor q = Input(DType::kF32, {B, c.sq, H, D}, 11);
  Tensor k = Input(DType::kF32, {B, c.sk, H, D}, 12);
  Tensor v = Input(DType::kF32, {B, c.sk, H, D}, 13);
  Context ctx;
  ctx.path = path;
  for (int side = 0; side < 2; ++side) {
    Tensor want = Output(DType::kF32, {B, c.sq, H, D}), got = Output(DType::kF32, {B, c.sq, H, D});
    Tensor want_lse = Output(DType::kF32, {B, H, c.sq}),
           got_lse = Output(DType::kF32, {B, H, c.sq});
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.causal = c.causal;
    p.align = c.align;
    p.out = want.view();
    p.lse = want_lse.view();
    ASSERT_TRUE(AttentionForward(p, ctx).ok());
    (side == 0 ? p.window_left : p.window_right) = kMax;
    p.out = got.view();
    p.lse = got_lse.view();
    const Status s = AttentionForward(p, ctx);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(got.BitwiseEqual(want)) << (side == 0 ? "window_left" : "window_right");
    EXPECT_TRUE(got_lse.BitwiseEqual(want_lse));
  }
}

TEST(BadInput, HugeWindowsEqualUnboundedForward) {
  // Sq 40: the tiled kernel; Sq 3: routed to the decode kernel; Sq > Sk puts bottom-right
  // positions below 0, where pos - window_left overflowed.
  const WindowCase cases[] = {{40, 33, false, MaskAlign::kBottomRight},
                              {40, 7, false, MaskAlign::kBottomRight},
                              {3, 50, false, MaskAlign::kBottomRight},
                              {3, 50, true, MaskAlign::kBottomRight},
                              {40, 7, false, MaskAlign::kTopLeft}};
  for (const WindowCase& c : cases) {
    for (Path path : {Path::kGeneric, Path::kReference}) ExpectHugeWindowsMatchUnbounded(c, path);
  }
}

TEST(BadInput, HugeWindowLeftEqualsUnboundedBackward) {
  const int64_t B = 1, Sq = 24, Sk = 20, H = 2, D = 16;
  Tensor q = Input(DType::kF32, {B, Sq, H, D}, 21), k = Input(DType::kF32, {B, Sk, H, D}, 22);
  Tensor v = Input(DType::kF32, {B, Sk, H, D}, 23), dout = Input(DType::kF32, {B, Sq, H, D}, 24);
  Tensor out = Output(DType::kF32, {B, Sq, H, D}), lse = Output(DType::kF32, {B, H, Sq});
  AttentionBackwardParams bp;
  bp.forward.q = q.view();
  bp.forward.k = k.view();
  bp.forward.v = v.view();
  bp.forward.out = out.view();
  bp.forward.lse = lse.view();
  ASSERT_TRUE(AttentionForward(bp.forward, Context()).ok());
  bp.dout = dout.view();
  std::vector<Tensor> grads;
  for (int64_t wl : {int64_t{-1}, kMax}) {
    for (const auto& shape : {q.shape(), k.shape(), v.shape()}) {
      grads.push_back(Output(DType::kF32, shape));
    }
    Tensor* g = &grads[grads.size() - 3];
    bp.forward.window_left = wl;
    bp.dq = g[0].view();
    bp.dk = g[1].view();
    bp.dv = g[2].view();
    const Status s = AttentionBackward(bp, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(grads[size_t(i + 3)].BitwiseEqual(grads[size_t(i)]));
}

// A contiguous f32 cache holding `len` tokens of every sequence.
struct SmallCache {
  KVCache cache;
  std::vector<int32_t> lens;
  KVBatchView batch;
  SmallCache(int64_t B, int32_t len, int64_t H, int64_t D) : lens(size_t(B), 0) {
    EXPECT_TRUE(cache.Allocate(KVDType::kF32, B, len, H, D).ok());
    Tensor k = Input(DType::kF32, {B, len, H, D}, 31), v = Input(DType::kF32, {B, len, H, D}, 32);
    batch.batch = B;
    batch.seq_lens = test::I32View(lens);
    AppendKVParams a;
    a.k_new = k.view();
    a.v_new = v.view();
    a.cache = cache.view();
    a.batch = batch;
    EXPECT_TRUE(AppendKV(a, Context()).ok());
    for (int32_t& l : lens) l = len;
  }
};

TEST(BadInput, DecodeHugeWindowAndSplitEqualDefaults) {
  const int64_t B = 2, Q = 3, H = 2, D = 16;
  Tensor q = Input(DType::kF32, {B, Q, H, D}, 33);
  // 40 keys; and 1 key for 3 queries, where the first query sits at position -2 and
  // position - window_left overflowed.
  for (int32_t len : {40, 1}) {
    SmallCache c(B, len, H, D);
    auto run = [&](int64_t window_left, int64_t split_tokens, Tensor* out) {
      DecodeParams p;
      p.q = q.view();
      p.cache = c.cache.view();
      p.kv = c.batch;
      p.out = out->view();
      p.window_left = window_left;
      p.split_tokens = split_tokens;
      return Decode(p, Context());
    };
    Tensor want = Output(DType::kF32, {B, Q, H, D});
    ASSERT_TRUE(run(-1, 64, &want).ok());
    Tensor got = Output(DType::kF32, {B, Q, H, D});
    Status s = run(kMax, 64, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(got.BitwiseEqual(want)) << "len " << len;
    Tensor split = Output(DType::kF32, {B, Q, H, D});
    s = run(-1, kMax - 15, &split);  // seq_len + split_tokens - 1 overflowed
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(split.BitwiseEqual(want)) << "len " << len;
  }
}

// ---------------------------------------------------------------------------------------------
// Linear attention: BASED's window far past the sequence (a heap overflow in WindowChunk).

TEST(BadInput, LinearHugeWindowEqualsWholeSequence) {
  const int64_t B = 1, S = 40, H = 1, D = 8;
  Tensor q = Input(DType::kF32, {B, S, H, D}, 41), k = Input(DType::kF32, {B, S, H, D}, 42);
  Tensor v = Input(DType::kF32, {B, S, H, D}, 43);
  for (bool recurrent : {false, true}) {
    Tensor want = Output(DType::kF32, {B, S, H, D}), got = Output(DType::kF32, {B, S, H, D});
    LinearAttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.feature_map = LinearFeatureMap::kTaylor2;
    p.chunk_size = 16;
    p.window = S;
    p.out = want.view();
    auto run = recurrent ? LinearAttentionRecurrent : LinearAttentionForward;
    ASSERT_TRUE(run(p, Context()).ok());
    p.window = kMax;
    p.out = got.view();
    const Status s = run(p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(got.BitwiseEqual(want)) << (recurrent ? "recurrent" : "chunked");
  }
}

TEST(BadInput, LinearFeatureDimDoesNotOverflow) {
  EXPECT_EQ(LinearFeatureDim(LinearFeatureMap::kTaylor2, 100000), 1 + 100000 + 10000000000);
  EXPECT_EQ(LinearFeatureDim(LinearFeatureMap::kTaylor2, int64_t{1} << 40), kMax);
}

// ---------------------------------------------------------------------------------------------
// Mask sizes whose products or sums overflow.

TEST(BadInput, NeighborhoodWindowTimesDilationOverflowIsRejected) {
  const int64_t S = 32, H = 1, D = 8;
  Tensor q = Input(DType::kF32, {1, S, H, D}, 51), out = Output(DType::kF32, {1, S, H, D});
  AttentionParams p;
  p.q = q.view();
  p.k = q.view();
  p.v = q.view();
  p.out = out.view();
  p.mask.neighborhood.rank = 1;
  p.mask.neighborhood.grid[0] = S;
  p.mask.neighborhood.window[0] = kMax;
  p.mask.neighborhood.dilation[0] = 2;  // kMax * 2 wrapped below the grid
  Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "mask.neighborhood.window[0]")) << s.message();

  p.mask.neighborhood.rank = 2;
  p.mask.neighborhood.grid[0] = 576460752303423489;  // * 32 = 2^64 + 32
  p.mask.neighborhood.grid[1] = 32;
  p.mask.neighborhood.window[0] = 1;
  p.mask.neighborhood.dilation[0] = 1;
  s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "mask.neighborhood.grid")) << s.message();
  EXPECT_TRUE(out.Unchanged());
}

TEST(BadInput, BlockMaskSizesNearInt64MaxAreRejected) {
  Tensor q = Input(DType::kF32, {1, 16, 1, 8}, 61), out = Output(DType::kF32, {1, 16, 1, 8});
  std::vector<uint8_t> blocks(4, 1);
  AttentionParams p;
  p.q = q.view();
  p.k = q.view();
  p.v = q.view();
  p.out = out.view();
  p.mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 1, 1);
  p.mask.block_q = 9223372036854775792;  // Sq + block_q - 1 overflowed
  p.mask.block_k = 16;
  Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(out.Unchanged());

  BlockSelectParams sel;
  sel.q = MakeView4(nullptr, DType::kF32, 1, 9223372036854775792, 1, 8);
  sel.k = MakeView4(nullptr, DType::kF32, 1, 16, 1, 8);
  std::vector<uint8_t> mask(1, 7);
  sel.out = MakeView4(mask.data(), DType::kU8, 1, 1, 1, 1);
  sel.block_q = sel.block_k = 16;
  sel.top_k = 1;
  s = SelectBlocks(sel, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  sel.q = MakeView4(nullptr, DType::kF32, 1, 16, 1, 8);
  sel.block_q = 9223372036854775792;
  s = SelectBlocks(sel, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(mask[0], 7);
}

// S2 block masks with local_blocks, vert_stride or offset near the int64 limits: every block is
// the documented rule evaluated without overflow (the builder formed kb - qb - local_blocks + 1
// and x % V + V, which overflowed).
TEST(BadInput, S2MaskParametersNearInt64LimitsDoNotOverflow) {
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  const int64_t heads = 3, nqb = 6, nkb = 7;
  struct Params {
    int64_t local, stride, offset;
  };
  for (const bool causal : {true, false}) {
    for (const Params& c :
         {Params{kMax, 3, 0}, Params{1, kMax, 0}, Params{2, kMax, kMax}, Params{1, kMax - 1, kMin},
          Params{kMax, kMax, -5}, Params{3, 5, kMin}, Params{1, kMax, kMax - 2}}) {
      S2MaskParams p;
      p.heads = heads;
      p.num_q_blocks = nqb;
      p.num_k_blocks = nkb;
      p.local_blocks = c.local;
      p.vert_stride = c.stride;
      p.offset = c.offset;
      p.causal = causal;
      std::vector<uint8_t> mask(size_t(heads * nqb * nkb), 7);
      p.out = MakeView4(mask.data(), DType::kU8, 1, heads, nqb, nkb);
      const Status s = BuildS2BlockMask(p, Context());
      ASSERT_TRUE(s.ok()) << s.ToString();
      // The rule of tessera/mask.h in 128-bit arithmetic.
      using I128 = __int128;
      const auto mod = [](I128 x, I128 m) { return (x % m + m) % m; };
      const I128 V = c.stride, L = c.local;
      const I128 step = std::max<I128>(1, V / heads);
      for (int64_t h = 0; h < heads; ++h) {
        const I128 shift = mod(h * step, V) + mod(c.offset, V);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          for (int64_t kb = 0; kb < nkb; ++kb) {
            bool keep;
            if (causal) {
              keep = qb >= kb && (qb - kb < L || mod(kb + shift, V) == 0);
            } else {
              const I128 dist = std::max<I128>(0, I128(qb) - kb - L + 1) +
                                std::max<I128>(0, I128(kb) - qb - L + 1);
              keep = (qb - kb < L && kb - qb < L) || mod(dist + shift, V) == 0;
            }
            ASSERT_EQ(mask[size_t((h * nqb + qb) * nkb + kb)], keep ? 1 : 0)
                << "causal " << causal << " local " << c.local << " stride " << c.stride
                << " offset " << c.offset << " at " << h << ", " << qb << ", " << kb;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Empty work costs nothing: a batch of 2^40 sequences with no tokens returns at once.

TEST(BadInput, EmptyWorkReturnsAtOnce) {
  const int64_t huge = int64_t{1} << 40;
  float dummy[8] = {};
  auto empty4 = [&](int64_t d1) {
    TensorView t = MakeView4(dummy, DType::kF32, huge, d1, 1, 8);
    return t;
  };
  AttentionParams p;
  p.q = empty4(0);
  p.k = empty4(0);
  p.v = empty4(0);
  p.out = empty4(0);
  EXPECT_TRUE(AttentionForward(p, Context()).ok());
  p.k = MakeView4(dummy, DType::kF32, huge, 4, 1, 8);
  for (int i = 0; i < 4; ++i) p.k.strides[i] = 0;  // broadcast keys: no memory behind them
  p.v = p.k;
  EXPECT_TRUE(AttentionForward(p, Context()).ok());

  AttentionBackwardParams bp;
  bp.forward.q = empty4(0);
  bp.forward.k = empty4(0);
  bp.forward.v = empty4(0);
  bp.forward.out = empty4(0);
  bp.forward.lse = MakeView3(dummy, DType::kF32, huge, 1, 0);
  bp.dout = bp.dq = bp.dk = bp.dv = empty4(0);
  EXPECT_TRUE(AttentionBackward(bp, Context()).ok());

  LinearAttentionParams lp;
  lp.q = lp.k = lp.v = lp.out = empty4(0);
  EXPECT_TRUE(LinearAttentionForward(lp, Context()).ok());
  EXPECT_TRUE(LinearAttentionRecurrent(lp, Context()).ok());
  LinearAttentionBackwardParams lbp;
  lbp.forward = lp;
  lbp.dout = lbp.dq = lbp.dk = lbp.dv = empty4(0);
  EXPECT_TRUE(LinearAttentionBackward(lbp, Context()).ok());

  MergeStatesParams mp;
  mp.out_parts = MakeView4(dummy, DType::kF32, huge, huge, 0, 8);
  mp.lse_parts = MakeView3(dummy, DType::kF32, huge, huge, 0);
  mp.out = MakeView3(dummy, DType::kF32, huge, 0, 8);
  const Status s = MergeStates(mp, Context());
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(BadInput, EmptyBlockMasksReturnAtOnce) {
  // No block to write, but 2^62 heads (S2) or 2^31 - 1 frames (Radial: a 32 GiB table of frame
  // pairs was allocated first).
  S2MaskParams s2;
  s2.heads = int64_t{1} << 62;
  s2.num_q_blocks = 0;
  s2.num_k_blocks = 4;
  uint8_t dummy = 0;
  s2.out = MakeView4(&dummy, DType::kU8, 1, s2.heads, 0, 4);
  EXPECT_TRUE(BuildS2BlockMask(s2, Context()).ok());
  RadialMaskParams radial;
  radial.frames = std::numeric_limits<int32_t>::max();
  radial.tokens_per_frame = 0;
  radial.block = 16;
  radial.out = MakeView4(&dummy, DType::kU8, 1, 1, 0, 0);
  EXPECT_TRUE(BuildRadialBlockMask(radial, Context()).ok());
}

TEST(BadInput, NoKeysGiveZeroOutputAndMinusInfLse) {
  const int64_t B = 3, Sq = 5, H = 2, D = 8;
  Tensor q = Input(DType::kF32, {B, Sq, H, D}, 71);
  Tensor k(DType::kF32, {B, 0, H, D});
  for (Path path : {Path::kAuto, Path::kGeneric, Path::kReference}) {
    Tensor out = Output(DType::kF32, {B, Sq, H, D}), lse = Output(DType::kF32, {B, H, Sq});
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = k.view();
    p.out = out.view();
    p.lse = lse.view();
    Context ctx;
    ctx.path = path;
    ASSERT_TRUE(AttentionForward(p, ctx).ok());
    for (double x : out.ToVector()) EXPECT_EQ(x, 0.0);
    for (double x : lse.ToVector()) EXPECT_EQ(x, -std::numeric_limits<double>::infinity());
  }
}

// ---------------------------------------------------------------------------------------------
// Aliasing: outputs may not overlap an input, each other, or themselves.

TEST(BadInput, AttentionOutputOverlappingAnInputIsRejected) {
  const int64_t B = 1, S = 20, H = 1, D = 16;
  Tensor q = Input(DType::kF32, {B, S, H, D}, 81), k = Input(DType::kF32, {B, S, H, D}, 82);
  Tensor v = Input(DType::kF32, {B, S, H, D}, 83);
  v.Snapshot();
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = v.view();  // was accepted, and the kernel read V it had already overwritten
  Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "out") && Names(s, "v")) << s.message();
  EXPECT_TRUE(v.Unchanged());

  // Overlapping by one element only (out starts at v's last element).
  std::vector<float> buf(size_t(2 * S * H * D), 0.0f);
  p.v = MakeView4(buf.data(), DType::kF32, B, S, H, D);
  p.out = MakeView4(buf.data() + S * H * D - 1, DType::kF32, B, S, H, D);
  s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  // Adjacent, not overlapping: fine.
  p.out = MakeView4(buf.data() + S * H * D, DType::kF32, B, S, H, D);
  s = AttentionForward(p, Context());
  EXPECT_TRUE(s.ok()) << s.ToString();

  // lse inside out.
  Tensor out = Output(DType::kF32, {B, S, H, D});
  p.v = v.view();
  p.out = out.view();
  p.lse = MakeView3(out.data(), DType::kF32, B, H, S);
  s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "lse")) << s.message();
  EXPECT_TRUE(out.Unchanged());
}

TEST(BadInput, OutputWhoseStridesOverlapIsRejected) {
  const int64_t B = 1, S = 20, H = 2, D = 16;
  Tensor q = Input(DType::kF32, {B, S, H, D}, 91);
  Tensor out = Output(DType::kF32, {B, S, H, D});
  AttentionParams p;
  p.q = q.view();
  p.k = q.view();
  p.v = q.view();
  p.out = out.view();
  p.out.strides[2] = 1;  // heads 1 element apart, channels 1 apart: rows overlap
  const Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "out")) << s.message();
  EXPECT_TRUE(out.Unchanged());
}

TEST(BadInput, BackwardGradientsOverlappingEachOtherAreRejected) {
  const int64_t B = 1, S = 20, H = 1, D = 16;
  Tensor q = Input(DType::kF32, {B, S, H, D}, 101), dout = Input(DType::kF32, {B, S, H, D}, 102);
  Tensor out = Output(DType::kF32, {B, S, H, D}), lse = Output(DType::kF32, {B, H, S});
  AttentionBackwardParams bp;
  bp.forward.q = q.view();
  bp.forward.k = q.view();
  bp.forward.v = q.view();
  bp.forward.out = out.view();
  bp.forward.lse = lse.view();
  ASSERT_TRUE(AttentionForward(bp.forward, Context()).ok());
  Tensor dq = Output(DType::kF32, {B, S, H, D}), dk = Output(DType::kF32, {B, S, H, D});
  bp.dout = dout.view();
  bp.dq = dq.view();
  bp.dk = dk.view();
  bp.dv = dk.view();  // dk and dv in one buffer
  Status s = AttentionBackward(bp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "dv") && Names(s, "dk")) << s.message();
  bp.dv = dout.view();  // dv over an input
  s = AttentionBackward(bp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "dout")) << s.message();
  EXPECT_TRUE(dq.Unchanged());
  EXPECT_TRUE(dk.Unchanged());
}

TEST(BadInput, OtherOpsRejectAliasedOutputs) {
  // MergeStates: out over out_parts.
  std::vector<float> parts(2 * 3 * 2 * 4, 1.0f), lse_parts(2 * 3 * 2, 0.0f);
  MergeStatesParams mp;
  mp.out_parts = MakeView4(parts.data(), DType::kF32, 2, 3, 2, 4);
  mp.lse_parts = MakeView3(lse_parts.data(), DType::kF32, 2, 3, 2);
  mp.out = MakeView3(parts.data() + 3 * 2 * 4, DType::kF32, 3, 2, 4);
  Status s = MergeStates(mp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "out_parts")) << s.message();

  // Linear attention: final_state over q.
  const int64_t S = 4, D = 4;
  std::vector<float> q(size_t(S * D), 0.5f), out(size_t(S * D));
  LinearAttentionParams lp;
  lp.q = lp.k = lp.v = MakeView4(q.data(), DType::kF32, 1, S, 1, D);
  lp.out = MakeView4(out.data(), DType::kF32, 1, S, 1, D);
  lp.final_state = MakeView4(q.data(), DType::kF32, 1, 1, D, D);
  s = LinearAttentionForward(lp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "final_state")) << s.message();

  // Decode: out over the cache.
  SmallCache c(1, 8, 1, 16);
  std::vector<float> dq(16, 0.5f);
  DecodeParams dp;
  dp.q = MakeView4(dq.data(), DType::kF32, 1, 1, 1, 16);
  dp.cache = c.cache.view();
  dp.kv = c.batch;
  dp.out = MakeView4(c.cache.view().v, DType::kF32, 1, 1, 1, 16);
  s = Decode(dp, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "cache.v")) << s.message();

  // AppendKV: new keys read from the cache they are written to.
  AppendKVParams ap;
  ap.k_new = ap.v_new = MakeView4(c.cache.view().k, DType::kF32, 1, 1, 1, 16);
  ap.cache = c.cache.view();
  std::vector<int32_t> lens = {0};
  ap.batch.batch = 1;
  ap.batch.seq_lens = test::I32View(lens);
  s = AppendKV(ap, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Names(s, "k_new")) << s.message();
}

// ---------------------------------------------------------------------------------------------
// MergeStates: +inf or NaN part LSEs are rejected (they made every output NaN).

TEST(BadInput, MergeRejectsNonFinitePartLse) {
  std::vector<float> parts(2 * 3 * 2 * 4, 1.0f), lse_parts(2 * 3 * 2, 0.0f);
  std::vector<float> out(3 * 2 * 4, 5.0f);
  MergeStatesParams mp;
  mp.out_parts = MakeView4(parts.data(), DType::kF32, 2, 3, 2, 4);
  mp.lse_parts = MakeView3(lse_parts.data(), DType::kF32, 2, 3, 2);
  mp.out = MakeView3(out.data(), DType::kF32, 3, 2, 4);
  for (float bad :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    lse_parts[size_t((1 * 3 + 2) * 2 + 1)] = bad;
    const Status s = MergeStates(mp, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_TRUE(Names(s, "lse_parts") && Names(s, "[1, 2, 1]")) << s.message();
    for (float x : out) EXPECT_EQ(x, 5.0f);
  }
  lse_parts[size_t((1 * 3 + 2) * 2 + 1)] = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(MergeStates(mp, Context()).ok());
}

// ---------------------------------------------------------------------------------------------
// No exception crosses the API.

TEST(BadInput, ExceptionsBecomeInternalStatus) {
  auto oom = []() -> Status { throw std::bad_alloc(); };
  Status s = internal::StatusFromCall("Op", oom);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_TRUE(Names(s, "out of memory")) << s.message();
  EXPECT_TRUE(Names(s, "Op")) << s.message();
  auto other = []() -> Status { throw std::runtime_error("boom"); };
  s = internal::StatusFromCall("Op", other);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_TRUE(Names(s, "boom")) << s.message();
  // An exception thrown on a worker thread reaches the caller (it terminated the process).
  EXPECT_THROW(ParallelFor(4, 64,
                           [](int64_t task, int32_t) {
                             if (task == 37) throw std::bad_alloc();
                           }),
               std::bad_alloc);
}

#if !defined(__SANITIZE_ADDRESS__)
TEST(BadInput, ImpossibleScratchIsAnOutOfMemoryStatus) {
  // Broadcast q / k with a head dim of 2^58: no memory behind the inputs, but the pooled scratch
  // would take 2^60 bytes. The allocation fails inside the op; the caller gets a Status.
  const int64_t D = int64_t{1} << 58;
  float dummy = 0.0f;
  BlockSelectParams sel;
  sel.q = MakeView4(&dummy, DType::kF32, 1, 16, 1, D);
  for (int i = 0; i < 4; ++i) sel.q.strides[i] = 0;
  sel.k = sel.q;
  std::vector<uint8_t> mask(1, 7);
  sel.out = MakeView4(mask.data(), DType::kU8, 1, 1, 1, 1);
  sel.block_q = sel.block_k = 16;
  sel.top_k = 1;
  for (int32_t threads : {1, 4}) {
    Context ctx;
    ctx.num_threads = threads;
    const Status s = SelectBlocks(sel, ctx);
    EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
    EXPECT_TRUE(Names(s, "out of memory")) << s.message();
  }
}
#endif

}  // namespace
}  // namespace tessera
