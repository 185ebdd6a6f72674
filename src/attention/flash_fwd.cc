// SPDX-License-Identifier: Apache-2.0
// Exact attention forward: validation, path choice and per-target dispatch. The kernel itself
// and its design notes are in flash_fwd-inl.h; bf16 on Intel AMX in flash_fwd_amx.cc.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "attention/flash_fwd.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "attention/flash_fwd-inl.h"

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "attention/flash_fwd_amx.h"
#include "attention/window_stats.h"
#include "core/amx.h"
#include "core/attention_problem.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "core/element.h"
#include "core/guard.h"
#include "decode/decode.h"
#include "ref/attention_ref.h"
#include "tessera/attention.h"

namespace tessera {

HWY_EXPORT(FlashForward);

namespace {

// Path::kReference: the fp64 reference, rounded into the caller's outputs. Only rows that belong
// to a sequence are written.
Status RunReference(const AttentionParams& params, const AttentionProblem& p) {
  const int64_t rows = p.varlen() ? p.seq_q : p.batch * p.seq_q;
  std::vector<double> out, lse;
  try {
    out.resize(static_cast<size_t>(rows * p.heads_q * p.dim));
    lse.resize(static_cast<size_t>(rows * p.heads_q));
  } catch (const std::bad_alloc&) {
    return Status::Internal("reference path: could not allocate the fp64 result buffers");
  }
  ref::AttentionForwardF64(WithResolvedWindows(params, p), out.data(), lse.data());
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = p.q_begin(b); t < p.q_begin(b) + p.q_len(b); ++t) {
      const int64_t row = p.varlen() ? t : b * p.seq_q + t;
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const double* src = out.data() + (row * p.heads_q + h) * p.dim;
        const int64_t off = p.out_offset(b, t, h);
        for (int64_t d = 0; d < p.dim; ++d) {
          StoreElement(p.dtype, p.out, off + d * p.out_stride[3], static_cast<float>(src[d]));
        }
        if (p.lse != nullptr) {
          const int64_t li = p.varlen() ? h * p.seq_q + t : (b * p.heads_q + h) * p.seq_q + t;
          p.lse[p.lse_offset(b, h, t)] = static_cast<float>(lse[static_cast<size_t>(li)]);
        }
      }
    }
  }
  return Status::Ok();
}

// A few queries per sequence: the decode kernel (channels in lanes, split keys) beats the
// rows-in-lanes forward, whose vectors would be mostly padding.
bool RoutesToDecode(const AttentionProblem& p) {
  // Decode implements the window masks only.
  if (p.mask.any || p.mask.sigmoid) return false;
  int64_t max_q = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_q = std::max(max_q, p.q_len(b));
  return max_q > 0 && max_q <= kMaxDecodeQueries;
}

