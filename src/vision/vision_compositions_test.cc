// SPDX-License-Identifier: Apache-2.0
// The vision operators that are calls of what exists (docs/vision.md), each against a direct fp64
// reference of the paper's semantics (src/ref/vision_ref.h), written as boxes of the image rather
// than through NeighborhoodMask:
//   HaloNet     AttentionForward with a 2-D neighborhood mask, stride = block, window = block +
//               2 halo (windows shifted inward at the border, never zero-padded)
//   strips      heads split between horizontal and vertical strips (CSWin's cross-shaped
//               windows; the "strip attention"), one call per half on head-sliced views,
//               neighborhood stride = window = (s, W) or (H, s)
//   S2AFormer   its Strip Self-Attention: queries over spatially reduced keys and values, query
//               and key channels compressed (zero-padded to the value width)
//   SHViT       single-head attention on the first c_p channels: views of a fused qkv tensor,
//               the output written into a channel slice while the other channels pass through
//   HiLo        ApproxAttention's kHiLo, the call docs/vision.md shows
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "comparator.h"
#include "ref/approx_agent_ref.h"
#include "ref/vision_ref.h"
#include "tessera/approx.h"
#include "tessera/attention.h"
#include "test_tensor.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Tensor;

// q, k, v, out [B, gh * gw, H, D], f32, optionally with padded rows.
struct GridRun {
  int64_t B, gh, gw, H, D;
  Tensor q, k, v, out;

  GridRun(int64_t b, int64_t grid_h, int64_t grid_w, int64_t heads, int64_t dim, bool padded,
          const std::string& name)
      : B(b), gh(grid_h), gw(grid_w), H(heads), D(dim) {
    test::Rng rng(test::SeedFor(name));
    const std::vector<int64_t> shape = {B, gh * gw, H, D};
    const std::vector<int64_t> strides =
        padded ? Tensor::PaddedStrides(shape, 5) : Tensor::ContiguousStrides(shape);
    q = Tensor(DType::kF32, shape, strides);
    k = Tensor(DType::kF32, shape, strides);
    v = Tensor(DType::kF32, shape, strides);
    out = Tensor(DType::kF32, shape, strides);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
  }

  // The call over heads [h0, h0 + count): every view sliced to those heads.
  AttentionParams Heads(int64_t h0, int64_t count) {
    AttentionParams p;
    TensorView* views[] = {&p.q, &p.k, &p.v, &p.out};
    Tensor* tensors[] = {&q, &k, &v, &out};
    for (int i = 0; i < 4; ++i) {
      TensorView t = tensors[i]->view();
      t.data = static_cast<float*>(t.data) + h0 * t.strides[2];
      t.shape[2] = count;
      *views[i] = t;
    }
    return p;
  }

  std::vector<double> Reference(const ref::KeyBoxFn& box) const {
    std::vector<double> r(static_cast<size_t>(out.numel()));
    ref::BoxAttentionF64(q.view(), k.view(), v.view(), 1.0 / std::sqrt(static_cast<double>(D)), gw,
                         box, r.data());
    return r;
  }
};

// 2-D neighborhood mask on a grid_h x grid_w image.
NeighborhoodMask Neighborhood2D(int64_t grid_h, int64_t grid_w, int64_t window_h, int64_t window_w,
                                int64_t stride_h, int64_t stride_w) {
  NeighborhoodMask n;
  n.rank = 2;
  n.grid[0] = grid_h;
  n.grid[1] = grid_w;
  n.window[0] = window_h;
  n.window[1] = window_w;
  n.stride[0] = stride_h;
  n.stride[1] = stride_w;
  return n;
}

