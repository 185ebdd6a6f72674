// SPDX-License-Identifier: Apache-2.0
// Decode (tessera/decode.h) over KV caches (tessera/kv_cache.h), against the fp64 reference on the
// dequantized cache (ref/decode_ref.h) with the tolerance rules of tests/tolerances.h:
//   f32 / bf16 / f16 KV (read exactly): the forward's rules for the q / out dtype (fp32 rule with
//     its magnitude scale; bf16 / f16: ratio rule against the naive same-precision computation);
//   int8 / int4 KV: NMSE <= kQuantKvMaxNmse against the fp64 reference on the dequantized cache,
//     and, against the same reference fed the query the integer kernel uses
//     (ref::DecodeF64QuantizedQuery), the fp32 ceiling plus the documented bound of the VNNI
//     P.V's weight rounding (kQuantPvStepFraction*), which isolates the kernel's error from the
//     documented query quantization.
// Plus the identities (decode = AttentionForward, paged = contiguous bitwise, split + merge = one
// pass, batch and thread-count invariance), masks and modifiers, plans, rejected arguments and
// non-finite values.
//
// Every output is NaN-prefilled with guards (tests/test_util.h). TESSERA_SMALL_TESTS=1 shrinks the
// longest sequence (sanitizer builds); TESSERA_SEED=<n> changes every random input.
#include "tessera/decode.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <numeric>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_cases.h"
#include "ref/attention_ref.h"
#include "ref/decode_ref.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/merge.h"
#include "tessera/status.h"
#include "tessera/types.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::AlibiKind;
using test::I32View;
using test::Index;
using test::Rng;
using test::Rule;
using test::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();

bool Small() { return test::SmallTests(); }

// The longest sequence of the sweeps: several splits of the sweeps' split sizes (64, 100),
// several pages of 256 and a page-size-1 block table of 1000+ entries (Small(): still past one
// page of 256).
int32_t LongLen() { return Small() ? 300 : 1100; }

size_t Sz(int64_t n) { return static_cast<size_t>(n); }

// Sequence b's length in a batch view.
int64_t LenOf(const KVBatchView& kv, int64_t b) {
  return static_cast<const int32_t*>(kv.seq_lens.data)[b];
}

// ---------------------------------------------------------------------------------------------
// Caches.

// A cache of random K/V ~ N(0, 1). The values depend only on `name` and the lengths, never on the
// layout: a paged and a contiguous cache built with the same name hold the same tokens.
struct CacheSpec {
  KVDType dtype = KVDType::kF32;
  int64_t page_size = 0;  // 0: contiguous; else paged, pages shuffled over a pool 3x too large
  int64_t heads_kv = 2;
  int64_t dim = 64;
  std::vector<int32_t> lens;
  int64_t spare = 0;    // room for this many more tokens per sequence
  bool poison = false;  // every pool byte no append writes is 0xff (NaN in every float format)
  std::string name;
  // Optional: fills sequence b's values instead of N(0, 1) (k, v: [len, Hkv, D], preallocated).
  std::function<void(int64_t b, std::vector<float>* k, std::vector<float>* v)> values;
};

struct TestCache {
  CacheSpec spec;
  KVCache cache;
  std::vector<int32_t> lens;         // [B] current lengths (kv().seq_lens points here)
  std::vector<int32_t> block_table;  // [B, max_pages], paged only
  int64_t max_pages = 0;
  int64_t num_pages = 0;
  int64_t page_size = 0;  // of the pool: the capacity per sequence when contiguous
  std::vector<std::vector<float>> k_src, v_src;  // the appended values, [len, Hkv, D] each

  bool paged() const { return spec.page_size > 0; }
  int64_t batch() const { return static_cast<int64_t>(lens.size()); }
  int64_t row_bytes() const { return KVRowBytes(spec.dtype, spec.dim); }

  KVCacheView view() { return cache.view(); }
  KVBatchView kv() const {
    KVBatchView v;
    v.batch = batch();
    v.seq_lens = I32View(lens.data(), v.batch);
    if (paged()) v.block_table = I32View(block_table.data(), v.batch, max_pages);
    return v;
  }
  // Sequence b as a batch of one over the same storage (contiguous: the pool starting at page b).
  KVCacheView view_of(int64_t b) {
    KVCacheView v = cache.view();
    if (paged()) return v;
    const int64_t rows = b * page_size * spec.heads_kv;
    v.k = static_cast<uint8_t*>(v.k) + rows * row_bytes();
    v.v = static_cast<uint8_t*>(v.v) + rows * row_bytes();
    if (v.k_scales != nullptr) v.k_scales += rows * 2;
    if (v.v_scales != nullptr) v.v_scales += rows * 2;
    v.num_pages = 1;
    return v;
  }
  KVBatchView kv_of(int64_t b, const int32_t* len) const {
    KVBatchView v;
    v.batch = 1;
    v.seq_lens = I32View(len, 1);
    if (paged()) v.block_table = I32View(block_table.data() + b * max_pages, 1, max_pages);
    return v;
  }
  // Byte offset of the (token t of sequence b, head) row in the K or V pool.
  int64_t RowOffset(int64_t b, int64_t t, int64_t head) const {
    const int64_t page = paged() ? block_table[Sz(b * max_pages + t / page_size)] : b;
    const int64_t slot = paged() ? t % page_size : t;
    return ((page * spec.heads_kv + head) * page_size + slot) * row_bytes();  // head-major pages
  }
};

// Allocates and fills a cache: sequences are appended one at a time (longest first, so that the
// quantized dtypes calibrate their channel normalizers on the most tokens).
void BuildCache(const CacheSpec& s, TestCache* c) {
  c->spec = s;
  c->lens = s.lens;
  const int64_t batch = c->batch(), row = s.heads_kv * s.dim;
  Rng rng(test::SeedFor(s.name + "/kv"));
  c->k_src.assign(Sz(batch), {});
  c->v_src.assign(Sz(batch), {});
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = c->lens[Sz(b)];
    c->k_src[Sz(b)].resize(Sz(len * row));
    c->v_src[Sz(b)].resize(Sz(len * row));
    if (s.values) {
      s.values(b, &c->k_src[Sz(b)], &c->v_src[Sz(b)]);
      continue;
    }
    for (float& x : c->k_src[Sz(b)]) x = rng.Normal();
    for (float& x : c->v_src[Sz(b)]) x = rng.Normal();
  }
  if (c->paged()) {
    c->page_size = s.page_size;
    int64_t needed = 0;
    std::vector<int64_t> pages(Sz(batch));
    for (int64_t b = 0; b < batch; ++b) {
      pages[Sz(b)] = (c->lens[Sz(b)] + s.spare + s.page_size - 1) / s.page_size;
      needed += pages[Sz(b)];
      c->max_pages = std::max(c->max_pages, pages[Sz(b)]);
    }
    c->max_pages = std::max<int64_t>(c->max_pages, 1);
    c->num_pages = std::max<int64_t>(1, 3 * needed);
    std::vector<int32_t> perm(Sz(c->num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    Rng page_rng(test::SeedFor(s.name + "/pages"));
    std::shuffle(perm.begin(), perm.end(), page_rng.engine());
    // Entries past a sequence's pages name a page no sequence uses.
    c->block_table.assign(Sz(batch * c->max_pages), perm.back());
    size_t next = 0;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t p = 0; p < pages[Sz(b)]; ++p) {
        c->block_table[Sz(b * c->max_pages + p)] = perm[next++];
      }
    }
  } else {
    c->page_size = 1;
    for (int32_t len : c->lens) c->page_size = std::max<int64_t>(c->page_size, len + s.spare);
    c->num_pages = std::max<int64_t>(1, batch);
  }
  const Status st = c->cache.Allocate(s.dtype, c->num_pages, c->page_size, s.heads_kv, s.dim);
  ASSERT_TRUE(st.ok()) << st.ToString();
  if (s.poison) {
    KVCacheView v = c->cache.view();
    const int64_t rows = c->num_pages * c->page_size * s.heads_kv;
    std::memset(v.k, 0xff, Sz(rows * c->row_bytes()));
    std::memset(v.v, 0xff, Sz(rows * c->row_bytes()));
    if (v.k_scales != nullptr) std::memset(v.k_scales, 0xff, Sz(rows * 2) * sizeof(float));
    if (v.v_scales != nullptr) std::memset(v.v_scales, 0xff, Sz(rows * 2) * sizeof(float));
  }
  std::vector<int64_t> order(Sz(batch));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return c->lens[Sz(a)] > c->lens[Sz(b)]; });
  const int32_t zero = 0;
  for (int64_t b : order) {
    const int64_t len = c->lens[Sz(b)];
    if (len == 0) continue;
    AppendKVParams ap;
    ap.k_new = MakeView4(c->k_src[Sz(b)].data(), DType::kF32, 1, len, s.heads_kv, s.dim);
    ap.v_new = MakeView4(c->v_src[Sz(b)].data(), DType::kF32, 1, len, s.heads_kv, s.dim);
    ap.cache = c->view_of(b);
    ap.batch = c->kv_of(b, &zero);
    const Status a = AppendKV(ap, Context());
    ASSERT_TRUE(a.ok()) << "AppendKV of sequence " << b << ": " << a.ToString();
  }
}

// Appends one random token to every sequence (one batched AppendKV) and advances the lengths.
void AppendOneToken(TestCache* c, Rng& rng) {
  const int64_t batch = c->batch(), row = c->spec.heads_kv * c->spec.dim;
  std::vector<float> k(Sz(batch * row)), v(Sz(batch * row));
  for (float& x : k) x = rng.Normal();
  for (float& x : v) x = rng.Normal();
  AppendKVParams ap;
  ap.k_new = MakeView4(k.data(), DType::kF32, batch, 1, c->spec.heads_kv, c->spec.dim);
  ap.v_new = MakeView4(v.data(), DType::kF32, batch, 1, c->spec.heads_kv, c->spec.dim);
  ap.cache = c->view();
  ap.batch = c->kv();
  const Status st = AppendKV(ap, Context());
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (int32_t& len : c->lens) ++len;
}

// ---------------------------------------------------------------------------------------------
// Cases.

struct Case {
  KVDType kv = KVDType::kF32;
  DType dtype = DType::kF32;  // q and out
  int64_t page_size = 0;      // 0: contiguous
  int64_t num_q = 1;
  int64_t dim = 64;
  int64_t heads_kv = 2;
  int64_t group = 1;  // Hq / Hkv
  std::vector<int32_t> lens;
  bool causal = false;
  int64_t window_left = -1;
  float softcap = 0.0f;
  std::optional<float> scale;
  AlibiKind alibi = AlibiKind::kNone;
  int64_t split_tokens = 0;
  bool with_lse = true;
  double q_mult = 1.0;
  std::string tag;  // names what the fields above do not (custom scale, lengths, values)

  int64_t heads_q() const { return heads_kv * group; }
  int64_t batch() const { return static_cast<int64_t>(lens.size()); }

