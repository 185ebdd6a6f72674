// SPDX-License-Identifier: Apache-2.0
// The forward kernel under every mask of tessera/mask.h: against the fp64 reference, against the
// same kernel with the mask materialized as a dense additive mask (the fallback as oracle), and
// the identities (all-ones block mask = no mask, window >= S = causal, K = L neighborhood =
// full attention, stride = K neighborhood = block diagonal).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ref/attention_ref.h"
#include "tessera/attention.h"
#include "tessera/mask.h"
#include "tolerances.h"

namespace tessera {
namespace {

struct Shape {
  int64_t batch = 1, seq_q = 0, seq_k = 0, heads_q = 2, heads_kv = 1, dim = 40;
};

// Random f32 q, k, v of one shape, and the runs of the forward on them.
class MaskCase {
 public:
  explicit MaskCase(const Shape& s, uint64_t seed = 7) : s_(s) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill = [&](std::vector<float>* x, int64_t n) {
      x->resize(static_cast<size_t>(n));
      for (float& v : *x) v = normal(rng);
    };
    fill(&q_, s.batch * s.seq_q * s.heads_q * s.dim);
    fill(&k_, s.batch * s.seq_k * s.heads_kv * s.dim);
    fill(&v_, s.batch * s.seq_k * s.heads_kv * s.dim);
  }

  AttentionParams Params(std::vector<float>* out) {
    out->assign(q_.size(), std::numeric_limits<float>::quiet_NaN());
    AttentionParams p;
    p.q = MakeView4(q_.data(), DType::kF32, s_.batch, s_.seq_q, s_.heads_q, s_.dim);
    p.k = MakeView4(k_.data(), DType::kF32, s_.batch, s_.seq_k, s_.heads_kv, s_.dim);
    p.v = MakeView4(v_.data(), DType::kF32, s_.batch, s_.seq_k, s_.heads_kv, s_.dim);
    p.out = MakeView4(out->data(), DType::kF32, s_.batch, s_.seq_q, s_.heads_q, s_.dim);
    return p;
  }

  // The kernel's output for the options set by `set`, with `threads` threads.
  std::vector<float> Run(const std::function<void(AttentionParams&)>& set, int32_t threads = 2) {
    std::vector<float> out;
    AttentionParams p = Params(&out);
    set(p);
    Context ctx;
    ctx.num_threads = threads;
    const Status st = AttentionForward(p, ctx);
    EXPECT_TRUE(st.ok()) << st.message();
    return out;
  }

  // The fp64 reference for the same options.
  std::vector<double> Reference(const std::function<void(AttentionParams&)>& set) {
    std::vector<float> out;
    AttentionParams p = Params(&out);
    set(p);
    std::vector<double> ref(q_.size()), lse(static_cast<size_t>(s_.batch * s_.heads_q * s_.seq_q));
    ref::AttentionForwardF64(p, ref.data(), lse.data());
    return ref;
  }

  // The mask of `set` materialized by the reference as an f32 additive mask [B, Hq, Sq, Sk].
  std::vector<float> Materialized(const std::function<void(AttentionParams&)>& set) {
    std::vector<float> out;
    AttentionParams p = Params(&out);
    set(p);
    std::vector<double> bias;
    ref::MaterializeMask(p, &bias);
    return std::vector<float>(bias.begin(), bias.end());
  }

