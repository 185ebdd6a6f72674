// SPDX-License-Identifier: Apache-2.0
// ChannelAttention (DaViT channel attention, tessera/vision.h) against the fp64 reference
// (src/ref/vision_ref.h) on awkward shapes, strided layouts and 16-bit inputs; the composition it
// replaces (AttentionForward on the channel-major views of the same memory, while N fits its head
// dim); thread counts; NaN propagation; empty problems; rejected arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "comparator.h"
#include "naive_attention.h"
#include "ref/vision_ref.h"
#include "tessera/attention.h"
#include "tessera/vision.h"
#include "test_tensor.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Tensor;

// Storage of a [B, N, H, dh] view.
enum class Layout {
  kContiguous,
  kPadded,        // 3 spare elements after every dh row
  kHeadsMajor,    // storage [B, H, N, dh]
  kChannelsLast,  // storage [B, N, dh, H]: channel stride H (the transposed reshape of [B, N, C])
};

const char* LayoutName(Layout l) {
  switch (l) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kPadded:
      return "padded";
    case Layout::kHeadsMajor:
      return "heads-major";
    case Layout::kChannelsLast:
      return "channels-last";
  }
  return "?";
}

Tensor Make(DType dtype, int64_t B, int64_t N, int64_t H, int64_t dh, Layout layout) {
  const std::vector<int64_t> shape = {B, N, H, dh};
  switch (layout) {
    case Layout::kContiguous:
      return Tensor(dtype, shape);
    case Layout::kPadded:
      return Tensor(dtype, shape, Tensor::PaddedStrides(shape, 3));
    case Layout::kHeadsMajor:
      return Tensor(dtype, shape, {H * N * dh, dh, N * dh, 1});
    case Layout::kChannelsLast:
      return Tensor(dtype, shape, {N * dh * H, dh * H, 1, H});
  }
  return Tensor(dtype, shape);
}

struct Case {
  int64_t B = 2, N = 7, H = 3, dh = 32;
  DType dtype = DType::kF32;
  Layout in = Layout::kContiguous;
  Layout out = Layout::kContiguous;
  std::optional<float> scale;

  std::string Name() const {
    std::string s = "B" + std::to_string(B) + "_N" + std::to_string(N) + "_H" + std::to_string(H) +
                    "_dh" + std::to_string(dh) + "_" + DTypeName(dtype) + "_in-" + LayoutName(in) +
                    "_out-" + LayoutName(out);
    if (scale.has_value()) s += "_scale" + std::to_string(*scale);
    return s;
  }
};

struct Problem {
  Tensor q, k, v, out;
  ChannelAttentionParams params;

  explicit Problem(const Case& c) {
    test::Rng rng(test::SeedFor(c.Name()));
    q = Make(c.dtype, c.B, c.N, c.H, c.dh, c.in);
    k = Make(c.dtype, c.B, c.N, c.H, c.dh, c.in);
    v = Make(c.dtype, c.B, c.N, c.H, c.dh, c.in);
    out = Make(c.dtype, c.B, c.N, c.H, c.dh, c.out);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    params.q = q.view();
    params.k = k.view();
    params.v = v.view();
    params.out = out.view();
    params.scale = c.scale;
  }
};

// A [B, N, H, dh] view seen as [B, dh, H, N]: the channels become the tokens, no copy.
TensorView ChannelsAsTokens(TensorView t) {
  std::swap(t.shape[1], t.shape[3]);
  std::swap(t.strides[1], t.strides[3]);
  return t;
}

// The same problem as exact attention on the channel-major views (DaViT's default scale).
AttentionParams Composed(const ChannelAttentionParams& p, const TensorView& out) {
  AttentionParams a;
  a.q = ChannelsAsTokens(p.q);
  a.k = ChannelsAsTokens(p.k);
  a.v = ChannelsAsTokens(p.v);
  a.out = ChannelsAsTokens(out);
  a.scale = p.scale.has_value() ? *p.scale : 1.0f / std::sqrt(static_cast<float>(p.q.shape[3]));
  return a;
}