  std::string Name() const {
    std::string n = std::string(KVDTypeName(kv)) + "kv_" + DTypeName(dtype) + "_" +
                    (page_size > 0 ? "ps" + std::to_string(page_size) : std::string("contig")) +
                    "_Q" + std::to_string(num_q) + "_D" + std::to_string(dim) + "_h" +
                    std::to_string(heads_q()) + "x" + std::to_string(heads_kv);
    if (causal) n += "_causal";
    if (window_left >= 0) n += "_wl" + std::to_string(window_left);
    if (softcap > 0.0f) n += "_cap" + std::to_string(static_cast<int>(softcap));
    if (alibi == AlibiKind::kPerHead) n += "_alibiH";
    if (alibi == AlibiKind::kPerBatch) n += "_alibiBH";
    if (split_tokens > 0) n += "_split" + std::to_string(split_tokens);
    if (!with_lse) n += "_nolse";
    if (!tag.empty()) n += "_" + tag;
    return n;
  }

  CacheSpec Cache() const {
    CacheSpec s;
    s.dtype = kv;
    s.page_size = page_size;
    s.heads_kv = heads_kv;
    s.dim = dim;
    s.lens = lens;
    s.name = Name();
    return s;
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.Name(); }

constexpr KVDType kAllKvDTypes[] = {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8,
                                    KVDType::kInt4};

// A case with the fields every test sets: `group` query heads per KV head, `tag` in its name; the
// other fields keep their defaults (f32 q and out, no mask, the default split size, an LSE).
Case MakeCase(KVDType kv, int64_t page_size, int64_t num_q, int64_t dim, int64_t heads_kv,
              int64_t group, std::vector<int32_t> lens, std::string tag) {
  Case c;
  c.kv = kv;
  c.page_size = page_size;
  c.num_q = num_q;
  c.dim = dim;
  c.heads_kv = heads_kv;
  c.group = group;
  c.lens = std::move(lens);
  c.tag = std::move(tag);
  return c;
}

// The query, the ALiBi slopes and NaN-prefilled outputs of a case, and the parameters that tie
// them to a cache.
struct DecodeRun {
  Tensor q, slopes, out, lse;
  DecodeParams params;
};

void MakeRun(const Case& c, TestCache* cache, DecodeRun* r) {
  const int64_t batch = c.batch(), nq = c.num_q, hq = c.heads_q(), dim = c.dim;
  Rng rng(test::SeedFor(c.Name() + "/q"));
  r->q = Tensor(c.dtype, {batch, nq, hq, dim});
  r->q.FillNormal(rng, c.q_mult);
  r->out = Tensor(c.dtype, {batch, nq, hq, dim});
  r->lse = Tensor(DType::kF32, {batch, hq, nq});
  DecodeParams& p = r->params;
  p = DecodeParams();
  p.q = r->q.view();
  p.cache = cache->view();
  p.kv = cache->kv();
  p.out = r->out.view();
  if (c.with_lse) p.lse = r->lse.view();
  p.scale = c.scale;
  p.causal = c.causal;
  p.window_left = c.window_left;
  p.softcap = c.softcap;
  p.split_tokens = c.split_tokens;
  if (c.alibi == AlibiKind::kPerHead) {
    r->slopes = Tensor(DType::kF32, {hq});
    for (int64_t h = 0; h < hq; ++h) {
      r->slopes.Set({h}, std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(hq)));
    }
  } else if (c.alibi == AlibiKind::kPerBatch) {
    r->slopes = Tensor(DType::kF32, {batch, hq});
    r->slopes.ForEach([&](const Index& i) { r->slopes.Set(i, rng.Uniform(0.01, 0.5)); });
  }
  if (c.alibi != AlibiKind::kNone) p.alibi_slopes = r->slopes.view();
}

Status RunWith(const DecodeParams& p, int32_t threads = 0) {
  Context ctx;
  ctx.num_threads = threads;
  return Decode(p, ctx);
}

// ---------------------------------------------------------------------------------------------
// References.

// The cache's sequences read back (ReadKV) and packed along the token axis for the varlen
// attention references: k, v [total, Hkv, D] f32.
struct Packed {
  Tensor k, v;
  std::vector<int32_t> cu_q, cu_k;
};

void PackCache(const DecodeParams& p, Packed* pk) {
  const int64_t batch = p.kv.batch, hkv = p.cache.num_kv_heads, dim = p.cache.head_dim;
  const int64_t nq = p.q.shape[1];
  pk->cu_q = {0};
  pk->cu_k = {0};
  for (int64_t b = 0; b < batch; ++b) {
    pk->cu_q.push_back(static_cast<int32_t>((b + 1) * nq));
    pk->cu_k.push_back(pk->cu_k.back() + static_cast<int32_t>(LenOf(p.kv, b)));
  }
  const int64_t total = pk->cu_k.back();
  pk->k = Tensor(DType::kF32, {total, hkv, dim});
  pk->v = Tensor(DType::kF32, {total, hkv, dim});
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = LenOf(p.kv, b);
    if (len == 0) continue;
    const int64_t at = pk->cu_k[Sz(b)] * hkv * dim;
    const Status st = ReadKV(
        ReadKVParams{p.cache, p.kv, b,
                     MakeView3(static_cast<float*>(pk->k.data()) + at, DType::kF32, len, hkv, dim),
                     MakeView3(static_cast<float*>(pk->v.data()) + at, DType::kF32, len, hkv, dim)},
        Context());
    ASSERT_TRUE(st.ok()) << "ReadKV of sequence " << b << ": " << st.ToString();
  }
}

// The varlen attention problem equal to a decode call: sequence b's Q query rows against its
// keys, aligned bottom-right (query i at position len - Q + i). q must be batch-contiguous.
AttentionParams AsAttention(const DecodeParams& p, const Packed& pk) {
  AttentionParams a;
  a.q = p.q;
  a.q.rank = 3;
  a.q.shape[0] = p.q.shape[0] * p.q.shape[1];
  a.q.shape[1] = p.q.shape[2];
  a.q.shape[2] = p.q.shape[3];
  a.q.shape[3] = 1;
  a.q.strides[0] = p.q.strides[1];
  a.q.strides[1] = p.q.strides[2];
  a.q.strides[2] = p.q.strides[3];
  a.q.strides[3] = 0;
  a.k = pk.k.view();
  a.v = pk.v.view();
  a.scale = p.scale;
  a.causal = p.causal;
  a.window_left = p.window_left;
  a.softcap = p.softcap;
  a.alibi_slopes = p.alibi_slopes;
  a.cu_seqlens_q = I32View(pk.cu_q.data(), static_cast<int64_t>(pk.cu_q.size()));
  a.cu_seqlens_k = I32View(pk.cu_k.data(), static_cast<int64_t>(pk.cu_k.size()));
  a.num_seqs = static_cast<int32_t>(p.kv.batch);
  return a;
}

// A varlen LSE [Hq, B * Q] as the decode layout [B, Hq, Q].
std::vector<double> LseFromVarlen(const std::vector<double>& x, int64_t batch, int64_t hq,
                                  int64_t nq) {
  std::vector<double> r(x.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      for (int64_t i = 0; i < nq; ++i) {
        r[Sz((b * hq + h) * nq + i)] = x[Sz(h * batch * nq + b * nq + i)];
      }
    }
  }
  return r;
}

struct Reference {
  std::vector<double> out, lse, magnitude;   // quantized KV: with the kernel's quantized query
  std::vector<double> plain_out;             // quantized KV: DecodeF64 (the query as given)
  std::vector<double> naive_out, naive_lse;  // bf16 / f16 q over exactly read KV
};

bool NeedsNaive(const DecodeParams& p) {
  return p.q.dtype != DType::kF32 && !KVDTypeIsQuantized(p.cache.dtype);
}

void ComputeReference(const DecodeParams& p, Reference* r) {
  const int64_t batch = p.q.shape[0], nq = p.q.shape[1], hq = p.q.shape[2], dim = p.q.shape[3];
  const size_t n_out = Sz(batch * nq * hq * dim), n_lse = Sz(batch * hq * nq);
  const bool quant = KVDTypeIsQuantized(p.cache.dtype);
  r->out.assign(n_out, std::nan(""));
  r->lse.assign(n_lse, std::nan(""));
  r->magnitude.assign(n_out, std::nan(""));
  ref::DecodeRefOptions o;
  o.quantize_query = quant;
  ref::DecodeF64WithOptions(p, o, r->out.data(), r->lse.data(), r->magnitude.data());
  if (quant) {
    r->plain_out.assign(n_out, std::nan(""));
    ref::DecodeF64(p, r->plain_out.data(), nullptr);
  }
  if (NeedsNaive(p) && batch * nq > 0) {
    Packed pk;
    ASSERT_NO_FATAL_FAILURE(PackCache(p, &pk));
    const AttentionParams a = AsAttention(p, pk);
    r->naive_out.assign(n_out, std::nan(""));
    std::vector<double> lse(n_lse, std::nan(""));
    test::AttentionForwardNaive(a, r->naive_out.data(), lse.data());
    r->naive_lse = LseFromVarlen(lse, batch, hq, nq);
  }
}

// The largest V quantization step of KV head h, n_c * step over the pool's finite rows, per
// channel c (an upper bound on the steps of any sequence's visible rows).
std::vector<double> LargestVSteps(const KVCacheView& cache, int64_t h) {
  double step = 0.0;
  for (int64_t page = 0; page < cache.num_pages; ++page) {
    for (int64_t slot = 0; slot < cache.page_size; ++slot) {
      const float x =
          cache.v_scales[2 * ((page * cache.num_kv_heads + h) * cache.page_size + slot)];
      if (std::isfinite(x)) step = std::max(step, static_cast<double>(x));
    }
  }
  std::vector<double> steps(Sz(cache.head_dim));
  for (int64_t c = 0; c < cache.head_dim; ++c) {
    steps[Sz(c)] = step * std::fabs(double(cache.v_channel_scales[h * cache.head_dim + c]));
  }
  return steps;
}