  // Kernel and fp64 gradients (dq, dk, dv concatenated) for a random dout, with the forward's
  // out and LSE from the kernel (none for sigmoid).
  void Gradients(const std::function<void(AttentionParams&)>& set, std::vector<float>* got,
                 std::vector<double>* want) {
    std::vector<float> out;
    AttentionBackwardParams bp;
    bp.forward = Params(&out);
    set(bp.forward);
    const bool sigmoid = bp.forward.mask.score == ScoreFunction::kSigmoid;
    std::vector<float> lse(static_cast<size_t>(s_.batch * s_.heads_q * s_.seq_q));
    if (!sigmoid)
      bp.forward.lse = MakeView3(lse.data(), DType::kF32, s_.batch, s_.heads_q, s_.seq_q);
    Context ctx;
    ctx.num_threads = 2;
    Status st = AttentionForward(bp.forward, ctx);
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<float> dout(q_.size()), dq(q_.size()), dk(k_.size()), dv(v_.size());
    std::mt19937_64 rng(99);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : dout) x = normal(rng);
    bp.dout = MakeView4(dout.data(), DType::kF32, s_.batch, s_.seq_q, s_.heads_q, s_.dim);
    bp.dq = MakeView4(dq.data(), DType::kF32, s_.batch, s_.seq_q, s_.heads_q, s_.dim);
    bp.dk = MakeView4(dk.data(), DType::kF32, s_.batch, s_.seq_k, s_.heads_kv, s_.dim);
    bp.dv = MakeView4(dv.data(), DType::kF32, s_.batch, s_.seq_k, s_.heads_kv, s_.dim);
    st = AttentionBackward(bp, ctx);
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<double> rq(dq.size()), rk(dk.size()), rv(dv.size());
    ref::AttentionBackwardF64(bp, rq.data(), rk.data(), rv.data());
    *got = dq;
    got->insert(got->end(), dk.begin(), dk.end());
    got->insert(got->end(), dv.begin(), dv.end());
    *want = rq;
    want->insert(want->end(), rk.begin(), rk.end());
    want->insert(want->end(), rv.begin(), rv.end());
  }

  const Shape& shape() const { return s_; }

 private:
  Shape s_;
  std::vector<float> q_, k_, v_;
};

std::vector<double> ToDouble(const std::vector<float>& a) {
  return std::vector<double>(a.begin(), a.end());
}

// The f32 output ceiling (tests/tolerances.h) against the fp64 reference.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol =
        test::kOutputCeilingF32.atol + test::kOutputCeilingF32.rtol * std::fabs(want[i]);
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol)
        << what << " at element " << i << ": got " << got[i] << ", want " << want[i];
  }
}

// Gradients under the mask against fp64 (the f32 gradient ceiling of tests/tolerances.h).
void CheckGradients(MaskCase& c, const std::function<void(AttentionParams&)>& set,
                    const std::string& what) {
  std::vector<float> got;
  std::vector<double> want;
  c.Gradients(set, &got, &want);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = test::kGradCeilingF32.atol + test::kGradCeilingF32.rtol * std::fabs(want[i]);
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol)
        << what << " gradient element " << i << ": got " << got[i] << ", want " << want[i];
  }
}

// The structured mask against the fp64 reference, and against the kernel with the same mask as a
// dense additive fallback (same score function and window options).
void CheckMask(MaskCase& c, const std::function<void(AttentionParams&)>& set,
               const std::string& what) {
  const std::vector<float> got = c.Run(set);
  ExpectClose(got, c.Reference(set), what + " vs fp64");
  std::vector<float> dense = c.Materialized(set);
  const Shape& s = c.shape();
  const auto with_dense = [&](AttentionParams& p) {
    set(p);
    const ScoreFunction score = p.mask.score;
    const float bias = p.mask.sigmoid_bias;
    p.causal = false;
    p.window_left = p.window_right = -1;
    p.mask = MaskParams();
    p.mask.score = score;
    p.mask.sigmoid_bias = bias;
    p.mask.dense = MakeView4(dense.data(), DType::kF32, s.batch, s.heads_q, s.seq_q, s.seq_k);
  };
  ExpectClose(got, ToDouble(c.Run(with_dense)), what + " vs dense fallback");
  CheckGradients(c, set, what + " backward");
}

// ---------------------------------------------------------------------------------------------
// Block-sparse.

std::vector<uint8_t> RandomBlocks(int64_t n, double density, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution keep(density);
  std::vector<uint8_t> b(static_cast<size_t>(n));
  for (uint8_t& x : b) x = keep(rng) ? 1 : 0;
  return b;
}

