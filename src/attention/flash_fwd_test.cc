// The exact forward, every path forced in turn (Context.path) against the fp64 reference with the
// tolerance rules of docs/RELIABILITY.md §2, plus the identities of DESIGN.md (varlen = loop,
// GQA = repeated K/V, window >= S = causal, batch = loop of singles, split + merge = one pass),
// the bug-class regressions of RELIABILITY.md §3 and the bitwise guarantees of §5.
//
// Every kernel run writes into NaN-prefilled outputs surrounded by 1 KiB guards; padding inside
// strided inputs is NaN too, so a kernel that reads or writes outside a view fails loudly.
//
// TESSERA_SMALL_TESTS=1 (sanitizer builds) shrinks the heavy shapes but keeps tile tails;
// TESSERA_LONG_TESTS=1 adds large sweeps. TESSERA_SEED=<n> changes every random input.
#include "attention/flash_fwd.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "ref/attention_ref.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Index;
using test::Rng;
using test::Rule;
using test::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

bool Small() { return test::SmallTests(); }
bool Long() { return test::LongTests(); }

// The head dims documented to have a fast instantiation (context.h), independent of the kernel's
// own flash::HasFastHeadDim so a change there shows up here.
bool HasFastPath(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }

// Every path a head dim can be forced through (kFast only where it has an instantiation).
std::vector<Path> PathsFor(int64_t dim) {
  std::vector<Path> paths = {Path::kReference, Path::kGeneric};
  if (HasFastPath(dim)) paths.push_back(Path::kFast);
  paths.push_back(Path::kAuto);
  return paths;
}

// ---------------------------------------------------------------------------------------------
// Test problems.

enum class AlibiKind { kNone, kPerHead, kPerBatch };

// Storage of a [.., S, H, D] tensor relative to its logical view. Gaps hold NaN.
enum class Layout {
  kContiguous,
  kPaddedDim,       // 3 spare elements after every head-dim row
  kHeadSliced,      // heads [1, H + 1) of a tensor with H + 2 heads
  kHeadsMajor,      // storage [B, H, S, D] behind a [B, S, H, D] view (transposed strides)
  kSeqSliced,       // tokens [1, S + 1) of a tensor with S + 2 tokens (a view into a bigger cache)
  kBatchBroadcast,  // stride-0 batch: every batch entry reads batch 0 (inputs only)
};

const char* LayoutName(Layout l) {
  switch (l) {
    case Layout::kContiguous:
      return "contig";
    case Layout::kPaddedDim:
      return "padded";
    case Layout::kHeadSliced:
      return "headslice";
    case Layout::kHeadsMajor:
      return "headsmajor";
    case Layout::kSeqSliced:
      return "seqslice";
    case Layout::kBatchBroadcast:
      return "bcast";
  }
  return "?";
}

struct Spec {
  int64_t batch = 1;
  int64_t seq_q = 1;
  int64_t seq_k = 1;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;
  int64_t dim = 64;
  DType dtype = DType::kF32;
  bool causal = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  MaskAlign align = MaskAlign::kBottomRight;
  float softcap = 0.0f;
  std::optional<float> scale;
  AlibiKind alibi = AlibiKind::kNone;
  // Varlen when non-empty (then batch, seq_q and seq_k are unused): per-sequence lengths.
  std::vector<int32_t> seqlens_q;
  std::vector<int32_t> seqlens_k;
  int64_t extra_q_tokens = 0;  // varlen: query tokens after the last sequence (left untouched)
  int64_t extra_k_tokens = 0;  // varlen: key tokens after the last sequence (never read)
  bool varlen_rank4 = false;   // [1, T, H, D] views instead of [T, H, D]
  bool with_lse = true;
  double q_mult = 1.0;  // q ~ N(0, 1) * q_mult
  Layout q_layout = Layout::kContiguous;
  Layout kv_layout = Layout::kContiguous;
  Layout out_layout = Layout::kContiguous;
  int64_t misalign = 0;  // element offset of every base pointer from 64-byte alignment
  Rule rule = Rule::kStandard;

  bool varlen() const { return !seqlens_q.empty(); }
  int64_t num_seqs() const { return varlen() ? static_cast<int64_t>(seqlens_q.size()) : batch; }

  // A unique, gtest-safe name; also the seed of the case's random inputs.
  std::string Name() const {
    auto num = [](double x) {
      std::string s = std::to_string(static_cast<long long>(std::llround(x)));
      if (s[0] == '-') s = "m" + s.substr(1);
      return s;
    };
    std::string n;
    if (varlen()) {
      n += "varlen_q";
      for (size_t i = 0; i < seqlens_q.size(); ++i) n += (i ? "x" : "") + num(seqlens_q[i]);
      n += "_k";
      for (size_t i = 0; i < seqlens_k.size(); ++i) n += (i ? "x" : "") + num(seqlens_k[i]);
      if (extra_q_tokens || extra_k_tokens) {
        n += "_extra" + num(double(extra_q_tokens)) + "x" + num(double(extra_k_tokens));
      }
      if (varlen_rank4) n += "_rank4";
    } else {
      n += "b" + num(double(batch)) + "_sq" + num(double(seq_q)) + "_sk" + num(double(seq_k));
    }
    n += "_h" + num(double(heads_q)) + "x" + num(double(heads_kv)) + "_d" + num(double(dim));
    n += std::string("_") + DTypeName(dtype);
    if (causal) n += "_causal";
    if (window_left != -1 || window_right != -1) {
      n += "_win" + num(double(window_left)) + "x" + num(double(window_right));
    }
    if (align == MaskAlign::kTopLeft) n += "_topleft";
    if (softcap != 0.0f) n += "_cap" + num(softcap);
    if (scale.has_value()) n += "_scale" + num(*scale * 1000.0) + "milli";
    if (alibi == AlibiKind::kPerHead) n += "_alibiH";
    if (alibi == AlibiKind::kPerBatch) n += "_alibiBH";
    if (!with_lse) n += "_nolse";
    if (q_mult != 1.0) n += "_qmult" + num(q_mult);
    if (q_layout != Layout::kContiguous) n += std::string("_q") + LayoutName(q_layout);
    if (kv_layout != Layout::kContiguous) n += std::string("_kv") + LayoutName(kv_layout);
    if (out_layout != Layout::kContiguous) n += std::string("_out") + LayoutName(out_layout);
    if (misalign) n += "_misalign" + num(double(misalign));
    if (rule == Rule::kRatioOnly) n += "_ratio";
    return n;
  }
};

void PrintTo(const Spec& s, std::ostream* os) { *os << s.Name(); }

// A tensor of logical shape [B, S, H, D] or [T, H, D] stored with `layout`.
Tensor MakeTensor(DType dtype, const std::vector<int64_t>& shape, Layout layout, int64_t offset) {
  const int r = static_cast<int>(shape.size());
  const int s = r - 3, h = r - 2;  // token and head dims
  switch (layout) {
    case Layout::kContiguous:
      return Tensor(dtype, shape, {}, offset);
    case Layout::kPaddedDim:
      return Tensor(dtype, shape, Tensor::PaddedStrides(shape, 3), offset);
    case Layout::kHeadSliced: {
      std::vector<int64_t> storage = shape;
      storage[static_cast<size_t>(h)] += 2;
      const std::vector<int64_t> strides = Tensor::ContiguousStrides(storage);
      return Tensor(dtype, shape, strides, offset + strides[static_cast<size_t>(h)]);
    }
    case Layout::kHeadsMajor: {
      // Storage [.., H, S, D]: head stride S*D, token stride D.
      std::vector<int64_t> strides(shape.size());
      const int64_t tokens = shape[static_cast<size_t>(s)], heads = shape[static_cast<size_t>(h)];
      const int64_t d = shape.back();
      strides[static_cast<size_t>(r - 1)] = 1;
      strides[static_cast<size_t>(s)] = d;
      strides[static_cast<size_t>(h)] = tokens * d;
      if (r == 4) strides[0] = heads * tokens * d;
      return Tensor(dtype, shape, strides, offset);
    }
    case Layout::kSeqSliced: {
      std::vector<int64_t> storage = shape;
      storage[static_cast<size_t>(s)] += 2;
      const std::vector<int64_t> strides = Tensor::ContiguousStrides(storage);
      return Tensor(dtype, shape, strides, offset + strides[static_cast<size_t>(s)]);
    }
    case Layout::kBatchBroadcast: {
      std::vector<int64_t> strides = Tensor::ContiguousStrides(shape);
      if (r == 4) strides[0] = 0;
      return Tensor(dtype, shape, strides, offset);
    }
  }
  return Tensor(dtype, shape, {}, offset);
}