// Quantized cache, f32 output, against the fp64 reference with the kernel's quantized query:
// |got - ref| <= the fp32 ceiling + kQuantPvStepFraction* largest V steps (tolerances.h; the
// VNNI P.V's weight rounding), that bound taken `runs` times when ref is another decode.
::testing::AssertionResult CheckQuantizedOutput(const DecodeParams& p,
                                                const std::vector<double>& got,
                                                const std::vector<double>& ref, int runs = 1) {
  const int64_t batch = p.q.shape[0], nq = p.q.shape[1], hq = p.q.shape[2], dim = p.q.shape[3];
  const int64_t group = hq / p.cache.num_kv_heads;
  const double fraction = runs * (p.cache.dtype == KVDType::kInt4 ? test::kQuantPvStepFractionInt4
                                                                  : test::kQuantPvStepFractionInt8);
  std::vector<std::vector<double>> steps;
  for (int64_t h = 0; h < p.cache.num_kv_heads; ++h) steps.push_back(LargestVSteps(p.cache, h));
  const test::Ceiling ceiling = test::OutputCeiling(DType::kF32);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t head = 0; head < hq; ++head) {
        for (int64_t c = 0; c < dim; ++c) {
          const size_t at = Sz(((b * nq + i) * hq + head) * dim + c);
          if (!std::isfinite(ref[at])) continue;  // CheckNonFinite's business
          const double allowed = ceiling.atol + ceiling.rtol * std::fabs(ref[at]) +
                                 fraction * steps[Sz(head / group)][Sz(c)];
          if (!(std::fabs(got[at] - ref[at]) <= allowed)) {
            return ::testing::AssertionFailure()
                   << "out[" << at << "]: got " << got[at] << ", ref " << ref[at] << ", |diff| "
                   << std::fabs(got[at] - ref[at]) << " > " << allowed;
          }
        }
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Checks a decode output under the rule of its KV dtype and q / out dtype (file comment).
void ExpectMatchesReference(const DecodeParams& p, const Reference& ref, const Tensor& out,
                            const Tensor* lse) {
  const std::vector<double> got = out.ToVector();
  const DType dt = p.out.dtype;
  if (KVDTypeIsQuantized(p.cache.dtype)) {
    if (dt == DType::kF32) {
      EXPECT_TRUE(CheckQuantizedOutput(p, got, ref.out))
          << "against the fp64 reference with the kernel's quantized query";
    } else {
      // No naive computation models the quantized query: the dtype's ceiling alone.
      EXPECT_TRUE(test::CheckClose(got, ref.out, test::OutputCeiling(dt), "out"))
          << "against the fp64 reference with the kernel's quantized query";
    }
    EXPECT_TRUE(test::CheckNonFinite(got, ref.plain_out, "out"));
    const double nmse = test::Nmse(got, ref.plain_out);
    EXPECT_LE(nmse, test::kQuantKvMaxNmse)
        << "NMSE against the fp64 reference on the dequantized cache (query unquantized)";
  } else if (dt == DType::kF32) {
    EXPECT_TRUE(test::CheckOutput(dt, got, ref.out, nullptr, Rule::kStandard, &ref.magnitude));
  } else {
    EXPECT_TRUE(test::CheckOutput(dt, got, ref.out, &ref.naive_out, Rule::kStandard));
  }
  if (lse != nullptr) {
    EXPECT_TRUE(test::CheckLse(lse->ToVector(), ref.lse));
  }
  EXPECT_TRUE(out.GuardsIntact());
}

// Makes the run of a case over `cache`, decodes, and checks against the reference (left in *ref
// when given).
void RunAndCheck(const Case& c, TestCache* cache, DecodeRun* r, Reference* ref = nullptr) {
  MakeRun(c, cache, r);
  Reference own;
  if (ref == nullptr) ref = &own;
  ASSERT_NO_FATAL_FAILURE(ComputeReference(r->params, ref));
  const Status st = RunWith(r->params);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectMatchesReference(r->params, *ref, r->out, c.with_lse ? &r->lse : nullptr);
  if (!c.with_lse) {
    EXPECT_TRUE(r->lse.Unchanged()) << "lse written although not requested";
  }
}

// Builds the cache and the run of a case, decodes, and checks against the reference.
void CheckCase(const Case& c) {
  SCOPED_TRACE(test::Repro(c.Name()));
  TestCache cache;
  ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
  DecodeRun r;
  RunAndCheck(c, &cache, &r);
}

// The out and lse of a run bitwise equal to those of `want`.
void ExpectSameOutputs(const Tensor& out, const Tensor& lse, const DecodeRun& want,
                       const std::string& what) {
  EXPECT_TRUE(out.BitwiseEqual(want.out)) << what << ": out";
  EXPECT_TRUE(lse.BitwiseEqual(want.lse)) << what << ": lse";
}

::testing::AssertionResult SameBits(const std::vector<double>& a, const std::vector<double>& b,
                                    const char* what) {
  if (a.size() != b.size()) {
    return ::testing::AssertionFailure() << what << ": " << a.size() << " vs " << b.size();
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(double)) != 0) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: " << a[i] << " vs " << b[i] << " (not bitwise equal)";
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// The sweep: KV dtype x layout x Q, with head dims, GQA groups, q dtypes and split sizes spread
// over it so that every KV dtype meets every head dim, both groups and (unquantized) every q
// dtype, and every layout meets every head dim. Every case holds the lengths 0, 1, 17, 203 and
// LongLen() in one batch.

class DecodeSweep : public ::testing::TestWithParam<Case> {};

TEST_P(DecodeSweep, MatchesReference) { CheckCase(GetParam()); }

std::vector<Case> MatrixCases() {
  const KVDType kvs[] = {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8,
                         KVDType::kInt4};
  const int64_t pages[] = {0, 1, 16, 256};
  const int64_t qs[] = {1, 3, 16};
  const int64_t dims[] = {64, 128, 40, 1};
  const int64_t groups[] = {1, 4};
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  const int64_t splits[] = {0, 64, 100};
  std::vector<Case> cases;
  for (int kvi = 0; kvi < 5; ++kvi) {
    for (int pi = 0; pi < 4; ++pi) {
      for (int qi = 0; qi < 3; ++qi) {
        const int k = pi * 3 + qi;
        Case c;
        c.kv = kvs[kvi];
        c.page_size = pages[pi];
        c.num_q = qs[qi];
        c.dim = dims[(k + kvi) % 4];
        c.group = groups[(k + k / 4 + kvi) % 2];
        c.dtype = KVDTypeIsQuantized(c.kv) ? DType::kF32 : dtypes[(k / 3 + qi + kvi) % 3];
        c.split_tokens = splits[(k + k / 3) % 3];
        c.with_lse = k % 7 != 3;
        c.lens = {0, 1, 17, 203, LongLen()};
        cases.push_back(c);
      }
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DecodeMatrix, DecodeSweep, ::testing::ValuesIn(MatrixCases()), CaseName);

// bf16 caches whose padded head dim is a multiple of 4 vectors are widened in channel pairs
// (Bf16Pairs; 64 channels on AVX-512, 32 on AVX2): in place (64, 128, 256), staged (120 pads to
// 128), and the in-order widening next to them (96 on AVX-512), over lengths around the 4- and
// 16-key blocks, a page size that splits them, and split sizes that cut pages.
std::vector<Case> PairedBf16Cases() {
  std::vector<Case> cases;
  int k = 0;
  for (int64_t dim : {64, 128, 256, 120, 96}) {
    for (int64_t page : {0, 16, 7}) {
      Case c = MakeCase(KVDType::kBF16, page, k % 3 == 0 ? 2 : 1, dim, 2, 4, {1, 15, 17, 1000, 48},
                        "pairs");
      c.dtype = k % 2 == 0 ? DType::kBF16 : DType::kF32;
      c.split_tokens = page == 7 ? 100 : 0;
      cases.push_back(c);
      ++k;
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DecodeBf16Pairs, DecodeSweep, ::testing::ValuesIn(PairedBf16Cases()),
                         CaseName);

// Masks and modifiers. Q = 4 over lengths below Q too (rows at negative positions see nothing
// under a causal mask); split size 64, so windows leave whole splits empty.
std::vector<Case> MaskCases() {
  std::vector<Case> cases;
  auto base = [](KVDType kv, DType dt) {
    Case c;
    c.kv = kv;
    c.dtype = dt;
    c.page_size = 16;
    c.num_q = 4;
    c.dim = 64;
    c.heads_kv = 2;
    c.group = 2;
    c.split_tokens = 64;
    c.lens = {0, 1, 3, 4, 5, 17, 203, LongLen()};
    return c;
  };
  const std::pair<KVDType, DType> types[] = {{KVDType::kF32, DType::kF32},
                                             {KVDType::kBF16, DType::kBF16},
                                             {KVDType::kF16, DType::kF16},
                                             {KVDType::kInt8, DType::kF32},
                                             {KVDType::kInt4, DType::kF32}};
  for (const auto& [kv, dt] : types) {
    Case c = base(kv, dt);
    c.causal = true;
    cases.push_back(c);
    c.window_left = 5;
    cases.push_back(c);
    c.window_left = 0;  // each row sees its own key only
    cases.push_back(c);
    c = base(kv, dt);
    c.num_q = 3;
    c.window_left = 5;  // left window without causal: keys right of the row stay visible
    cases.push_back(c);
    c = base(kv, dt);
    c.softcap = 30.0f;
    c.q_mult = 8.0;  // logits large enough for the cap to bite
    c.tag = "qx8";
    cases.push_back(c);
    c = base(kv, dt);
    c.causal = true;
    c.alibi = AlibiKind::kPerHead;
    cases.push_back(c);
    c = base(kv, dt);
    c.alibi = AlibiKind::kPerBatch;
    cases.push_back(c);
    c = base(kv, dt);
    c.num_q = 16;
    c.causal = true;
    c.window_left = 37;
    c.softcap = 30.0f;
    c.alibi = AlibiKind::kPerBatch;
    c.split_tokens = 16;
    cases.push_back(c);
    c = base(kv, dt);
    c.scale = 0.3f;
    c.tag = "scale0p3";
    cases.push_back(c);
  }
  for (float s : {0.0f, -0.5f}) {
    Case c = base(KVDType::kF32, DType::kF32);
    c.scale = s;
    c.causal = true;
    c.tag = s == 0.0f ? "scale0" : "scaleminus0p5";
    cases.push_back(c);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DecodeMasks, DecodeSweep, ::testing::ValuesIn(MaskCases()), CaseName);

// ---------------------------------------------------------------------------------------------
// The reference itself: DecodeF64 equals the fp64 attention reference run on the same keys as a
// varlen problem (an independent oracle: other code, the same arithmetic), bitwise.

TEST(DecodeReference, AgreesWithTheAttentionReference) {
  std::vector<Case> cases = MaskCases();
  for (const Case& m : MatrixCases()) {
    if (m.kv == KVDType::kBF16 || m.kv == KVDType::kInt8) cases.push_back(m);
  }
  for (Case c : cases) {
    if (Small() && c.page_size == 1) continue;
    c.lens = {0, 1, 3, 17, 203};
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun r;
    MakeRun(c, &cache, &r);
    const int64_t n_out = r.out.numel(), n_lse = r.lse.numel();
    std::vector<double> out(Sz(n_out)), lse(Sz(n_lse)), a_out(Sz(n_out)), a_lse(Sz(n_lse));
    ref::DecodeF64(r.params, out.data(), lse.data());
    Packed pk;
    ASSERT_NO_FATAL_FAILURE(PackCache(r.params, &pk));
    ref::AttentionForwardF64(AsAttention(r.params, pk), a_out.data(), a_lse.data());
    EXPECT_TRUE(SameBits(out, a_out, "out"));
    EXPECT_TRUE(SameBits(lse, LseFromVarlen(a_lse, c.batch(), c.heads_q(), c.num_q), "lse"));
  }
}

// The quantized query stays within one int8 step of the query, per channel in the normalized
// space, and is the query itself for the unquantized dtypes.
TEST(DecodeReference, QuantizedQueryOnlyForQuantizedCaches) {
  for (KVDType kv : {KVDType::kF32, KVDType::kInt8}) {
    const Case c = MakeCase(kv, 0, 2, 64, 2, 1, {5, 40}, "");
    SCOPED_TRACE(c.Name());
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun r;
    MakeRun(c, &cache, &r);
    std::vector<double> a(Sz(r.out.numel())), b(a.size());
    ref::DecodeF64(r.params, a.data(), nullptr);
    ref::DecodeF64QuantizedQuery(r.params, b.data(), nullptr);
    if (kv == KVDType::kF32) {
      EXPECT_TRUE(SameBits(a, b, "out"));
    } else {
      const double nmse = test::Nmse(b, a);
      EXPECT_GT(nmse, 0.0) << "the quantized query changed nothing";
      EXPECT_LE(nmse, test::kQuantKvMaxNmse);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Identities.

// Decode equals AttentionForward with the same few queries on the same dense K/V (appended to a
// contiguous cache), both within the rules against fp64; AttentionForward with Sq <= 16 (which
// routes to the decode kernel) on every path.
TEST(DecodeIdentity, EqualsAttentionForward) {
  const int32_t sk = Small() ? 77 : 203;
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t dim : {64, 40}) {
      for (int64_t nq : {1, 5, 16}) {
        for (bool causal : {false, true}) {
          const KVDType kv = dt == DType::kF32 ? KVDType::kF32 : KVDType::kBF16;
          Case c = MakeCase(kv, 0, nq, dim, 2, 4, {sk, sk}, "fwd");
          c.dtype = dt;
          c.causal = causal;
          SCOPED_TRACE(test::Repro(c.Name()));
          TestCache cache;
          ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
          DecodeRun r;
          Reference ref;
          ASSERT_NO_FATAL_FAILURE(RunAndCheck(c, &cache, &r, &ref));

          Tensor k(dt, {2, sk, c.heads_kv, dim}), v(dt, {2, sk, c.heads_kv, dim});
          for (int64_t b = 0; b < 2; ++b) {
            for (int64_t e = 0; e < sk * c.heads_kv * dim; ++e) {
              const Index i = {b, e / (c.heads_kv * dim), (e / dim) % c.heads_kv, e % dim};
              k.Set(i, cache.k_src[Sz(b)][Sz(e)]);
              v.Set(i, cache.v_src[Sz(b)][Sz(e)]);
            }
          }
          AttentionParams a;
          a.q = r.q.view();
          a.k = k.view();
          a.v = v.view();
          a.causal = causal;
          std::vector<double> f_out(Sz(r.out.numel())), f_lse(Sz(r.lse.numel()));
          ref::AttentionForwardF64(a, f_out.data(), f_lse.data());
          EXPECT_TRUE(SameBits(f_out, ref.out, "AttentionForwardF64 vs DecodeF64"));
          std::vector<double> naive(f_out.size()), naive_lse(f_lse.size());
          if (dt != DType::kF32) test::AttentionForwardNaive(a, naive.data(), naive_lse.data());
          for (Path path : test::PathsFor(dim)) {
            SCOPED_TRACE(std::string("AttentionForward path ") + PathName(path));
            Tensor out(dt, {2, nq, c.heads_q(), dim}), lse(DType::kF32, {2, c.heads_q(), nq});
            a.out = out.view();
            a.lse = lse.view();
            Context ctx;
            ctx.path = path;
            const Status st = AttentionForward(a, ctx);
            ASSERT_TRUE(st.ok()) << st.ToString();
            const std::vector<double> got = out.ToVector();
            EXPECT_TRUE(test::CheckOutput(dt, got, f_out, dt == DType::kF32 ? nullptr : &naive,
                                          Rule::kStandard, &ref.magnitude));
            EXPECT_TRUE(test::CheckLse(lse.ToVector(), f_lse));
            EXPECT_TRUE(test::CheckClose(r.out.ToVector(), got, test::IdentityCeiling(dt),
                                         "decode vs AttentionForward"));
            EXPECT_TRUE(test::CheckClose(r.lse.ToVector(), lse.ToVector(), test::kLseCeiling,
                                         "decode lse vs AttentionForward lse"));
          }
        }
      }
    }
  }
}

// Paged with shuffled pages over a pool 3x too large equals contiguous, bitwise (same dtype, same
// split size), for page sizes 1, 16, 256 and every KV dtype. Split 0: the contiguous cache's
// default, passed to the paged runs too (pages of 1-3 tokens default to a smaller one).
TEST(DecodeIdentity, PagedEqualsContiguousBitwise) {
  for (KVDType kv : kAllKvDTypes) {
    for (int64_t split : {0, 48}) {
      Case c = MakeCase(kv, 0, 3, 64, 2, 2, {17, 0, Small() ? 300 : 600, 1, 203}, "layout");
      c.dtype = kv == KVDType::kF16 ? DType::kF16 : DType::kF32;
      c.causal = true;
      c.split_tokens = split;
      SCOPED_TRACE(test::Repro(c.Name()));
      CacheSpec spec = c.Cache();
      TestCache contiguous;
      ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &contiguous));
      DecodeRun want;
      MakeRun(c, &contiguous, &want);
      ASSERT_TRUE(RunWith(want.params).ok());
      for (int64_t ps : {1, 16, 256}) {
        SCOPED_TRACE("page size " + std::to_string(ps));
        spec.page_size = ps;
        spec.values = [&](int64_t b, std::vector<float>* k, std::vector<float>* v) {
          *k = contiguous.k_src[Sz(b)];
          *v = contiguous.v_src[Sz(b)];
        };
        TestCache paged;
        ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &paged));
        DecodeRun got;
        MakeRun(c, &paged, &got);
        if (split == 0) got.params.split_tokens = kDefaultDecodeSplitTokens;
        const Status st = RunWith(got.params);
        ASSERT_TRUE(st.ok()) << st.ToString();
        ExpectSameOutputs(got.out, got.lse, want, "paged vs contiguous");
      }
    }
  }
}

// Split + merge = one pass: split sizes 16, 64 and 100000 (one split) agree within the fp32
// rule, each within the rules against fp64.
TEST(DecodeIdentity, SplitSizesAgree) {
  for (KVDType kv : {KVDType::kF32, KVDType::kInt8}) {
    for (bool causal : {false, true}) {
      Case c = MakeCase(kv, 16, 3, 64, 1, 4, {1, 17, 203, LongLen()}, "splits");
      c.causal = causal;
      SCOPED_TRACE(test::Repro(c.Name()));
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
      DecodeRun one_pass;
      MakeRun(c, &cache, &one_pass);
      one_pass.params.split_tokens = 100000;
      ASSERT_TRUE(RunWith(one_pass.params).ok());
      for (int64_t split : {100000, 16, 64}) {
        SCOPED_TRACE("split " + std::to_string(split));
        DecodeRun r;
        MakeRun(c, &cache, &r);  // the same query for every split size
        r.params.split_tokens = split;
        Reference ref;
        ASSERT_NO_FATAL_FAILURE(ComputeReference(r.params, &ref));
        const Status st = RunWith(r.params);
        ASSERT_TRUE(st.ok()) << st.ToString();
        ExpectMatchesReference(r.params, ref, r.out, &r.lse);
        if (KVDTypeIsQuantized(kv)) {
          // Other splits cut other tiles, whose P.V weights round differently (VNNI).
          EXPECT_TRUE(CheckQuantizedOutput(r.params, r.out.ToVector(), one_pass.out.ToVector(), 2))
              << "split vs one pass";
        } else {
          EXPECT_TRUE(test::CheckClose(r.out.ToVector(), one_pass.out.ToVector(),
                                       test::IdentityCeiling(DType::kF32), "split vs one pass"));
        }
        EXPECT_TRUE(test::CheckClose(r.lse.ToVector(), one_pass.lse.ToVector(), test::kLseCeiling,
                                     "split lse vs one pass"));
      }
    }
  }
}

// A split-16 run equals two decodes over the two halves of the keys (two batch views of the same
// pages) merged with MergeStates. No mask: the halves would move the rows' positions.
TEST(DecodeIdentity, SplitEqualsManualHalvesMerged) {
  for (KVDType kv : {KVDType::kF32, KVDType::kBF16}) {
    Case c = MakeCase(kv, 16, 3, 40, 2, 2, {203}, "halves");
    c.split_tokens = 16;
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun whole;
    MakeRun(c, &cache, &whole);
    ASSERT_TRUE(RunWith(whole.params).ok());

    const int64_t nq = c.num_q, hq = c.heads_q(), dim = c.dim, first_pages = 6;
    const int32_t lens[2] = {static_cast<int32_t>(first_pages * 16),
                             static_cast<int32_t>(203 - first_pages * 16)};
    std::vector<float> parts(Sz(2 * nq * hq * dim)), part_lse(Sz(2 * hq * nq));
    for (int64_t half = 0; half < 2; ++half) {
      DecodeParams p = whole.params;
      p.kv.seq_lens = I32View(&lens[half], 1);
      p.kv.block_table = I32View(cache.block_table.data() + half * first_pages, 1,
                                 cache.max_pages - half * first_pages);
      p.out = MakeView4(parts.data() + half * nq * hq * dim, DType::kF32, 1, nq, hq, dim);
      p.lse = MakeView3(part_lse.data() + half * hq * nq, DType::kF32, 1, hq, nq);
      const Status st = RunWith(p);
      ASSERT_TRUE(st.ok()) << st.ToString();
    }
    std::vector<float> merged(Sz(nq * hq * dim)), merged_lse(Sz(nq * hq));
    MergeStatesParams m;
    m.out_parts = MakeView4(parts.data(), DType::kF32, 2, nq, hq, dim);
    m.lse_parts.data = part_lse.data();
    m.lse_parts.dtype = DType::kF32;
    m.lse_parts.rank = 3;
    m.lse_parts.shape[0] = 2;
    m.lse_parts.shape[1] = nq;
    m.lse_parts.shape[2] = hq;
    m.lse_parts.strides[0] = hq * nq;  // decode LSE [1, Hq, Q] seen as [Q, Hq]
    m.lse_parts.strides[1] = 1;
    m.lse_parts.strides[2] = nq;
    m.out = MakeView3(merged.data(), DType::kF32, nq, hq, dim);
    const int64_t lse_shape[2] = {nq, hq};
    m.lse = MakeContiguousView(merged_lse.data(), DType::kF32, 2, lse_shape);
    ASSERT_TRUE(MergeStates(m, Context()).ok());
    const std::vector<double> got(merged.begin(), merged.end());
    EXPECT_TRUE(test::CheckClose(got, whole.out.ToVector(), test::IdentityCeiling(DType::kF32),
                                 "merged halves vs split-16 decode"));
    std::vector<double> got_lse(Sz(hq * nq));
    for (int64_t h = 0; h < hq; ++h) {
      for (int64_t i = 0; i < nq; ++i) got_lse[Sz(h * nq + i)] = merged_lse[Sz(i * hq + h)];
    }
    EXPECT_TRUE(test::CheckClose(got_lse, whole.lse.ToVector(), test::kLseCeiling,
                                 "merged halves lse vs split-16 decode"));
  }
}

// ---------------------------------------------------------------------------------------------
// Bitwise guarantees.

// Context.num_threads 1, 2, 3, 7 give identical out and lse.
TEST(DecodeDeterminism, ThreadCountInvarianceBitwise) {
  for (KVDType kv : {KVDType::kF32, KVDType::kBF16, KVDType::kInt8, KVDType::kInt4}) {
    Case c = MakeCase(kv, 16, 2, 128, 2, 4, {LongLen(), 17, 203, 0, 1, 700}, "threads");
    c.dtype = kv == KVDType::kBF16 ? DType::kBF16 : DType::kF32;
    c.causal = true;
    c.split_tokens = 64;
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun one;
    MakeRun(c, &cache, &one);
    ASSERT_TRUE(RunWith(one.params, 1).ok());
    for (int32_t threads : {2, 3, 7, 1}) {
      DecodeRun r;
      MakeRun(c, &cache, &r);
      const Status st = RunWith(r.params, threads);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ExpectSameOutputs(r.out, r.lse, one, std::to_string(threads) + " threads");
    }
  }
}

// The view of sequence b of a run's tensor ([B, ...] -> [1, ...]).
TensorView SliceBatch(const Tensor& t, int64_t b) {
  TensorView v = t.view();
  v.data = static_cast<char*>(v.data) + b * v.strides[0] * static_cast<int64_t>(DTypeSize(v.dtype));
  v.shape[0] = 1;
  return v;
}

// A sequence decoded alone equals the same sequence inside a batch with others of different
// lengths, bitwise (same split size): paged (its block-table row) and contiguous (its page).
TEST(DecodeDeterminism, BatchInvarianceBitwise) {
  for (int64_t ps : {16, 0}) {
    for (KVDType kv : {KVDType::kF32, KVDType::kF16, KVDType::kInt4}) {
      Case c = MakeCase(kv, ps, 4, 64, 2, 2, {203, LongLen(), 17, 0, 600}, "batch");
      c.causal = true;
      c.alibi = AlibiKind::kPerBatch;
      SCOPED_TRACE(test::Repro(c.Name()));
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
      for (int64_t split : {0, 64}) {
        SCOPED_TRACE("split " + std::to_string(split));
        DecodeRun all;
        MakeRun(c, &cache, &all);
        all.params.split_tokens = split;
        ASSERT_TRUE(RunWith(all.params).ok());
        const std::vector<double> all_out = all.out.ToVector(), all_lse = all.lse.ToVector();
        const int64_t out_row = c.num_q * c.heads_q() * c.dim, lse_row = c.heads_q() * c.num_q;
        for (int64_t b = 0; b < c.batch(); ++b) {
          SCOPED_TRACE("sequence " + std::to_string(b));
          Tensor out(c.dtype, {1, c.num_q, c.heads_q(), c.dim});
          Tensor lse(DType::kF32, {1, c.heads_q(), c.num_q});
          DecodeParams p = all.params;
          p.q = SliceBatch(all.q, b);
          p.alibi_slopes = SliceBatch(all.slopes, b);
          p.cache = cache.view_of(b);
          p.kv = cache.kv_of(b, &cache.lens[Sz(b)]);
          p.out = out.view();
          p.lse = lse.view();
          const Status st = RunWith(p);
          ASSERT_TRUE(st.ok()) << st.ToString();
          EXPECT_TRUE(SameBits(out.ToVector(),
                               std::vector<double>(all_out.begin() + b * out_row,
                                                   all_out.begin() + (b + 1) * out_row),
                               "out"));
          EXPECT_TRUE(SameBits(lse.ToVector(),
                               std::vector<double>(all_lse.begin() + b * lse_row,
                                                   all_lse.begin() + (b + 1) * lse_row),
                               "lse"));
        }
      }
    }
  }
}

// Repeated runs and strided q / out / lse (padded rows, heads-major LSE) are bitwise equal to the
// contiguous run; lse is optional and leaves out unchanged.
TEST(DecodeDeterminism, StridedViewsAndOptionalLseBitwise) {
  for (KVDType kv : {KVDType::kF32, KVDType::kInt8}) {
    Case c = MakeCase(kv, 16, 3, 40, 2, 2, {203, 17, 1}, "strided");
    c.split_tokens = 64;
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun want;
    MakeRun(c, &cache, &want);
    ASSERT_TRUE(RunWith(want.params).ok());
    DecodeRun again;
    MakeRun(c, &cache, &again);
    ASSERT_TRUE(RunWith(again.params).ok());
    ExpectSameOutputs(again.out, again.lse, want, "repeated run");

    const std::vector<int64_t> shape = {c.batch(), c.num_q, c.heads_q(), c.dim};
    Tensor q(DType::kF32, shape, Tensor::PaddedStrides(shape, 3), 1);
    q.FromVector(want.q.ToVector());
    Tensor out(DType::kF32, shape, Tensor::PaddedStrides(shape, 5), 3);
    // LSE [B, Hq, Q] stored as [B, Q, Hq].
    Tensor lse(DType::kF32, {c.batch(), c.heads_q(), c.num_q},
               {c.num_q * c.heads_q(), 1, c.heads_q()});
    DecodeParams p = want.params;
    p.q = q.view();
    p.out = out.view();
    p.lse = lse.view();
    Status st = RunWith(p);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectSameOutputs(out, lse, want, "strided");
    EXPECT_TRUE(out.OutsideViewUntouched());
    EXPECT_TRUE(lse.OutsideViewUntouched());

    DecodeRun no_lse;
    MakeRun(c, &cache, &no_lse);
    no_lse.params.lse = TensorView();
    st = RunWith(no_lse.params);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE(no_lse.out.BitwiseEqual(want.out)) << "out without lse";
    EXPECT_TRUE(no_lse.lse.Unchanged()) << "lse written although not requested";
  }
}

// ---------------------------------------------------------------------------------------------
// Regressions.

// Empty caches (out exactly 0, lse -inf, no NaN), one-token caches, causal rows at negative
// positions, and an empty batch.
TEST(DecodeRegression, EmptyAndOneTokenCaches) {
  for (KVDType kv : kAllKvDTypes) {
    for (int64_t ps : {0, 16}) {
      for (bool causal : {false, true}) {
        Case c = MakeCase(kv, ps, 3, 64, 2, 2, {0, 1, 0, 2}, "tiny");
        c.causal = causal;
        SCOPED_TRACE(test::Repro(c.Name()));
        TestCache cache;
        ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
        DecodeRun r;
        ASSERT_NO_FATAL_FAILURE(RunAndCheck(c, &cache, &r));
        // Rows that see no key: sequences 0 and 2, and under causal the rows of sequences 1 and 3
        // at negative positions (len - Q + i < 0).
        for (int64_t b = 0; b < c.batch(); ++b) {
          for (int64_t i = 0; i < c.num_q; ++i) {
            const int64_t len = c.lens[Sz(b)];
            if (!(len == 0 || (causal && len - c.num_q + i < 0))) continue;
            for (int64_t h = 0; h < c.heads_q(); ++h) {
              EXPECT_EQ(r.lse.Get({b, h, i}), -kInf) << b << " " << h << " " << i;
              for (int64_t d = 0; d < c.dim; ++d) {
                ASSERT_EQ(r.out.Get({b, i, h, d}), 0.0) << b << " " << i << " " << h << " " << d;
              }
            }
          }
        }
      }
    }
  }
  // B = 0: nothing to do, nothing written.
  TestCache cache;
  CacheSpec spec;
  spec.lens = {};
  spec.name = "empty batch";
  ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &cache));
  Tensor q(DType::kF32, {0, 1, 2, 64}), out(DType::kF32, {0, 1, 2, 64}),
      lse(DType::kF32, {0, 2, 1});
  const int32_t dummy = 0;
  DecodeParams p;
  p.q = q.view();
  p.cache = cache.view();
  p.kv.batch = 0;
  p.kv.seq_lens = I32View(&dummy, 0);
  p.out = out.view();
  p.lse = lse.view();
  const Status st = RunWith(p);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(out.Unchanged());
  EXPECT_TRUE(lse.Unchanged());
}

// Garbage (NaN) in every pool byte no sequence owns: slots past a sequence's length in its last
// page and pages no sequence uses are never read, or never reach an output.
TEST(DecodeRegression, UnusedSlotsAndPagesNeverReachTheOutput) {
  for (KVDType kv : kAllKvDTypes) {
    for (int64_t ps : {0, 16, 256}) {
      Case c = MakeCase(kv, ps, 4, 40, 2, 2, {1, 17, 203, 5}, "poison");
      c.causal = true;
      c.split_tokens = 64;
      SCOPED_TRACE(test::Repro(c.Name()));
      CacheSpec spec = c.Cache();
      spec.poison = true;
      spec.spare = 20;
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &cache));
      DecodeRun r;
      ASSERT_NO_FATAL_FAILURE(RunAndCheck(c, &cache, &r));
      EXPECT_TRUE(r.out.AllFinite());
      for (double x : r.lse.ToVector()) ASSERT_FALSE(std::isnan(x)) << "NaN in lse";
    }
  }
}

