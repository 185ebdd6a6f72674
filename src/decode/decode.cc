// SPDX-License-Identifier: Apache-2.0
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
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/element.h"
#include "core/guard.h"
#include "decode/decode.h"
#include "decode/decode_validate.h"
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
                     const internal::DecodeSchedule& schedule, bool fast,
                     const StatsRecord* stats) {
  return HWY_DYNAMIC_DISPATCH(DecodeKernel)(p, kv, schedule, fast, stats);
}

}  // namespace decode

namespace {

std::string Num(int64_t x) { return std::to_string(x); }

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
  DecodeParams resolved = params;
  if (p.window_left == kUnboundedWindow) resolved.window_left = -1;
  ref::DecodeF64(resolved, out.data(), lse.data());
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

// The logits of DecodeStats when probs cannot hold them (absent or strided), kept per calling
// thread up to kMaxKeptLogitBytes: a fresh, zeroed buffer on every call cost its page faults
// (accumulated-only decode at 32K: ~4% of the call).
constexpr size_t kMaxKeptLogitBytes = size_t{64} << 20;
struct LogitBuffer {
  std::unique_ptr<float[]> data;
  size_t floats = 0;
};
LogitBuffer& CallerLogitBuffer() {
  static thread_local LogitBuffer buffer;
  return buffer;
}
float* LogitScratch(size_t floats) {
  LogitBuffer& b = CallerLogitBuffer();
  if (b.floats < floats) {
    b.data.reset(new float[floats]);  // uninitialized: every read element is written first
    b.floats = floats;
  }
  return b.data.get();
}
void TrimLogitScratch() {
  LogitBuffer& b = CallerLogitBuffer();
  if (b.floats * sizeof(float) > kMaxKeptLogitBytes) b.data.reset(), b.floats = 0;
}

// Path::kReference for the statistics: the fp64 probabilities, rounded into probs and summed
// (heads, then queries, in order) into accumulated.
void ReferenceStats(const DecodeParams& params, const AttentionProblem& p,
                    const std::vector<int64_t>& lens) {
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  std::vector<double> out(static_cast<size_t>(p.batch * p.seq_q * p.heads_q * p.dim));
  std::vector<double> probs(static_cast<size_t>(p.batch * p.heads_q * p.seq_q * max_len), 0.0);
  ref::DecodeRefOptions options;
  options.probs = probs.data();
  options.probs_keys = max_len;
  DecodeParams resolved = params;
  if (p.window_left == kUnboundedWindow) resolved.window_left = -1;
  ref::DecodeF64WithOptions(resolved, options, out.data(), nullptr);
  const TensorView& pv = params.stats.probs;
  const TensorView& av = params.stats.accumulated;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = lens[static_cast<size_t>(b)];
    for (int64_t hkv = 0; hkv < p.heads_kv; ++hkv) {
      std::vector<double> sums(static_cast<size_t>(len), 0.0);
      for (int64_t h = hkv * p.group; h < (hkv + 1) * p.group; ++h) {
        for (int64_t i = 0; i < p.seq_q; ++i) {
          const double* row = probs.data() + ((b * p.heads_q + h) * p.seq_q + i) * max_len;
          for (int64_t j = 0; j < len; ++j) {
            sums[static_cast<size_t>(j)] += row[j];
            if (pv.data != nullptr) {
              static_cast<float*>(pv.data)[b * pv.strides[0] + h * pv.strides[1] +
                                           i * pv.strides[2] + j * pv.strides[3]] =
                  static_cast<float>(row[j]);
            }
          }
        }
      }
      if (av.data == nullptr) continue;
      for (int64_t j = 0; j < len; ++j) {
        float& acc = static_cast<float*>(
            av.data)[b * av.strides[0] + hkv * av.strides[1] + j * av.strides[2]];
        acc = static_cast<float>(acc + sums[static_cast<size_t>(j)]);
      }
    }
  }
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

Status PlanDecode(const DecodeParams& params, const Context& ctx, DecodePlan* plan) try {
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
                        ResolveSplitTokens(params), ResolveThreads(ctx), schedule.get());
  plan->schedule_ = std::move(schedule);
  return Status::Ok();
}
TESSERA_CATCH_ALL("PlanDecode")

Status RunDecode(const DecodePlan& plan, const DecodeParams& params, const Context& ctx) try {
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
  const int64_t split = ResolveSplitTokens(params);
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
  if (prob.batch == 0) return Status::Ok();  // no output row: nothing to do
  const DecodeStats& stats = params.stats;
  const bool want_stats = stats.probs.data != nullptr || stats.accumulated.data != nullptr;
  if (ctx.path == Path::kReference) {
    s = RunReference(params, prob);
    if (s.ok() && want_stats) ReferenceStats(params, prob, lens);
    return s;
  }
  bool fast = false;
  s = ChooseKernel(ctx, prob.dim, &fast);
  if (!s.ok()) return s;
  if (!want_stats) {
    if (!decode::RunDecodeKernel(prob, kv, sched, fast)) {
      return Status::Internal("RunDecode: could not allocate scratch");
    }
    return Status::Ok();
  }

  // Statistics: the kernel records each row's logits (into probs when their keys are
  // contiguous) and needs every row's LSE (the caller's or a scratch one).
  decode::StatsRecord rec;
  std::vector<float> lse;
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  if (stats.probs.data != nullptr) {
    rec.probs = static_cast<float*>(stats.probs.data);
    for (int i = 0; i < 4; ++i) rec.probs_stride[i] = stats.probs.strides[i];
  }
  if (stats.accumulated.data != nullptr) {
    rec.accumulated = static_cast<float*>(stats.accumulated.data);
    for (int i = 0; i < 3; ++i) rec.acc_stride[i] = stats.accumulated.strides[i];
  }
  if (rec.probs != nullptr && rec.probs_stride[3] == 1) {
    rec.logits = rec.probs;
    for (int i = 0; i < 3; ++i) rec.logit_stride[i] = rec.probs_stride[i];
  } else {
    rec.logits =
        LogitScratch(static_cast<size_t>(prob.batch * prob.heads_q * prob.seq_q * max_len));
    rec.logit_stride[2] = max_len;
    rec.logit_stride[1] = prob.seq_q * max_len;
    rec.logit_stride[0] = prob.heads_q * prob.seq_q * max_len;
  }
  if (prob.lse == nullptr) {
    lse.resize(static_cast<size_t>(prob.batch * prob.heads_q * prob.seq_q));
    prob.lse = lse.data();
    prob.lse_stride[0] = prob.heads_q * prob.seq_q;
    prob.lse_stride[1] = prob.seq_q;
    prob.lse_stride[2] = 1;
  }
  const bool ok = decode::RunDecodeKernel(prob, kv, sched, fast, &rec);
  TrimLogitScratch();
  if (!ok) return Status::Internal("RunDecode: could not allocate scratch");
  return Status::Ok();
}
TESSERA_CATCH_ALL("RunDecode")

Status Decode(const DecodeParams& params, const Context& ctx) try {
  DecodePlan plan;
  Status s = PlanDecode(params, ctx, &plan);
  if (!s.ok()) return s;
  return RunDecode(plan, params, ctx);
}
TESSERA_CATCH_ALL("Decode")

}  // namespace tessera
#endif  // HWY_ONCE