TEST(FlashMask, AllOnesBlockMaskEqualsDense) {
  for (const int64_t bs : {16, 32, 128}) {
    for (const bool causal : {false, true}) {
      MaskCase c(Shape{1, 203, 113, 4, 2, 40});
      const int64_t nqb = (203 + bs - 1) / bs, nkb = (113 + bs - 1) / bs;
      std::vector<uint8_t> ones(static_cast<size_t>(nqb * nkb), 1);
      const auto plain = [&](AttentionParams& p) { p.causal = causal; };
      const auto blocked = [&](AttentionParams& p) {
        p.causal = causal;
        p.mask.blocks = MakeView4(ones.data(), DType::kU8, 1, 1, nqb, nkb);
        p.mask.block_q = p.mask.block_k = bs;
      };
      ExpectClose(c.Run(blocked), ToDouble(c.Run(plain)),
                  "block " + std::to_string(bs) + (causal ? " causal" : ""));
    }
  }
}

TEST(FlashMask, RandomBlockMasks) {
  // Per-head masks under GQA (rows of one task disagree on blocks), broadcast masks, bool dtype.
  for (const double density : {0.0, 0.2, 0.6}) {
    for (const bool per_head : {false, true}) {
      MaskCase c(Shape{2, 150, 260, 4, 2, 64});
      const int64_t bq = 32, bk = 48, nqb = 5, nkb = 6, hm = per_head ? 4 : 1;
      std::vector<uint8_t> blocks = RandomBlocks(2 * hm * nqb * nkb, density, 11);
      CheckMask(
          c,
          [&](AttentionParams& p) {
            p.mask.blocks =
                MakeView4(blocks.data(), per_head ? DType::kU8 : DType::kBool, 2, hm, nqb, nkb);
            p.mask.block_q = bq;
            p.mask.block_k = bk;
          },
          "blocks density " + std::to_string(density) + (per_head ? " per head" : ""));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Neighborhood attention.

NeighborhoodMask Nbhd(std::vector<int64_t> grid, std::vector<int64_t> window,
                      std::vector<int64_t> dilation = {}, std::vector<int64_t> stride = {},
                      std::vector<bool> causal = {}) {
  NeighborhoodMask n;
  n.rank = static_cast<int32_t>(grid.size());
  for (size_t a = 0; a < grid.size(); ++a) {
    n.grid[a] = grid[a];
    n.window[a] = window[a];
    if (!dilation.empty()) n.dilation[a] = dilation[a];
    if (!stride.empty()) n.stride[a] = stride[a];
    if (!causal.empty()) n.causal[a] = causal[a];
  }
  return n;
}

TEST(FlashMask, NeighborhoodFullWindowEqualsDense) {
  MaskCase c(Shape{1, 12 * 10, 12 * 10, 2, 2, 32});
  const auto full = [&](AttentionParams& p) { p.mask.neighborhood = Nbhd({12, 10}, {12, 10}); };
  ExpectClose(c.Run(full), ToDouble(c.Run([](AttentionParams&) {})), "K = L");
}

TEST(FlashMask, Neighborhood1D2D3D) {
  struct Case {
    std::vector<int64_t> grid, window, dilation, stride;
    std::vector<bool> causal;
  };
  const std::vector<Case> cases = {
      {{203}, {13}, {1}, {1}, {false}},
      {{203}, {8}, {3}, {1}, {false}},
      {{203}, {16}, {1}, {16}, {false}},
      {{203}, {9}, {2}, {4}, {true}},
      {{19, 23}, {7, 5}, {1, 1}, {1, 1}, {false, false}},
      {{19, 23}, {4, 6}, {2, 3}, {2, 3}, {false, true}},
      {{24, 24}, {8, 8}, {1, 1}, {8, 8}, {false, false}},
      {{5, 9, 11}, {3, 5, 4}, {1, 1, 2}, {1, 2, 1}, {true, false, false}},
      {{6, 7, 8}, {2, 3, 3}, {2, 1, 2}, {1, 1, 3}, {false, true, false}},
  };
  for (const Case& k : cases) {
    int64_t n = 1;
    for (int64_t g : k.grid) n *= g;
    MaskCase c(Shape{1, n, n, 2, 1, 40});
    std::string name = "grid";
    for (int64_t g : k.grid) name += " " + std::to_string(g);
    CheckMask(
        c,
        [&](AttentionParams& p) {
          p.mask.neighborhood = Nbhd(k.grid, k.window, k.dilation, k.stride, k.causal);
        },
        name);
  }
}

// Whether key coordinate y is visible from query coordinate x on one axis of a neighborhood mask,
// from the definition in tessera/mask.h written as a window start (NATTEN's form), independently
// of the reference's centre-clamp form: within the dilation group, non-causal, the K keys
// [start, start + K) with start = leader - K / 2 moved inside the group (an even K puts K / 2 keys
// before the leader and K / 2 - 1 after it); causal, the K keys ending at the leader, none past x.
bool AxisVisible(int64_t x, int64_t y, int64_t L, int64_t K, int64_t d, int64_t s, bool causal) {
  if (x % d != y % d) return false;
  const int64_t len = (L - x % d + d - 1) / d;  // tokens of the dilation group
  const int64_t xi = x / d, yi = y / d;
  const int64_t group_start = xi / s * s;  // the query's stride group
  if (causal) {
    const int64_t leader = std::min(group_start + s - 1, len - 1);
    return yi <= xi && yi > leader - K;
  }
  const int64_t leader = std::min(group_start + s / 2, len - 1);
  const int64_t start = std::clamp<int64_t>(leader - K / 2, 0, len - K);
  return yi >= start && yi < start + K;
}

// The neighborhood mask as a dense f32 additive mask [n, n] (0 visible, -inf hidden).
std::vector<float> NeighborhoodByDefinition(const NeighborhoodMask& m) {
  int64_t n = 1;
  for (int a = 0; a < m.rank; ++a) n *= m.grid[a];
  std::vector<float> bias(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      bool visible = true;
      for (int64_t a = m.rank - 1, qi = i, kj = j; a >= 0; --a) {  // row-major: last axis fastest
        const int64_t L = m.grid[a];
        visible = visible && AxisVisible(qi % L, kj % L, L, m.window[a], m.dilation[a], m.stride[a],
                                         m.causal[a]);
        qi /= L;
        kj /= L;
      }
      bias[static_cast<size_t>(i * n + j)] =
          visible ? 0.0f : -std::numeric_limits<float>::infinity();
    }
  }
  return bias;
}

// Even windows (K / 2 keys before the leader, K / 2 - 1 after), a second oracle beside the
// reference: the reference's materialized mask equals the definition above, and the kernel
// (forward and backward) matches fp64 run with the definition as a dense mask, on 1-3 axes with
// dilations, strides and causal axes.
TEST(FlashMask, EvenNeighborhoodWindowsMatchTheDefinition) {
  struct Case {
    std::vector<int64_t> grid, window, dilation, stride;
    std::vector<bool> causal;
  };
  const std::vector<Case> cases = {
      {{40}, {4}, {1}, {1}, {false}},
      {{40}, {6}, {3}, {1}, {false}},
      {{41}, {8}, {2}, {2}, {true}},
      {{40}, {4}, {1}, {4}, {false}},
      {{37}, {6}, {2}, {3}, {false}},
      {{12, 10}, {4, 6}, {1, 1}, {1, 1}, {false, false}},
      {{12, 10}, {2, 4}, {2, 2}, {2, 1}, {true, false}},
      {{9, 16}, {4, 8}, {1, 2}, {3, 4}, {false, true}},
      {{4, 6, 8}, {2, 4, 2}, {1, 1, 2}, {1, 2, 1}, {true, false, false}},
      {{5, 6, 7}, {4, 2, 6}, {1, 3, 1}, {2, 1, 3}, {false, false, true}},
  };
  for (const Case& k : cases) {
    const NeighborhoodMask m = Nbhd(k.grid, k.window, k.dilation, k.stride, k.causal);
    int64_t n = 1;
    std::string name = "grid";
    for (size_t a = 0; a < k.grid.size(); ++a) {
      n *= k.grid[a];
      name += " " + std::to_string(k.grid[a]) + "/K" + std::to_string(k.window[a]) + "/d" +
              std::to_string(k.dilation[a]) + "/s" + std::to_string(k.stride[a]) +
              (k.causal[a] ? "c" : "");
    }
    SCOPED_TRACE(name);
    MaskCase c(Shape{1, n, n, 2, 1, 40});
    const std::vector<float> mask = NeighborhoodByDefinition(m);
    const auto structured = [&](AttentionParams& p) { p.mask.neighborhood = m; };
    const auto dense = [&](AttentionParams& p) {
      p.mask.dense = MakeView4(const_cast<float*>(mask.data()), DType::kF32, 1, 1, n, n);
    };
    const std::vector<float> reference_mask = c.Materialized(structured);  // [1, Hq, n, n]
    for (size_t e = 0; e < reference_mask.size(); ++e) {
      ASSERT_EQ(reference_mask[e] == 0.0f, mask[e % mask.size()] == 0.0f)
          << "head " << e / mask.size() << " query " << e % mask.size() / static_cast<size_t>(n)
          << " key " << e % static_cast<size_t>(n) << ": the reference and the definition differ";
    }
    ExpectClose(c.Run(structured), c.Reference(dense), "forward vs fp64 with the definition");
    std::vector<float> got, unused_f;
    std::vector<double> want, unused_d;
    c.Gradients(structured, &got, &unused_d);
    c.Gradients(dense, &unused_f, &want);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      const double tol =
          test::kGradCeilingF32.atol + test::kGradCeilingF32.rtol * std::fabs(want[i]);
      ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol)
          << "gradient element " << i << ": got " << got[i] << ", fp64 with the definition "
          << want[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sinks, prefix, documents, token groups, tree.

TEST(FlashMask, SinksPrefixDocumentsGroups) {
  const int64_t n = 211;
  MaskCase c(Shape{2, n, n, 4, 2, 40});
  std::vector<int32_t> docs(static_cast<size_t>(2 * n));
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t j = 0; j < n; ++j) {
      docs[static_cast<size_t>(b * n + j)] = static_cast<int32_t>(b == 0 ? j / 50 : (j * j) / 4000);
    }
  }
  const std::vector<std::pair<std::string, std::function<void(AttentionParams&)>>> masks = {
      {"sink 4 + window 31",
       [](AttentionParams& p) {
         p.causal = true;
         p.window_left = 30;
         p.mask.sink_tokens = 4;
       }},
      {"prefix 37 causal",
       [](AttentionParams& p) {
         p.causal = true;
         p.mask.prefix_len = 37;
       }},
      {"documents causal",
       [&](AttentionParams& p) {
         p.causal = true;
         p.mask.document_ids = MakeView3(docs.data(), DType::kI32, 2, n, 1);
         p.mask.document_ids.rank = 2;
       }},
      {"documents bidirectional + prefix",
       [&](AttentionParams& p) {
         p.mask.document_ids = MakeView3(docs.data(), DType::kI32, 2, n, 1);
         p.mask.document_ids.rank = 2;
         p.mask.prefix_len = 10;
       }},
  };
  for (const auto& [name, set] : masks) CheckMask(c, set, name);

  MaskCase g(Shape{1, 208, 208, 4, 2, 40});
  CheckMask(
      g,
      [](AttentionParams& p) {
        p.causal = true;
        p.mask.group_size = 52;
      },
      "LongLoRA shifted groups");
  CheckMask(
      g,
      [](AttentionParams& p) {
        p.causal = true;
        p.mask.group_size = 52;
        p.mask.shift_half_heads = false;
        p.mask.sink_tokens = 4;
      },
      "SinkLoRA groups + sinks");
}

TEST(FlashMask, WindowCoveringEverythingEqualsCausal) {
  MaskCase c(Shape{1, 150, 150, 2, 2, 32});
  const auto causal = [](AttentionParams& p) { p.causal = true; };
  const auto windowed = [](AttentionParams& p) {
    p.causal = true;
    p.window_left = 150;
    p.mask.sink_tokens = 3;
  };
  ExpectClose(c.Run(windowed), ToDouble(c.Run(causal)), "window >= S with sinks");
}

TEST(FlashMask, Tree) {
  const int64_t prefix = 300, nodes = 13;
  std::vector<int32_t> parents = {-1, 0, 0, 1, 1, 2, -1, 6, 3, 8, 8, 5, 11};
  MaskCase c(Shape{1, nodes, prefix + nodes, 4, 1, 64});
  CheckMask(
      c,
      [&](AttentionParams& p) {
        p.mask.tree_parents = MakeView1(parents.data(), DType::kI32, nodes);
      },
      "tree");
  // A chain is causal decode of the nodes.
  std::vector<int32_t> chain(static_cast<size_t>(nodes));
  std::iota(chain.begin(), chain.end(), -1);
  const auto tree = [&](AttentionParams& p) {
    p.mask.tree_parents = MakeView1(chain.data(), DType::kI32, nodes);
  };
  ExpectClose(c.Run(tree), c.Reference([](AttentionParams& p) { p.causal = true; }), "chain");
}

// ---------------------------------------------------------------------------------------------
// Dense fallback and sigmoid.

TEST(FlashMask, DenseBoolAndAdditive) {
  MaskCase c(Shape{2, 77, 190, 4, 2, 40});
  std::vector<uint8_t> vis = RandomBlocks(77 * 190, 0.3, 5);
  std::vector<float> add(static_cast<size_t>(2 * 4 * 77 * 190));
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> u(-3.0f, 1.0f);
  for (float& x : add) x = u(rng) < -2.5f ? -std::numeric_limits<float>::infinity() : u(rng);
  CheckMask(
      c,
      [&](AttentionParams& p) {
        p.mask.dense = MakeView3(vis.data(), DType::kU8, 77, 190, 1);
        p.mask.dense.rank = 2;
      },
      "dense bool [Sq, Sk]");
  CheckMask(
      c,
      [&](AttentionParams& p) {
        p.causal = true;
        p.mask.dense = MakeView4(add.data(), DType::kF32, 2, 4, 77, 190);
      },
      "dense additive + causal");
}

TEST(FlashMask, Sigmoid) {
  MaskCase c(Shape{1, 130, 170, 4, 2, 64});
  CheckMask(
      c,
      [](AttentionParams& p) {
        p.mask.score = ScoreFunction::kSigmoid;
        p.mask.sigmoid_bias = -std::log(170.0f);
      },
      "sigmoid");
  MaskCase grid(Shape{1, 170, 170, 4, 2, 64});
  CheckMask(
      grid,
      [](AttentionParams& p) {
        p.causal = true;
        p.softcap = 5.0f;
        p.mask.score = ScoreFunction::kSigmoid;
        p.mask.neighborhood = Nbhd({10, 17}, {5, 5});
      },
      "sigmoid + softcap + causal + neighborhood");
}

TEST(FlashMask, ThreadCountInvariance) {
  MaskCase c(Shape{1, 24 * 24, 24 * 24, 4, 2, 64});
  const auto set = [](AttentionParams& p) {
    p.mask.neighborhood = Nbhd({24, 24}, {7, 9}, {2, 1}, {1, 3});
  };
  const std::vector<float> one = c.Run(set, 1);
  for (const int32_t t : {2, 3, 7}) {
    const std::vector<float> many = c.Run(set, t);
    ASSERT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(float)))
        << t << " threads";
  }
}