struct Inputs {
  Tensor q, k, v, slopes;
  std::vector<int32_t> cu_q, cu_k;
  int64_t tokens_q = 0;  // Sq (dense) or total query tokens (varlen)
  int64_t tokens_k = 0;
};

std::vector<int64_t> QShape(const Spec& s, int64_t tokens_q, int64_t heads) {
  if (!s.varlen()) return {s.batch, tokens_q, heads, s.dim};
  if (s.varlen_rank4) return {1, tokens_q, heads, s.dim};
  return {tokens_q, heads, s.dim};
}

std::vector<int32_t> Offsets(const std::vector<int32_t>& lens) {
  std::vector<int32_t> cu = {0};
  for (int32_t l : lens) cu.push_back(cu.back() + l);
  return cu;
}

// Random inputs for a spec: q ~ N(0, 1) * q_mult, k, v ~ N(0, 1), rounded to the dtype. The
// values depend only on the spec's name, never on its layout fields' storage.
Inputs MakeInputs(const Spec& s) {
  Inputs in;
  Rng rng(test::SeedFor(s.Name()));
  if (s.varlen()) {
    in.cu_q = Offsets(s.seqlens_q);
    in.cu_k = Offsets(s.seqlens_k);
    in.tokens_q = in.cu_q.back() + s.extra_q_tokens;
    in.tokens_k = in.cu_k.back() + s.extra_k_tokens;
  } else {
    in.tokens_q = s.seq_q;
    in.tokens_k = s.seq_k;
  }
  in.q = MakeTensor(s.dtype, QShape(s, in.tokens_q, s.heads_q), s.q_layout, s.misalign);
  in.k = MakeTensor(s.dtype, QShape(s, in.tokens_k, s.heads_kv), s.kv_layout, s.misalign);
  in.v = MakeTensor(s.dtype, QShape(s, in.tokens_k, s.heads_kv), s.kv_layout, s.misalign);
  in.q.FillNormal(rng, s.q_mult);
  if (s.kv_layout == Layout::kBatchBroadcast) {
    // Stride-0 batch: every element of a batch-0 slot is shared, so set batch 0 only.
    for (Tensor* t : {&in.k, &in.v}) {
      t->ForEach([&](const Index& idx) {
        if (idx[0] == 0) t->Set(idx, rng.Normal());
      });
    }
  } else {
    in.k.FillNormal(rng);
    in.v.FillNormal(rng);
  }
  if (s.alibi == AlibiKind::kPerHead) {
    in.slopes = Tensor(DType::kF32, {s.heads_q});
    for (int64_t h = 0; h < s.heads_q; ++h) {
      in.slopes.Set({h},
                    std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(s.heads_q)));
    }
  } else if (s.alibi == AlibiKind::kPerBatch) {
    in.slopes = Tensor(DType::kF32, {s.num_seqs(), s.heads_q});
    in.slopes.ForEach([&](const Index& idx) { in.slopes.Set(idx, rng.Uniform(0.01, 1.0)); });
  }
  return in;
}

struct Outputs {
  Tensor out;
  Tensor lse;
};

Outputs MakeOutputs(const Spec& s, const Inputs& in) {
  Outputs o;
  o.out = MakeTensor(s.dtype, QShape(s, in.tokens_q, s.heads_q), s.out_layout, s.misalign);
  if (s.with_lse) {
    std::vector<int64_t> shape;
    if (!s.varlen()) {
      shape = {s.batch, s.heads_q, in.tokens_q};
    } else if (s.varlen_rank4) {
      shape = {1, s.heads_q, in.tokens_q};
    } else {
      shape = {s.heads_q, in.tokens_q};
    }
    const bool padded = s.out_layout != Layout::kContiguous;
    o.lse = Tensor(DType::kF32, shape,
                   padded ? Tensor::PaddedStrides(shape, 3) : std::vector<int64_t>{}, s.misalign);
  }
  return o;
}

AttentionParams MakeParams(const Spec& s, const Inputs& in, Outputs* o) {
  AttentionParams p;
  p.q = in.q.view();
  p.k = in.k.view();
  p.v = in.v.view();
  if (o != nullptr) {
    p.out = o->out.view();
    if (s.with_lse) p.lse = o->lse.view();
  }
  p.scale = s.scale;
  p.causal = s.causal;
  p.window_left = s.window_left;
  p.window_right = s.window_right;
  p.align = s.align;
  p.softcap = s.softcap;
  if (s.alibi != AlibiKind::kNone) p.alibi_slopes = in.slopes.view();
  if (s.varlen()) {
    p.cu_seqlens_q = in.cu_q.data();
    p.cu_seqlens_k = in.cu_k.data();
    p.num_seqs = static_cast<int32_t>(s.seqlens_q.size());
  }
  return p;
}

// fp64 reference (and the naive same-precision one where a rule needs it), in the layouts of
// ref::AttentionForwardF64. Rows outside every varlen sequence stay NaN.
struct Reference {
  std::vector<double> out, lse, naive_out, naive_lse;
  std::vector<double> magnitude;  // sum_j p_ij |v_jd| (f32 standard rule only)
};

bool NeedsNaive(const Spec& s) { return s.dtype != DType::kF32 || s.rule == Rule::kRatioOnly; }

Reference ComputeReference(const Spec& s, const Inputs& in) {
  Reference r;
  const AttentionParams p = MakeParams(s, in, nullptr);
  const int64_t rows = in.q.numel() / s.dim;
  r.out.assign(static_cast<size_t>(rows * s.dim), kNaN);
  r.lse.assign(static_cast<size_t>(rows), kNaN);
  ref::AttentionForwardF64(p, r.out.data(), r.lse.data());
  if (s.dtype == DType::kF32 && s.rule == Rule::kStandard) {
    // The fp64 reference on |V| gives the magnitude of the terms behind each output element.
    Tensor abs_v = in.v.ContiguousCopy();
    abs_v.ForEach([&](const Index& i) { abs_v.Set(i, std::fabs(abs_v.Get(i))); });
    AttentionParams pa = p;
    pa.v = abs_v.view();
    r.magnitude.assign(r.out.size(), kNaN);
    ref::AttentionForwardF64(pa, r.magnitude.data(), nullptr);
  }
  if (NeedsNaive(s)) {
    r.naive_out.assign(r.out.size(), kNaN);
    r.naive_lse.assign(r.lse.size(), kNaN);
    test::AttentionForwardNaive(p, r.naive_out.data(), r.naive_lse.data());
  }
  return r;
}

// Runs the forward on fresh NaN-prefilled, guarded outputs. Guards and gaps are checked here.
Status RunForward(const Spec& s, const Inputs& in, Path path, int32_t threads, Outputs* o) {
  *o = MakeOutputs(s, in);
  Context ctx;
  ctx.path = path;
  ctx.num_threads = threads;
  const Status status = AttentionForward(MakeParams(s, in, o), ctx);
  EXPECT_TRUE(o->out.OutsideViewUntouched()) << "out";
  if (s.with_lse) {
    EXPECT_TRUE(o->lse.OutsideViewUntouched()) << "lse";
  }
  return status;
}

// Number of query tokens that belong to some sequence: a prefix of the token axis.
int64_t CoveredTokens(const Spec& s, const Inputs& in) {
  return s.varlen() ? in.cu_q.back() : in.tokens_q;
}

// Splits an [.., T, Hq, D] output vector (or an [.., Hq, T] LSE vector) into the elements of
// covered tokens (returned) and those of uncovered ones (appended to `outside`).
std::vector<double> Covered(const Spec& s, const Inputs& in, const std::vector<double>& x,
                            bool is_lse, std::vector<double>* outside) {
  const int64_t covered = CoveredTokens(s, in);
  if (covered == in.tokens_q) return x;
  std::vector<double> r;
  if (!is_lse) {
    const size_t n = static_cast<size_t>(covered * s.heads_q * s.dim);
    r.assign(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(n));
    if (outside)
      outside->insert(outside->end(), x.begin() + static_cast<std::ptrdiff_t>(n), x.end());
    return r;
  }
  for (int64_t h = 0; h < s.heads_q; ++h) {
    for (int64_t t = 0; t < in.tokens_q; ++t) {
      const double value = x[static_cast<size_t>(h * in.tokens_q + t)];
      if (t < covered) {
        r.push_back(value);
      } else if (outside) {
        outside->push_back(value);
      }
    }
  }
  return r;
}

