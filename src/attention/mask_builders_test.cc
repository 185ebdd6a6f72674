// SPDX-License-Identifier: Apache-2.0
// Tests of the block-mask builders (tessera/mask.h): BuildS2BlockMask and BuildRadialBlockMask
// against direct restatements of their formulas, SelectBlocks against an fp64 gate and a direct
// selection, and every rejected argument leaving the output untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "tessera/mask.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Index;
using test::Rng;
using test::Tensor;

constexpr uint8_t kSentinel = 0xAB;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// S2-Attention.

std::vector<uint8_t> BuildS2(S2MaskParams p) {
  std::vector<uint8_t> out(static_cast<size_t>(p.heads * p.num_q_blocks * p.num_k_blocks),
                           kSentinel);
  p.out = MakeView4(out.data(), DType::kU8, 1, p.heads, p.num_q_blocks, p.num_k_blocks);
  const Status s = BuildS2BlockMask(p, Context());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

uint8_t At(const std::vector<uint8_t>& m, int64_t rows, int64_t cols, int64_t h, int64_t r,
           int64_t c) {
  return m[static_cast<size_t>((h * rows + r) * cols + c)];
}

TEST(MaskBuilders, S2CausalFollowsTheFormula) {
  for (int64_t heads : {1, 3, 4}) {
    for (int64_t stride : {1, 3, 8}) {
      for (int64_t offset : {0, 2}) {
        S2MaskParams p;
        p.heads = heads;
        p.num_q_blocks = 13;
        p.num_k_blocks = 13;
        p.local_blocks = 2;
        p.vert_stride = stride;
        p.offset = offset;
        const std::vector<uint8_t> m = BuildS2(p);
        const int64_t step = std::max<int64_t>(1, stride / heads);
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t qb = 0; qb < 13; ++qb) {
            for (int64_t kb = 0; kb < 13; ++kb) {
              const bool keep = qb >= kb && (qb - kb < 2 || (kb + h * step + offset) % stride == 0);
              ASSERT_EQ(At(m, 13, 13, h, qb, kb), keep ? 1 : 0)
                  << "heads " << heads << " stride " << stride << " offset " << offset << " h " << h
                  << " qb " << qb << " kb " << kb;
            }
          }
        }
      }
    }
  }
}

TEST(MaskBuilders, S2HandRows) {
  S2MaskParams p;
  p.num_q_blocks = 8;
  p.num_k_blocks = 8;
  p.local_blocks = 1;
  p.vert_stride = 3;
  const std::vector<uint8_t> causal = BuildS2(p);
  std::string row;
  for (int64_t kb = 0; kb < 8; ++kb) row += At(causal, 8, 8, 0, 7, kb) ? '#' : '.';
  EXPECT_EQ(row, "#..#..##");
  // Bidirectional, local 2 on each side: stripes every 3 blocks of distance past the band.
  p.causal = false;
  p.local_blocks = 2;
  const std::vector<uint8_t> both = BuildS2(p);
  row.clear();
  for (int64_t kb = 0; kb < 8; ++kb) row += At(both, 8, 8, 0, 0, kb) ? '#' : '.';
  EXPECT_EQ(row, "##..#..#");
  row.clear();
  for (int64_t kb = 0; kb < 8; ++kb) row += At(both, 8, 8, 0, 4, kb) ? '#' : '.';
  EXPECT_EQ(row, "#..###..");
}

TEST(MaskBuilders, S2NegativeOffsetIsTakenModuloTheStride) {
  S2MaskParams p;
  p.heads = 2;
  p.num_q_blocks = 9;
  p.num_k_blocks = 11;
  p.vert_stride = 4;
  p.offset = -3;
  const std::vector<uint8_t> negative = BuildS2(p);
  p.offset = 1;
  EXPECT_EQ(negative, BuildS2(p));
}