// A NaN in a visible V row of an f32 cache reaches every output row of that sequence and of
// that KV head's query heads, and nothing else.
TEST(DecodeRegression, NanInVisibleValuePropagates) {
  Case c = MakeCase(KVDType::kF32, 16, 3, 64, 2, 2, {203, 100, 17}, "nan");
  c.split_tokens = 64;
  SCOPED_TRACE(test::Repro(c.Name()));
  TestCache cache;
  ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
  const int64_t bad_b = 1, bad_t = 70, bad_head = 1;
  float* row = reinterpret_cast<float*>(static_cast<uint8_t*>(cache.view().v) +
                                        cache.RowOffset(bad_b, bad_t, bad_head));
  std::fill(row, row + c.dim, kNaNf);
  DecodeRun r;
  MakeRun(c, &cache, &r);
  const Status st = RunWith(r.params);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (int64_t b = 0; b < c.batch(); ++b) {
    for (int64_t i = 0; i < c.num_q; ++i) {
      for (int64_t h = 0; h < c.heads_q(); ++h) {
        const bool poisoned = b == bad_b && h / c.group == bad_head;
        EXPECT_TRUE(std::isfinite(r.lse.Get({b, h, i}))) << b << " " << h << " " << i;
        for (int64_t d = 0; d < c.dim; ++d) {
          const double x = r.out.Get({b, i, h, d});
          if (poisoned) {
            ASSERT_TRUE(std::isnan(x)) << "out[" << b << ", " << i << ", " << h << ", " << d
                                       << "] = " << x << ", expected NaN";
          } else {
            ASSERT_TRUE(std::isfinite(x)) << "out[" << b << ", " << i << ", " << h << ", " << d
                                          << "] = " << x << ", expected finite";
          }
        }
      }
    }
  }
}