void CheckAgainstReference(const Case& c, int32_t threads) {
  SCOPED_TRACE(c.Name() + " " + test::Repro(c.Name()));
  Problem run(c);
  Context ctx;
  ctx.num_threads = threads;
  const Status s = ChannelAttention(run.params, ctx);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const size_t n = static_cast<size_t>(run.out.numel());
  std::vector<double> ref(n), magnitude(n);
  ref::ChannelAttentionF64(run.params, ref.data(), magnitude.data());
  if (c.dtype == DType::kF32) {
    EXPECT_TRUE(test::CheckOutput(c.dtype, run.out.ToVector(), ref, nullptr, test::Rule::kStandard,
                                  &magnitude));
  } else {
    // The naive same-precision baseline of the ratio rule: the materialized attention of the
    // composed problem in the input precision (its head dim N is not bounded there).
    std::vector<double> naive(n), naive_lse(static_cast<size_t>(c.B * c.H * c.dh));
    Tensor scratch = Make(c.dtype, c.B, c.N, c.H, c.dh, Layout::kContiguous);
    test::AttentionForwardNaive(Composed(run.params, scratch.view()), naive.data(),
                                naive_lse.data());
    // The naive output is in the composed layout [B, dh, H, N]: back to [B, N, H, dh].
    std::vector<double> naive_bnhd(n);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t ch = 0; ch < c.dh; ++ch)
        for (int64_t h = 0; h < c.H; ++h)
          for (int64_t t = 0; t < c.N; ++t)
            naive_bnhd[static_cast<size_t>(((b * c.N + t) * c.H + h) * c.dh + ch)] =
                naive[static_cast<size_t>(((b * c.dh + ch) * c.H + h) * c.N + t)];
    EXPECT_TRUE(test::CheckOutput(c.dtype, run.out.ToVector(), ref, &naive_bnhd));
  }
  EXPECT_TRUE(run.out.OutsideViewUntouched());
}

TEST(ChannelAttention, MatchesReferenceOnAwkwardShapes) {
  std::vector<Case> cases;
  for (int64_t N : {1, 7, 600}) {
    for (int64_t dh : {3, 32}) {
      for (int64_t H : {1, 3}) {
        Case c;
        c.N = N;
        c.dh = dh;
        c.H = H;
        cases.push_back(c);
      }
    }
  }
  Case one;  // a single channel: A = [[1]], out = v
  one.dh = 1;
  cases.push_back(one);
  Case wide;  // dh past two vectors of every target, not a multiple of any lane count
  wide.N = 40;
  wide.dh = 100;
  wide.H = 1;
  cases.push_back(wide);
  Case chunks;  // N over the 1024-token chunk: partial logit sums added in chunk order
  chunks.N = 2500;
  chunks.H = 1;
  chunks.scale = 0.05f;
  cases.push_back(chunks);
  for (const Case& c : cases) CheckAgainstReference(c, 2);
}

TEST(ChannelAttention, StridedViews) {
  const Layout layouts[] = {Layout::kPadded, Layout::kHeadsMajor, Layout::kChannelsLast};
  for (Layout in : layouts) {
    Case c;
    c.N = 45;
    c.dh = 11;
    c.in = in;
    c.out = in == Layout::kPadded ? Layout::kChannelsLast : Layout::kPadded;
    CheckAgainstReference(c, 2);
  }
}

TEST(ChannelAttention, SixteenBitInputs) {
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Case c;
    c.N = 130;
    c.dh = 16;
    c.dtype = dt;
    c.in = Layout::kChannelsLast;
    CheckAgainstReference(c, 2);
  }
}

