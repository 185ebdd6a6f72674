// SPDX-License-Identifier: Apache-2.0
// Every bad input AttentionForward must reject (docs/testing.md §4.1): the status code, a message
// naming the argument, and outputs left bitwise untouched, on every forced path.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attention_cases.h"
#include "core/attention_problem.h"
#include "tessera/attention.h"
#include "test_util.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

constexpr int64_t kB = 2, kSq = 5, kSk = 7, kHq = 4, kHkv = 2, kD = 8;
constexpr double kSentinel = -7.25;  // outputs are pre-filled with it and must keep it
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
constexpr float kInff = std::numeric_limits<float>::infinity();

Tensor Output(DType dtype, std::vector<int64_t> shape) {
  Tensor t(dtype, std::move(shape));
  t.FillSlots(kSentinel);
  t.Snapshot();
  return t;
}

Tensor Input(DType dtype, std::vector<int64_t> shape, uint64_t seed) {
  Tensor t(dtype, std::move(shape));
  Rng rng(seed);
  t.FillNormal(rng);
  return t;
}

// Calls AttentionForward on every path and ValidateAttention directly; each must give `code`
// with a message naming `arg`, and no output may change.
void ExpectRejected(const AttentionParams& p, StatusCode code, const std::string& arg,
                    const std::vector<const Tensor*>& outputs) {
  AttentionProblem problem;
  const Status direct = ValidateAttention(p, &problem);
  EXPECT_EQ(direct.code(), code) << "ValidateAttention: " << direct.ToString();
  test::ExpectRejectedOnEveryPath([&](const Context& ctx) { return AttentionForward(p, ctx); },
                                  code, arg, outputs);
}

class ValidateTest : public ::testing::Test {
 protected:
  ValidateTest()
      : q_(Input(DType::kF32, {kB, kSq, kHq, kD}, 1)),
        k_(Input(DType::kF32, {kB, kSk, kHkv, kD}, 2)),
        v_(Input(DType::kF32, {kB, kSk, kHkv, kD}, 3)),
        out_(Output(DType::kF32, {kB, kSq, kHq, kD})),
        lse_(Output(DType::kF32, {kB, kHq, kSq})) {}

  // A valid dense problem: B = 2, Sq = 5, Sk = 7, Hq = 4, Hkv = 2, D = 8, f32, with LSE.
  AttentionParams Valid() const {
    AttentionParams p;
    p.q = q_.view();
    p.k = k_.view();
    p.v = v_.view();
    p.out = out_.view();
    p.lse = lse_.view();
    return p;
  }

  void Rejected(const AttentionParams& p, const std::string& arg,
                StatusCode code = StatusCode::kInvalidArgument,
                std::vector<const Tensor*> extra_outputs = {}) {
    extra_outputs.push_back(&out_);
    extra_outputs.push_back(&lse_);
    ExpectRejected(p, code, arg, extra_outputs);
  }

  Tensor q_, k_, v_, out_, lse_;
};