// A NaN or inf in one query row poisons that output row only, on every KV dtype and in the
// narrow (<= 4 rows per KV head) and wide layouts: the same NaN pattern as the f16 cache (the
// int8 / int4 kernels once cast the NaN to an integer, undefined behavior).
TEST(DecodeRegression, NonFiniteQueryPoisonsItsRowOnly) {
  for (const auto& [num_q, group] : {std::pair<int64_t, int64_t>{1, 2}, {4, 2}}) {
    for (const float bad : {kNaNf, std::numeric_limits<float>::infinity()}) {
      std::vector<bool> want_out, want_lse;  // isnan per element, from the f16 cache
      for (KVDType kv :
           {KVDType::kF16, KVDType::kF32, KVDType::kBF16, KVDType::kInt8, KVDType::kInt4}) {
        Case c = MakeCase(kv, 16, num_q, 64, 2, group, {203, 100, 17}, "nanq");
        c.split_tokens = 64;
        SCOPED_TRACE(test::Repro(c.Name()) + " bad " + std::to_string(bad));
        TestCache cache;
        ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
        DecodeRun r;
        MakeRun(c, &cache, &r);
        const int64_t bad_b = 1, bad_i = num_q - 1, bad_h = 1;
        r.q.Set({bad_b, bad_i, bad_h, 5}, bad);
        const Status st = RunWith(r.params);
        ASSERT_TRUE(st.ok()) << st.ToString();
        std::vector<bool> out_nan, lse_nan;
        for (double x : r.out.ToVector()) out_nan.push_back(std::isnan(x));
        for (double x : r.lse.ToVector()) lse_nan.push_back(std::isnan(x));
        for (int64_t b = 0; b < c.batch(); ++b) {
          for (int64_t i = 0; i < c.num_q; ++i) {
            for (int64_t h = 0; h < c.heads_q(); ++h) {
              const bool poisoned = b == bad_b && i == bad_i && h == bad_h;
              for (int64_t d = 0; d < c.dim; ++d) {
                const double x = r.out.Get({b, i, h, d});
                ASSERT_EQ(std::isnan(x), poisoned)
                    << "out[" << b << ", " << i << ", " << h << ", " << d << "] = " << x;
              }
            }
          }
        }
        if (kv == KVDType::kF16) {
          want_out = out_nan;
          want_lse = lse_nan;
        } else {
          EXPECT_EQ(out_nan, want_out) << "out's NaNs differ from the f16 cache's";
          EXPECT_EQ(lse_nan, want_lse) << "lse's NaNs differ from the f16 cache's";
        }
      }
    }
  }
}

