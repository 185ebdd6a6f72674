// SPDX-License-Identifier: Apache-2.0
// LongConv1D and LongConvStream against the fp64 reference (src/ref/longconv_ref.h): both paths
// on awkward shapes, strided views, streamed == one-shot, thread counts, bad input.
#include "tessera/longconv.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "longconv/longconv_test_util.h"
#include "ref/longconv_ref.h"

namespace tessera {
namespace {

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

bool SmallTests() { return std::getenv("TESSERA_SMALL_TESTS") != nullptr; }

struct Problem {
  int64_t B, N, C, L;
  std::vector<float> u, h, d, y;
  LongConvParams params;
};

// u [B, N, C] stored with a channel stride of `cstride` (strided when > 1).
std::unique_ptr<Problem> Make(int64_t B, int64_t N, int64_t C, int64_t L, bool bias,
                              int64_t cstride = 1, uint32_t seed = 1) {
  auto p = std::make_unique<Problem>();
  p->B = B, p->N = N, p->C = C, p->L = L;
  p->u = Random(B * N * C * cstride, seed);
  p->h = Random(L * C, seed + 1);
  for (float& x : p->h) x /= std::sqrt(static_cast<float>(L));
  p->d = Random(C, seed + 2);
  p->y.assign(static_cast<size_t>(B * N * C), -7.0f);
  TensorView u = MakeView3(p->u.data(), DType::kF32, B, N, C * cstride);
  u.shape[2] = C;
  u.strides[2] = cstride;
  p->params.u = u;
  const int64_t hshape[2] = {L, C};
  p->params.filter = MakeContiguousView(p->h.data(), DType::kF32, 2, hshape);
  if (bias) p->params.bias = MakeView1(p->d.data(), DType::kF32, C);
  p->params.y = MakeView3(p->y.data(), DType::kF32, B, N, C);
  return p;
}

void ExpectMatchesReference(int64_t B, int64_t N, int64_t C, int64_t L, bool bias,
                            int64_t cstride = 1) {
  for (LongConvPath path : {LongConvPath::kDirect, LongConvPath::kFft, LongConvPath::kAuto}) {
    auto p = Make(B, N, C, L, bias, cstride);
    p->params.path = path;
    Context ctx;
    ctx.num_threads = 2;
    ASSERT_TRUE(LongConv1D(p->params, ctx).ok());
    const std::vector<double> ref = ref::LongConvF64(p->params);
    // The direct sum rounds each product once; the FFT path's error grows with log M.
    const double tol = path == LongConvPath::kDirect ? 1e-5 : 5e-5;
    EXPECT_LE(test::RelErrorToScale(p->y, ref), tol)
        << "B=" << B << " N=" << N << " C=" << C << " L=" << L
        << " path=" << static_cast<int>(path);
  }
}

TEST(LongConv, MatchesReferenceOnAwkwardShapes) {
  ExpectMatchesReference(1, 1, 1, 1, false);
  ExpectMatchesReference(2, 7, 3, 7, true);
  ExpectMatchesReference(1, 7, 130, 3, false);
  ExpectMatchesReference(1, 1000, 3, 1000, true);
  ExpectMatchesReference(2, 1000, 1, 17, false);
  if (!SmallTests()) {
    ExpectMatchesReference(1, 4097, 3, 4097, false);
    ExpectMatchesReference(1, 4097, 130, 40, true);
  } else {
    ExpectMatchesReference(1, 300, 130, 40, true);
  }
}

TEST(LongConv, StridedInput) {
  ExpectMatchesReference(2, 100, 5, 100, true, /*cstride=*/3);
  ExpectMatchesReference(1, 33, 17, 9, false, /*cstride=*/2);
}

TEST(LongConv, DeterministicAcrossThreadCounts) {
  for (LongConvPath path : {LongConvPath::kDirect, LongConvPath::kFft}) {
    std::vector<float> first;
    for (int32_t threads : {1, 2, 3}) {
      auto p = Make(2, 513, 33, 200, true);
      p->params.path = path;
      Context ctx;
      ctx.num_threads = threads;
      ASSERT_TRUE(LongConv1D(p->params, ctx).ok());
      if (first.empty()) {
        first = p->y;
      } else {
        EXPECT_EQ(0, std::memcmp(first.data(), p->y.data(), first.size() * sizeof(float)));
      }
    }
  }
}

// Pushes u in blocks of `block` tokens and compares with the reference of the whole sequence.
void ExpectStreamMatches(int64_t B, int64_t N, int64_t C, int64_t L, int64_t block, bool bias) {
  auto p = Make(B, N, C, L, bias);
  std::unique_ptr<LongConvStream> stream;
  ASSERT_TRUE(LongConvStream::Create(p->params.filter, p->params.bias, block, B, &stream).ok());
  Context ctx;
  ctx.num_threads = 2;
  for (int64_t t0 = 0; t0 < N; t0 += block) {
    const int64_t T = std::min(block, N - t0);
    TensorView u = p->params.u, y = p->params.y;
    u.data = p->u.data() + t0 * C;
    u.shape[1] = T;
    y.data = p->y.data() + t0 * C;
    y.shape[1] = T;
    ASSERT_TRUE(stream->Push(u, y, ctx).ok());
  }
  EXPECT_EQ(stream->tokens_seen(), N);
  EXPECT_LE(test::RelErrorToScale(p->y, ref::LongConvF64(p->params)), 5e-5)
      << "N=" << N << " L=" << L << " block=" << block;
}

TEST(LongConvStream, MatchesOneShot) {
  ExpectStreamMatches(1, 100, 3, 10, 16, true);     // L <= block: one block of carry
  ExpectStreamMatches(2, 100, 5, 100, 16, false);   // L > block: the delay line
  ExpectStreamMatches(1, 257, 130, 257, 64, true);  // short last block
  ExpectStreamMatches(1, 7, 1, 7, 1, false);        // one token per block
}

TEST(LongConvStream, ShortBlockEndsTheStream) {
  auto p = Make(1, 10, 2, 4, false);
  std::unique_ptr<LongConvStream> stream;
  ASSERT_TRUE(LongConvStream::Create(p->params.filter, p->params.bias, 8, 1, &stream).ok());
  TensorView u = p->params.u, y = p->params.y;
  u.shape[1] = y.shape[1] = 3;
  ASSERT_TRUE(stream->Push(u, y, Context()).ok());
  EXPECT_FALSE(stream->Push(u, y, Context()).ok());
  stream->Reset();
  EXPECT_TRUE(stream->Push(u, y, Context()).ok());
  u.shape[1] = y.shape[1] = 9;
  stream->Reset();
  EXPECT_NE(stream->Push(u, y, Context()).message().find("u:"), std::string::npos);
}

TEST(LongConv, BadInputNamesTheArgumentAndWritesNothing) {
  const auto expect_error = [](const LongConvParams& params, const char* name) {
    const float before = static_cast<float*>(params.y.data)[0];
    const Status s = LongConv1D(params, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << name;
    EXPECT_EQ(s.message().rfind(name, 0), 0u) << s.message();
    EXPECT_EQ(static_cast<float*>(params.y.data)[0], before);
  };
  auto p = Make(1, 8, 4, 4, true);
  LongConvParams q = p->params;
  q.filter.shape[0] = 9;  // longer than N
  expect_error(q, "filter");
  q = p->params;
  q.filter.shape[1] = 3;
  expect_error(q, "filter");
  q = p->params;
  q.bias.shape[0] = 5;
  expect_error(q, "bias");
  q = p->params;
  q.u.dtype = DType::kBF16;
  expect_error(q, "u");
  q = p->params;
  q.y.shape[1] = 7;
  expect_error(q, "y");
  q = p->params;
  q.y.data = p->u.data();  // overlaps u
  q.y.data = p->params.y.data;
  q.u.data = p->y.data();
  expect_error(q, "y");
  q = p->params;
  q.path = static_cast<LongConvPath>(9);
  expect_error(q, "path");
  std::unique_ptr<LongConvStream> stream;
  EXPECT_EQ(LongConvStream::Create(p->params.filter, p->params.bias, 0, 1, &stream)
                .message()
                .rfind("block", 0),
            0u);
}

}  // namespace
}  // namespace tessera