// HaloNet: query blocks of block x block pixels, keys the block plus a halo on every side.
TEST(VisionHaloNet, NeighborhoodWithStrideBlockMatchesHaloReference) {
  struct Case {
    std::string name;
    int64_t gh, gw, block, halo;
    bool padded;
  };
  const std::vector<Case> cases = {
      {"10x13 block 4 halo 1 (partial last blocks)", 10, 13, 4, 1, false},
      {"9x8 block 3 halo 2, padded rows", 9, 8, 3, 2, true},
      {"8x8 block 4 halo 2 (window covers the image)", 8, 8, 4, 2, false},
      {"12x7 block 2 halo 0 (non-overlapping blocks)", 12, 7, 2, 0, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name + " " + test::Repro(c.name));
    GridRun run(2, c.gh, c.gw, 3, 16, c.padded, c.name);
    AttentionParams p = run.Heads(0, run.H);
    const int64_t window = c.block + 2 * c.halo;
    p.mask.neighborhood = Neighborhood2D(c.gh, c.gw, window, window, c.block, c.block);
    const Status s = AttentionForward(p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    const std::vector<double> ref = run.Reference([&](int64_t, int64_t y, int64_t x) {
      return ref::HaloBox(c.gh, c.gw, c.block, c.halo, y, x);
    });
    EXPECT_TRUE(test::CheckClose(run.out.ToVector(), ref, test::kOutputCeilingF32, "out"));
    EXPECT_TRUE(run.out.OutsideViewUntouched());
  }
}

// A halo window wider than the image is refused by name, not silently shrunk.
TEST(VisionHaloNet, WindowWiderThanTheImageIsRejected) {
  GridRun run(1, 6, 9, 1, 8, false, "halo too wide");
  AttentionParams p = run.Heads(0, 1);
  p.mask.neighborhood = Neighborhood2D(6, 9, 8, 8, 4, 4);  // block 4, halo 2 on 6 rows
  run.out.Snapshot();
  const Status s = AttentionForward(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("mask.neighborhood.window"), std::string::npos) << s.message();
  EXPECT_TRUE(run.out.Unchanged());
}

// Strip attention: the first half of the heads in horizontal strips of s rows across the width,
// the second half in vertical strips of s columns across the height; sides not multiples of s.
TEST(VisionStrips, HeadsSplitBetweenHorizontalAndVerticalStripsMatchReference) {
  struct Case {
    std::string name;
    int64_t gh, gw, strip_h, strip_v, heads;
    bool padded;
  };
  const std::vector<Case> cases = {
      {"9x12 strips 2 and 5, 4 heads", 9, 12, 2, 5, 4, false},
      {"7x6 strips 3 and 1, 2 heads, padded rows", 7, 6, 3, 1, 2, true},
      {"5x5 strips 5 and 5 (full attention)", 5, 5, 5, 5, 2, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name + " " + test::Repro(c.name));
    GridRun run(2, c.gh, c.gw, c.heads, 8, c.padded, c.name);
    const int64_t half = c.heads / 2;
    AttentionParams rows = run.Heads(0, half);
    rows.mask.neighborhood = Neighborhood2D(c.gh, c.gw, c.strip_h, c.gw, c.strip_h, c.gw);
    AttentionParams cols = run.Heads(half, c.heads - half);
    cols.mask.neighborhood = Neighborhood2D(c.gh, c.gw, c.gh, c.strip_v, c.gh, c.strip_v);
    ASSERT_TRUE(AttentionForward(rows, Context()).ok());
    ASSERT_TRUE(AttentionForward(cols, Context()).ok());
    const std::vector<double> ref = run.Reference([&](int64_t h, int64_t y, int64_t x) {
      return h < half ? ref::HorizontalStripBox(c.gh, c.gw, c.strip_h, y, x)
                      : ref::VerticalStripBox(c.gh, c.gw, c.strip_v, y, x);
    });
    EXPECT_TRUE(test::CheckClose(run.out.ToVector(), ref, test::kOutputCeilingF32, "out"));
    EXPECT_TRUE(run.out.OutsideViewUntouched());
  }
}

// SHViT: x [B, N, C] splits into the first c_p channels (attention) and the rest (passed through).
// The caller's projection of x1 writes q, k, v into one fused [B, N, 3 c_p] tensor; the call reads
// its channel slices as [B, N, 1, c_p] views and writes out[..., :c_p] of a [B, N, C] buffer that
// already holds x in its other channels: the concatenation costs no copy. With d_qk < c_p (SHViT's
// 16-channel queries and keys), q and k fill their first d_qk channels and zeros the rest, with
// scale 1 / sqrt(d_qk): the zero channels add nothing to a logit.
TEST(VisionShvit, SingleHeadOnAChannelSliceMatchesReference) {
  struct Case {
    std::string name;
    int64_t B, N, C, cp, dqk;
  };
  const std::vector<Case> cases = {
      {"B2 N49 C20 cp8", 2, 49, 20, 8, 8},
      {"B1 N30 C13 cp12 dqk5 (zero-padded queries and keys)", 1, 30, 13, 12, 5},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name + " " + test::Repro(c.name));
    test::Rng rng(test::SeedFor(c.name));
    Tensor x(DType::kF32, {c.B, c.N, c.C});
    Tensor qkv(DType::kF32, {c.B, c.N, 3 * c.cp});
    x.FillNormal(rng);
    qkv.FillNormal(rng);
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t n = 0; n < c.N; ++n) {
        for (int64_t d = c.dqk; d < c.cp; ++d) {
          qkv.Set({b, n, d}, 0.0);         // q
          qkv.Set({b, n, c.cp + d}, 0.0);  // k
        }
      }
    }
    Tensor out(DType::kF32, {c.B, c.N, c.C});
    out.FromVector(x.ToVector());  // the pass-through channels; [0, cp) is overwritten
    // Channel slice [c0, c0 + width) of a [B, N, C'] tensor as a [B, N, 1, width] view.
    const auto slice = [](const Tensor& t, int64_t c0, int64_t width) {
      TensorView v = t.view();
      v.data = static_cast<float*>(v.data) + c0;
      v.rank = 4;
      v.shape[2] = 1;
      v.shape[3] = width;
      v.strides[3] = 1;
      v.strides[2] = width;
      return v;
    };
    AttentionParams p;
    p.q = slice(qkv, 0, c.cp);
    p.k = slice(qkv, c.cp, c.cp);
    p.v = slice(qkv, 2 * c.cp, c.cp);
    p.out = slice(out, 0, c.cp);
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.dqk));
    const Status s = AttentionForward(p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();

    // Reference: one head of d_qk-channel queries and keys and c_p-channel values.
    const auto rank3 = [](TensorView v, int64_t width) {
      v.rank = 3;
      v.shape[2] = width;
      v.strides[2] = 1;
      v.shape[3] = 1;
      v.strides[3] = 0;
      return v;
    };
    std::vector<double> attn(static_cast<size_t>(c.B * c.N * c.cp));
    ref::SingleHeadAttentionF64(rank3(p.q, c.dqk), rank3(p.k, c.dqk), rank3(p.v, c.cp),
                                1.0 / std::sqrt(static_cast<double>(c.dqk)), attn.data());
    std::vector<double> got_attn, got_rest, want_rest;
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t n = 0; n < c.N; ++n) {
        for (int64_t ch = 0; ch < c.C; ++ch) {
          if (ch < c.cp) {
            got_attn.push_back(out.Get({b, n, ch}));
          } else {
            got_rest.push_back(out.Get({b, n, ch}));
            want_rest.push_back(x.Get({b, n, ch}));
          }
        }
      }
    }
    EXPECT_TRUE(test::CheckClose(got_attn, attn, test::kOutputCeilingF32, "attention channels"));
    EXPECT_EQ(got_rest, want_rest) << "the pass-through channels changed";
  }
}

