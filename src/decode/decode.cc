// Decode: validation, planning (split + stream-K balance) and per-target dispatch. The kernel and
// its design notes are in decode-inl.h.
//
// Plan: every sequence's keys are cut into splits of split_tokens keys (the last one shorter; a
// sequence with no keys has one empty split). A unit is (sequence, split, block of KV heads),
// ordered sequence-major, split, then head block. Workers claim units in that order from a shared
// counter (stream-K in spirit, Lean Attention): a long sequence is shared by every worker, a
// worker that finishes one sequence starts the next, and a core that the machine slows down
// (a busy neighbour on a shared host: measured up to 1.6x on this VM) simply claims fewer units,
// where a static split of equal cost would leave the other core waiting. A sequence with one split
// writes its output directly; one with several writes one partial state per split, merged
// afterwards in split order. The key split is fixed by split_tokens alone and heads are
// independent, so the results do not depend on the thread count or on the other sequences of the
// batch.
//
// Decode instantiates head dims x element types per target; SSSE3 / SSE4 machines (pre-AVX2) run
// the portable fallback instead, which keeps this file's build time in check.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_SSE4)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "decode/decode.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "decode/decode-inl.h"

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/element.h"
#include "decode/decode.h"
#include "kvcache/kv_validate.h"
#include "ref/decode_ref.h"
#include "tessera/attention.h"
#include "tessera/decode.h"

namespace tessera {
HWY_EXPORT(DecodeKernel);

namespace decode {

void BuildSchedule(const std::vector<int64_t>& k_lens, int64_t heads_q, int64_t heads_kv,
                   int64_t dim, int64_t queries, int64_t split_tokens, int32_t threads,
                   internal::DecodeSchedule* out) {
  internal::DecodeSchedule& s = *out;
  s = internal::DecodeSchedule();
  const int64_t batch = static_cast<int64_t>(k_lens.size());
  s.batch = batch;
  s.heads_q = heads_q;
  s.heads_kv = heads_kv;
  s.dim = dim;
  s.queries = queries;
  s.split_tokens = split_tokens;
  s.splits.resize(static_cast<size_t>(batch));
  s.first_slot.assign(static_cast<size_t>(batch), -1);
  int64_t total_splits = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = std::max<int64_t>(1, (k_lens[size_t(b)] + split_tokens - 1) / split_tokens);
    s.splits[size_t(b)] = n;
    total_splits += n;
    if (n > 1) {
      s.first_slot[size_t(b)] = s.num_slots;
      s.num_slots += n;
    }
  }
  // Head blocks only add parallelism where splits alone are too few (they never change results).
  const int64_t want_units = 4 * static_cast<int64_t>(std::max(threads, 1));
  int64_t head_blocks = 1;
  while (head_blocks < heads_kv && total_splits * head_blocks < want_units) ++head_blocks;
  const int64_t heads_per_block = heads_kv > 0 ? (heads_kv + head_blocks - 1) / head_blocks : 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = k_lens[size_t(b)];
    for (int64_t sp = 0; sp < s.splits[size_t(b)]; ++sp) {
      const int64_t k0 = sp * split_tokens, k1 = std::min(len, k0 + split_tokens);
      for (int64_t h0 = 0; h0 < heads_kv; h0 += heads_per_block) {
        const int64_t h1 = std::min(heads_kv, h0 + heads_per_block);
        const int64_t slot = s.first_slot[size_t(b)] >= 0 ? s.first_slot[size_t(b)] + sp : -1;
        s.units.push_back(DecodeUnit{b, k0, std::max(k0, k1), h0, h1, sp, slot});
      }
    }
  }
  const int64_t n_units = static_cast<int64_t>(s.units.size());
  s.threads = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(threads, n_units)));
  (void)dim;
}

bool ScheduleFits(const internal::DecodeSchedule& s, const std::vector<int64_t>& k_lens) {
  if (static_cast<int64_t>(k_lens.size()) != s.batch) return false;
  for (size_t b = 0; b < k_lens.size(); ++b) {
    const int64_t n = std::max<int64_t>(1, (k_lens[b] + s.split_tokens - 1) / s.split_tokens);
    if (n != s.splits[b]) return false;
  }
  return true;
}

bool RunDecodeKernel(const AttentionProblem& p, const KVSource& kv,
                     const internal::DecodeSchedule& schedule, bool fast) {
  return HWY_DYNAMIC_DISPATCH(DecodeKernel)(p, kv, schedule, fast);
}

}  // namespace decode