TEST(MaskBuilders, S2UnionOverHeadsCoversEveryAllowedBlock) {
  // With at least as many heads as the stride (step 1), the heads' stripes tile every residue.
  for (bool causal : {true, false}) {
    for (int64_t heads : {4, 6, 8}) {
      S2MaskParams p;
      p.heads = heads;
      p.num_q_blocks = 17;
      p.num_k_blocks = 17;
      p.local_blocks = 1;
      p.vert_stride = 4;
      p.offset = 1;
      p.causal = causal;
      const std::vector<uint8_t> m = BuildS2(p);
      for (int64_t qb = 0; qb < 17; ++qb) {
        for (int64_t kb = 0; kb < 17; ++kb) {
          bool any = false;
          for (int64_t h = 0; h < heads; ++h) any = any || At(m, 17, 17, h, qb, kb);
          EXPECT_EQ(any, !causal || qb >= kb) << "heads " << heads << " " << qb << ", " << kb;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Radial attention.

int64_t BitLength(int64_t x) {
  int64_t n = 0;
  while (x > 0) x >>= 1, ++n;
  return n;
}

// A direct implementation: the n x n token mask from the per-frame-pair rule of the reference
// generator (mit-han-lab/radial-attention, attn_mask.py), then the strict block reduction.
std::vector<uint8_t> RadialDirect(const RadialMaskParams& p) {
  const int64_t nf = p.tokens_per_frame, n = p.frames * nf, nb = CeilDiv(n, p.block);
  std::vector<char> token(static_cast<size_t>(n * n));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t dist = std::llabs(r / nf - c / nf);
      bool visible = true;
      if (dist > 1) {
        const double base = std::pow(2.0, static_cast<double>(BitLength(nf))) /
                            std::pow(2.0, static_cast<double>(BitLength(dist)));
        const double width = std::max(base * p.decay_factor, static_cast<double>(p.block));
        const bool split = base >= 128.0 || dist % static_cast<int64_t>(128.0 / base) == 0;
        visible = split && std::fabs(static_cast<double>(r % nf - c % nf)) <= width;
      }
      token[static_cast<size_t>(r * n + c)] = visible;
    }
  }
  std::vector<uint8_t> blocks(static_cast<size_t>(nb * nb));
  for (int64_t I = 0; I < nb; ++I) {
    const int64_t rows = std::min(n, (I + 1) * p.block) - I * p.block;
    for (int64_t J = 0; J < nb; ++J) {
      double non_zero = 0.0, high = 0.0;
      for (int64_t c = J * p.block; c < std::min(n, (J + 1) * p.block); ++c) {
        double count = 0.0;
        for (int64_t r = I * p.block; r < I * p.block + rows; ++r) {
          count += token[static_cast<size_t>(r * n + c)];
        }
        const double density = count / static_cast<double>(rows);
        non_zero += density > 0.0;
        high += density > 1.0 / 3.0;
      }
      blocks[static_cast<size_t>(I * nb + J)] = high / (non_zero + 1e-9) > 0.6;
    }
  }
  return blocks;
}

TEST(MaskBuilders, RadialMatchesADirectImplementation) {
  struct Case {
    int64_t frames, tokens_per_frame, block;
    double decay_factor;
  };
  const Case cases[] = {{8, 300, 16, 1.0}, {5, 300, 64, 1.0}, {6, 256, 128, 0.5},
                        {12, 48, 32, 1.0}, {9, 520, 48, 2.0}, {1, 40, 16, 1.0}};
  for (const Case& c : cases) {
    RadialMaskParams p;
    p.frames = c.frames;
    p.tokens_per_frame = c.tokens_per_frame;
    p.block = c.block;
    p.decay_factor = c.decay_factor;
    const int64_t nb = CeilDiv(c.frames * c.tokens_per_frame, c.block);
    std::vector<uint8_t> out(static_cast<size_t>(nb * nb), kSentinel);
    p.out = MakeView4(out.data(), DType::kU8, 1, 1, nb, nb);
    const Status s = BuildRadialBlockMask(p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    const std::vector<uint8_t> direct = RadialDirect(p);
    EXPECT_EQ(out, direct) << "frames " << c.frames << " n_f " << c.tokens_per_frame << " block "
                           << c.block;
    for (int64_t I = 0; I < nb; ++I) EXPECT_EQ(out[static_cast<size_t>(I * nb + I)], 1) << I;
    // Some far frame pairs are pruned where the frames are long enough for a band.
    if (c.frames >= 5 && c.tokens_per_frame >= 256) {
      EXPECT_LT(std::accumulate(out.begin(), out.end(), int64_t{0}), nb * nb);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SelectBlocks.

struct Selection {
  Tensor q, k;
  std::vector<uint8_t> out;
  BlockSelectParams p;
  int64_t nqb = 0, nkb = 0;

  uint8_t at(int64_t b, int64_t h, int64_t I, int64_t J) const {
    return out[static_cast<size_t>(((b * p.q.shape[2] + h) * nqb + I) * nkb + J)];
  }
  Status Run(int32_t threads = 0) {
    Context ctx;
    ctx.num_threads = threads;
    return SelectBlocks(p, ctx);
  }
};

Selection MakeSelection(DType dtype, int64_t B, int64_t sq, int64_t sk, int64_t hq, int64_t hkv,
                        int64_t D, int64_t block_q, int64_t block_k, uint64_t seed) {
  Selection s{Tensor(dtype, {B, sq, hq, D}), Tensor(dtype, {B, sk, hkv, D}), {}, {}, 0, 0};
  Rng rng(seed);
  s.q.FillNormal(rng);
  s.k.FillNormal(rng);
  // A per-block offset along the head dim so that the pooled means differ clearly.
  s.k.ForEach([&](const Index& i) {
    s.k.Set(i, s.k.Get(i) + std::sin(static_cast<double>(i[1] / block_k * 7 + i[3] * 3 + i[2])));
  });
  s.q.ForEach([&](const Index& i) {
    s.q.Set(i, s.q.Get(i) + std::cos(static_cast<double>(i[1] / block_q * 5 + i[3] + i[2])));
  });
  s.nqb = CeilDiv(sq, block_q);
  s.nkb = CeilDiv(sk, block_k);
  s.out.assign(static_cast<size_t>(B * hq * s.nqb * s.nkb), kSentinel);
  s.p.q = s.q.view();
  s.p.k = s.k.view();
  s.p.block_q = block_q;
  s.p.block_k = block_k;
  s.p.out = MakeView4(s.out.data(), DType::kU8, B, hq, s.nqb, s.nkb);
  return s;
}

// The gate in fp64: scale * mean(q block) . mean(k block), and the magnitude of its terms.
struct Gate {
  std::vector<double> score, magnitude;  // [B, Hq, nqb, nkb]
};

Gate GateF64(const Selection& s) {
  const int64_t B = s.q.shape(0), sq = s.q.shape(1), hq = s.q.shape(2), D = s.q.shape(3);
  const int64_t sk = s.k.shape(1), hkv = s.k.shape(2);
  const double scale = s.p.scale.has_value()
                           ? *s.p.scale
                           : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  auto mean = [](const Tensor& t, int64_t b, int64_t h, int64_t t0, int64_t t1, int64_t d,
                 bool absolute) {
    double sum = 0.0;
    for (int64_t x = t0; x < t1; ++x) {
      const double v = t.Get({b, x, h, d});
      sum += absolute ? std::fabs(v) : v;
    }
    return sum / static_cast<double>(t1 - t0);
  };
  Gate g;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kvh = h / (hq / hkv);
      for (int64_t I = 0; I < s.nqb; ++I) {
        const int64_t q0 = I * s.p.block_q, q1 = std::min(sq, q0 + s.p.block_q);
        for (int64_t J = 0; J < s.nkb; ++J) {
          const int64_t k0 = J * s.p.block_k, k1 = std::min(sk, k0 + s.p.block_k);
          double dot = 0.0, mag = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            dot += mean(s.q, b, h, q0, q1, d, false) * mean(s.k, b, kvh, k0, k1, d, false);
            mag += mean(s.q, b, h, q0, q1, d, true) * mean(s.k, b, kvh, k0, k1, d, true);
          }
          g.score.push_back(scale * dot);
          g.magnitude.push_back(std::fabs(scale) * mag);
        }
      }
    }
  }
  return g;
}

// Key blocks query block I may choose: [0, allowed); under causal the last one is the diagonal.
int64_t Allowed(const BlockSelectParams& p, int64_t I, int64_t nkb) {
  if (!p.causal) return nkb;
  const int64_t sq = p.q.shape[1], sk = p.k.shape[1];
  const int64_t last =
      std::min(sq, (I + 1) * p.block_q) - 1 + (p.align == MaskAlign::kTopLeft ? 0 : sk - sq);
  return last < 0 ? 0 : std::min(nkb, last / p.block_k + 1);
}

TEST(MaskBuilders, SelectTopKAsLargeAsTheRowKeepsEveryAllowedBlock) {
  for (bool causal : {false, true}) {
    Selection s = MakeSelection(DType::kF32, 2, 100, 100, 4, 2, 8, 16, 16, 1);
    s.p.top_k = s.nkb;
    s.p.causal = causal;
    ASSERT_TRUE(s.Run().ok());
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t h = 0; h < 4; ++h) {
        for (int64_t I = 0; I < s.nqb; ++I) {
          for (int64_t J = 0; J < s.nkb; ++J) {
            EXPECT_EQ(s.at(b, h, I, J), !causal || J <= I ? 1 : 0) << b << h << I << J;
          }
        }
      }
    }
  }
}

TEST(MaskBuilders, SelectTopKKeepsExactlyKOfTheLargestGates) {
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool causal : {false, true}) {
      // Sq, Sk not multiples of the blocks: the last blocks' means are over fewer tokens.
      Selection s = MakeSelection(dtype, 2, 77, 131, 4, 2, 40, 16, 32, 2);
      s.p.top_k = 3;
      s.p.causal = causal;
      ASSERT_TRUE(s.Run().ok());
      const Gate g = GateF64(s);
      for (int64_t b = 0; b < 2; ++b) {
        for (int64_t h = 0; h < 4; ++h) {
          for (int64_t I = 0; I < s.nqb; ++I) {
            const int64_t allowed = Allowed(s.p, I, s.nkb);
            int64_t count = 0;
            double lowest_kept = std::numeric_limits<double>::infinity();
            double highest_dropped = -std::numeric_limits<double>::infinity(), tol = 0.0;
            for (int64_t J = 0; J < s.nkb; ++J) {
              const size_t e = static_cast<size_t>(((b * 4 + h) * s.nqb + I) * s.nkb + J);
              tol = std::max(tol, test::kF32MaxRelErr * g.magnitude[e]);
              if (J >= allowed) {
                EXPECT_EQ(s.at(b, h, I, J), 0) << "past the diagonal";
                continue;
              }
              count += s.at(b, h, I, J);
              if (causal && J == allowed - 1) {
                EXPECT_EQ(s.at(b, h, I, J), 1) << "the diagonal block is kept";
              } else if (s.at(b, h, I, J)) {
                lowest_kept = std::min(lowest_kept, g.score[e]);
              } else {
                highest_dropped = std::max(highest_dropped, g.score[e]);
              }
            }
            EXPECT_EQ(count, std::min<int64_t>(3, allowed)) << "row " << I;
            EXPECT_GE(lowest_kept, highest_dropped - tol)
                << DTypeName(dtype) << " causal " << causal << " b " << b << " h " << h << " I "
                << I;
          }
        }
      }
    }
  }
}