// Checks one run's outputs against the references under the spec's rule.
void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref,
                            const Outputs& o) {
  std::vector<double> outside;
  const std::vector<double> got = Covered(s, in, o.out.ToVector(), false, &outside);
  const std::vector<double> want = Covered(s, in, ref.out, false, nullptr);
  const std::vector<double> naive =
      NeedsNaive(s) ? Covered(s, in, ref.naive_out, false, nullptr) : std::vector<double>{};
  const std::vector<double> magnitude =
      ref.magnitude.empty() ? std::vector<double>{} : Covered(s, in, ref.magnitude, false, nullptr);
  EXPECT_TRUE(test::CheckOutput(s.dtype, got, want, NeedsNaive(s) ? &naive : nullptr, s.rule,
                                magnitude.empty() ? nullptr : &magnitude));
  if (s.with_lse) {
    const std::vector<double> got_lse = Covered(s, in, o.lse.ToVector(), true, &outside);
    const std::vector<double> want_lse = Covered(s, in, ref.lse, true, nullptr);
    const std::vector<double> naive_lse =
        NeedsNaive(s) ? Covered(s, in, ref.naive_lse, true, nullptr) : std::vector<double>{};
    EXPECT_TRUE(test::CheckLse(got_lse, want_lse, NeedsNaive(s) ? &naive_lse : nullptr, s.rule));
  }
  // Rows outside every sequence keep their NaN prefill.
  size_t written = 0;
  for (double x : outside) written += !std::isnan(x);
  EXPECT_EQ(written, 0u) << "elements of tokens outside every sequence were written";
}

// The main check: every path against the fp64 reference.
void CheckAllPaths(const Spec& s, const Inputs& in) {
  const Reference ref = ComputeReference(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs o;
    const Status status = RunForward(s, in, path, 0, &o);
    ASSERT_TRUE(status.ok()) << status.ToString();
    ExpectMatchesReference(s, in, ref, o);
  }
}

void CheckAllPaths(const Spec& s) {
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);
}