namespace {

std::string Num(int64_t x) { return std::to_string(x); }

// Validates a DecodeParams and builds the kernel's problem (queries, outputs, options) and KV
// source. The option checks are the forward's (ValidateAttention on the same q / out / lse /
// options with a stand-in K/V of the cache's shape).
Status ValidateDecode(const DecodeParams& p, AttentionProblem* prob, decode::KVSource* kv,
                      std::vector<int64_t>* lens) {
  Status s = ValidateKVCache(p.cache, p.kv, "cache", "kv");
  if (!s.ok()) return s;
  s = CheckRankAndStrides("q", p.q, false);
  if (!s.ok()) return s;
  if (p.q.rank != 4) {
    return Status::InvalidArgument(
        Expected("q", "rank 4 [B, Q, Hq, D]", "rank " + std::to_string(p.q.rank)));
  }
  const int64_t B = p.q.shape[0], Q = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.cache.num_kv_heads;
  if (B != p.kv.batch) {
    return Status::InvalidArgument(Expected(
        "q", "batch " + Num(p.kv.batch) + " (kv.batch) in dim 0", "shape " + ShapeString(p.q)));
  }
  if (Q < 1 || Q > kMaxDecodeQueries) {
    return Status::InvalidArgument(
        Expected("q", "1 to " + Num(kMaxDecodeQueries) + " queries per sequence (dim 1)", Num(Q)));
  }
  if (D != p.cache.head_dim) {
    return Status::InvalidArgument(
        Expected("q", "head dim " + Num(p.cache.head_dim) + " (cache.head_dim) in dim 3", Num(D)));
  }
  if (Hq < 1 || Hq % Hkv != 0) {
    return Status::InvalidArgument(Expected(
        "q", "a head count that is a positive multiple of cache.num_kv_heads = " + Num(Hkv),
        Num(Hq)));
  }
  if (p.split_tokens < 0) {
    return Status::InvalidArgument(
        Expected("split_tokens", ">= 0 (0: the default)", Num(p.split_tokens)));
  }
  AttentionParams a;
  a.q = p.q;
  a.out = p.out;
  a.lse = p.lse;
  a.scale = p.scale;
  a.causal = p.causal;
  a.window_left = p.window_left;
  a.softcap = p.softcap;
  a.alibi_slopes = p.alibi_slopes;
  // The stand-in K/V: the cache's shape with one key, never read.
  a.k = MakeView4(p.cache.k, p.q.dtype, B, 1, Hkv, D);
  for (int i = 0; i < 4; ++i) a.k.strides[i] = 0;
  a.v = a.k;
  s = ValidateAttention(a, prob);
  if (!s.ok()) return s;

  decode::KVSource& src = *kv;
  src = decode::KVSource();
  src.dtype = p.cache.dtype;
  src.batch = B;
  src.heads_kv = Hkv;
  src.dim = D;
  src.k = static_cast<const uint8_t*>(p.cache.k);
  src.v = static_cast<const uint8_t*>(p.cache.v);
  const int64_t row_bytes = KVRowBytes(p.cache.dtype, D);
  src.k_page_stride = src.v_page_stride = Hkv * p.cache.page_size * row_bytes;
  src.k_head_stride = src.v_head_stride = p.cache.page_size * row_bytes;
  src.k_token_stride = src.v_token_stride = row_bytes;
  src.seq_lens = p.kv.seq_lens;
  src.block_table = p.kv.block_table;
  src.block_stride = p.kv.max_pages_per_seq;
  src.page_size = p.cache.page_size;
  src.cache = true;
  if (KVDTypeIsQuantized(p.cache.dtype)) {
    src.k_scales = p.cache.k_scales;
    src.v_scales = p.cache.v_scales;
    src.k_norm = p.cache.k_channel_scales;
    src.v_norm = p.cache.v_channel_scales;
  }
  lens->resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) (*lens)[size_t(b)] = p.kv.seq_lens[b];
  return Status::Ok();
}

int64_t SplitTokens(const DecodeParams& p) {
  if (p.split_tokens > 0) return p.split_tokens;
  const bool small_pages =
      p.kv.block_table != nullptr && p.cache.page_size < kDecodeSmallPageTokens;
  return small_pages ? kDefaultDecodeSplitTokensSmallPages : kDefaultDecodeSplitTokens;
}