// The selection restated: softmax over the allowed blocks, then top-k or the cumulative
// threshold, in descending score with ties to the lower index, the causal diagonal first.
std::vector<uint8_t> SelectDirect(const BlockSelectParams& p, const std::vector<float>& scores,
                                  int64_t nqb, int64_t nkb) {
  const int64_t rows = p.q.shape[0] * p.q.shape[2] * nqb;
  std::vector<uint8_t> out(static_cast<size_t>(rows * nkb), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t I = r % nqb;
    const int64_t allowed = Allowed(p, I, nkb);
    if (allowed == 0) continue;
    const float* g = scores.data() + r * nkb;
    uint8_t* row = out.data() + r * nkb;
    std::vector<int64_t> order;
    const int64_t diag = p.causal ? allowed - 1 : -1;
    for (int64_t J = 0; J < allowed; ++J) {
      if (J != diag) order.push_back(J);
    }
    std::stable_sort(order.begin(), order.end(), [g](int64_t a, int64_t b) { return g[a] > g[b]; });
    if (diag >= 0) row[diag] = 1;
    if (p.top_k > 0) {
      for (int64_t n = 0; n < p.top_k - (diag >= 0) && n < static_cast<int64_t>(order.size());
           ++n) {
        row[order[static_cast<size_t>(n)]] = 1;
      }
      continue;
    }
    // The masses in SelectBlocks' arithmetic (f32 exp, f64 sums), so that the comparison can be
    // exact: exp(g - max) / sum, accumulated largest first.
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t J = 0; J < allowed; ++J) top = std::max(top, g[J]);
    double total = 0.0;
    for (int64_t J = 0; J < allowed; ++J) total += std::exp(g[J] - top);
    const double inv_total = 1.0 / total;
    double cumulative = diag >= 0 ? std::exp(g[diag] - top) * inv_total : 0.0;
    for (int64_t J : order) {
      if (cumulative >= p.threshold) break;
      row[J] = 1;
      cumulative += std::exp(g[J] - top) * inv_total;
    }
  }
  return out;
}