::testing::AssertionResult SameBits(const Outputs& a, const Outputs& b, bool with_lse) {
  ::testing::AssertionResult r = a.out.BitwiseEqual(b.out);
  if (!r) return r << " (out)";
  if (with_lse) {
    r = a.lse.BitwiseEqual(b.lse);
    if (!r) return r << " (lse)";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// The parameterized sweep: one test per spec, every path against fp64.

class Forward : public ::testing::TestWithParam<Spec> {};

TEST_P(Forward, MatchesReferenceOnEveryPath) { CheckAllPaths(GetParam()); }

std::string SpecName(const ::testing::TestParamInfo<Spec>& info) { return info.param.Name(); }

// Removes specs with duplicate names (gtest rejects them), keeping the first.
std::vector<Spec> Unique(std::vector<Spec> specs) {
  std::set<std::string> seen;
  std::vector<Spec> r;
  for (Spec& s : specs) {
    if (seen.insert(s.Name()).second) r.push_back(std::move(s));
  }
  return r;
}

Spec Dense(int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d, DType dt = DType::kF32) {
  Spec s;
  s.seq_q = sq;
  s.seq_k = sk;
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.dim = d;
  s.dtype = dt;
  return s;
}

// Sequence lengths 0, 1, 17, 113, 203, 1024 for queries and keys independently (q > k and
// q < k), with and without a causal mask.
std::vector<Spec> ShapeSpecs() {
  std::vector<int64_t> lens = {0, 1, 17, 113, 203, 1024};
  if (Small()) lens = {0, 1, 17, 113};
  std::vector<Spec> specs;
  for (int64_t sq : lens) {
    for (int64_t sk : lens) {
      for (bool causal : {false, true}) {
        // The 1024-long cases are the expensive ones for the fp64 reference: causal only.
        if ((sq == 1024 || sk == 1024) && !causal && !(sq == 1024 && sk == 1024)) continue;
        Spec s = Dense(sq, sk, 2, 1, 64);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  if (Long()) {
    for (auto [sq, sk] : {std::pair<int64_t, int64_t>{1023, 1024}, {1024, 1023}, {2048, 2048}}) {
      Spec s = Dense(sq, sk, 2, 1, 128);
      s.causal = true;
      specs.push_back(s);
      s.dtype = DType::kBF16;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Shapes, Forward, ::testing::ValuesIn(ShapeSpecs()), SpecName);

// Head dims 1, 40, 64, 72, 96, 128, 256, 512 on tile-tail lengths.
std::vector<Spec> HeadDimSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{17, 203}, {203, 17}, {113, 113}};
  if (Small()) shapes = {{17, 113}, {113, 17}};
  for (int64_t d : {1, 40, 64, 72, 96, 128, 256, 512}) {
    for (auto [sq, sk] : shapes) {
      for (bool causal : {false, true}) {
        Spec s = Dense(sq, sk, 2, 1, d);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  if (Long()) {
    for (int64_t d : {7, 59, 80, 111, 192}) {
      Spec s = Dense(203, 257, 2, 1, d);
      s.causal = true;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(HeadDims, Forward, ::testing::ValuesIn(HeadDimSpecs()), SpecName);

// Every dtype with the ratio rule and the ceilings.
std::vector<Spec> DTypeSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{113, 203}, {203, 113}};
  if (Small()) shapes = {{17, 113}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t d : {40, 64, 128, 256}) {
      for (auto [sq, sk] : shapes) {
        for (bool causal : {false, true}) {
          Spec s = Dense(sq, sk, 4, 2, d, dt);
          s.causal = causal;
          specs.push_back(s);
        }
      }
    }
  }
  if (Long()) {
    for (DType dt : {DType::kBF16, DType::kF16}) {
      for (int64_t d : {1, 72, 96, 512}) {
        Spec s = Dense(257, 509, 4, 1, d, dt);
        s.causal = true;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(DTypes, Forward, ::testing::ValuesIn(DTypeSpecs()), SpecName);

// Masks: none, causal in both alignments, sliding windows (0,0), (1,0), (0,1), (w,w), (Lk,0),
// causal + left window, and fixed pseudo-random windows, on q < k, q > k and q = k.
std::vector<Spec> MaskSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{17, 113}, {113, 17}, {129, 129}, {64, 203}};
  if (Small()) shapes = {{17, 113}, {113, 17}, {65, 65}};
  Rng rng(20240917);  // fixed: the windows are part of the test's identity
  for (auto [sq, sk] : shapes) {
    struct Mask {
      bool causal;
      int64_t wl, wr;
    };
    std::vector<Mask> masks = {{false, -1, -1}, {true, -1, -1}, {false, 0, 0},  {false, 1, 0},
                               {false, 0, 1},   {false, 7, 7},  {false, sk, 0}, {true, 16, -1},
                               {false, -1, 3},  {false, 5, -1}};
    for (int r = 0; r < 3; ++r) {
      masks.push_back({false, rng.UniformInt(-1, 40), rng.UniformInt(-1, 40)});
    }
    for (const Mask& m : masks) {
      for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
        Spec s = Dense(sq, sk, 2, 1, 64);
        s.causal = m.causal;
        s.window_left = m.wl;
        s.window_right = m.wr;
        s.align = align;
        specs.push_back(s);
      }
    }
  }
  // Low precision under masks that leave rows with few visible keys.
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (auto [sq, sk] : {std::pair<int64_t, int64_t>{17, 113}, {113, 17}}) {
      for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
        Spec s = Dense(sq, sk, 2, 1, 96, dt);
        s.causal = true;
        s.align = align;
        specs.push_back(s);
        s.causal = false;
        s.window_left = s.window_right = 7;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Masks, Forward, ::testing::ValuesIn(MaskSpecs()), SpecName);

// Softcap 50 with q scaled by 50 so that the logits reach the cap (FlashAttention's test).
// Logits of magnitude ~50 make fp32 itself ill-conditioned at the 1e-5 level, so fp32 is held
// to the ratio rule against the naive fp32 computation; bf16/f16 get the standard rules.
std::vector<Spec> SoftcapSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t d : {64, 96}) {
      for (bool causal : {false, true}) {
        Spec s = Dense(Small() ? 17 : 113, Small() ? 65 : 203, 2, 1, d, dt);
        s.causal = causal;
        s.softcap = 50.0f;
        s.q_mult = 50.0;
        if (dt == DType::kF32) s.rule = Rule::kRatioOnly;
        specs.push_back(s);
      }
    }
  }
  // A cap that is rarely reached: fp32 within the standard rules.
  Spec s = Dense(113, 203, 2, 1, 64);
  s.softcap = 30.0f;
  s.causal = true;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Softcap, Forward, ::testing::ValuesIn(SoftcapSpecs()), SpecName);

// ALiBi slopes [Hq] and [B, Hq], with and without causal, in both alignments.
std::vector<Spec> AlibiSpecs() {
  std::vector<Spec> specs;
  for (AlibiKind kind : {AlibiKind::kPerHead, AlibiKind::kPerBatch}) {
    for (auto [sq, sk] : {std::pair<int64_t, int64_t>{17, 113}, {113, 113}, {113, 17}}) {
      for (int mask = 0; mask < 3; ++mask) {
        for (DType dt : {DType::kF32, DType::kBF16}) {
          Spec s = Dense(sq, sk, 4, 2, 64, dt);
          s.batch = 2;
          s.alibi = kind;
          s.causal = mask > 0;
          s.align = mask == 2 ? MaskAlign::kTopLeft : MaskAlign::kBottomRight;
          specs.push_back(s);
        }
      }
    }
  }
  // ALiBi together with softcap and a window: the modifier order matters.
  Spec s = Dense(65, 129, 4, 2, 64);
  s.alibi = AlibiKind::kPerHead;
  s.softcap = 5.0f;
  s.window_left = 20;
  s.window_right = 4;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Alibi, Forward, ::testing::ValuesIn(AlibiSpecs()), SpecName);

// Custom scales, including 0 (every visible key weighs the same) and a negative one.
std::vector<Spec> ScaleSpecs() {
  std::vector<Spec> specs;
  for (float scale : {0.0f, 0.05f, 0.3f, -0.5f}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Spec s = Dense(65, 129, 2, 1, 64, dt);
      s.scale = scale;
      s.causal = true;
      specs.push_back(s);
    }
  }
  // Logits ~16x larger than usual: ill-conditioned in fp32, ratio rule.
  Spec s = Dense(65, 129, 2, 1, 64);
  s.scale = 2.0f;
  s.rule = Rule::kRatioOnly;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Scale, Forward, ::testing::ValuesIn(ScaleSpecs()), SpecName);

// Varlen: zero-length sequences, Lq >> Lk, fewer tokens than sequences (RELIABILITY class 6),
// tokens past the last sequence that must stay untouched, both layouts.
std::vector<Spec> VarlenSpecs() {
  const int32_t big = Small() ? 129 : 1024;
  const int32_t mid = Small() ? 65 : 512;
  struct Lens {
    std::vector<int32_t> q, k;
  };
  const std::vector<Lens> lens = {
      {{0, 0, 0}, {0, 0, 0}},
      {{1, mid, 1, 1}, {1, mid, 1, 1}},
      {{1, 1, 1, big, 1, 1, 1, 1}, {1, 1, 1, big, 1, 1, 1, 1}},
      {{76, 34, 146}, {1, 1, 1}},
      {{3, 0, 17, 0, 5}, {0, 4, 20, 0, 9}},
      {{17, 113, 1}, {113, 17, 203}},
  };
  std::vector<Spec> specs;
  for (const Lens& l : lens) {
    for (int mask = 0; mask < 3; ++mask) {
      Spec s;
      s.seqlens_q = l.q;
      s.seqlens_k = l.k;
      s.heads_q = 4;
      s.heads_kv = 2;
      s.dim = 64;
      s.causal = mask > 0;
      s.align = mask == 2 ? MaskAlign::kTopLeft : MaskAlign::kBottomRight;
      s.extra_q_tokens = 3;
      s.extra_k_tokens = 2;
      specs.push_back(s);
    }
  }
  // Rank-4 views, ALiBi per sequence, a window, bf16, generic head dim.
  Spec s;
  s.seqlens_q = {3, 0, 17, 40};
  s.seqlens_k = {5, 9, 17, 1};
  s.heads_q = 4;
  s.heads_kv = 1;
  s.dim = 72;
  s.varlen_rank4 = true;
  s.alibi = AlibiKind::kPerBatch;
  s.window_left = 6;
  s.window_right = 2;
  specs.push_back(s);
  s.dtype = DType::kBF16;
  s.varlen_rank4 = false;
  s.extra_q_tokens = 5;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Varlen, Forward, ::testing::ValuesIn(VarlenSpecs()), SpecName);

// Tile tails (RELIABILITY class 5): for each tile size T of the kernel (the query block of a GQA
// group, the key tile) L in {1, 2, T-1, T, T+1, 2T-1, 2T+1} plus primes, for Lq and Lk
// independently; inputs padded with NaN so that a read past a row's head dim or a tile's end
// shows up.
std::vector<int64_t> TailLengths(int64_t tile) {
  return {1, 2, tile - 1, tile, tile + 1, 2 * tile - 1, 2 * tile + 1};
}

std::vector<Spec> TailSpecs() {
  std::set<int64_t> key_lens = {97, 113, 127, 131, 203, 251, 257};
  for (int64_t l : TailLengths(flash::kKeyTile)) key_lens.insert(l);
  if (Long()) key_lens.insert(509);
  std::vector<Spec> specs;
  // Key tails with a fixed query length, and the same lengths on the query side (G = 1).
  for (int64_t l : key_lens) {
    for (bool q_side : {true, false}) {
      Spec s = Dense(q_side ? l : 131, q_side ? 131 : l, 1, 1, 64);
      s.causal = true;
      s.q_layout = s.kv_layout = Layout::kPaddedDim;
      specs.push_back(s);
    }
  }
  // Query tails per GQA group: the query block is QueryBlock(G) positions.
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{1, 1}, {6, 2}, {8, 1}}) {
    const int64_t block = flash::QueryBlock(hq / hkv);
    std::set<int64_t> lens;
    for (int64_t l : TailLengths(block)) lens.insert(std::max<int64_t>(l, 1));
    for (int64_t l : lens) {
      Spec s = Dense(l, 37, hq, hkv, 40);
      s.causal = true;
      s.q_layout = s.kv_layout = Layout::kPaddedDim;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Tails, Forward, ::testing::ValuesIn(TailSpecs()), SpecName);

// Ill-conditioned inputs, held to the ratio rule (RELIABILITY classes 2 and 4).
std::vector<Spec> RatioSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    // |logit| ~ 1e4.
    Spec s = Dense(65, 129, 2, 1, 64, dt);
    s.q_mult = 1e4;
    s.causal = true;
    s.rule = Rule::kRatioOnly;
    specs.push_back(s);
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(LargeLogits, Forward, ::testing::ValuesIn(RatioSpecs()), SpecName);

// ---------------------------------------------------------------------------------------------
// GQA head mapping (class 16): against fp64 and against MHA with K/V explicitly repeated.

struct GqaCase {
  int64_t hq, hkv, sq;
};

class Gqa : public ::testing::TestWithParam<GqaCase> {};

TEST_P(Gqa, MatchesReferenceAndRepeatedKv) {
  const GqaCase c = GetParam();
  Spec s = Dense(c.sq, 37, c.hq, c.hkv, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);

  // The same problem with K/V repeated G times per head.
  Spec mha = s;
  mha.heads_kv = s.heads_q;
  Inputs rep = MakeInputs(mha);
  const int64_t g = s.heads_q / s.heads_kv;
  rep.q.FromVector(in.q.ToVector());
  rep.k.ForEach([&](const Index& i) { rep.k.Set(i, in.k.Get({i[0], i[1], i[2] / g, i[3]})); });
  rep.v.ForEach([&](const Index& i) { rep.v.Set(i, in.v.Get({i[0], i[1], i[2] / g, i[3]})); });
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs a, b;
    ASSERT_TRUE(RunForward(s, in, path, 0, &a).ok());
    ASSERT_TRUE(RunForward(mha, rep, path, 0, &b).ok());
    EXPECT_TRUE(test::CheckClose(a.out.ToVector(), b.out.ToVector(), test::IdentityCeiling(s.dtype),
                                 "out vs repeated K/V"));
    EXPECT_TRUE(test::CheckClose(a.lse.ToVector(), b.lse.ToVector(), test::kLseCeiling,
                                 "lse vs repeated K/V"));
  }
}

std::vector<GqaCase> GqaCases() {
  std::vector<GqaCase> cases;
  for (auto [hq, hkv] : std::vector<std::pair<int64_t, int64_t>>{
           {8, 8}, {8, 1}, {8, 2}, {6, 3}, {6, 2}, {12, 4}, {48, 2}, {40, 2}, {65, 5}, {27, 1}}) {
    for (int64_t sq : {1, 17}) cases.push_back({hq, hkv, sq});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Heads, Gqa, ::testing::ValuesIn(GqaCases()),
                         [](const ::testing::TestParamInfo<GqaCase>& p) {
                           return "hq" + std::to_string(p.param.hq) + "_hkv" +
                                  std::to_string(p.param.hkv) + "_sq" + std::to_string(p.param.sq);
                         });

// ---------------------------------------------------------------------------------------------
// Identities.

// Copies tokens [t0, t0 + n) of a varlen input into a dense [1, n, H, D] tensor.
Tensor SliceTokens(const Tensor& packed, int64_t t0, int64_t n) {
  const int first = packed.rank() == 4 ? 1 : 0;
  const int64_t heads = packed.shape(first + 1), dim = packed.shape(first + 2);
  Tensor t(packed.dtype(), {1, n, heads, dim});
  t.ForEach([&](const Index& i) {
    const Index src = first ? Index{0, t0 + i[1], i[2], i[3]} : Index{t0 + i[1], i[2], i[3], 0};
    t.Set(i, packed.Get(src));
  });
  return t;
}

TEST(ForwardIdentity, VarlenEqualsLoopOverSequences) {
  Spec s;
  s.seqlens_q = {17, 0, 113, 5, 64};
  s.seqlens_k = {113, 9, 17, 0, 64};
  s.heads_q = 4;
  s.heads_kv = 2;
  s.dim = 64;
  s.causal = true;
  s.alibi = AlibiKind::kPerBatch;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs packed;
    ASSERT_TRUE(RunForward(s, in, path, 0, &packed).ok());
    const std::vector<double> out = packed.out.ToVector(), lse = packed.lse.ToVector();
    for (size_t b = 0; b < s.seqlens_q.size(); ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const int64_t q0 = in.cu_q[b], lq = s.seqlens_q[b], k0 = in.cu_k[b], lk = s.seqlens_k[b];
      Spec one = Dense(lq, lk, s.heads_q, s.heads_kv, s.dim);
      one.causal = s.causal;
      one.alibi = AlibiKind::kPerHead;
      Inputs single = MakeInputs(one);
      single.q = SliceTokens(in.q, q0, lq);
      single.k = SliceTokens(in.k, k0, lk);
      single.v = SliceTokens(in.v, k0, lk);
      for (int64_t h = 0; h < s.heads_q; ++h) {
        single.slopes.Set({h}, in.slopes.Get({static_cast<int64_t>(b), h}));
      }
      Outputs alone;
      ASSERT_TRUE(RunForward(one, single, path, 0, &alone).ok());
      const std::vector<double> a_out = alone.out.ToVector(), a_lse = alone.lse.ToVector();
      const size_t row = static_cast<size_t>(s.heads_q * s.dim);
      std::vector<double> p_out(out.begin() + static_cast<std::ptrdiff_t>(q0 * row),
                                out.begin() + static_cast<std::ptrdiff_t>((q0 + lq) * row));
      std::vector<double> p_lse;
      for (int64_t h = 0; h < s.heads_q; ++h) {
        for (int64_t t = 0; t < lq; ++t) {
          p_lse.push_back(lse[static_cast<size_t>(h * in.tokens_q + q0 + t)]);
        }
      }
      EXPECT_TRUE(test::CheckClose(p_out, a_out, test::IdentityCeiling(s.dtype), "out"));
      EXPECT_TRUE(test::CheckClose(p_lse, a_lse, test::kLseCeiling, "lse"));
    }
  }
}

// The window identities compare two runs of the same path on the same inputs.
void ExpectSameAttention(const Spec& a, const Spec& b) {
  SCOPED_TRACE(a.Name() + " vs " + b.Name());
  const Inputs in = MakeInputs(a);
  for (Path path : PathsFor(a.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs x, y;
    ASSERT_TRUE(RunForward(a, in, path, 0, &x).ok());
    ASSERT_TRUE(RunForward(b, in, path, 0, &y).ok());
    EXPECT_TRUE(test::CheckClose(x.out.ToVector(), y.out.ToVector(), test::IdentityCeiling(a.dtype),
                                 "out"));
    EXPECT_TRUE(test::CheckClose(x.lse.ToVector(), y.lse.ToVector(), test::kLseCeiling, "lse"));
  }
}

TEST(ForwardIdentity, WindowCoveringEveryKeyEqualsCausal) {
  for (auto [sq, sk] : {std::pair<int64_t, int64_t>{113, 203}, {203, 113}, {129, 129}}) {
    for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
      Spec causal = Dense(sq, sk, 2, 1, 64);
      causal.causal = true;
      causal.align = align;
      Spec window = causal;
      window.causal = false;
      window.window_left = std::max(sq, sk);  // wl >= S
      window.window_right = 0;
      ExpectSameAttention(causal, window);
      window.window_left = -1;  // (-1, 0)
      ExpectSameAttention(causal, window);
      Spec capped = causal;  // causal caps any right window at 0
      capped.window_right = 5;
      ExpectSameAttention(causal, capped);
    }
  }
}

TEST(ForwardIdentity, BatchEqualsLoopOfSingles) {
  // Bitwise on the same path: a row's result does not depend on the rest of the batch.
  for (int64_t batch : {5, 12}) {
    Spec s = Dense(Small() ? 17 : 113, Small() ? 33 : 203, 4, 2, 64);
    s.batch = batch;
    s.causal = true;
    s.alibi = AlibiKind::kPerBatch;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs all;
      ASSERT_TRUE(RunForward(s, in, path, 0, &all).ok());
      for (int64_t b : {int64_t{0}, int64_t{3}, batch - 1}) {
        Spec one = s;
        one.batch = 1;
        Inputs single = MakeInputs(one);
        for (const auto& pair : {std::pair<Tensor*, const Tensor*>{&single.q, &in.q},
                                 {&single.k, &in.k},
                                 {&single.v, &in.v}}) {
          Tensor* dst = pair.first;
          const Tensor* src = pair.second;
          dst->ForEach([&](const Index& i) { dst->Set(i, src->Get({b, i[1], i[2], i[3]})); });
        }
        single.slopes.ForEach([&](const Index& i) {
          single.slopes.Set(i, in.slopes.Get({b, i[1]}));
        });
        Outputs alone;
        ASSERT_TRUE(RunForward(one, single, path, 0, &alone).ok());
        Tensor row_out(s.dtype, {1, s.seq_q, s.heads_q, s.dim});
        row_out.ForEach([&](const Index& i) {
          row_out.Set(i, all.out.Get({b, i[1], i[2], i[3]}));
        });
        Tensor row_lse(DType::kF32, {1, s.heads_q, s.seq_q});
        row_lse.ForEach([&](const Index& i) { row_lse.Set(i, all.lse.Get({b, i[1], i[2]})); });
        EXPECT_TRUE(row_out.BitwiseEqual(alone.out)) << "batch entry " << b;
        EXPECT_TRUE(row_lse.BitwiseEqual(alone.lse)) << "batch entry " << b;
      }
    }
  }
}

// Merges two attention states (O, LSE) in fp64 (ALGORITHMS.md §3.1).
void MergeStates(const std::vector<double>& o1, const std::vector<double>& l1,
                 const std::vector<double>& o2, const std::vector<double>& l2, int64_t dim,
                 std::vector<double>* o, std::vector<double>* l, int64_t heads, int64_t seq) {
  o->assign(o1.size(), 0.0);
  l->assign(l1.size(), 0.0);
  // out [1, S, H, D], lse [1, H, S]
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const size_t li = static_cast<size_t>(h * seq + t);
      const double a = l1[li], b = l2[li], m = std::max(a, b);
      double lse = -kInf, wa = 0.0, wb = 0.0;
      if (m != -kInf) {
        lse = m + std::log(std::exp(a - m) + std::exp(b - m));
        wa = std::exp(a - lse);
        wb = std::exp(b - lse);
      }
      (*l)[li] = lse;
      for (int64_t d = 0; d < dim; ++d) {
        const size_t oi = static_cast<size_t>((t * heads + h) * dim + d);
        (*o)[oi] = m == -kInf ? 0.0 : wa * o1[oi] + wb * o2[oi];
      }
    }
  }
}

TEST(ForwardIdentity, SplitKeysAndMergeEqualsOnePass) {
  // No mask: splitting the keys of a causal problem would move its bottom-right alignment.
  for (int64_t split : {0, 1, 100, 128}) {
    Spec s = Dense(113, 203, 2, 1, 64);
    s.softcap = split == 100 ? 20.0f : 0.0f;
    SCOPED_TRACE(test::Repro(s.Name()) + " split at " + std::to_string(split));
    const Inputs in = MakeInputs(s);
    const Reference ref = ComputeReference(s, in);
    Spec lo = s, hi = s;
    lo.seq_k = split;
    hi.seq_k = s.seq_k - split;
    Inputs a = MakeInputs(lo), b = MakeInputs(hi);
    a.q.FromVector(in.q.ToVector());
    b.q.FromVector(in.q.ToVector());
    for (const auto& pair : {std::pair<Inputs*, int64_t>{&a, 0}, {&b, split}}) {
      Inputs* part = pair.first;
      const int64_t k0 = pair.second;
      part->k.ForEach([&](const Index& i) {
        part->k.Set(i, in.k.Get({i[0], i[1] + k0, i[2], i[3]}));
      });
      part->v.ForEach([&](const Index& i) {
        part->v.Set(i, in.v.Get({i[0], i[1] + k0, i[2], i[3]}));
      });
    }
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs whole, first, second;
      ASSERT_TRUE(RunForward(s, in, path, 0, &whole).ok());
      ASSERT_TRUE(RunForward(lo, a, path, 0, &first).ok());
      ASSERT_TRUE(RunForward(hi, b, path, 0, &second).ok());
      std::vector<double> o, l;
      MergeStates(first.out.ToVector(), first.lse.ToVector(), second.out.ToVector(),
                  second.lse.ToVector(), s.dim, &o, &l, s.heads_q, s.seq_q);
      EXPECT_TRUE(test::CheckClose(o, whole.out.ToVector(), test::IdentityCeiling(s.dtype),
                                   "merged out vs one pass"));
      EXPECT_TRUE(
          test::CheckClose(l, whole.lse.ToVector(), test::kLseCeiling, "merged lse vs one pass"));
      EXPECT_TRUE(test::CheckOutput(s.dtype, o, ref.out, nullptr, Rule::kStandard, &ref.magnitude));
      EXPECT_TRUE(test::CheckLse(l, ref.lse));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bug-class regressions.

// Visible-key count of query row i under a spec's mask (dense), computed from the definition.
int64_t VisibleKeys(const Spec& s, int64_t sq, int64_t sk, int64_t i) {
  const int64_t pos = i + (s.align == MaskAlign::kTopLeft ? 0 : sk - sq);
  int64_t lo = 0, hi = sk - 1;
  if (s.window_left >= 0) lo = std::max(lo, pos - s.window_left);
  const int64_t wr = s.causal ? 0 : s.window_right;
  if (wr >= 0) hi = std::min(hi, pos + wr);
  return std::max<int64_t>(0, hi - lo + 1);
}

// Fully masked rows give output exactly 0 and LSE exactly -inf, never NaN (class 1).
TEST(ForwardRegression, FullyMaskedRows) {
  const int64_t n = Small() ? 150 : 600, half = n / 2;
  std::vector<Spec> specs;
  // PyTorch #127055's banded mask triu(-inf, 1) + tril(-inf, -10): window (9, 0), top-left.
  Spec band = Dense(n, n, 1, 1, 64);
  band.window_left = 9;
  band.window_right = 0;
  band.align = MaskAlign::kTopLeft;
  specs.push_back(band);
  Spec tall = band;  // Lq > Lk: rows past Lk + 9 see nothing
  tall.seq_k = half;
  specs.push_back(tall);
  Spec causal = Dense(203, 17, 2, 1, 64);  // bottom-right causal, Lq > Lk: 186 empty rows
  causal.causal = true;
  specs.push_back(causal);
  Spec br_window = Dense(n, half, 2, 2, 40);  // bottom-right window: first half of rows empty
  br_window.window_left = 9;
  br_window.window_right = 0;
  specs.push_back(br_window);
  Spec right_only = Dense(64, 40, 1, 1, 64);  // window (0, -1), top-left: row i sees j >= i,
  right_only.window_left = 0;                 // so rows 40.. see nothing
  right_only.window_right = -1;
  right_only.align = MaskAlign::kTopLeft;
  specs.push_back(right_only);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Spec low = causal;
    low.dtype = dt;
    specs.push_back(low);
  }

  for (const Spec& s : specs) {
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    int64_t empty_rows = 0;
    for (int64_t i = 0; i < s.seq_q; ++i) empty_rows += VisibleKeys(s, s.seq_q, s.seq_k, i) == 0;
    if (s.seq_q > s.seq_k + 9 || s.causal) {
      EXPECT_GT(empty_rows, 0) << "the case lost its point";
    }
    CheckAllPaths(s, in);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      EXPECT_TRUE(o.out.AllFinite());
      for (int64_t i = 0; i < s.seq_q; ++i) {
        if (VisibleKeys(s, s.seq_q, s.seq_k, i) != 0) continue;
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) {
            ASSERT_EQ(o.out.Get({0, i, h, d}), 0.0) << "row " << i << " head " << h;
          }
          ASSERT_EQ(o.lse.Get({0, h, i}), -kInf) << "row " << i << " head " << h;
        }
      }
    }
  }
}