// int8 / int4: a NaN key channel normalizer poisons every query row of its KV head (the
// normalizer scales the query), and nothing else.
TEST(DecodeRegression, NanChannelNormalizerPoisonsItsHead) {
  for (KVDType kv : {KVDType::kInt8, KVDType::kInt4}) {
    for (const auto& [num_q, group] : {std::pair<int64_t, int64_t>{1, 2}, {4, 2}}) {
      Case c = MakeCase(kv, 16, num_q, 64, 2, group, {203, 100, 17}, "nannorm");
      SCOPED_TRACE(test::Repro(c.Name()));
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
      const int64_t bad_head = 1;
      cache.view().k_channel_scales[bad_head * c.dim + 7] = kNaNf;
      DecodeRun r;
      MakeRun(c, &cache, &r);
      const Status st = RunWith(r.params);
      ASSERT_TRUE(st.ok()) << st.ToString();
      r.out.ForEach([&](const Index& i) {
        const double x = r.out.Get(i);
        ASSERT_EQ(std::isnan(x), i[2] / c.group == bad_head) << "out head " << i[2] << ": " << x;
      });
    }
  }
}

// int8 / int4: a NaN V step in a visible row makes that key's softmax weight NaN; the rows of its
// sequence and KV head give NaN and the others stay finite, in the narrow and the wide (on VNNI
// targets: integer P.V, whose weight packing once cast the NaN to int32) layouts. Steps that no
// AppendKV writes (negative, or so small that the packing's 32767 / max weight overflows) give
// some output and no undefined behavior.
TEST(DecodeRegression, NonFiniteOrCorruptValueStepsAreDefined) {
  for (KVDType kv : {KVDType::kInt8, KVDType::kInt4}) {
    for (const auto& [num_q, group] : {std::pair<int64_t, int64_t>{1, 2}, {4, 2}}) {
      for (const char* corrupt : {"nan", "negative", "subnormal"}) {
        Case c = MakeCase(kv, 16, num_q, 64, 2, group, {203, 100, 17}, corrupt);
        c.split_tokens = 64;
        SCOPED_TRACE(test::Repro(c.Name()));
        TestCache cache;
        ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
        const int64_t bad_b = 1, bad_head = 1;
        float* steps = cache.view().v_scales;
        const auto step_of = [&](int64_t t) -> float& {
          return steps[2 * (cache.RowOffset(bad_b, t, bad_head) / cache.row_bytes())];
        };
        const std::string what = corrupt;
        if (what == "nan") {
          step_of(70) = kNaNf;
        } else if (what == "negative") {
          step_of(70) = -1e30f;  // past int32 once scaled by 32767 / the largest weight
        } else {
          for (int64_t t = 0; t < c.lens[Sz(bad_b)]; ++t) step_of(t) = 1e-42f;
        }
        DecodeRun r;
        MakeRun(c, &cache, &r);
        const Status st = RunWith(r.params);
        ASSERT_TRUE(st.ok()) << st.ToString();
        r.out.ForEach([&](const Index& i) {
          const double x = r.out.Get(i);
          const bool touched = i[0] == bad_b && i[2] / c.group == bad_head;
          if (!touched) {
            ASSERT_TRUE(std::isfinite(x)) << "out " << i[0] << " " << i[1] << " " << i[2];
          } else if (what == "nan") {
            ASSERT_TRUE(std::isnan(x)) << "out " << i[0] << " " << i[1] << " " << i[2];
          }
        });
      }
    }
  }
}

// int8 / int4: a query so small that its int8 step sigma is subnormal (rounded to a few units of
// 2^-149, so the largest code can pass 127) still decodes to the reference (the VNNI kernel once
// cast such a code to int8: undefined behavior).
TEST(DecodeRegression, SubnormalQueryStepStaysDefined) {
  for (KVDType kv : {KVDType::kInt8, KVDType::kInt4}) {
    const double mults[] = {1e-43, 3e-43, 1e-42};
    for (int m = 0; m < 3; ++m) {
      Case c = MakeCase(kv, 16, 4, 64, 2, 2, {203, 100, 17}, "tinyq" + std::to_string(m));
      c.q_mult = mults[m];
      CheckCase(c);
    }
  }
}

// Logits near -2e4 (a true -inf mask is the only one that survives) still match fp64 under the
// ratio rule (ill-conditioned in fp32, like the forward's VeryNegativeLogits), in one split and
// in splits of 64 keys merged. The error of either side is set by the f32 rounding of a few
// logits (an ulp at 2e4 is 2e-3), so one draw's naive error moves by 25x between seeds (2e-6 to
// 3e-3 measured over 24): the rule compares the largest errors over kDraws draws of the values
// (with 4 draws the ratio still reached 2.6 over 60 seeds; with 8 none of 200 seeds fails).
TEST(DecodeRegression, VeryNegativeLogits) {
  constexpr int kDraws = 8;
  for (auto [kv, dt, split] : {std::tuple<KVDType, DType, int64_t>{KVDType::kF32, DType::kF32, 0},
                               {KVDType::kF32, DType::kF32, 64},
                               {KVDType::kBF16, DType::kBF16, 0},
                               {KVDType::kBF16, DType::kBF16, 64}}) {
    Case c = MakeCase(kv, 16, 4, 64, 2, 2, {65, 129, 3}, "neglogits");
    c.dtype = dt;
    c.causal = true;
    c.split_tokens = split;
    SCOPED_TRACE(test::Repro(c.Name()));
    // Every draw's outputs and LSEs, concatenated: the checks take the largest error over all.
    std::vector<double> out, ref_out, naive_out, lse, ref_lse, naive_lse;
    for (int draw = 0; draw < kDraws; ++draw) {
      CacheSpec spec = c.Cache();
      Rng rng(test::SeedFor(c.Name() + "/values/" + std::to_string(draw)));
      spec.values = [&rng](int64_t, std::vector<float>* k, std::vector<float>* v) {
        for (float& x : *k) x = static_cast<float>(1.0 + 0.01 * rng.Normal());
        for (float& x : *v) x = rng.Normal();
      };
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &cache));
      DecodeRun r;
      MakeRun(c, &cache, &r);
      // s = scale * q.k ~ -2e4 * (1 + small): q_d = -2e4 / (scale * D).
      const double qd = -2e4 / (0.125 * 64.0);
      r.q.ForEach([&](const Index& i) { r.q.Set(i, qd); });
      Reference ref;
      ASSERT_NO_FATAL_FAILURE(ComputeReference(r.params, &ref));
      if (ref.naive_out.empty()) {
        Packed pk;
        ASSERT_NO_FATAL_FAILURE(PackCache(r.params, &pk));
        ref.naive_out.assign(ref.out.size(), 0.0);
        std::vector<double> naive_lse_varlen(ref.lse.size());
        test::AttentionForwardNaive(AsAttention(r.params, pk), ref.naive_out.data(),
                                    naive_lse_varlen.data());
        ref.naive_lse = LseFromVarlen(naive_lse_varlen, c.batch(), c.heads_q(), c.num_q);
      }
      const Status st = RunWith(r.params);
      ASSERT_TRUE(st.ok()) << st.ToString();
      auto append = [](std::vector<double>* all, const std::vector<double>& part) {
        all->insert(all->end(), part.begin(), part.end());
      };
      append(&out, r.out.ToVector());
      append(&ref_out, ref.out);
      append(&naive_out, ref.naive_out);
      append(&lse, r.lse.ToVector());
      append(&ref_lse, ref.lse);
      append(&naive_lse, ref.naive_lse);
    }
    EXPECT_TRUE(test::CheckOutput(dt, out, ref_out, &naive_out, Rule::kRatioOnly));
    EXPECT_TRUE(test::CheckLse(lse, ref_lse, &naive_lse, Rule::kRatioOnly));
  }
}

// ---------------------------------------------------------------------------------------------
// Quantized caches: the error against the unquantized K/V, reported for docs/decode.md.

TEST(DecodeQuantized, ErrorAgainstTheUnquantizedCache) {
  for (KVDType kv : {KVDType::kInt8, KVDType::kInt4}) {
    const Case c = MakeCase(kv, 16, 1, 128, 2, 4, {LongLen(), 512, 203, 17}, "report");
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun r;
    Reference ref;
    ASSERT_NO_FATAL_FAILURE(RunAndCheck(c, &cache, &r, &ref));

    // fp64 attention on the values as appended (before quantization).
    Packed pk;
    pk.cu_q = {0};
    pk.cu_k = {0};
    for (int64_t b = 0; b < c.batch(); ++b) {
      pk.cu_q.push_back(static_cast<int32_t>((b + 1) * c.num_q));
      pk.cu_k.push_back(pk.cu_k.back() + c.lens[Sz(b)]);
    }
    std::vector<double> k_all, v_all;
    for (int64_t b = 0; b < c.batch(); ++b) {
      k_all.insert(k_all.end(), cache.k_src[Sz(b)].begin(), cache.k_src[Sz(b)].end());
      v_all.insert(v_all.end(), cache.v_src[Sz(b)].begin(), cache.v_src[Sz(b)].end());
    }
    pk.k = Tensor(DType::kF32, {pk.cu_k.back(), c.heads_kv, c.dim});
    pk.v = Tensor(DType::kF32, {pk.cu_k.back(), c.heads_kv, c.dim});
    pk.k.FromVector(k_all);
    pk.v.FromVector(v_all);
    std::vector<double> unq(ref.out.size());
    ref::AttentionForwardF64(AsAttention(r.params, pk), unq.data(), nullptr);

    const std::vector<double> got = r.out.ToVector();
    const double vs_unquantized = test::Nmse(got, unq);
    const double vs_dequantized = test::Nmse(got, ref.plain_out);
    const double vs_quantized_query = test::Nmse(got, ref.out);
    const double ref_vs_unquantized = test::Nmse(ref.plain_out, unq);
    std::cout << "[decode " << KVDTypeName(kv) << " KV, D " << c.dim << ", lengths up to "
              << LongLen()
              << "] NMSE of the output vs fp64 on the unquantized K/V: " << vs_unquantized
              << "; vs fp64 on the dequantized K/V: " << vs_dequantized
              << "; vs fp64 on the dequantized K/V with the quantized query: " << vs_quantized_query
              << "; (fp64 dequantized vs unquantized: " << ref_vs_unquantized << ")\n";
    const std::string key = std::string(KVDTypeName(kv)) + "_nmse_";
    RecordProperty(key + "vs_unquantized", std::to_string(vs_unquantized));
    RecordProperty(key + "vs_dequantized", std::to_string(vs_dequantized));
    RecordProperty(key + "vs_quantized_query", std::to_string(vs_quantized_query));
    EXPECT_TRUE(std::isfinite(vs_unquantized));
  }
}