// Path::kReference: the fp64 reference (on the dequantized cache), rounded into the outputs.
Status RunReference(const DecodeParams& params, const AttentionProblem& p) {
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  std::vector<double> out, lse;
  try {
    out.resize(static_cast<size_t>(rows * p.dim));
    lse.resize(static_cast<size_t>(rows));
  } catch (const std::bad_alloc&) {
    return Status::Internal("RunDecode: could not allocate the fp64 reference buffers");
  }
  ref::DecodeF64(params, out.data(), lse.data());
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = 0; t < p.seq_q; ++t) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const double* src = out.data() + ((b * p.seq_q + t) * p.heads_q + h) * p.dim;
        const int64_t off = p.out_offset(b, t, h);
        for (int64_t d = 0; d < p.dim; ++d) {
          StoreElement(p.dtype, p.out, off + d * p.out_stride[3], static_cast<float>(src[d]));
        }
        if (p.lse != nullptr) {
          p.lse[p.lse_offset(b, h, t)] =
              static_cast<float>(lse[static_cast<size_t>((b * p.heads_q + h) * p.seq_q + t)]);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

DecodePlan::DecodePlan() = default;
DecodePlan::~DecodePlan() = default;
DecodePlan::DecodePlan(const DecodePlan&) = default;
DecodePlan& DecodePlan::operator=(const DecodePlan&) = default;
int64_t DecodePlan::num_units() const {
  return schedule_ ? static_cast<int64_t>(schedule_->units.size()) : 0;
}
int64_t DecodePlan::split_tokens() const { return schedule_ ? schedule_->split_tokens : 0; }
int32_t DecodePlan::threads() const { return schedule_ ? schedule_->threads : 0; }

Status PlanDecode(const DecodeParams& params, const Context& ctx, DecodePlan* plan) {
  if (plan == nullptr) {
    return Status::InvalidArgument(Expected("plan", "a DecodePlan to fill", "nullptr"));
  }
  AttentionProblem prob;
  decode::KVSource kv;
  std::vector<int64_t> lens;
  Status s = ValidateDecode(params, &prob, &kv, &lens);
  if (!s.ok()) return s;
  auto schedule = std::make_shared<internal::DecodeSchedule>();
  decode::BuildSchedule(lens, prob.heads_q, prob.heads_kv, prob.dim, prob.seq_q,
                        SplitTokens(params), ResolveThreads(ctx), schedule.get());
  plan->schedule_ = std::move(schedule);
  return Status::Ok();
}

Status RunDecode(const DecodePlan& plan, const DecodeParams& params, const Context& ctx) {
  if (!plan.valid()) {
    return Status::InvalidArgument(
        Expected("plan", "a plan made by PlanDecode", "an empty (default-constructed) plan"));
  }
  AttentionProblem prob;
  decode::KVSource kv;
  std::vector<int64_t> lens;
  Status s = ValidateDecode(params, &prob, &kv, &lens);
  if (!s.ok()) return s;
  const internal::DecodeSchedule& sched = *plan.schedule_;
  const int64_t split = SplitTokens(params);
  if (sched.batch != prob.batch || sched.heads_q != prob.heads_q ||
      sched.heads_kv != prob.heads_kv || sched.dim != prob.dim || sched.queries != prob.seq_q ||
      sched.split_tokens != split || !decode::ScheduleFits(sched, lens)) {
    return Status::InvalidArgument(
        Expected("plan",
                 "a plan for this batch (B " + Num(sched.batch) + ", Hq " + Num(sched.heads_q) +
                     ", Hkv " + Num(sched.heads_kv) + ", D " + Num(sched.dim) + ", Q " +
                     Num(sched.queries) + ", split_tokens " + Num(sched.split_tokens) +
                     ", the same number of splits per sequence); call PlanDecode again",
                 "B " + Num(prob.batch) + ", Hq " + Num(prob.heads_q) + ", Hkv " +
                     Num(prob.heads_kv) + ", D " + Num(prob.dim) + ", Q " + Num(prob.seq_q) +
                     ", split_tokens " + Num(split) + " with seq_lens whose split counts differ"));
  }
  if (ctx.path == Path::kReference) return RunReference(params, prob);
  bool fast = false;
  s = ChooseKernel(ctx, prob.dim, &fast);
  if (!s.ok()) return s;
  if (!decode::RunDecodeKernel(prob, kv, sched, fast)) {
    return Status::Internal("RunDecode: could not allocate scratch");
  }
  return Status::Ok();
}

Status Decode(const DecodeParams& params, const Context& ctx) {
  DecodePlan plan;
  Status s = PlanDecode(params, ctx, &plan);
  if (!s.ok()) return s;
  return RunDecode(plan, params, ctx);
}

}  // namespace tessera
#endif  // HWY_ONCE