// Varlen with every 4th sequence having no keys: those rows are 0 / -inf, neighbours unaffected.
TEST(ForwardRegression, FullyMaskedVarlenSequences) {
  Spec s;
  for (int i = 0; i < 12; ++i) {
    s.seqlens_q.push_back(5 + i);
    s.seqlens_k.push_back(i % 4 == 0 ? 0 : 9 + 3 * i);
  }
  s.heads_q = 2;
  s.heads_kv = 1;
  s.dim = 64;
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs o;
    ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
    EXPECT_TRUE(o.out.AllFinite());
    for (size_t b = 0; b < s.seqlens_q.size(); b += 4) {
      for (int64_t t = in.cu_q[b]; t < in.cu_q[b + 1]; ++t) {
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) ASSERT_EQ(o.out.Get({t, h, d}), 0.0);
          ASSERT_EQ(o.lse.Get({h, t}), -kInf);
        }
      }
    }
  }
}

// Sk = 0: every row has no key (class 7 / §4.2).
TEST(ForwardRegression, NoKeys) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Spec s = Dense(17, 0, 4, 2, 64, dt);
    s.batch = 2;
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      for (double x : o.out.ToVector()) ASSERT_EQ(x, 0.0);
      for (double x : o.lse.ToVector()) ASSERT_EQ(x, -kInf);
    }
  }
}