// For N within the exact kernel's head dim, channel attention is AttentionForward on the views of
// q, k, v with the token and channel strides swapped: dh queries and keys of head dim N. With
// logits of order 1 (scale 1 / sqrt(N)) both match fp64 and agree within the identity ceiling.
// At DaViT's scale (logits ~ sqrt(N / dh), several units) ChannelAttention still meets the f32
// rule; the exact kernel, whose own tests use logits of order 1, exceeded it there by up to 40%
// at N = 512 (25 seeds), so that pair is not compared. Past N = 512 the exact kernel refuses the
// views, which is why ChannelAttention has its own kernel.
TEST(ChannelAttention, EqualsAttentionForwardOnChannelMajorViews) {
  for (int64_t N : {1, 7, 300, 512}) {
    for (bool unit_logits : {false, true}) {
      Case c;
      c.N = N;
      c.dh = 24;
      c.in = Layout::kPadded;
      if (unit_logits) c.scale = 1.0f / std::sqrt(static_cast<float>(N));
      SCOPED_TRACE(c.Name());
      Problem run(c);
      ASSERT_TRUE(ChannelAttention(run.params, Context()).ok());
      Tensor composed_out = Make(c.dtype, c.B, c.N, c.H, c.dh, Layout::kContiguous);
      const Status s = AttentionForward(Composed(run.params, composed_out.view()), Context());
      ASSERT_TRUE(s.ok()) << s.ToString();
      const size_t n = static_cast<size_t>(run.out.numel());
      std::vector<double> ref(n), magnitude(n);
      ref::ChannelAttentionF64(run.params, ref.data(), magnitude.data());
      EXPECT_TRUE(test::CheckOutput(c.dtype, run.out.ToVector(), ref, nullptr,
                                    test::Rule::kStandard, &magnitude));
      if (unit_logits) {
        EXPECT_TRUE(test::CheckOutput(c.dtype, composed_out.ToVector(), ref, nullptr,
                                      test::Rule::kStandard, &magnitude));
        EXPECT_TRUE(test::CheckClose(run.out.ToVector(), composed_out.ToVector(),
                                     test::IdentityCeiling(c.dtype), "channel vs composed"));
      }
    }
  }
  Case big;
  big.N = 600;
  Problem run(big);
  Tensor composed_out = Make(big.dtype, big.B, big.N, big.H, big.dh, Layout::kContiguous);
  composed_out.Snapshot();
  const Status s = AttentionForward(Composed(run.params, composed_out.view()), Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(composed_out.Unchanged());
  EXPECT_TRUE(ChannelAttention(run.params, Context()).ok());
}

TEST(ChannelAttention, DefaultScaleIsOneOverRootDh) {
  Case c;
  c.N = 50;
  c.dh = 9;
  Problem implicit(c);
  Problem explicit_scale(c);  // the same inputs (seeded by c's name)
  explicit_scale.params.scale = 1.0f / 3.0f;
  ASSERT_TRUE(ChannelAttention(implicit.params, Context()).ok());
  ASSERT_TRUE(ChannelAttention(explicit_scale.params, Context()).ok());
  EXPECT_TRUE(implicit.out.BitwiseEqual(explicit_scale.out));
}

TEST(ChannelAttention, SameBitsForEveryThreadCount) {
  Case c;
  c.N = 2100;  // three chunks of logits, nine blocks of the product
  c.H = 3;
  c.dh = 20;
  c.in = Layout::kChannelsLast;
  c.scale = 0.05f;
  Problem base(c);
  Context one;
  one.num_threads = 1;
  ASSERT_TRUE(ChannelAttention(base.params, one).ok());
  for (int32_t threads : {2, 3, 7}) {
    Problem other(c);
    Context ctx;
    ctx.num_threads = threads;
    ASSERT_TRUE(ChannelAttention(other.params, ctx).ok());
    EXPECT_TRUE(base.out.BitwiseEqual(other.out)) << threads << " threads";
  }
}

// A NaN is never hidden: in k it enters every logit of its (b, h), in q one row of logits (one
// output channel), in v one token's outputs.
TEST(ChannelAttention, NaNReachesTheOutputsItEnters) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Where {
    const char* name;
    std::function<void(Problem&)> poison;
    std::function<bool(int64_t b, int64_t n, int64_t h, int64_t c)> touched;
  };
  const std::vector<Where> cases = {
      {"k",
       [&](Problem& r) {
         r.k.Set({1, 3, 2, 4}, nan);
       },
       [](int64_t b, int64_t, int64_t h, int64_t) { return b == 1 && h == 2; }},
      {"q",
       [&](Problem& r) {
         r.q.Set({0, 5, 1, 2}, nan);
       },
       [](int64_t b, int64_t, int64_t h, int64_t c) { return b == 0 && h == 1 && c == 2; }},
      {"v",
       [&](Problem& r) {
         r.v.Set({1, 6, 0, 0}, nan);
       },
       [](int64_t b, int64_t n, int64_t h, int64_t) { return b == 1 && n == 6 && h == 0; }},
  };
  Case c;
  c.N = 9;
  c.dh = 5;
  for (const Where& w : cases) {
    SCOPED_TRACE(w.name);
    Problem run(c);
    w.poison(run);
    ASSERT_TRUE(ChannelAttention(run.params, Context()).ok());
    run.out.ForEach([&](const test::Index& i) {
      const double x = run.out.Get(i);
      EXPECT_EQ(std::isnan(x), w.touched(i[0], i[1], i[2], i[3]))
          << i[0] << "," << i[1] << "," << i[2] << "," << i[3] << ": " << x;
    });
  }
}

