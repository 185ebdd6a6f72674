// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/hyper_attention.cc: the fast path against the fp64 reference of the same
// algorithm with the same draws (ref/approx_hyper_ref.h), and the limits where HyperAttention is
// exact (one block covering the sequence, samples covering every outside key, fewer rows than
// min_seq_len), causality, determinism across thread counts and the option checks.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ref/approx_hyper_ref.h"
#include "tessera/approx.h"
#include "tessera/attention.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Tensor;

struct Case {
  int64_t batch = 1, seq = 64, heads_q = 2, heads_kv = 2, dim = 32;
  bool causal = false;
  HyperOptions hyper;
  uint64_t seed = 7;
  int64_t pad = 0;  // unused elements after each q row (strided input)
};

struct Inputs {
  Tensor q, k, v;
};

Inputs MakeInputs(const Case& c, const std::string& name) {
  test::Rng rng(test::SeedFor(name));
  Inputs in{Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim},
                   Tensor::PaddedStrides({c.batch, c.seq, c.heads_q, c.dim}, c.pad)),
            Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim}),
            Tensor(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim})};
  in.q.FillNormal(rng);
  in.k.FillNormal(rng);
  in.v.FillNormal(rng);
  return in;
}

ApproxParams Params(const Case& c, const Inputs& in, Tensor* out, Tensor* lse) {
  ApproxParams p;
  p.method = ApproxMethod::kHyper;
  p.q = in.q.view();
  p.k = in.k.view();
  p.v = in.v.view();
  p.out = out->view();
  if (lse != nullptr) p.lse = lse->view();
  p.causal = c.causal;
  p.seed = c.seed;
  p.hyper = c.hyper;
  return p;
}

Tensor Out(const Case& c) { return Tensor(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim}); }
Tensor Lse(const Case& c) { return Tensor(DType::kF32, {c.batch, c.heads_q, c.seq}); }