// ---------------------------------------------------------------------------------------------
// Plans.

TEST(DecodePlan, ReusedAcrossDecodeStepsEqualsDecode) {
  for (KVDType kv : {KVDType::kF32, KVDType::kInt8}) {
    for (int64_t ps : {16, 0}) {
      // 1 + 2 splits of the default size.
      Case c = MakeCase(kv, ps, 1, 64, 2, 4,
                        {100, static_cast<int32_t>(kDefaultDecodeSplitTokens) + 88}, "plan");
      c.causal = true;
      SCOPED_TRACE(test::Repro(c.Name()));
      CacheSpec spec = c.Cache();
      spec.spare = 8;
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &cache));
      DecodeRun r;
      MakeRun(c, &cache, &r);
      DecodePlan plan;
      Status st = PlanDecode(r.params, Context(), &plan);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_TRUE(plan.valid());
      EXPECT_EQ(plan.split_tokens(), kDefaultDecodeSplitTokens);
      // 1 + 2 splits; a unit may also cover only a block of KV heads (decode.cc), so there are
      // at least that many units.
      EXPECT_GE(plan.num_units(), 1 + 2);
      EXPECT_GE(plan.threads(), 1);
      Rng rng(test::SeedFor(c.Name() + "/steps"));
      for (int step = 0; step < 4; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        if (step > 0) {
          ASSERT_NO_FATAL_FAILURE(AppendOneToken(&cache, rng));
          r.q.FillNormal(rng);
        }
        Tensor out(c.dtype, {c.batch(), c.num_q, c.heads_q(), c.dim});
        Tensor lse(DType::kF32, {c.batch(), c.heads_q(), c.num_q});
        DecodeParams p = r.params;
        p.out = out.view();
        p.lse = lse.view();
        st = RunDecode(plan, p, Context());
        ASSERT_TRUE(st.ok()) << st.ToString();
        DecodeRun fresh;
        MakeRun(c, &cache, &fresh);
        fresh.q.FromVector(r.q.ToVector());
        st = RunWith(fresh.params);
        ASSERT_TRUE(st.ok()) << st.ToString();
        ExpectSameOutputs(out, lse, fresh, "RunDecode with the reused plan vs Decode");
        Reference ref;
        ASSERT_NO_FATAL_FAILURE(ComputeReference(p, &ref));
        ExpectMatchesReference(p, ref, out, &lse);
      }
    }
  }
}

// The default split size: kDefaultDecodeSplitTokensSmallPages for pages of fewer than
// kDecodeSmallPageTokens tokens, else kDefaultDecodeSplitTokens; a given size wins.
TEST(DecodePlan, DefaultSplitSizeFollowsThePageSize) {
  for (int64_t ps : {1, 2, 3, 4, 16, 0}) {
    for (int64_t given : {0, 64}) {
      Case c = MakeCase(KVDType::kF32, ps, 1, 64, 2, 1, {10, 40}, "defsplit");
      c.split_tokens = given;
      SCOPED_TRACE(test::Repro(c.Name()));
      TestCache cache;
      ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
      DecodeRun r;
      MakeRun(c, &cache, &r);
      DecodePlan plan;
      const Status st = PlanDecode(r.params, Context(), &plan);
      ASSERT_TRUE(st.ok()) << st.ToString();
      const bool small = ps > 0 && ps < kDecodeSmallPageTokens;
      const int64_t want = given > 0 ? given
                           : small   ? kDefaultDecodeSplitTokensSmallPages
                                     : kDefaultDecodeSplitTokens;
      EXPECT_EQ(plan.split_tokens(), want);
    }
  }
}

bool MentionsPlan(const std::string& message) {
  std::string lower = message;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return lower.find("plan") != std::string::npos;
}

TEST(DecodePlan, MismatchedOrInvalidPlansAreRejected) {
  Case c = MakeCase(KVDType::kF32, 16, 2, 64, 2, 2, {100, 600}, "badplan");
  c.split_tokens = 512;
  SCOPED_TRACE(test::Repro(c.Name()));
  CacheSpec spec = c.Cache();
  spec.spare = 500;
  TestCache cache;
  ASSERT_NO_FATAL_FAILURE(BuildCache(spec, &cache));
  DecodeRun r;
  MakeRun(c, &cache, &r);
  r.out.FillSlots(7.0);
  r.out.Snapshot();
  r.lse.FillSlots(7.0);
  r.lse.Snapshot();
  auto expect_rejected = [&](const DecodePlan& plan, const DecodeParams& p, const char* what) {
    SCOPED_TRACE(what);
    const Status st = RunDecode(plan, p, Context());
    EXPECT_FALSE(st.ok());
    EXPECT_TRUE(MentionsPlan(st.message()))
        << "the message does not mention the plan: " << st.ToString();
    EXPECT_TRUE(r.out.Unchanged());
    EXPECT_TRUE(r.lse.Unchanged());
  };

  expect_rejected(DecodePlan(), r.params, "default-constructed plan");
  DecodePlan plan;
  Status st = PlanDecode(r.params, Context(), &plan);
  ASSERT_TRUE(st.ok()) << st.ToString();
  // 600 -> 1030 tokens: 2 -> 3 splits of 512.
  std::vector<int32_t> longer = {100, 1030};
  DecodeParams p = r.params;
  p.kv.seq_lens = I32View(longer.data(), 2);
  expect_rejected(plan, p, "split count of a sequence changed");
  // 100 -> 0 tokens: rejected, or (an empty sequence counts as one empty split) run correctly,
  // without reading the 100 keys the plan was made for.
  {
    SCOPED_TRACE("a sequence emptied");
    std::vector<int32_t> emptied = {0, 600};
    DecodeRun e;
    MakeRun(c, &cache, &e);
    e.params.kv.seq_lens = I32View(emptied.data(), 2);
    st = RunDecode(plan, e.params, Context());
    if (st.ok()) {
      Reference ref;
      ASSERT_NO_FATAL_FAILURE(ComputeReference(e.params, &ref));
      ExpectMatchesReference(e.params, ref, e.out, &e.lse);
    } else {
      EXPECT_TRUE(MentionsPlan(st.message())) << st.ToString();
      EXPECT_TRUE(e.out.Unchanged());
    }
  }
  // A batch of one.
  p = r.params;
  p.q.shape[0] = 1;
  p.out.shape[0] = 1;
  p.lse.shape[0] = 1;
  p.kv.batch = 1;
  p.kv.seq_lens.shape[0] = 1;
  if (p.kv.block_table.data != nullptr) p.kv.block_table.shape[0] = 1;
  expect_rejected(plan, p, "batch size changed");
  // One query instead of two.
  p = r.params;
  p.q.shape[1] = 1;
  p.out.shape[1] = 1;
  p.lse.shape[2] = 1;
  expect_rejected(plan, p, "Q changed");
  // Another split size.
  p = r.params;
  p.split_tokens = 64;
  expect_rejected(plan, p, "split size changed");
  // The plan still works where it fits.
  st = RunDecode(plan, r.params, Context());
  EXPECT_TRUE(st.ok()) << st.ToString();
}

// ---------------------------------------------------------------------------------------------
// Rejected arguments: a non-ok Status naming the argument, and nothing written.