// S2AFormer's Strip Self-Attention as its abstract states it: the keys and values spatially
// reduced (the caller's strided depth-wise convolution: N / r^2 tokens) and the query and key
// channels compressed to d' < D. AttentionForward needs one head dim for q, k and v, so the
// compressed q and k fill d' channels of D and zeros the rest (the projection's weights padded
// with zero rows), scale 1 / sqrt(d'); Sq = N, Sk = N / r^2.
TEST(VisionS2AFormer, ReducedKeysAndCompressedQueryKeyChannelsMatchReference) {
  const int64_t B = 2, grid = 8, r = 2, D = 16, d_small = 4;
  const int64_t N = grid * grid, Nk = N / (r * r);
  test::Rng rng(test::SeedFor("s2aformer ssa"));
  Tensor q(DType::kF32, {B, N, 1, D}), k(DType::kF32, {B, Nk, 1, D}), v(DType::kF32, {B, Nk, 1, D});
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  for (Tensor* t : {&q, &k}) {
    t->ForEach([&](const test::Index& i) {
      if (i[3] >= d_small) t->Set(i, 0.0);
    });
  }
  Tensor out(DType::kF32, {B, N, 1, D});
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.scale = 1.0f / std::sqrt(static_cast<float>(d_small));
  const Status s = AttentionForward(p, Context());
  ASSERT_TRUE(s.ok()) << s.ToString();
  // The reference reads only the d' compressed channels of q and k.
  const auto rank3 = [](TensorView t, int64_t width) {
    t.rank = 3;
    t.shape[2] = width;
    t.strides[2] = t.strides[3];
    t.shape[3] = 1;
    t.strides[3] = 0;
    return t;
  };
  std::vector<double> ref(static_cast<size_t>(out.numel()));
  ref::SingleHeadAttentionF64(rank3(q.view(), d_small), rank3(k.view(), d_small),
                              rank3(v.view(), D), 1.0 / std::sqrt(static_cast<double>(d_small)),
                              ref.data());
  EXPECT_TRUE(test::CheckClose(out.ToVector(), ref, test::kOutputCeilingF32, "out"));
}

// HiLo (LITv2) is ApproxAttention's kHiLo (src/approx/hilo_test.cc tests it in depth): the call
// docs/vision.md shows, on a small grid, against its fp64 reference.
TEST(VisionHiLo, TheDocumentedCallMatchesReference) {
  GridRun run(1, 6, 10, 4, 16, false, "hilo 6x10");
  Tensor lse(DType::kF32, {1, 4, 60});
  ApproxParams p;
  p.method = ApproxMethod::kHiLo;
  p.q = run.q.view();
  p.k = run.k.view();
  p.v = run.v.view();
  p.out = run.out.view();
  p.lse = lse.view();
  p.hilo.grid_h = 6;
  p.hilo.grid_w = 10;
  p.hilo.window = 2;
  p.hilo.lofi_heads = 2;  // heads 2, 3 attend to 2 x 2 average-pooled keys
  ASSERT_TRUE(ApproxAttention(p, Context()).ok());
  std::vector<double> ref(static_cast<size_t>(run.out.numel()));
  std::vector<double> ref_lse(static_cast<size_t>(lse.numel()));
  ref::HiLoForwardF64(p, ref.data(), ref_lse.data());
  EXPECT_TRUE(test::CheckClose(run.out.ToVector(), ref, test::kOutputCeilingF32, "out"));
  EXPECT_TRUE(test::CheckLse(lse.ToVector(), ref_lse));
}

}  // namespace
}  // namespace tessera