TEST(MaskBuilders, SelectWithUserScoresTopKAndThreshold) {
  const int64_t B = 2, hq = 3, sq = 90, sk = 140;
  for (bool causal : {false, true}) {
    for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
      for (int64_t top_k : {0, 1, 4}) {
        for (float threshold : {0.3f, 0.8f, 1.0f}) {
          if (top_k > 0 && threshold != 0.3f) continue;
          BlockSelectParams p;
          // Only the shapes of q and k are read with user scores.
          p.q = MakeView4(nullptr, DType::kF32, B, sq, hq, 64);
          p.k = MakeView4(nullptr, DType::kF32, B, sk, 1, 64);
          p.block_q = 32;
          p.block_k = 16;
          const int64_t nqb = CeilDiv(sq, 32), nkb = CeilDiv(sk, 16);
          std::vector<float> scores(static_cast<size_t>(B * hq * nqb * nkb));
          Rng rng(static_cast<uint64_t>(top_k * 10 + causal));
          for (float& x : scores) x = 3.0f * rng.Normal();
          std::vector<uint8_t> out(scores.size(), kSentinel);
          p.scores = MakeView4(scores.data(), DType::kF32, B, hq, nqb, nkb);
          p.out = MakeView4(out.data(), DType::kU8, B, hq, nqb, nkb);
          p.top_k = top_k;
          p.threshold = threshold;
          p.causal = causal;
          p.align = align;
          const Status s = SelectBlocks(p, Context());
          ASSERT_TRUE(s.ok()) << s.ToString();
          EXPECT_EQ(out, SelectDirect(p, scores, nqb, nkb))
              << "causal " << causal << " align " << static_cast<int>(align) << " top_k " << top_k
              << " threshold " << threshold;
        }
      }
    }
  }
}