Status RunAsDecode(const AttentionProblem& p, const Context& ctx, bool fast) {
  decode::KVSource kv;
  kv.dtype = p.dtype == DType::kF32    ? KVDType::kF32
             : p.dtype == DType::kBF16 ? KVDType::kBF16
                                       : KVDType::kF16;
  kv.batch = p.batch;
  kv.heads_kv = p.heads_kv;
  kv.dim = p.dim;
  kv.k = static_cast<const uint8_t*>(p.k);
  kv.v = static_cast<const uint8_t*>(p.v);
  const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
  // A dim of extent <= 1 may carry any stride (validation bounds only the others: its index is
  // always 0), so its byte stride is 0 rather than a product that can overflow.
  const auto bytes = [elem](int64_t extent, int64_t stride) -> int64_t {
    return extent <= 1 ? 0 : stride * elem;
  };
  kv.k_page_stride = p.varlen() ? 0 : bytes(p.batch, p.k_stride[0]);
  kv.k_token_stride = bytes(p.seq_k, p.k_stride[1]);
  kv.k_head_stride = bytes(p.heads_kv, p.k_stride[2]);
  kv.k_dim_stride = p.k_stride[3];
  kv.v_page_stride = p.varlen() ? 0 : bytes(p.batch, p.v_stride[0]);
  kv.v_token_stride = bytes(p.seq_k, p.v_stride[1]);
  kv.v_head_stride = bytes(p.heads_kv, p.v_stride[2]);
  kv.v_dim_stride = p.v_stride[3];
  kv.seq_k = p.seq_k;
  kv.cu_seqlens_k = p.cu_seqlens_k;
  std::vector<int64_t> lens(static_cast<size_t>(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) lens[static_cast<size_t>(b)] = kv.len(b);
  internal::DecodeSchedule schedule;
  int64_t max_q = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_q = std::max(max_q, p.q_len(b));
  decode::BuildSchedule(lens, p.heads_q, p.heads_kv, p.dim, max_q, kDefaultDecodeSplitTokens,
                        ResolveThreads(ctx), &schedule);
  if (!decode::RunDecodeKernel(p, kv, schedule, fast)) {
    return Status::Internal("AttentionForward: could not allocate decode scratch");
  }
  return Status::Ok();
}

// The kernels of a validated problem with keys: decode for a few queries per sequence, bf16 on a
// dot-product unit, else the Highway kernel.
Status RunKernels(const AttentionProblem& problem, const Context& ctx) {
  bool fast = false;
  Status status = ChooseKernel(ctx, problem.dim, &fast);
  if (!status.ok()) return status;
  if (RoutesToDecode(problem)) return RunAsDecode(problem, ctx, fast);
  // bf16 on a dot-product unit (flash_fwd_amx.cc: AMX tiles, else AVX512-BF16) when the CPU has
  // one, on the default path only: Path::kGeneric and Path::kFast force the Highway kernel.
  if (ctx.path == Path::kAuto && AmxForwardHandles(problem)) {
    const Bf16Dot engine = Bf16DotEngine();
    if (engine != Bf16Dot::kNone) {
      if (!AmxForward(problem, ResolveThreads(ctx), engine)) {
        return Status::Internal("AttentionForward: could not allocate per-worker bf16 scratch");
      }
      return Status::Ok();
    }
  }
  if (!HWY_DYNAMIC_DISPATCH(FlashForward)(problem, ResolveThreads(ctx), fast)) {
    return Status::Internal("AttentionForward: could not allocate per-worker scratch");
  }
  return Status::Ok();
}

// Writes a contiguous fp64 result into an f32 view of rank 3.
void StoreRank3(const TensorView& view, const std::vector<double>& values) {
  if (view.data == nullptr) return;
  float* out = static_cast<float*>(view.data);
  size_t at = 0;
  for (int64_t a = 0; a < view.shape[0]; ++a) {
    for (int64_t b = 0; b < view.shape[1]; ++b) {
      for (int64_t c = 0; c < view.shape[2]; ++c) {
        out[a * view.strides[0] + b * view.strides[1] + c * view.strides[2]] =
            static_cast<float>(values[at++]);
      }
    }
  }
}

// Path::kReference for the window statistics.
void ReferenceStats(const AttentionParams& params, const AttentionProblem& p) {
  const AttentionStats& st = params.stats;
  std::vector<double> mass(static_cast<size_t>(st.key_mass.numel()));
  std::vector<double> mass_sq(static_cast<size_t>(st.key_mass.numel()));
  std::vector<double> entropy(static_cast<size_t>(p.batch * p.heads_q * st.window));
  ref::AttentionStatsF64(WithResolvedWindows(params, p), mass.data(), mass_sq.data(),
                         entropy.data());
  StoreRank3(st.key_mass, mass);
  StoreRank3(st.key_mass_sq, mass_sq);
  StoreRank3(st.row_entropy, entropy);
}

}  // namespace

Status AttentionForward(const AttentionParams& params, const Context& ctx) try {
  AttentionProblem problem;
  Status status = ValidateAttention(params, &problem);
  if (!status.ok()) return status;
  const AttentionStats& stats = params.stats;
  // No work: nothing to write, or (dense batch) no key, where every row gets (0, -inf) and every
  // window row entropy 0.
  if (params.out.numel() == 0) return Status::Ok();
  if (!problem.varlen() && problem.seq_k == 0) {
    FillView(params.out, 0.0f);
    if (params.lse.data != nullptr) FillView(params.lse, -std::numeric_limits<float>::infinity());
    if (stats.row_entropy.data != nullptr) FillView(stats.row_entropy, 0.0f);
    return Status::Ok();
  }
  if (ctx.path == Path::kReference) {
    status = RunReference(params, problem);
    if (status.ok() && stats.window != 0) ReferenceStats(params, problem);
    return status;
  }
  if (stats.window == 0) return RunKernels(problem, ctx);

  // Window statistics read every window row's LSE: the caller's, or one of our own.
  AttentionProblem with_lse = problem;
  std::vector<float> lse;
  if (with_lse.lse == nullptr) {
    lse.resize(static_cast<size_t>(problem.batch * problem.heads_q * problem.seq_q));
    with_lse.lse = lse.data();
    with_lse.lse_stride[0] = problem.heads_q * problem.seq_q;
    with_lse.lse_stride[1] = problem.seq_q;
    with_lse.lse_stride[2] = 1;
  }
  status = RunKernels(with_lse, ctx);
  if (!status.ok()) return status;
  if (!ComputeWindowStats(with_lse, stats, with_lse.lse, with_lse.lse_stride,
                          ResolveThreads(ctx))) {
    return Status::Internal("AttentionForward: could not allocate the statistics scratch");
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("AttentionForward")

}  // namespace tessera
#endif  // HWY_ONCE