TEST(DecodeErrors, RejectedArgumentsWriteNothing) {
  for (int64_t ps : {16, 0}) {
    const Case c = MakeCase(KVDType::kF32, ps, 2, 64, 2, 2, {17, 40}, "errors");
    SCOPED_TRACE(test::Repro(c.Name()));
    TestCache cache;
    ASSERT_NO_FATAL_FAILURE(BuildCache(c.Cache(), &cache));
    DecodeRun r;
    MakeRun(c, &cache, &r);
    ASSERT_TRUE(RunWith(r.params).ok());  // the unmutated call is valid
    const int64_t batch = c.batch(), hq = c.heads_q(), dim = c.dim;

    // Outputs of other shapes or dtypes for the mutated calls, all prefilled with a sentinel.
    Tensor q17(DType::kF32, {batch, 17, hq, dim}), out17(DType::kF32, {batch, 17, hq, dim});
    Tensor lse17(DType::kF32, {batch, hq, 17});
    Tensor q3(DType::kF32, {batch, 2, 3, dim}), out3(DType::kF32, {batch, 2, 3, dim});
    Tensor lse3(DType::kF32, {batch, 3, 2});
    Tensor q32(DType::kF32, {batch, 2, hq, 32}), out32(DType::kF32, {batch, 2, hq, 32});
    Tensor out_bf16(DType::kBF16, {batch, 2, hq, dim});
    Tensor lse_bad(DType::kF32, {batch, hq, 3});
    Rng rng(1);
    for (Tensor* t : {&q17, &q3, &q32}) t->FillNormal(rng);
    std::vector<Tensor*> outputs = {&r.out, &r.lse, &out17,    &lse17,  &out3,
                                    &lse3,  &out32, &out_bf16, &lse_bad};
    for (Tensor* t : outputs) {
      t->FillSlots(7.0);
      t->Snapshot();
    }
    std::vector<int32_t> table = cache.block_table;
    std::vector<int32_t> lens = cache.lens;

    struct Bad {
      const char* what;
      std::vector<std::string> names;  // the message names one of these
      std::function<void(DecodeParams&)> mutate;
    };
    std::vector<Bad> bad = {
        {"Q = 17",
         {"q"},
         [&](DecodeParams& p) {
           p.q = q17.view();
           p.out = out17.view();
           p.lse = lse17.view();
         }},
        {"Hq not a multiple of Hkv",
         {"q", "cache", "num_kv_heads"},
         [&](DecodeParams& p) {
           p.q = q3.view();
           p.out = out3.view();
           p.lse = lse3.view();
         }},
        {"out dtype differs from q", {"out"}, [&](DecodeParams& p) { p.out = out_bf16.view(); }},
        {"head dim of q differs from the cache",
         {"q", "cache", "head_dim"},
         [&](DecodeParams& p) {
           p.q = q32.view();
           p.out = out32.view();
           p.lse = TensorView();
         }},
        {"null q data", {"q"}, [&](DecodeParams& p) { p.q.data = nullptr; }},
        {"null out data", {"out"}, [&](DecodeParams& p) { p.out.data = nullptr; }},
        {"lse of the wrong shape", {"lse"}, [&](DecodeParams& p) { p.lse = lse_bad.view(); }},
        {"kv.batch differs from q", {"kv", "batch", "q"}, [&](DecodeParams& p) { p.kv.batch = 1; }},
        {"null seq_lens",
         {"seq_lens", "kv"},
         [&](DecodeParams& p) { p.kv.seq_lens = TensorView(); }},
        {"seq_lens of dtype f32",
         {"seq_lens"},
         [&](DecodeParams& p) { p.kv.seq_lens.dtype = DType::kF32; }},
        {"seq_lens of the wrong length",
         {"seq_lens"},
         [&](DecodeParams& p) { p.kv.seq_lens.shape[0] += 1; }},
        {"seq_lens with a non-unit stride",
         {"seq_lens"},
         [&](DecodeParams& p) { p.kv.seq_lens.strides[0] = 2; }},
        {"negative seq_len",
         {"seq_lens", "kv"},
         [&](DecodeParams& p) {
           lens = cache.lens;
           lens[1] = -1;
           p.kv.seq_lens = I32View(lens.data(), cache.batch());
         }},
        {"seq_len past the capacity",
         {"seq_lens", "block_table", "kv", "cache", "page_size"},
         [&](DecodeParams& p) {
           lens = cache.lens;
           lens[1] =
               static_cast<int32_t>(cache.paged() ? cache.max_pages * ps + 1 : cache.page_size + 1);
           p.kv.seq_lens = I32View(lens.data(), cache.batch());
         }},
        {"ALiBi slopes of the wrong shape",
         {"alibi_slopes"},
         [&](DecodeParams& p) { p.alibi_slopes = MakeView1(r.q.data(), DType::kF32, hq + 1); }},
        {"null cache k", {"cache", "k"}, [&](DecodeParams& p) { p.cache.k = nullptr; }},
    };
    if (cache.paged()) {
      bad.push_back({"page id -1 in the block table", {"block_table"}, [&](DecodeParams& p) {
                       table = cache.block_table;
                       table[Sz(1 * cache.max_pages + 1)] = -1;
                       p.kv.block_table = I32View(table.data(), cache.batch(), cache.max_pages);
                     }});
      bad.push_back({"page id num_pages in the block table", {"block_table"}, [&](DecodeParams& p) {
                       table = cache.block_table;
                       table[Sz(1 * cache.max_pages + 2)] = static_cast<int32_t>(cache.num_pages);
                       p.kv.block_table = I32View(table.data(), cache.batch(), cache.max_pages);
                     }});
    }
    if (cache.paged()) {
      bad.push_back({"block_table of dtype u8", {"block_table"}, [&](DecodeParams& p) {
                       p.kv.block_table.dtype = DType::kU8;
                     }});
      bad.push_back({"block_table with a row too few", {"block_table"}, [&](DecodeParams& p) {
                       p.kv.block_table.shape[0] -= 1;
                     }});
      bad.push_back({"block_table of rank 1", {"block_table"}, [&](DecodeParams& p) {
                       p.kv.block_table.rank = 1;
                     }});
      bad.push_back({"block_table with a non-unit stride in the last dim",
                     {"block_table"},
                     [&](DecodeParams& p) { p.kv.block_table.strides[1] = 2; }});
    }
    for (const Bad& b : bad) {
      SCOPED_TRACE(b.what);
      DecodeParams p = r.params;
      b.mutate(p);
      for (int via_plan = 0; via_plan < 2; ++via_plan) {
        Status st;
        if (via_plan == 0) {
          st = Decode(p, Context());
        } else {
          DecodePlan plan;
          st = PlanDecode(p, Context(), &plan);
          EXPECT_FALSE(plan.valid()) << "PlanDecode returned a plan for invalid parameters";
        }
        EXPECT_FALSE(st.ok()) << (via_plan ? "PlanDecode" : "Decode") << " accepted it";
        EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
        bool named = false;
        for (const std::string& n : b.names) named = named || test::NamesArgument(st.message(), n);
        EXPECT_TRUE(named) << "the message names none of the expected arguments: " << st.ToString();
      }
      // RunDecode with a valid plan validates the parameters again.
      DecodePlan plan;
      ASSERT_TRUE(PlanDecode(r.params, Context(), &plan).ok());
      EXPECT_FALSE(RunDecode(plan, p, Context()).ok()) << "RunDecode accepted it";
      for (const Tensor* t : outputs) EXPECT_TRUE(t->Unchanged());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// DecodeStats: the final probabilities of every key and the H2O accumulator.

struct StatsRun {
  Tensor probs, accumulated;
};

// Probs padded past the longest sequence (keys there stay untouched) and, with key_stride > 1,
// read through a strided view; the accumulator starts at 1.
void AddStats(const Case& c, int64_t key_stride, DecodeRun* r, StatsRun* st) {
  const int64_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
  const std::vector<int64_t> shape = {c.batch(), c.heads_q(), c.num_q, max_len + 3};
  std::vector<int64_t> strides = Tensor::ContiguousStrides(shape);
  for (int i = 0; i < 3; ++i) strides[Sz(i)] *= key_stride;
  strides[3] = key_stride;
  st->probs = Tensor(DType::kF32, shape, strides);
  st->probs.FillSlots(-7.0);
  st->accumulated = Tensor(DType::kF32, {c.batch(), c.heads_kv, max_len + 1});
  st->accumulated.FillSlots(1.0);
  st->probs.Snapshot();
  r->params.stats.probs = st->probs.view();
  r->params.stats.accumulated = st->accumulated.view();
}

class DecodeStatsTest : public ::testing::TestWithParam<Case> {};

TEST_P(DecodeStatsTest, MatchesReference) {
  const Case& c = GetParam();
  TestCache cache;
  BuildCache(c.Cache(), &cache);
  const int64_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
  // The integer kernels score with the quantized query: the reference does too, so that the
  // comparison measures the statistics, not the documented query quantization.
  DecodeRun ref_run;
  MakeRun(c, &cache, &ref_run);
  std::vector<double> out(Sz(c.batch() * c.num_q * c.heads_q() * c.dim));
  std::vector<double> probs(Sz(c.batch() * c.heads_q() * c.num_q * max_len), 0.0);
  ref::DecodeRefOptions options;
  options.quantize_query = true;
  options.probs = probs.data();
  options.probs_keys = max_len;
  ref::DecodeF64WithOptions(ref_run.params, options, out.data(), nullptr);
  // Path::kReference computes with the query as given.
  std::vector<double> ref_path_probs(probs.size(), 0.0);
  options.quantize_query = false;
  options.probs = ref_path_probs.data();
  ref::DecodeF64WithOptions(ref_run.params, options, out.data(), nullptr);

  Tensor first_probs, plain_out;
  {
    DecodeRun plain;
    MakeRun(c, &cache, &plain);
    ASSERT_TRUE(RunWith(plain.params).ok());
    plain_out = plain.out.ContiguousCopy();
  }
  for (Path path : {Path::kAuto, Path::kReference}) {
    for (int32_t threads : {1, 2}) {
      for (int64_t key_stride : {1, 2}) {
        SCOPED_TRACE("path " + std::to_string(static_cast<int>(path)) + ", threads " +
                     std::to_string(threads) + ", key stride " + std::to_string(key_stride));
        DecodeRun r;
        MakeRun(c, &cache, &r);
        StatsRun st;
        AddStats(c, key_stride, &r, &st);
        Context ctx;
        ctx.path = path;
        ctx.num_threads = threads;
        ASSERT_TRUE(Decode(r.params, ctx).ok());
        EXPECT_TRUE(st.probs.OutsideViewUntouched());
        if (path == Path::kAuto) {
          EXPECT_TRUE(r.out.BitwiseEqual(plain_out)) << "the statistics changed the output";
        }
        for (int64_t b = 0; b < c.batch(); ++b) {
          const int64_t len = c.lens[Sz(b)];
          for (int64_t hkv = 0; hkv < c.heads_kv; ++hkv) {
            std::vector<double> sums(Sz(len), 0.0);
            for (int64_t h = hkv * c.group; h < (hkv + 1) * c.group; ++h) {
              for (int64_t i = 0; i < c.num_q; ++i) {
                for (int64_t j = 0; j < max_len + 3; ++j) {
                  const double got = st.probs.Get({b, h, i, j});
                  if (j >= len) {
                    ASSERT_EQ(got, -7.0) << "probs written past seq_len at " << b << "," << h << ","
                                         << i << "," << j;
                    continue;
                  }
                  const size_t at = Sz(((b * c.heads_q() + h) * c.num_q + i) * max_len + j);
                  const double want = path == Path::kReference ? ref_path_probs[at] : probs[at];
                  sums[Sz(j)] += want;
                  ASSERT_NEAR(got, want, test::kStatsCeiling.atol + test::kStatsCeiling.rtol * want)
                      << "probs[" << b << ", " << h << ", " << i << ", " << j << "]";
                }
              }
            }
            for (int64_t j = 0; j < max_len + 1; ++j) {
              const double want = j < len ? 1.0 + sums[Sz(j)] : 1.0;
              ASSERT_NEAR(st.accumulated.Get({b, hkv, j}), want,
                          test::kStatsCeiling.atol + test::kStatsCeiling.rtol * want)
                  << "accumulated[" << b << ", " << hkv << ", " << j << "]";
            }
          }
        }
        if (path == Path::kAuto) {
          if (threads == 1 && key_stride == 1) {
            first_probs = st.probs.ContiguousCopy();
          } else {
            EXPECT_TRUE(first_probs.BitwiseEqual(st.probs))
                << "the thread count or the layout changed the bits";
          }
        }
      }
    }
  }
}

std::vector<Case> StatsCases() {
  std::vector<Case> cases;
  const std::vector<int32_t> ragged = {LongLen(), 1, 0, 77};
  for (KVDType kv : kAllKvDTypes) {
    // GQA 4 with one query: the narrow softmax (4 rows); several splits of 256 keys.
    Case c = MakeCase(kv, 0, 1, 64, 2, 4, ragged, "stats");
    c.split_tokens = 256;
    cases.push_back(c);
  }
  // One row per head (MHA decode): the [key][4] tile with three padding rows.
  cases.push_back(MakeCase(KVDType::kF32, 0, 1, 128, 3, 1, {LongLen(), 33}, "stats"));
  Case paged = MakeCase(KVDType::kF16, 16, 3, 128, 2, 2, {LongLen(), 40}, "stats");
  paged.causal = true;
  paged.window_left = 50;
  paged.split_tokens = 100;
  cases.push_back(paged);
  Case mods = MakeCase(KVDType::kBF16, 0, 2, 72, 1, 3, {300, 5}, "stats");
  mods.softcap = 5.0f;
  mods.alibi = AlibiKind::kPerBatch;
  mods.with_lse = false;
  cases.push_back(mods);
  Case int8_wide = MakeCase(KVDType::kInt8, 32, 4, 64, 1, 4, {LongLen()}, "stats");
  int8_wide.causal = true;
  cases.push_back(int8_wide);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Stats, DecodeStatsTest, ::testing::ValuesIn(StatsCases()), CaseName);

TEST(DecodeStats, BadInput) {
  const Case c = MakeCase(KVDType::kF16, 0, 2, 64, 2, 2, {50, 30}, "stats_bad");
  TestCache cache;
  BuildCache(c.Cache(), &cache);
  DecodeRun r;
  MakeRun(c, &cache, &r);
  Tensor short_probs(DType::kF32, {2, 4, 2, 49});
  Tensor bf16_probs(DType::kBF16, {2, 4, 2, 50});
  Tensor wrong_heads(DType::kF32, {2, 4, 50});  // accumulated per query head
  r.out.Snapshot();
  const struct {
    const char* name;
    std::function<void(DecodeParams&)> mutate;
  } bad[] = {
      {"stats.probs", [&](DecodeParams& p) { p.stats.probs = short_probs.view(); }},
      {"stats.probs", [&](DecodeParams& p) { p.stats.probs = bf16_probs.view(); }},
      {"stats.accumulated", [&](DecodeParams& p) { p.stats.accumulated = wrong_heads.view(); }},
      {"stats.probs", [&](DecodeParams& p) { p.stats.probs = p.q; }},
  };
  for (const auto& b : bad) {
    DecodeParams p = r.params;
    b.mutate(p);
    const Status st = Decode(p, Context());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
    EXPECT_TRUE(test::NamesArgument(st.message(), b.name)) << st.ToString();
    EXPECT_TRUE(r.out.Unchanged());
  }
}

}  // namespace
}  // namespace tessera