// Row-major strides computed as if every zero extent were 1: an empty tensor whose strides are
// all non-zero (the natural row-major strides of an empty shape contain zeros).
std::vector<int64_t> StridesIgnoringEmptyDims(std::vector<int64_t> shape) {
  for (int64_t& x : shape) x = std::max<int64_t>(x, 1);
  return Tensor::ContiguousStrides(shape);
}

// Runs an empty problem on every path and exits 0 when each call succeeds and leaves its
// outputs bitwise untouched, 1 otherwise. Runs inside EXPECT_EXIT: a crash (SIGFPE from a
// division by an empty extent, bug class 7) fails the one test instead of the whole binary.
void RunEmptyProblemAndExit(const AttentionParams& p, const std::vector<const Tensor*>& outputs,
                            int64_t dim) {
  for (Path path : PathsFor(dim)) {
    Context ctx;
    ctx.path = path;
    const Status st = AttentionForward(p, ctx);
    if (!st.ok()) {
      std::fprintf(stderr, "path %s: %s\n", PathName(path), st.ToString().c_str());
      std::_Exit(1);
    }
    for (const Tensor* t : outputs) {
      const ::testing::AssertionResult same = t->Unchanged();
      if (!same) {
        std::fprintf(stderr, "path %s: output written: %s\n", PathName(path), same.message());
        std::_Exit(1);
      }
    }
  }
  std::_Exit(0);
}