TEST_F(ValidateTest, ValidParamsPassValidation) {
  AttentionProblem problem;
  const Status s = ValidateAttention(Valid(), &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(problem.group, kHq / kHkv);
}

// --- Shapes ---------------------------------------------------------------------------------

TEST_F(ValidateTest, RankMismatch) {
  AttentionParams p = Valid();
  p.q.rank = 3;  // [B, Sq, Hq] without varlen
  Rejected(p, "q");
  p = Valid();
  p.k.rank = 5;
  Rejected(p, "k");
  p = Valid();
  p.v.rank = 0;
  Rejected(p, "v");
  p = Valid();
  p.out.rank = 2;
  Rejected(p, "out");
}

TEST_F(ValidateTest, NegativeShape) {
  AttentionParams p = Valid();
  p.q.shape[1] = -1;
  Rejected(p, "q");
}

TEST_F(ValidateTest, BatchMismatch) {
  Tensor k = Input(DType::kF32, {kB + 1, kSk, kHkv, kD}, 4);
  Tensor v = Input(DType::kF32, {kB + 1, kSk, kHkv, kD}, 5);
  AttentionParams p = Valid();
  p.k = k.view();
  p.v = v.view();
  Rejected(p, "k");
}

TEST_F(ValidateTest, HeadDimMismatchBetweenQAndK) {
  Tensor k = Input(DType::kF32, {kB, kSk, kHkv, kD + 1}, 4);
  AttentionParams p = Valid();
  p.k = k.view();
  Rejected(p, "k");
}

TEST_F(ValidateTest, VShapeDiffersFromK) {
  Tensor v_len = Input(DType::kF32, {kB, kSk + 1, kHkv, kD}, 4);
  AttentionParams p = Valid();
  p.v = v_len.view();
  Rejected(p, "v");
  Tensor v_heads = Input(DType::kF32, {kB, kSk, kHkv * 2, kD}, 5);
  p.v = v_heads.view();
  Rejected(p, "v");
}

TEST_F(ValidateTest, ValueHeadDimDifferentFromKeyIsUnimplemented) {
  Tensor v = Input(DType::kF32, {kB, kSk, kHkv, kD * 2}, 4);
  Tensor out = Output(DType::kF32, {kB, kSq, kHq, kD * 2});
  AttentionParams p = Valid();
  p.v = v.view();
  p.out = out.view();
  Rejected(p, "v", StatusCode::kUnimplemented, {&out});
}

TEST_F(ValidateTest, OutShapeDiffersFromQ) {
  Tensor out_len = Output(DType::kF32, {kB, kSq + 1, kHq, kD});
  AttentionParams p = Valid();
  p.out = out_len.view();
  Rejected(p, "out", StatusCode::kInvalidArgument, {&out_len});
  Tensor out_heads = Output(DType::kF32, {kB, kSq, kHq / 2, kD});
  p.out = out_heads.view();
  Rejected(p, "out", StatusCode::kInvalidArgument, {&out_heads});
}

TEST_F(ValidateTest, GqaHeadsNotDivisible) {
  // 7 query heads over 2 KV heads: never floor-divide.
  Tensor q = Input(DType::kF32, {kB, kSq, 7, kD}, 4);
  Tensor out = Output(DType::kF32, {kB, kSq, 7, kD});
  Tensor lse = Output(DType::kF32, {kB, 7, kSq});
  AttentionParams p = Valid();
  p.q = q.view();
  p.out = out.view();
  p.lse = lse.view();
  Rejected(p, "k", StatusCode::kInvalidArgument, {&out, &lse});
}

TEST_F(ValidateTest, ZeroKvHeads) {
  Tensor k = Input(DType::kF32, {kB, kSk, 0, kD}, 4);
  Tensor v = Input(DType::kF32, {kB, kSk, 0, kD}, 5);
  AttentionParams p = Valid();
  p.k = k.view();
  p.v = v.view();
  Rejected(p, "k");
}

TEST_F(ValidateTest, TooManyKeyTokens) {
  // A key axis of 2^31 tokens (a stride-0 view over one row, never read) exceeds the kernel's
  // 32-bit key positions.
  AttentionParams p = Valid();
  const int64_t tokens = int64_t{1} << 31;
  for (TensorView* view : {&p.k, &p.v}) {
    view->shape[1] = tokens;
    view->strides[1] = 0;
  }
  Rejected(p, "k");
}

TEST_F(ValidateTest, HeadDimOutOfRange) {
  for (int64_t d : {int64_t{0}, int64_t{513}}) {
    SCOPED_TRACE("D = " + std::to_string(d));
    // Strides laid out for max(D, 1) so that a D = 0 output has no zero stride to complain of.
    auto strides = [d](std::vector<int64_t> shape) {
      return Tensor::PaddedStrides(shape, d == 0 ? 1 : 0);
    };
    Tensor q(DType::kF32, {kB, kSq, kHq, d}, strides({kB, kSq, kHq, d}));
    Tensor k(DType::kF32, {kB, kSk, kHkv, d}, strides({kB, kSk, kHkv, d}));
    Tensor v(DType::kF32, {kB, kSk, kHkv, d}, strides({kB, kSk, kHkv, d}));
    Tensor out(DType::kF32, {kB, kSq, kHq, d}, strides({kB, kSq, kHq, d}));
    Rng rng(4);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    out.FillSlots(kSentinel);
    out.Snapshot();
    AttentionParams p = Valid();
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.out = out.view();
    Rejected(p, "q", StatusCode::kInvalidArgument, {&out});
  }
}

// --- Dtypes ---------------------------------------------------------------------------------

TEST_F(ValidateTest, DtypeMismatch) {
  Tensor k = Input(DType::kBF16, {kB, kSk, kHkv, kD}, 4);
  Tensor v = Input(DType::kF16, {kB, kSk, kHkv, kD}, 5);
  Tensor out = Output(DType::kBF16, {kB, kSq, kHq, kD});
  AttentionParams p = Valid();
  p.k = k.view();
  Rejected(p, "k");
  p = Valid();
  p.v = v.view();
  Rejected(p, "v");
  p = Valid();
  p.out = out.view();
  Rejected(p, "out", StatusCode::kInvalidArgument, {&out});
}

TEST_F(ValidateTest, UnknownDtype) {
  AttentionParams p = Valid();
  p.q.dtype = static_cast<DType>(9);
  Rejected(p, "q");
  p = Valid();
  p.v.dtype = static_cast<DType>(-1);
  Rejected(p, "v");
}

// --- Strides --------------------------------------------------------------------------------

TEST_F(ValidateTest, NegativeStride) {
  const struct {
    const char* name;
    TensorView AttentionParams::*member;
  } tensors[] = {{"q", &AttentionParams::q},
                 {"k", &AttentionParams::k},
                 {"v", &AttentionParams::v},
                 {"out", &AttentionParams::out},
                 {"lse", &AttentionParams::lse}};
  for (const auto& t : tensors) {
    for (int dim = 0; dim < (t.member == &AttentionParams::lse ? 3 : 4); ++dim) {
      SCOPED_TRACE(std::string(t.name) + " dim " + std::to_string(dim));
      AttentionParams p = Valid();
      (p.*t.member).strides[dim] = -1;
      Rejected(p, t.name);
    }
  }
}

TEST_F(ValidateTest, ZeroStrideOnAnOutputDim) {
  // Zero strides broadcast inputs, but an output dim of extent > 1 with stride 0 would alias.
  for (int dim = 0; dim < 4; ++dim) {
    SCOPED_TRACE("out dim " + std::to_string(dim));
    AttentionParams p = Valid();
    p.out.strides[dim] = 0;
    Rejected(p, "out");
  }
  for (int dim = 0; dim < 3; ++dim) {
    SCOPED_TRACE("lse dim " + std::to_string(dim));
    AttentionParams p = Valid();
    p.lse.strides[dim] = 0;
    Rejected(p, "lse");
  }
}

TEST_F(ValidateTest, ZeroStridesAreFineOnInputsAndUnitOutputDims) {
  Tensor k = Input(DType::kF32, {1, kSk, kHkv, kD}, 4);
  Tensor v = Input(DType::kF32, {1, kSk, kHkv, kD}, 5);
  AttentionParams p = Valid();
  p.k = k.view();
  p.k.shape[0] = kB;  // batch broadcast of one K/V
  p.k.strides[0] = 0;
  p.v = v.view();
  p.v.shape[0] = kB;
  p.v.strides[0] = 0;
  AttentionProblem problem;
  Status s = ValidateAttention(p, &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();

  Tensor q1 = Input(DType::kF32, {1, kSq, kHq, kD}, 6);
  Tensor out1 = Output(DType::kF32, {1, kSq, kHq, kD});
  p = Valid();
  p.q = q1.view();
  p.k.shape[0] = p.v.shape[0] = 1;
  p.out = out1.view();
  p.out.strides[0] = 0;  // extent 1: the stride is never used
  p.lse = TensorView();
  s = ValidateAttention(p, &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// --- Pointers -------------------------------------------------------------------------------

TEST_F(ValidateTest, NullDataPointers) {
  AttentionParams p = Valid();
  p.q.data = nullptr;
  Rejected(p, "q");
  p = Valid();
  p.k.data = nullptr;
  Rejected(p, "k");
  p = Valid();
  p.v.data = nullptr;
  Rejected(p, "v");
  p = Valid();
  p.out.data = nullptr;
  Rejected(p, "out");
}

// --- Scalars --------------------------------------------------------------------------------

TEST_F(ValidateTest, WindowBelowMinusOne) {
  AttentionParams p = Valid();
  p.window_left = -2;
  Rejected(p, "window_left");
  p = Valid();
  p.window_right = std::numeric_limits<int64_t>::min();
  Rejected(p, "window_right");
  p = Valid();
  p.causal = true;
  p.window_right = -5;
  Rejected(p, "window_right");
}

TEST_F(ValidateTest, NonFiniteScale) {
  for (float bad : {kNaNf, kInff, -kInff}) {
    SCOPED_TRACE(std::to_string(bad));
    AttentionParams p = Valid();
    p.scale = bad;
    Rejected(p, "scale");
  }
}

TEST_F(ValidateTest, BadSoftcap) {
  for (float bad : {-1.0f, -0.0001f, kNaNf, kInff}) {
    SCOPED_TRACE(std::to_string(bad));
    AttentionParams p = Valid();
    p.softcap = bad;
    Rejected(p, "softcap");
  }
}

TEST_F(ValidateTest, BadAlign) {
  AttentionParams p = Valid();
  p.align = static_cast<MaskAlign>(7);
  Rejected(p, "align");
}

TEST_F(ValidateTest, BadAlibiSlopes) {
  Tensor too_many = Input(DType::kF32, {kHq + 1}, 4);
  Tensor wrong_batch = Input(DType::kF32, {kB + 1, kHq}, 5);
  Tensor rank3 = Input(DType::kF32, {1, kB, kHq}, 6);
  Tensor bf16 = Input(DType::kBF16, {kHq}, 7);
  Tensor ok = Input(DType::kF32, {kB, kHq}, 8);
  for (const Tensor* t : {&too_many, &wrong_batch, &rank3, &bf16}) {
    SCOPED_TRACE("alibi shape rank " + std::to_string(t->rank()));
    AttentionParams p = Valid();
    p.alibi_slopes = t->view();
    Rejected(p, "alibi_slopes");
  }
  AttentionParams p = Valid();
  p.alibi_slopes = ok.view();
  p.alibi_slopes.strides[1] = -1;
  Rejected(p, "alibi_slopes");
}

// --- LSE ------------------------------------------------------------------------------------

TEST_F(ValidateTest, LseWrongShape) {
  Tensor longer = Output(DType::kF32, {kB, kHq, kSq + 1});
  Tensor transposed = Output(DType::kF32, {kB, kSq, kHq});  // [B, Sq, Hq] instead of [B, Hq, Sq]
  Tensor rank2 = Output(DType::kF32, {kHq, kSq});           // varlen layout on a dense call
  Tensor rank4 = Output(DType::kF32, {kB, kHq, kSq, 1});
  for (const Tensor* t : {&longer, &transposed, &rank2, &rank4}) {
    SCOPED_TRACE("lse rank " + std::to_string(t->rank()));
    AttentionParams p = Valid();
    p.lse = t->view();
    Rejected(p, "lse", StatusCode::kInvalidArgument, {t});
  }
}

TEST_F(ValidateTest, LseWrongDtype) {
  Tensor lse = Output(DType::kBF16, {kB, kHq, kSq});
  AttentionParams p = Valid();
  p.lse = lse.view();
  Rejected(p, "lse", StatusCode::kInvalidArgument, {&lse});
}

// --- Varlen ---------------------------------------------------------------------------------

// Two packed sequences: q tokens [0, 4) and [4, 10), k tokens [0, 5) and [5, 12).
class ValidateVarlenTest : public ::testing::Test {
 protected:
  static constexpr int64_t kTq = 10, kTk = 12;

  ValidateVarlenTest()
      : q_(Input(DType::kF32, {kTq, kHq, kD}, 1)),
        k_(Input(DType::kF32, {kTk, kHkv, kD}, 2)),
        v_(Input(DType::kF32, {kTk, kHkv, kD}, 3)),
        out_(Output(DType::kF32, {kTq, kHq, kD})),
        lse_(Output(DType::kF32, {kHq, kTq})) {}

  AttentionParams Valid() const {
    AttentionParams p;
    p.q = q_.view();
    p.k = k_.view();
    p.v = v_.view();
    p.out = out_.view();
    p.lse = lse_.view();
    p.cu_seqlens_q = test::I32View(cu_q_);
    p.cu_seqlens_k = test::I32View(cu_k_);
    p.num_seqs = 2;
    return p;
  }

  void Rejected(const AttentionParams& p, const std::string& arg,
                std::vector<const Tensor*> extra_outputs = {}) {
    extra_outputs.push_back(&out_);
    extra_outputs.push_back(&lse_);
    ExpectRejected(p, StatusCode::kInvalidArgument, arg, extra_outputs);
  }

  Tensor q_, k_, v_, out_, lse_;
  std::vector<int32_t> cu_q_ = {0, 4, 10};
  std::vector<int32_t> cu_k_ = {0, 5, 12};
};

TEST_F(ValidateVarlenTest, ValidParamsPassValidation) {
  AttentionProblem problem;
  Status s = ValidateAttention(Valid(), &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();
  // The rank-4 [1, T, H, D] layout and a rank-3 [1, Hq, T] LSE are accepted too.
  Tensor q4 = Input(DType::kF32, {1, kTq, kHq, kD}, 4);
  Tensor lse3 = Output(DType::kF32, {1, kHq, kTq});
  AttentionParams p = Valid();
  p.q = q4.view();
  p.lse = lse3.view();
  s = ValidateAttention(p, &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST_F(ValidateVarlenTest, OnlyOneOfCuSeqlensSet) {
  AttentionParams p = Valid();
  p.cu_seqlens_k = TensorView();
  Rejected(p, "cu_seqlens");
  p = Valid();
  p.cu_seqlens_q = TensorView();
  Rejected(p, "cu_seqlens");
}

TEST_F(ValidateVarlenTest, CuSeqlensNotStartingAtZero) {
  const std::vector<int32_t> bad = {1, 4, 10};
  AttentionParams p = Valid();
  p.cu_seqlens_q = test::I32View(bad);
  Rejected(p, "cu_seqlens_q");
  const std::vector<int32_t> bad_k = {-1, 5, 12};
  p = Valid();
  p.cu_seqlens_k = test::I32View(bad_k);
  Rejected(p, "cu_seqlens_k");
}

TEST_F(ValidateVarlenTest, CuSeqlensDecreasing) {
  const std::vector<int32_t> bad = {0, 6, 4};
  AttentionParams p = Valid();
  p.cu_seqlens_q = test::I32View(bad);
  Rejected(p, "cu_seqlens_q");
  const std::vector<int32_t> bad_k = {0, 7, 5};
  p = Valid();
  p.cu_seqlens_k = test::I32View(bad_k);
  Rejected(p, "cu_seqlens_k");
}

TEST_F(ValidateVarlenTest, CuSeqlensPastTheEnd) {
  const std::vector<int32_t> bad = {0, 4, kTq + 1};
  AttentionParams p = Valid();
  p.cu_seqlens_q = test::I32View(bad);
  Rejected(p, "cu_seqlens_q");
  const std::vector<int32_t> bad_k = {0, 5, kTk + 1};
  p = Valid();
  p.cu_seqlens_k = test::I32View(bad_k);
  Rejected(p, "cu_seqlens_k");
}

TEST_F(ValidateVarlenTest, NegativeNumSeqs) {
  AttentionParams p = Valid();
  p.num_seqs = -1;
  Rejected(p, "num_seqs");
}

TEST_F(ValidateVarlenTest, CuSeqlensMustBeUnitStrideI32OfNumSeqsPlusOne) {
  for (const char* which : {"cu_seqlens_q", "cu_seqlens_k"}) {
    SCOPED_TRACE(which);
    auto field = [&](AttentionParams& p) -> TensorView& {
      return which[11] == 'q' ? p.cu_seqlens_q : p.cu_seqlens_k;
    };
    AttentionParams p = Valid();
    field(p).dtype = DType::kU8;
    Rejected(p, which);
    p = Valid();
    field(p).shape[0] = 2;  // num_seqs = 2 needs 3 offsets
    Rejected(p, which);
    p = Valid();
    field(p).rank = 2;
    Rejected(p, which);
    p = Valid();
    field(p).strides[0] = 2;
    AttentionProblem problem;
    const Status s = ValidateAttention(p, &problem);
    EXPECT_NE(s.message().find("unit stride"), std::string::npos) << s.ToString();
    Rejected(p, which);
  }
  // num_seqs is checked against the views' length.
  AttentionParams p = Valid();
  p.num_seqs = 1;
  Rejected(p, "cu_seqlens_q");
}

TEST_F(ValidateVarlenTest, RankFourWithBatchAboveOne) {
  Tensor q = Input(DType::kF32, {2, kTq / 2, kHq, kD}, 4);
  AttentionParams p = Valid();
  p.q = q.view();
  Rejected(p, "q");
}

TEST_F(ValidateVarlenTest, LseWrongShape) {
  Tensor longer = Output(DType::kF32, {kHq, kTq + 1});
  Tensor dense = Output(DType::kF32, {2, kHq, kTq});  // a [B, Hq, Sq] view on a varlen call
  for (const Tensor* t : {&longer, &dense}) {
    AttentionParams p = Valid();
    p.lse = t->view();
    Rejected(p, "lse", {t});
  }
}

TEST_F(ValidateVarlenTest, AlibiShapeUsesNumSeqs) {
  Tensor per_seq = Input(DType::kF32, {2, kHq}, 5);
  AttentionParams p = Valid();
  p.alibi_slopes = per_seq.view();
  AttentionProblem problem;
  const Status s = ValidateAttention(p, &problem);
  EXPECT_TRUE(s.ok()) << s.ToString();
  Tensor wrong = Input(DType::kF32, {3, kHq}, 6);
  p.alibi_slopes = wrong.view();
  Rejected(p, "alibi_slopes");
}

}  // namespace
}  // namespace tessera