TEST(MaskBuilders, SelectThresholdOneKeepsEveryAllowedBlock) {
  Selection s = MakeSelection(DType::kBF16, 1, 64, 64, 2, 1, 16, 16, 16, 3);
  s.p.threshold = 1.0f;
  ASSERT_TRUE(s.Run().ok());
  EXPECT_EQ(s.out, std::vector<uint8_t>(s.out.size(), 1));
}

TEST(MaskBuilders, SelectCausalKeepsTheDiagonalAndNothingAfterIt) {
  struct Case {
    int64_t sq, sk;
    MaskAlign align;
    std::vector<int64_t> allowed;  // per query block
  };
  const Case cases[] = {
      {40, 100, MaskAlign::kBottomRight, {5, 6, 7}},  // last positions 75, 91, 99
      {40, 100, MaskAlign::kTopLeft, {1, 2, 3}},
      {64, 20, MaskAlign::kBottomRight, {0, 0, 1, 2}},  // positions -29, -13, 3, 19
      {64, 20, MaskAlign::kTopLeft, {1, 2, 2, 2}},
  };
  for (const Case& c : cases) {
    BlockSelectParams p;
    p.q = MakeView4(nullptr, DType::kF32, 1, c.sq, 1, 8);
    p.k = MakeView4(nullptr, DType::kF32, 1, c.sk, 1, 8);
    p.block_q = 16;
    p.block_k = 16;
    const int64_t nqb = CeilDiv(c.sq, 16), nkb = CeilDiv(c.sk, 16);
    // Scores rise with J: the blocks past the diagonal are the most attractive, and the
    // diagonal is the least attractive allowed block but one.
    std::vector<float> scores(static_cast<size_t>(nqb * nkb));
    for (int64_t I = 0; I < nqb; ++I) {
      for (int64_t J = 0; J < nkb; ++J) {
        const int64_t diag = c.allowed[static_cast<size_t>(I)] - 1;
        scores[static_cast<size_t>(I * nkb + J)] = J == diag ? -100.0f : static_cast<float>(J);
      }
    }
    std::vector<uint8_t> out(scores.size(), kSentinel);
    p.scores = MakeView4(scores.data(), DType::kF32, 1, 1, nqb, nkb);
    p.out = MakeView4(out.data(), DType::kU8, 1, 1, nqb, nkb);
    p.causal = true;
    p.align = c.align;
    p.top_k = 2;
    ASSERT_TRUE(SelectBlocks(p, Context()).ok());
    for (int64_t I = 0; I < nqb; ++I) {
      const int64_t allowed = c.allowed[static_cast<size_t>(I)];
      ASSERT_EQ(Allowed(p, I, nkb), allowed) << "case table vs rule, I " << I;
      std::string row, expected;
      for (int64_t J = 0; J < nkb; ++J) {
        row += out[static_cast<size_t>(I * nkb + J)] ? '#' : '.';
        // The diagonal, plus the best other allowed block (the highest J below it).
        const bool keep = J == allowed - 1 || (allowed >= 2 && J == allowed - 2);
        expected += keep ? '#' : '.';
      }
      EXPECT_EQ(row, expected) << "sq " << c.sq << " sk " << c.sk << " I " << I;
    }
  }
}