// B = 0, Sq = 0, Hq = 0 and num_seqs = 0 succeed without touching the outputs (RELIABILITY.md
// §4.2), with the natural row-major strides of the empty outputs (which contain zeros) and
// with all-non-zero strides.
TEST(ForwardRegression, EmptyProblemsAreNoOps) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<Spec> specs;
  Spec s = Dense(17, 33, 2, 1, 64);
  s.batch = 0;
  specs.push_back(s);
  specs.push_back(Dense(0, 33, 2, 1, 64));
  s = Dense(0, 0, 2, 1, 40);
  s.causal = true;
  specs.push_back(s);
  specs.push_back(Dense(17, 33, 0, 1, 64));  // no query heads: Hq = 0 is divisible by Hkv
  for (const Spec& e : specs) {
    for (bool natural_strides : {true, false}) {
      SCOPED_TRACE(e.Name() + (natural_strides ? " natural strides" : " non-zero strides"));
      const Inputs in = MakeInputs(e);
      Outputs o = MakeOutputs(e, in);
      if (!natural_strides) {
        o.out = Tensor(e.dtype, o.out.shape(), StridesIgnoringEmptyDims(o.out.shape()));
        o.lse = Tensor(DType::kF32, o.lse.shape(), StridesIgnoringEmptyDims(o.lse.shape()));
      }
      const AttentionParams p = MakeParams(e, in, &o);
      EXPECT_EXIT(RunEmptyProblemAndExit(p, {&o.out, &o.lse}, e.dim), ::testing::ExitedWithCode(0),
                  "");
    }
  }
  // Varlen with zero sequences over a non-empty token axis: nothing belongs to a sequence.
  Tensor q(DType::kF32, {5, 2, 64}), k(DType::kF32, {4, 1, 64}), v(DType::kF32, {4, 1, 64});
  Tensor out(DType::kF32, {5, 2, 64}), lse(DType::kF32, {2, 5});
  Rng rng(1);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  const std::vector<int32_t> cu = {0};
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.lse = lse.view();
  p.cu_seqlens_q = cu.data();
  p.cu_seqlens_k = cu.data();
  p.num_seqs = 0;
  EXPECT_EXIT(RunEmptyProblemAndExit(p, {&out, &lse}, 64), ::testing::ExitedWithCode(0), "");
}

// Path::kFast exists only for D in {64, 128, 256}; elsewhere it is an error, outputs untouched.
TEST(ForwardRegression, FastPathRejectsOtherHeadDims) {
  for (int64_t d : {1, 40, 63, 72, 96, 512}) {
    Spec s = Dense(17, 17, 2, 1, d);
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s);
    Outputs o = MakeOutputs(s, in);
    Context ctx;
    ctx.path = Path::kFast;
    const Status st = AttentionForward(MakeParams(s, in, &o), ctx);
    EXPECT_FALSE(st.ok());
    EXPECT_TRUE(st.code() == StatusCode::kUnimplemented ||
                st.code() == StatusCode::kInvalidArgument)
        << st.ToString();
    EXPECT_FALSE(st.message().empty());
    EXPECT_TRUE(o.out.Unchanged());
    EXPECT_TRUE(o.lse.Unchanged());
  }
}

// Large magnitudes (class 4): constant inputs at 256 (f16) and 133120 (bf16), whose logits
// overflow 16-bit arithmetic, and values near dtype max / L, whose unnormalized sum would
// overflow a 16-bit accumulator. Finite, and within the ratio rule.
TEST(ForwardRegression, LargeMagnitudeInputs) {
  struct Case {
    DType dtype;
    double qk;     // constant value of q and k
    double v_max;  // largest finite value of the dtype
  };
  for (const Case& c : {Case{DType::kF16, 256.0, 65504.0}, Case{DType::kBF16, 133120.0, 3.38e38}}) {
    for (bool causal : {false, true}) {
      Spec s = Dense(33, 129, 2, 1, 64, c.dtype);
      s.causal = causal;
      s.rule = Rule::kRatioOnly;
      SCOPED_TRACE(s.Name());
      Inputs in = MakeInputs(s);
      Rng rng(test::SeedFor(s.Name() + "values"));
      in.q.ForEach([&](const Index& i) { in.q.Set(i, c.qk); });
      in.k.ForEach([&](const Index& i) { in.k.Set(i, c.qk); });
      const double v_scale = c.v_max / static_cast<double>(s.seq_k) * 0.9;
      in.v.ForEach([&](const Index& i) { in.v.Set(i, v_scale * rng.Uniform(0.5, 1.0)); });
      CheckAllPaths(s, in);
      for (Path path : PathsFor(s.dim)) {
        Outputs o;
        ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
        EXPECT_TRUE(o.out.AllFinite()) << PathName(path);
        EXPECT_TRUE(o.lse.AllFinite()) << PathName(path);
      }
    }
  }
}

// Valid logits near -2e4 next to masked keys (class 2): masked keys get exactly nothing and
// the rows still match fp64. Only a true -inf mask survives this.
TEST(ForwardRegression, VeryNegativeLogits) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Spec s = Dense(65, 129, 2, 1, 64, dt);
    s.causal = true;
    s.rule = Rule::kRatioOnly;
    SCOPED_TRACE(s.Name());
    Inputs in = MakeInputs(s);
    Rng rng(test::SeedFor(s.Name() + "values"));
    // s = scale * q.k ~ -2e4 * (1 + small): q_d = -2e4 / (scale * D), k_d = 1 + 0.01 N(0, 1).
    const double qd = -2e4 / (0.125 * 64.0);
    in.q.ForEach([&](const Index& i) { in.q.Set(i, qd); });
    in.k.ForEach([&](const Index& i) { in.k.Set(i, 1.0 + 0.01 * rng.Normal()); });
    CheckAllPaths(s, in);
  }
}

// Strided views (class 10): each layout variant is bitwise equal to the contiguous copy on the
// same path.
TEST(ForwardRegression, StrideMatrix) {
  struct Variant {
    Layout q, kv, out;
  };
  const std::vector<Variant> variants = {
      {Layout::kPaddedDim, Layout::kPaddedDim, Layout::kPaddedDim},
      {Layout::kHeadSliced, Layout::kHeadSliced, Layout::kHeadSliced},
      {Layout::kHeadsMajor, Layout::kHeadsMajor, Layout::kHeadsMajor},
      {Layout::kSeqSliced, Layout::kSeqSliced, Layout::kSeqSliced},
      {Layout::kContiguous, Layout::kBatchBroadcast, Layout::kContiguous},
      {Layout::kHeadsMajor, Layout::kPaddedDim, Layout::kSeqSliced},
      {Layout::kPaddedDim, Layout::kHeadsMajor, Layout::kHeadSliced},
  };
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t d : {40, 64}) {
      for (const Variant& var : variants) {
        Spec s = Dense(Small() ? 17 : 113, Small() ? 33 : 203, 4, 2, d, dt);
        s.batch = 2;
        s.causal = true;
        s.q_layout = var.q;
        s.kv_layout = var.kv;
        s.out_layout = var.out;
        SCOPED_TRACE(test::Repro(s.Name()));
        const Inputs in = MakeInputs(s);
        Spec dense = s;
        dense.q_layout = dense.kv_layout = dense.out_layout = Layout::kContiguous;
        Inputs copy = MakeInputs(dense);
        copy.q = in.q.ContiguousCopy();
        copy.k = in.k.ContiguousCopy();
        copy.v = in.v.ContiguousCopy();
        for (Path path : PathsFor(d)) {
          SCOPED_TRACE(std::string("path ") + PathName(path));
          Outputs strided, contiguous;
          ASSERT_TRUE(RunForward(s, in, path, 0, &strided).ok());
          ASSERT_TRUE(RunForward(dense, copy, path, 0, &contiguous).ok());
          EXPECT_TRUE(SameBits(strided, contiguous, true));
        }
      }
    }
  }
  // Varlen through strided views.
  Spec s;
  s.seqlens_q = {17, 0, 40};
  s.seqlens_k = {33, 5, 40};
  s.heads_q = 4;
  s.heads_kv = 2;
  s.dim = 64;
  s.causal = true;
  s.q_layout = Layout::kHeadsMajor;
  s.kv_layout = Layout::kPaddedDim;
  s.out_layout = Layout::kHeadSliced;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);
  Spec dense = s;
  dense.q_layout = dense.kv_layout = dense.out_layout = Layout::kContiguous;
  Inputs copy = MakeInputs(dense);
  copy.q = in.q.ContiguousCopy();
  copy.k = in.k.ContiguousCopy();
  copy.v = in.v.ContiguousCopy();
  for (Path path : PathsFor(s.dim)) {
    Outputs a, b;
    ASSERT_TRUE(RunForward(s, in, path, 0, &a).ok());
    ASSERT_TRUE(RunForward(dense, copy, path, 0, &b).ok());
    EXPECT_TRUE(SameBits(a, b, true)) << PathName(path);
  }
}