// ||a - b||_F / ||b||_F.
double RelError(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

// The exact kernel on the same inputs.
void RunExact(const Case& c, const Inputs& in, Tensor* out, Tensor* lse) {
  AttentionParams a;
  a.q = in.q.view();
  a.k = in.k.view();
  a.v = in.v.view();
  a.out = out->view();
  a.lse = lse->view();
  a.causal = c.causal;
  ASSERT_TRUE(AttentionForward(a, Context{}).ok());
}

void ExpectMatchesRef(const Case& c, const std::string& name) {
  SCOPED_TRACE(test::Repro(name));
  const Inputs in = MakeInputs(c, name);
  Tensor out = Out(c), lse = Lse(c);
  const ApproxParams p = Params(c, in, &out, &lse);
  const Status s = ApproxAttention(p, Context{});
  ASSERT_TRUE(s.ok()) << s.ToString();
  const size_t n = static_cast<size_t>(c.batch * c.seq * c.heads_q);
  std::vector<double> ref(n * static_cast<size_t>(c.dim)), ref_lse(n);
  ref::HyperForwardF64(p, ref.data(), ref_lse.data());
  // The scale of the fp32 rounding of each output: the same estimate over |V| (same draws).
  Tensor abs_v(DType::kF32, {c.batch, c.seq, c.heads_kv, c.dim});
  std::vector<double> vals = in.v.ToVector();
  for (double& x : vals) x = std::fabs(x);
  abs_v.FromVector(vals);
  ApproxParams pm = p;
  pm.v = abs_v.view();
  std::vector<double> magnitude(ref.size());
  ref::HyperForwardF64(pm, magnitude.data(), nullptr);
  EXPECT_TRUE(test::CheckOutput(DType::kF32, out.ToVector(), ref, nullptr, test::Rule::kStandard,
                                &magnitude));
  EXPECT_TRUE(test::CheckLse(lse.ToVector(), ref_lse));
  // Without an lse output (the causal halving then keeps its own): the same output, bitwise.
  Tensor out2 = Out(c);
  ASSERT_TRUE(ApproxAttention(Params(c, in, &out2, nullptr), Context{}).ok());
  EXPECT_TRUE(out2.BitwiseEqual(out));
}

TEST(HyperAttention, MatchesFp64RefNonCausal) {
  Case c;
  c.batch = 2;
  c.seq = 200;  // 7 blocks, the last one short
  c.heads_q = 4;
  c.heads_kv = 2;
  c.pad = 3;
  c.hyper.block = 32;
  c.hyper.samples = 24;
  c.hyper.lsh_bits = 4;
  c.hyper.min_seq_len = 0;
  ExpectMatchesRef(c, "HyperNonCausal");
}

TEST(HyperAttention, MatchesFp64RefCausal) {
  Case c;
  c.batch = 2;
  c.seq = 301;  // odd halves; pieces of 38 rows are exact, non-causal pieces of 37 rows too
  c.heads_q = 2;
  c.heads_kv = 1;
  c.causal = true;
  c.hyper.block = 16;
  c.hyper.samples = 20;
  c.hyper.lsh_bits = 9;
  c.hyper.min_seq_len = 40;
  ExpectMatchesRef(c, "HyperCausal");
}

// A block covering the whole sequence is exact attention (the samples then have no keys).
TEST(HyperAttention, OneBlockCoveringTheSequenceIsExact) {
  for (bool causal : {false, true}) {
    Case c;
    c.seq = 150;
    c.causal = causal;
    c.hyper.block = 160;
    c.hyper.samples = 8;
    c.hyper.min_seq_len = 0;
    const Inputs in = MakeInputs(c, "HyperOneBlock");
    Tensor out = Out(c), lse = Lse(c), exact = Out(c), exact_lse = Lse(c);
    ASSERT_TRUE(ApproxAttention(Params(c, in, &out, &lse), Context{}).ok());
    RunExact(c, in, &exact, &exact_lse);
    EXPECT_LT(RelError(out.ToVector(), exact.ToVector()), 1e-5) << "causal " << causal;
    EXPECT_TRUE(test::CheckClose(lse.ToVector(), exact_lse.ToVector(),
                                 test::IdentityCeiling(DType::kF32), "lse"));
  }
}

// Samples covering every key outside the block: weight 1, the exact result again.
TEST(HyperAttention, SamplesCoveringEveryKeyAreExact) {
  Case c;
  c.seq = 100;
  c.hyper.block = 16;
  c.hyper.samples = 100;
  c.hyper.min_seq_len = 0;
  const Inputs in = MakeInputs(c, "HyperAllSamples");
  Tensor out = Out(c), lse = Lse(c), exact = Out(c), exact_lse = Lse(c);
  ASSERT_TRUE(ApproxAttention(Params(c, in, &out, &lse), Context{}).ok());
  RunExact(c, in, &exact, &exact_lse);
  EXPECT_LT(RelError(out.ToVector(), exact.ToVector()), 1e-5);
}

// Fewer rows than min_seq_len: the exact kernel's result, bitwise.
TEST(HyperAttention, BelowMinSeqLenIsTheExactKernel) {
  for (bool causal : {false, true}) {
    Case c;
    c.seq = 96;
    c.causal = causal;
    c.hyper.block = 16;
    c.hyper.min_seq_len = 97;
    const Inputs in = MakeInputs(c, "HyperBelowMin");
    Tensor out = Out(c), lse = Lse(c), exact = Out(c), exact_lse = Lse(c);
    ASSERT_TRUE(ApproxAttention(Params(c, in, &out, &lse), Context{}).ok());
    RunExact(c, in, &exact, &exact_lse);
    EXPECT_TRUE(out.BitwiseEqual(exact)) << "causal " << causal;
    EXPECT_TRUE(lse.BitwiseEqual(exact_lse)) << "causal " << causal;
  }
}

// No future key or value reaches an output: changing k and v from row t0 on leaves rows < t0
// bitwise unchanged. (A future query can move an earlier one to another block of its piece: the
// blocks of the sorted order are formed over all the piece's queries; that block still holds
// past keys only.)
TEST(HyperAttention, CausalFutureKeysDoNotLeak) {
  Case c;
  c.seq = 200;
  c.causal = true;
  c.hyper.block = 16;
  c.hyper.samples = 16;
  c.hyper.min_seq_len = 32;
  Inputs in = MakeInputs(c, "HyperLeak");
  Tensor before = Out(c), after = Out(c);
  ASSERT_TRUE(ApproxAttention(Params(c, in, &before, nullptr), Context{}).ok());
  constexpr int64_t kT0 = 130;
  for (int64_t t = kT0; t < c.seq; ++t) {
    for (int64_t d = 0; d < c.dim; ++d) {
      in.k.Set({0, t, 1, d}, 5.0);
      in.v.Set({0, t, 0, d}, -3.0);
    }
  }
  ASSERT_TRUE(ApproxAttention(Params(c, in, &after, nullptr), Context{}).ok());
  for (int64_t t = 0; t < c.seq; ++t) {
    for (int64_t h = 0; h < c.heads_q; ++h) {
      for (int64_t d = 0; d < c.dim; ++d) {
        if (t < kT0) {
          ASSERT_EQ(before.Get({0, t, h, d}), after.Get({0, t, h, d})) << t << " " << h;
        }
      }
    }
  }
  EXPECT_FALSE(before.BitwiseEqual(after));  // the later rows did change
}

TEST(HyperAttention, SameResultForEveryThreadCount) {
  Case c;
  c.seq = 160;
  c.heads_q = 3;
  c.heads_kv = 1;
  c.causal = true;
  c.hyper.block = 16;
  c.hyper.samples = 12;
  c.hyper.min_seq_len = 16;
  const Inputs in = MakeInputs(c, "HyperThreads");
  Tensor one = Out(c), two = Out(c), lse1 = Lse(c), lse2 = Lse(c);
  Context ctx1, ctx2;
  ctx1.num_threads = 1;
  ctx2.num_threads = 2;
  ASSERT_TRUE(ApproxAttention(Params(c, in, &one, &lse1), ctx1).ok());
  ASSERT_TRUE(ApproxAttention(Params(c, in, &two, &lse2), ctx2).ok());
  EXPECT_TRUE(one.BitwiseEqual(two));
  EXPECT_TRUE(lse1.BitwiseEqual(lse2));
  // Another seed draws other hyperplanes and samples.
  Case c2 = c;
  c2.seed = c.seed + 1;
  Tensor other = Out(c2);
  ASSERT_TRUE(ApproxAttention(Params(c2, in, &other, nullptr), ctx2).ok());
  EXPECT_FALSE(one.BitwiseEqual(other));
}

TEST(HyperAttention, RejectsBadKnobsWritingNothing) {
  struct Bad {
    const char* field;
    void (*set)(HyperOptions*);
    const char* message;
  };
  const Bad cases[] = {
      {"block 20", [](HyperOptions* o) { o->block = 20; },
       "hyper.block: expected a positive multiple of 16, got 20"},
      {"block 0", [](HyperOptions* o) { o->block = 0; }, "hyper.block"},
      {"samples -1", [](HyperOptions* o) { o->samples = -1; },
       "hyper.samples: expected >= 0, got -1"},
      {"lsh_bits 0", [](HyperOptions* o) { o->lsh_bits = 0; },
       "hyper.lsh_bits: expected 1..16, got 0"},
      {"lsh_bits 17", [](HyperOptions* o) { o->lsh_bits = 17; }, "hyper.lsh_bits"},
      {"min_seq_len -1", [](HyperOptions* o) { o->min_seq_len = -1; }, "hyper.min_seq_len"},
  };
  Case c;
  const Inputs in = MakeInputs(c, "HyperBad");
  for (const Bad& b : cases) {
    Tensor out = Out(c), lse = Lse(c);
    out.Snapshot();
    lse.Snapshot();
    ApproxParams p = Params(c, in, &out, &lse);
    b.set(&p.hyper);
    const Status s = ApproxAttention(p, Context{});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(s.message().find(b.message), std::string::npos) << b.field << ": " << s.message();
    EXPECT_TRUE(out.Unchanged()) << b.field;
    EXPECT_TRUE(lse.Unchanged()) << b.field;
  }
}

}  // namespace
}  // namespace tessera