TEST(MaskBuilders, SelectTiesGoToTheLowerKeyBlock) {
  BlockSelectParams p;
  p.q = MakeView4(nullptr, DType::kF32, 1, 32, 1, 8);
  p.k = MakeView4(nullptr, DType::kF32, 1, 96, 1, 8);
  std::vector<float> scores(12, 0.5f);
  std::vector<uint8_t> out(12, kSentinel);
  p.block_q = 16;
  p.block_k = 16;
  p.scores = MakeView4(scores.data(), DType::kF32, 1, 1, 2, 6);
  p.out = MakeView4(out.data(), DType::kU8, 1, 1, 2, 6);
  p.top_k = 2;
  ASSERT_TRUE(SelectBlocks(p, Context()).ok());
  EXPECT_EQ(out, (std::vector<uint8_t>{1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0}));
  // Threshold 0.45 of six equal masses: three blocks, the lowest indices.
  p.top_k = 0;
  p.threshold = 0.45f;
  ASSERT_TRUE(SelectBlocks(p, Context()).ok());
  EXPECT_EQ(out, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0}));
}

TEST(MaskBuilders, SelectIsTheSameForEveryThreadCount) {
  Selection one = MakeSelection(DType::kF16, 2, 200, 333, 6, 3, 72, 32, 16, 4);
  Selection many = MakeSelection(DType::kF16, 2, 200, 333, 6, 3, 72, 32, 16, 4);
  for (Selection* s : {&one, &many}) {
    s->p.threshold = 0.7f;
    s->p.causal = true;
  }
  ASSERT_TRUE(one.Run(1).ok());
  ASSERT_TRUE(many.Run(3).ok());
  EXPECT_EQ(one.out, many.out);
}

// ---------------------------------------------------------------------------------------------
// Rejected arguments: a Status naming the argument, and the output left as it was.

void ExpectRejected(const Status& s, const std::string& name, const std::vector<uint8_t>& out) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(s.message().rfind(name, 0), 0u)
      << "message should start with '" << name << "': " << s.message();
  for (uint8_t x : out) ASSERT_EQ(x, kSentinel) << "output written on error";
}

TEST(MaskBuilders, SelectRejectsBadArguments) {
  struct Bad {
    const char* name;
    std::function<void(BlockSelectParams*, std::vector<float>*, std::vector<uint8_t>*)> edit;
  };
  const Bad bad[] = {
      {"block_q", [](BlockSelectParams* p, auto*, auto*) { p->block_q = 0; }},
      {"block_q", [](BlockSelectParams* p, auto*, auto*) { p->block_q = 24; }},
      {"block_k", [](BlockSelectParams* p, auto*, auto*) { p->block_k = -16; }},
      {"top_k", [](BlockSelectParams* p, auto*, auto*) { p->top_k = -1; }},
      {"threshold",
       [](BlockSelectParams* p, auto*, auto*) {
         p->top_k = 0;
         p->threshold = 0.0f;
       }},
      {"threshold",
       [](BlockSelectParams* p, auto*, auto*) {
         p->top_k = 0;
         p->threshold = 1.5f;
       }},
      {"threshold",
       [](BlockSelectParams* p, auto*, auto*) {
         p->top_k = 0;
         p->threshold = std::numeric_limits<float>::quiet_NaN();
       }},
      {"scale", [](BlockSelectParams* p, auto*,
                   auto*) { p->scale = std::numeric_limits<float>::infinity(); }},
      {"align", [](BlockSelectParams* p, auto*, auto*) { p->align = static_cast<MaskAlign>(7); }},
      {"q", [](BlockSelectParams* p, auto*, auto*) { p->q.rank = 3; }},
      {"q", [](BlockSelectParams* p, auto*, auto*) { p->q.data = nullptr; }},
      {"q", [](BlockSelectParams* p, auto*, auto*) { p->q.dtype = DType::kI32; }},
      {"k", [](BlockSelectParams* p, auto*, auto*) { p->k.shape[0] = 3; }},
      {"k", [](BlockSelectParams* p, auto*, auto*) { p->k.dtype = DType::kBF16; }},
      {"k", [](BlockSelectParams* p, auto*, auto*) { p->k.shape[3] = 4; }},
      {"k", [](BlockSelectParams* p, auto*, auto*) { p->k.shape[2] = 3; }},
      {"out", [](BlockSelectParams* p, auto*, auto*) { p->out.shape[3] += 1; }},
      {"out", [](BlockSelectParams* p, auto*, auto*) { p->out.dtype = DType::kF32; }},
      {"out", [](BlockSelectParams* p, auto*, auto*) { p->out.strides[1] = 0; }},
      {"scores", [](BlockSelectParams* p, std::vector<float>* scores,
                    auto*) { p->scores = MakeView4(scores->data(), DType::kF32, 2, 4, 3, 5); }},
      {"scores", [](BlockSelectParams* p, std::vector<float>* scores,
                    auto*) { p->scores = MakeView4(scores->data(), DType::kBF16, 2, 4, 3, 4); }},
  };
  for (const Bad& b : bad) {
    Selection s = MakeSelection(DType::kF32, 2, 48, 64, 4, 2, 8, 16, 16, 5);
    s.p.top_k = 2;
    std::vector<float> scores(2 * 4 * 3 * 5, 0.0f);
    b.edit(&s.p, &scores, &s.out);
    ExpectRejected(s.Run(), b.name, s.out);
  }
}