// Base pointers 1, 2 and 3 elements past 64-byte alignment (class 11): correct, and bitwise
// equal to the aligned run on the same path.
TEST(ForwardRegression, MisalignedPointers) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t offset : {1, 2, 3}) {
      Spec s = Dense(33, 65, 2, 1, 64, dt);
      s.causal = true;
      s.misalign = offset;
      SCOPED_TRACE(test::Repro(s.Name()));
      const Inputs in = MakeInputs(s);
      CheckAllPaths(s, in);
      Spec aligned = s;
      aligned.misalign = 0;
      Inputs copy = MakeInputs(aligned);
      copy.q.FromVector(in.q.ToVector());
      copy.k.FromVector(in.k.ToVector());
      copy.v.FromVector(in.v.ToVector());
      for (Path path : PathsFor(s.dim)) {
        Outputs a, b;
        ASSERT_TRUE(RunForward(s, in, path, 0, &a).ok());
        ASSERT_TRUE(RunForward(aligned, copy, path, 0, &b).ok());
        EXPECT_TRUE(SameBits(a, b, true)) << PathName(path);
      }
    }
  }
}

// Outputs with gaps (padded rows, a padded LSE) and no LSE at all (class 18): every element
// written and finite, gaps and guards untouched. RunForward() checks gaps and guards on every call.
TEST(ForwardRegression, OutputPoisonAndGuards) {
  for (bool with_lse : {true, false}) {
    Spec s = Dense(65, 129, 4, 2, 72);
    s.batch = 2;
    s.causal = true;
    s.out_layout = Layout::kPaddedDim;
    s.with_lse = with_lse;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    CheckAllPaths(s, in);
    for (Path path : PathsFor(s.dim)) {
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      EXPECT_TRUE(o.out.AllFinite()) << PathName(path);
      if (with_lse) {
        EXPECT_TRUE(o.lse.AllFinite()) << PathName(path);
      }
    }
  }
}

// Repeated runs are bitwise identical (class 12), with a batch large enough for races to show.
TEST(ForwardDeterminism, RepeatedRunsAreBitwiseIdentical) {
  Spec s = Dense(Small() ? 17 : 64, Small() ? 33 : 96, 4, 2, 64);
  s.batch = Small() ? 8 : 60;
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    const int repeats = path == Path::kReference || Small() ? 3 : 50;
    Outputs first;
    ASSERT_TRUE(RunForward(s, in, path, 0, &first).ok());
    for (int r = 1; r < repeats; ++r) {
      Outputs again;
      ASSERT_TRUE(RunForward(s, in, path, 0, &again).ok());
      ASSERT_TRUE(SameBits(first, again, true)) << "repeat " << r;
    }
  }
}

// Thread-count invariance (class 13): 1, 2, 3 and 7 threads give the same bits.
TEST(ForwardDeterminism, ThreadCountInvariance) {
  for (int64_t d : {40, 64}) {
    Spec s = Dense(Small() ? 65 : 203, Small() ? 65 : 203, 8, 2, d);
    s.batch = 3;
    s.causal = true;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(d)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs one;
      ASSERT_TRUE(RunForward(s, in, path, 1, &one).ok());
      for (int32_t threads : {2, 3, 7}) {
        Outputs many;
        ASSERT_TRUE(RunForward(s, in, path, threads, &many).ok());
        EXPECT_TRUE(SameBits(one, many, true)) << threads << " threads";
      }
    }
  }
  // Varlen with very uneven sequences, where the split of work across threads matters most.
  Spec v;
  v.seqlens_q = {1, 200, 3, 64, 0, 129};
  v.seqlens_k = {300, 200, 3, 1, 7, 129};
  v.heads_q = 4;
  v.heads_kv = 1;
  v.dim = 64;
  v.causal = true;
  SCOPED_TRACE(test::Repro(v.Name()));
  const Inputs in = MakeInputs(v);
  for (Path path : PathsFor(v.dim)) {
    Outputs one, three;
    ASSERT_TRUE(RunForward(v, in, path, 1, &one).ok());
    ASSERT_TRUE(RunForward(v, in, path, 3, &three).ok());
    EXPECT_TRUE(SameBits(one, three, true)) << PathName(path);
  }
}

// NaN policy (class 17): a NaN in an unmasked q row makes that row NaN and leaves every other
// element bitwise as in a clean run; NaN in k or v poisons exactly the rows that see that key.
TEST(ForwardRegression, NanInInputsStaysInTheAffectedRows) {
  Spec s = Dense(40, 40, 4, 2, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs clean = MakeInputs(s);
  const int64_t row = 21, head = 1, key = 30;
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs base;
    ASSERT_TRUE(RunForward(s, clean, path, 0, &base).ok());

    // NaN in q[row, head]: out[row, head, :] and lse[head, row] are NaN, all else unchanged.
    {
      Inputs in = MakeInputs(s);
      in.q.Set({0, row, head, 7}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.out.ForEach([&](const Index& i) {
        const bool hit = i[1] == row && i[2] == head;
        const double x = o.out.Get(i), y = base.out.Get(i);
        if (hit) {
          EXPECT_TRUE(std::isnan(x)) << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "]";
        } else {
          EXPECT_EQ(std::memcmp(&x, &y, sizeof(x)), 0)
              << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "] changed";
        }
      });
      o.lse.ForEach([&](const Index& i) {
        const bool hit = i[1] == head && i[2] == row;
        EXPECT_EQ(std::isnan(o.lse.Get(i)), hit) << "lse[" << i[1] << ", " << i[2] << "]";
        if (!hit) {
          EXPECT_EQ(o.lse.Get(i), base.lse.Get(i));
        }
      });
    }
    // NaN in k[key] of KV head 0: rows that see the key (row >= key under causal Sq = Sk) of
    // query heads 0 and 1 are NaN.
    {
      Inputs in = MakeInputs(s);
      in.k.Set({0, key, 0, 3}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.lse.ForEach([&](const Index& i) {
        const bool hit = i[1] < 2 && i[2] >= key;
        EXPECT_EQ(std::isnan(o.lse.Get(i)), hit) << "lse[" << i[1] << ", " << i[2] << "]";
      });
    }
    // NaN in v[key, KV head 1, column 5]: column 5 of the rows that see the key is NaN and
    // every other column is unchanged. Rows that do not see the key may still get a NaN in
    // column 5 when they share a query block with a row that does (0 * NaN in the P.V tile),
    // as documented in attention.h; otherwise they are unchanged.
    {
      Inputs in = MakeInputs(s);
      in.v.Set({0, key, 1, 5}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.out.ForEach([&](const Index& i) {
        const bool hit = i[2] >= 2 && i[1] >= key && i[3] == 5;
        const double x = o.out.Get(i), y = base.out.Get(i);
        if (hit) {
          EXPECT_TRUE(std::isnan(x)) << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "]";
        } else if (i[3] != 5 || !std::isnan(x)) {
          EXPECT_EQ(std::memcmp(&x, &y, sizeof(x)), 0)
              << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "] changed";
        }
      });
      for (double x : o.lse.ToVector()) EXPECT_TRUE(std::isfinite(x));
    }
  }
}

// NaN stored at key positions a row never sees does not leak into it: tessera never reads
// masked keys (RELIABILITY.md class 17). Here the NaN keys are visible to no row at all.
TEST(ForwardRegression, NanInMaskedKeysDoesNotLeak) {
  Spec s = Dense(40, 200, 2, 1, 64);
  s.window_left = 20;
  s.window_right = 0;
  s.align = MaskAlign::kTopLeft;  // rows see keys [i - 20, i]: keys >= 40 are never visible
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs clean = MakeInputs(s);
  Inputs in = MakeInputs(s);
  for (int64_t j = 40; j < s.seq_k; ++j) {
    for (int64_t d = 0; d < s.dim; ++d) {
      in.k.Set({0, j, 0, d}, kNaN);
      in.v.Set({0, j, 0, d}, kNaN);
    }
  }
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs a, b;
    ASSERT_TRUE(RunForward(s, clean, path, 0, &a).ok());
    ASSERT_TRUE(RunForward(s, in, path, 0, &b).ok());
    EXPECT_TRUE(b.out.AllFinite());
    EXPECT_TRUE(SameBits(a, b, true));
  }
}

}  // namespace
}  // namespace tessera