// ---------------------------------------------------------------------------------------------
// Errors: named argument, nothing written.

TEST(FlashMask, BadMasksAreRejected) {
  MaskCase c(Shape{1, 64, 64, 2, 1, 32});
  std::vector<uint8_t> blocks(16, 1);
  std::vector<int32_t> docs = {0, 1, 0};
  std::vector<int32_t> parents(64, -1);  // i32 [Sq]
  std::vector<int32_t> cyclic(64, -1);
  cyclic[0] = 0;  // parents[t] must be < t
  const std::vector<std::pair<std::string, std::function<void(AttentionParams&)>>> bad = {
      {"mask.block_q",
       [&](AttentionParams& p) {
         p.mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 4, 4);
         p.mask.block_q = 24;
         p.mask.block_k = 16;
       }},
      {"mask.blocks",
       [&](AttentionParams& p) {
         p.mask.blocks = MakeView4(blocks.data(), DType::kU8, 1, 1, 2, 8);
         p.mask.block_q = p.mask.block_k = 16;
       }},
      {"mask.blocks",
       [&](AttentionParams& p) {
         p.mask.blocks = MakeView4(blocks.data(), DType::kF32, 1, 1, 2, 2);
         p.mask.block_q = p.mask.block_k = 32;
       }},
      {"mask.neighborhood.grid",
       [](AttentionParams& p) {
         p.mask.neighborhood = Nbhd({8, 9}, {3, 3});
       }},
      {"mask.neighborhood.window",
       [](AttentionParams& p) {
         p.mask.neighborhood = Nbhd({8, 8}, {3, 9});
       }},
      {"mask.neighborhood.stride",
       [](AttentionParams& p) {
         p.mask.neighborhood = Nbhd({8, 8}, {3, 3}, {1, 1}, {1, 4});
       }},
      {"mask.document_ids",
       [&](AttentionParams& p) {
         p.mask.document_ids = MakeView3(docs.data(), DType::kI32, 1, 3, 1);
         p.mask.document_ids.rank = 2;
       }},
      {"mask.group_size", [](AttentionParams& p) { p.mask.group_size = 5; }},
      {"mask.tree_parents",
       [&](AttentionParams& p) {
         p.mask.tree_parents = MakeView1(cyclic.data(), DType::kI32, 64);
       }},
      {"mask.tree_parents",
       [&](AttentionParams& p) {
         p.mask.tree_parents = MakeView1(parents.data(), DType::kI32, 1);  // not Sq entries
       }},
      {"mask.tree_parents",
       [&](AttentionParams& p) {
         p.mask.tree_parents = MakeView1(parents.data(), DType::kF32, 64);
       }},
      {"mask.tree_parents",
       [&](AttentionParams& p) {
         p.mask.tree_parents = MakeView1(parents.data(), DType::kI32, 32);
         p.mask.tree_parents.shape[0] = 64;
         p.mask.tree_parents.strides[0] = 0;  // not unit stride
       }},
      {"mask.sink_tokens", [](AttentionParams& p) { p.mask.sink_tokens = -1; }},
      {"lse",
       [](AttentionParams& p) {
         static float lse[128];
         p.lse = MakeView3(lse, DType::kF32, 1, 2, 64);
         p.mask.score = ScoreFunction::kSigmoid;
       }},
  };
  for (const auto& [name, set] : bad) {
    std::vector<float> out;
    AttentionParams p = c.Params(&out);
    std::fill(out.begin(), out.end(), 7.0f);
    set(p);
    const Status st = AttentionForward(p, Context());
    EXPECT_FALSE(st.ok()) << name;
    EXPECT_NE(st.message().find(name), std::string::npos) << st.message();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; })) << name;
  }
}

}  // namespace
}  // namespace tessera