TEST(MaskBuilders, BuildersRejectBadArguments) {
  std::vector<uint8_t> out(64, kSentinel);
  auto s2 = [&](const std::function<void(S2MaskParams*)>& edit, int64_t heads = 2) {
    S2MaskParams p;
    p.heads = 2;
    p.num_q_blocks = 4;
    p.num_k_blocks = 4;
    edit(&p);
    p.out = MakeView4(out.data(), DType::kU8, 1, heads, 4, 4);
    return BuildS2BlockMask(p, Context());
  };
  ExpectRejected(s2([](S2MaskParams* p) { p->heads = 0; }), "heads", out);
  ExpectRejected(s2([](S2MaskParams* p) { p->num_q_blocks = -1; }), "num_q_blocks", out);
  ExpectRejected(s2([](S2MaskParams* p) { p->num_k_blocks = -2; }), "num_k_blocks", out);
  ExpectRejected(s2([](S2MaskParams* p) { p->local_blocks = 0; }), "local_blocks", out);
  ExpectRejected(s2([](S2MaskParams* p) { p->vert_stride = 0; }), "vert_stride", out);
  ExpectRejected(s2([](S2MaskParams*) {}, 3), "out", out);
  ExpectRejected(BuildS2BlockMask(S2MaskParams{2, 4, 4, 1, 1, 0, true,
                                               MakeView4(out.data(), DType::kF32, 1, 2, 4, 4)},
                                  Context()),
                 "out", out);

  auto radial = [&](const std::function<void(RadialMaskParams*)>& edit, int64_t nb = 4) {
    RadialMaskParams p;
    p.frames = 2;
    p.tokens_per_frame = 32;
    p.block = 16;
    edit(&p);
    p.out = MakeView4(out.data(), DType::kU8, 1, 1, nb, nb);
    return BuildRadialBlockMask(p, Context());
  };
  ExpectRejected(radial([](RadialMaskParams* p) { p->frames = -1; }), "frames", out);
  ExpectRejected(radial([](RadialMaskParams* p) { p->tokens_per_frame = -1; }), "tokens_per_frame",
                 out);
  ExpectRejected(radial([](RadialMaskParams* p) { p->tokens_per_frame = int64_t{1} << 40; }),
                 "frames * tokens_per_frame", out);
  ExpectRejected(radial([](RadialMaskParams* p) { p->block = 20; }), "block", out);
  ExpectRejected(radial([](RadialMaskParams* p) { p->decay_factor = 0.0; }), "decay_factor", out);
  ExpectRejected(radial([](RadialMaskParams* p) {
                   p->decay_factor = std::numeric_limits<double>::quiet_NaN();
                 }),
                 "decay_factor", out);
  ExpectRejected(radial([](RadialMaskParams*) {}, 5), "out", out);
}

}  // namespace
}  // namespace tessera
