// SPDX-License-Identifier: Apache-2.0
#include "attention_cases.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <set>

namespace tessera {
namespace test {
namespace {

std::vector<int32_t> Offsets(const std::vector<int32_t>& lens) {
  std::vector<int32_t> cu = {0};
  for (int32_t l : lens) cu.push_back(cu.back() + l);
  return cu;
}

// Fills with N(0, 1) * mult; a batch-broadcast tensor through batch 0 (the only storage it has).
void FillNormalMaybeBroadcast(Tensor* t, Layout layout, Rng& rng, double mult) {
  if (layout == Layout::kBatchBroadcast) {
    t->ForEach([&](const Index& idx) {
      if (idx[0] == 0) t->Set(idx, static_cast<double>(rng.Normal()) * mult);
    });
  } else {
    t->FillNormal(rng, mult);
  }
}

// MakeInputs() and MakeBackwardInputs(): dout is drawn after q, k and v, which therefore do not
// depend on whether it is drawn.
Inputs RandomInputs(const Spec& s, bool with_dout) {
  if (s.in_layout != Layout::kContiguous) {
    EXPECT_EQ(s.q_layout, Layout::kContiguous) << "in_layout and q_layout both set";
    EXPECT_EQ(s.kv_layout, Layout::kContiguous) << "in_layout and kv_layout both set";
  }
  Inputs in;
  Rng rng(SeedFor(s.Name()));
  if (s.varlen()) {
    in.cu_q = Offsets(s.seqlens_q);
    in.cu_k = Offsets(s.seqlens_k);
    in.tokens_q = in.cu_q.back() + s.extra_q_tokens;
    in.tokens_k = in.cu_k.back() + s.extra_k_tokens;
  } else {
    in.tokens_q = s.seq_q;
    in.tokens_k = s.seq_k;
  }
  in.q = MakeTensor(s.dtype, TokenShape(s, in.tokens_q, s.heads_q), s.QLayout(), s.misalign);
  in.k = MakeTensor(s.dtype, TokenShape(s, in.tokens_k, s.heads_kv), s.KvLayout(), s.misalign);
  in.v = MakeTensor(s.dtype, TokenShape(s, in.tokens_k, s.heads_kv), s.KvLayout(), s.misalign);
  FillNormalMaybeBroadcast(&in.q, s.QLayout(), rng, s.q_mult);
  FillNormalMaybeBroadcast(&in.k, s.KvLayout(), rng, 1.0);
  FillNormalMaybeBroadcast(&in.v, s.KvLayout(), rng, 1.0);
  if (with_dout) {
    in.dout = MakeTensor(s.dtype, TokenShape(s, in.tokens_q, s.heads_q), s.dout_layout, s.misalign);
    FillNormalMaybeBroadcast(&in.dout, s.dout_layout, rng, 1.0);
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

bool HasDout(const Inputs& in) { return in.dout.rank() != 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Paths.

bool HasFastPath(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }

std::vector<Path> PathsFor(int64_t dim) {
  std::vector<Path> paths = {Path::kReference, Path::kGeneric};
  if (HasFastPath(dim)) paths.push_back(Path::kFast);
  paths.push_back(Path::kAuto);
  return paths;
}

// ---------------------------------------------------------------------------------------------
// Cases.

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

std::string Spec::Name() const {
  auto num = [](double x) {
    std::string s = std::to_string(static_cast<long long>(std::llround(x)));
    if (s[0] == '-') s = "m" + s.substr(1);
    return s;
  };
  auto inum = [&](int64_t x) { return num(static_cast<double>(x)); };
  std::string n;
  if (varlen()) {
    n += "varlen_q";
    for (size_t i = 0; i < seqlens_q.size(); ++i) n += (i ? "x" : "") + inum(seqlens_q[i]);
    n += "_k";
    for (size_t i = 0; i < seqlens_k.size(); ++i) n += (i ? "x" : "") + inum(seqlens_k[i]);
    if (extra_q_tokens || extra_k_tokens) {
      n += "_extra" + inum(extra_q_tokens) + "x" + inum(extra_k_tokens);
    }
    if (varlen_rank4) n += "_rank4";
  } else {
    n += "b" + inum(batch) + "_sq" + inum(seq_q) + "_sk" + inum(seq_k);
  }
  n += "_h" + inum(heads_q) + "x" + inum(heads_kv) + "_d" + inum(dim);
  n += std::string("_") + DTypeName(dtype);
  if (causal) n += "_causal";
  if (window_left != -1 || window_right != -1) {
    n += "_win" + inum(window_left) + "x" + inum(window_right);
  }
  if (align == MaskAlign::kTopLeft) n += "_topleft";
  if (softcap != 0.0f) n += "_cap" + num(softcap);
  if (scale.has_value()) n += "_scale" + num(*scale * 1000.0) + "milli";
  if (alibi == AlibiKind::kPerHead) n += "_alibiH";
  if (alibi == AlibiKind::kPerBatch) n += "_alibiBH";
  if (!with_lse) n += "_nolse";
  if (q_mult != 1.0) n += "_qmult" + num(q_mult);
  const std::pair<const char*, Layout> layouts[] = {{"_q", q_layout},       {"_kv", kv_layout},
                                                    {"_in", in_layout},     {"_out", out_layout},
                                                    {"_dout", dout_layout}, {"_grad", grad_layout}};
  for (const auto& [tag, layout] : layouts) {
    if (layout != Layout::kContiguous) n += tag + std::string(LayoutName(layout));
  }
  if (misalign) n += "_misalign" + inum(misalign);
  if (rule == Rule::kRatioOnly) n += "_ratio";
  return n;
}

void PrintTo(const Spec& s, std::ostream* os) { *os << s.Name(); }

std::string SpecName(const ::testing::TestParamInfo<Spec>& info) { return info.param.Name(); }

std::vector<Spec> Unique(std::vector<Spec> specs) {
  std::set<std::string> seen;
  std::vector<Spec> r;
  for (Spec& s : specs) {
    if (seen.insert(s.Name()).second) r.push_back(std::move(s));
  }
  return r;
}

Spec Dense(int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d, DType dt) {
  Spec s;
  s.seq_q = sq;
  s.seq_k = sk;
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.dim = d;
  s.dtype = dt;
  return s;
}

Spec Varlen(std::vector<int32_t> seqlens_q, std::vector<int32_t> seqlens_k, int64_t hq, int64_t hkv,
            int64_t d) {
  Spec s;
  s.seqlens_q = std::move(seqlens_q);
  s.seqlens_k = std::move(seqlens_k);
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.dim = d;
  return s;
}

bool NeedsNaive(const Spec& s) { return s.dtype != DType::kF32 || s.rule == Rule::kRatioOnly; }

// ---------------------------------------------------------------------------------------------
// Sweeps.

std::vector<Spec> MaskSweep(const Shapes& shapes, int random_windows) {
  struct Mask {
    bool causal;
    int64_t wl, wr;
  };
  Rng rng(20240917);  // fixed: the windows are part of the tests' identity
  std::vector<Spec> specs;
  for (auto [sq, sk] : shapes) {
    std::vector<Mask> masks = {{false, -1, -1}, {true, -1, -1}, {false, 0, 0},  {false, 1, 0},
                               {false, 0, 1},   {false, 7, 7},  {false, sk, 0}, {true, 16, -1},
                               {false, -1, 3},  {false, 5, -1}};
    for (int r = 0; r < random_windows; ++r) {
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
  return specs;
}

std::vector<Spec> AlibiSweep(const Shapes& shapes) {
  std::vector<Spec> specs;
  for (AlibiKind kind : {AlibiKind::kPerHead, AlibiKind::kPerBatch}) {
    for (auto [sq, sk] : shapes) {
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
  Spec s = Dense(65, 129, 4, 2, 64);
  s.alibi = AlibiKind::kPerHead;
  s.softcap = 5.0f;
  s.window_left = 20;
  s.window_right = 4;
  specs.push_back(s);
  return specs;
}

std::vector<Spec> ScaleSweep(int64_t sq, int64_t sk) {
  std::vector<Spec> specs;
  for (float scale : {0.0f, 0.05f, 0.3f, -0.5f}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Spec s = Dense(sq, sk, 2, 1, 64, dt);
      s.scale = scale;
      s.causal = true;
      specs.push_back(s);
    }
  }
  Spec s = Dense(sq, sk, 2, 1, 64);
  s.scale = 2.0f;
  s.rule = Rule::kRatioOnly;
  specs.push_back(s);
  return specs;
}

std::vector<Spec> VarlenSweep(const std::vector<SeqLens>& lens) {
  std::vector<Spec> specs;
  for (const SeqLens& l : lens) {
    for (int mask = 0; mask < 3; ++mask) {
      Spec s = Varlen(l.q, l.k, 4, 2, 64);
      s.causal = mask > 0;
      s.align = mask == 2 ? MaskAlign::kTopLeft : MaskAlign::kBottomRight;
      s.extra_q_tokens = 3;
      s.extra_k_tokens = 2;
      specs.push_back(s);
    }
  }
  return specs;
}

Spec VarlenMix() {
  Spec s = Varlen({3, 0, 17, 40}, {5, 9, 17, 1}, 4, 1, 72);
  s.varlen_rank4 = true;
  s.alibi = AlibiKind::kPerBatch;
  s.window_left = 6;
  s.window_right = 2;
  return s;
}

std::vector<Spec> FullyMaskedSpecs(int64_t n) {
  std::vector<Spec> specs;
  Spec band = Dense(n, n, 1, 1, 64);
  band.window_left = 9;
  band.window_right = 0;
  band.align = MaskAlign::kTopLeft;
  specs.push_back(band);
  Spec tall = band;
  tall.seq_k = n / 2;
  specs.push_back(tall);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    Spec causal = Dense(203, 17, 2, 1, 64, dt);  // 186 empty rows
    causal.causal = true;
    specs.push_back(causal);
  }
  return specs;
}

Spec EveryFourthSequenceWithoutKeys() {
  std::vector<int32_t> lens_q, lens_k;
  for (int i = 0; i < 12; ++i) {
    lens_q.push_back(5 + i);
    lens_k.push_back(i % 4 == 0 ? 0 : 9 + 3 * i);
  }
  Spec s = Varlen(lens_q, lens_k, 2, 1, 64);
  s.causal = true;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Inputs and parameters.

Tensor MakeTensor(DType dtype, const std::vector<int64_t>& shape, Layout layout, int64_t offset) {
  const int r = static_cast<int>(shape.size());
  const size_t s = static_cast<size_t>(r - 3), h = static_cast<size_t>(r - 2);  // token, head
  switch (layout) {
    case Layout::kContiguous:
      return Tensor(dtype, shape, {}, offset);
    case Layout::kPaddedDim:
      return Tensor(dtype, shape, Tensor::PaddedStrides(shape, 3), offset);
    case Layout::kHeadSliced: {
      std::vector<int64_t> storage = shape;
      storage[h] += 2;
      const std::vector<int64_t> strides = Tensor::ContiguousStrides(storage);
      return Tensor(dtype, shape, strides, offset + strides[h]);
    }
    case Layout::kHeadsMajor: {
      // Storage [.., H, S, D]: head stride S*D, token stride D.
      std::vector<int64_t> strides(shape.size());
      const int64_t tokens = shape[s], heads = shape[h], d = shape.back();
      strides[static_cast<size_t>(r - 1)] = 1;
      strides[s] = d;
      strides[h] = tokens * d;
      if (r == 4) strides[0] = heads * tokens * d;
      return Tensor(dtype, shape, strides, offset);
    }
    case Layout::kSeqSliced: {
      std::vector<int64_t> storage = shape;
      storage[s] += 2;
      const std::vector<int64_t> strides = Tensor::ContiguousStrides(storage);
      return Tensor(dtype, shape, strides, offset + strides[s]);
    }
    case Layout::kBatchBroadcast: {
      std::vector<int64_t> strides = Tensor::ContiguousStrides(shape);
      if (r == 4) strides[0] = 0;
      return Tensor(dtype, shape, strides, offset);
    }
  }
  return Tensor(dtype, shape, {}, offset);
}

std::vector<int64_t> TokenShape(const Spec& s, int64_t tokens, int64_t heads) {
  if (!s.varlen()) return {s.batch, tokens, heads, s.dim};
  if (s.varlen_rank4) return {1, tokens, heads, s.dim};
  return {tokens, heads, s.dim};
}

Inputs MakeInputs(const Spec& s) { return RandomInputs(s, /*with_dout=*/false); }

Inputs MakeBackwardInputs(const Spec& s) { return RandomInputs(s, /*with_dout=*/true); }

Spec ContiguousSpec(const Spec& s) {
  Spec dense = s;
  dense.q_layout = dense.kv_layout = dense.in_layout = Layout::kContiguous;
  dense.out_layout = dense.dout_layout = dense.grad_layout = Layout::kContiguous;
  dense.misalign = 0;
  return dense;
}

Inputs ContiguousInputs(const Spec& s, const Inputs& in) {
  Inputs copy = MakeInputs(ContiguousSpec(s));
  copy.q = in.q.ContiguousCopy();
  copy.k = in.k.ContiguousCopy();
  copy.v = in.v.ContiguousCopy();
  if (HasDout(in)) copy.dout = in.dout.ContiguousCopy();
  if (s.alibi != AlibiKind::kNone) copy.slopes = in.slopes.ContiguousCopy();
  return copy;
}

Inputs WithRepeatedKv(const Spec& s, const Inputs& in, Spec* mha) {
  *mha = s;
  mha->heads_kv = s.heads_q;
  Inputs rep = HasDout(in) ? MakeBackwardInputs(*mha) : MakeInputs(*mha);
  rep.q.FromVector(in.q.ToVector());
  if (HasDout(in)) rep.dout.FromVector(in.dout.ToVector());
  const int64_t group = s.heads_q / s.heads_kv;
  const size_t head_axis = static_cast<size_t>(in.k.rank() - 2);
  for (const auto& [dst, src] :
       {std::pair<Tensor*, const Tensor*>{&rep.k, &in.k}, {&rep.v, &in.v}}) {
    dst->ForEach([&](const Index& i) {
      Index from = i;
      from[head_axis] /= group;
      dst->Set(i, src->Get(from));
    });
  }
  if (s.alibi != AlibiKind::kNone) rep.slopes = in.slopes.ContiguousCopy();
  return rep;
}

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

std::vector<double> Prefix(const std::vector<double>& x, int64_t covered, int64_t tokens,
                           std::vector<double>* outside) {
  if (covered == tokens) return x;
  const size_t n =
      tokens == 0 ? 0 : x.size() / static_cast<size_t>(tokens) * static_cast<size_t>(covered);
  if (outside != nullptr) {
    outside->insert(outside->end(), x.begin() + static_cast<std::ptrdiff_t>(n), x.end());
  }
  return std::vector<double>(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(n));
}

Outputs MakeOutputs(const Spec& s, const Inputs& in) {
  Outputs o;
  o.out = MakeTensor(s.dtype, TokenShape(s, in.tokens_q, s.heads_q), s.out_layout, s.misalign);
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
    p.cu_seqlens_q = I32View(in.cu_q);
    p.cu_seqlens_k = I32View(in.cu_k);
    p.num_seqs = static_cast<int32_t>(s.seqlens_q.size());
  }
  return p;
}

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

// ---------------------------------------------------------------------------------------------
// Masks.

namespace {

// Position of query row i on the key axis.
int64_t QueryPosition(const Spec& s, int64_t i) {
  return i + (s.align == MaskAlign::kTopLeft ? 0 : s.seq_k - s.seq_q);
}

}  // namespace

int64_t VisibleKeys(const Spec& s, int64_t i) {
  const int64_t pos = QueryPosition(s, i);
  int64_t lo = 0, hi = s.seq_k - 1;
  if (s.window_left >= 0) lo = std::max(lo, pos - s.window_left);
  const int64_t wr = s.causal ? 0 : s.window_right;
  if (wr >= 0) hi = std::min(hi, pos + wr);
  return std::max<int64_t>(0, hi - lo + 1);
}

bool KeySeen(const Spec& s, int64_t j) {
  const int64_t wr = s.causal ? 0 : s.window_right;
  for (int64_t i = 0; i < s.seq_q; ++i) {
    const int64_t pos = QueryPosition(s, i);
    if ((s.window_left < 0 || j >= pos - s.window_left) && (wr < 0 || j <= pos + wr)) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Calls on every path.

std::vector<int64_t> StridesIgnoringEmptyDims(std::vector<int64_t> shape) {
  for (int64_t& x : shape) x = std::max<int64_t>(x, 1);
  return Tensor::ContiguousStrides(shape);
}

void RunOnEveryPathAndExit(const std::function<Status(const Context&)>& run,
                           const std::vector<const Tensor*>& outputs, int64_t dim) {
  for (Path path : PathsFor(dim)) {
    Context ctx;
    ctx.path = path;
    const Status st = run(ctx);
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

bool NamesArgument(const std::string& message, const std::string& name) {
  auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t at = message.find(name); at != std::string::npos; at = message.find(name, at + 1)) {
    const bool left_ok = at == 0 || !ident(message[at - 1]);
    const size_t end = at + name.size();
    const bool right_ok = end == message.size() || !ident(message[end]);
    if (left_ok && right_ok) return true;
  }
  return false;
}

void ExpectRejectedOnEveryPath(const std::function<Status(const Context&)>& run, StatusCode code,
                               const std::string& arg, const std::vector<const Tensor*>& outputs) {
  for (Path path : kAllPaths) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Context ctx;
    ctx.path = path;
    const Status s = run(ctx);
    EXPECT_EQ(s.code(), code) << s.ToString();
    EXPECT_TRUE(NamesArgument(s.message(), arg))
        << "the message does not name `" << arg << "`: " << s.message();
    for (const Tensor* t : outputs) EXPECT_TRUE(t->Unchanged());
  }
}

}  // namespace test
}  // namespace tessera