TEST(ChannelAttention, EmptyProblemsWriteNothing) {
  for (const auto& shape : std::vector<std::vector<int64_t>>{{2, 0, 3, 4}, {0, 5, 3, 4}}) {
    Tensor q(DType::kF32, shape), k(DType::kF32, shape), v(DType::kF32, shape);
    Tensor out(DType::kF32, shape);
    out.Snapshot();
    ChannelAttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.out = out.view();
    EXPECT_TRUE(ChannelAttention(p, Context()).ok());
    EXPECT_TRUE(out.Unchanged());
  }
}

TEST(ChannelAttention, BadInputIsNamedAndNothingIsWritten) {
  struct Bad {
    std::string name, field;
    std::function<void(Problem&, ChannelAttentionParams&)> set;
  };
  static Tensor wide_k(DType::kF32, {2, 7, 3, 33});
  static Tensor half_v(DType::kF16, {2, 7, 3, 32});
  static Tensor too_many_channels(DType::kF32, {1, 1, 1, kMaxChannelAttentionDim + 1});
  const std::vector<Bad> bad = {
      {"q rank 3", "q", [](Problem&, ChannelAttentionParams& p) { p.q.rank = 3; }},
      {"q dtype u8", "q", [](Problem&, ChannelAttentionParams& p) { p.q.dtype = DType::kU8; }},
      {"k shape", "k", [](Problem&, ChannelAttentionParams& p) { p.k = wide_k.view(); }},
      {"v dtype", "v", [](Problem&, ChannelAttentionParams& p) { p.v = half_v.view(); }},
      {"out shape", "out", [](Problem&, ChannelAttentionParams& p) { p.out.shape[1] = 6; }},
      {"out null", "out", [](Problem&, ChannelAttentionParams& p) { p.out.data = nullptr; }},
      {"out repeats an element", "out",
       [](Problem&, ChannelAttentionParams& p) { p.out.strides[1] = 0; }},
      {"out overlaps v", "out", [](Problem& r, ChannelAttentionParams& p) { p.v = r.out.view(); }},
      {"dh too large", "q",
       [](Problem&, ChannelAttentionParams& p) {
         p.q = p.k = p.v = too_many_channels.view();
         p.out.shape[0] = p.out.shape[1] = p.out.shape[2] = 1;
         p.out.shape[3] = kMaxChannelAttentionDim + 1;
       }},
      {"scale inf", "scale",
       [](Problem&, ChannelAttentionParams& p) {
         p.scale = std::numeric_limits<float>::infinity();
       }},
      {"scale NaN", "scale",
       [](Problem&, ChannelAttentionParams& p) {
         p.scale = std::numeric_limits<float>::quiet_NaN();
       }},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    Problem run(Case{});
    b.set(run, run.params);
    run.out.Snapshot();
    const Status s = ChannelAttention(run.params, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_EQ(s.message().rfind(b.field + ":", 0), 0u) << s.message();
    EXPECT_TRUE(run.out.Unchanged());
  }
  Problem run(Case{});
  run.out.Snapshot();
  Context ctx;
  ctx.num_threads = -1;
  const Status s = ChannelAttention(run.params, ctx);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message().rfind("ctx.num_threads:", 0), 0u) << s.message();
  EXPECT_TRUE(run.out.Unchanged());
}

}  // namespace
}  // namespace tessera
