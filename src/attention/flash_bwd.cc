// SPDX-License-Identifier: Apache-2.0
// Exact attention backward: validation, path choice and per-target dispatch. The kernel itself
// and its design notes are in flash_bwd-inl.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "attention/flash_bwd.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "attention/flash_bwd-inl.h"

#if HWY_ONCE
#include <cstdint>
#include <new>
#include <vector>

#include "attention/flash_bwd_amx.h"
#include "core/amx.h"
#include "core/attention_problem.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "core/element.h"
#include "core/guard.h"
#include "ref/attention_ref.h"
#include "tessera/attention.h"

namespace tessera {

HWY_EXPORT(FlashBackward);

namespace {

// An fp64 reference value rounded into an output of `dtype`.
void StoreRounded(DType dtype, void* base, int64_t i, double x) {
  StoreElement(dtype, base, i, static_cast<float>(x));
}

// Path::kReference: the fp64 reference gradients, rounded into the caller's outputs. Only rows
// that belong to a sequence are written.
Status RunReferenceBackward(const AttentionBackwardParams& params,
                            const AttentionBackwardProblem& bp) {
  const AttentionProblem& p = bp.fwd;
  const int64_t q_rows = p.varlen() ? p.seq_q : p.batch * p.seq_q;
  const int64_t k_rows = p.varlen() ? p.seq_k : p.batch * p.seq_k;
  std::vector<double> dq, dk, dv;
  try {
    dq.resize(static_cast<size_t>(q_rows * p.heads_q * p.dim));
    dk.resize(static_cast<size_t>(k_rows * p.heads_kv * p.dim));
    dv.resize(dk.size());
  } catch (const std::bad_alloc&) {
    return Status::Internal("reference path: could not allocate the fp64 gradient buffers");
  }
  AttentionBackwardParams resolved = params;
  resolved.forward = WithResolvedWindows(params.forward, p);
  ref::AttentionBackwardF64(resolved, dq.data(), dk.data(), dv.data());
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = p.q_begin(b); t < p.q_begin(b) + p.q_len(b); ++t) {
      const int64_t row = p.varlen() ? t : b * p.seq_q + t;
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const double* src = dq.data() + (row * p.heads_q + h) * p.dim;
        for (int64_t d = 0; d < p.dim; ++d) {
          StoreRounded(p.dtype, bp.dq, bp.dq_offset(b, t, h) + d * bp.dq_stride[3], src[d]);
        }
      }
    }
    for (int64_t t = p.k_begin(b); t < p.k_begin(b) + p.k_len(b); ++t) {
      const int64_t row = p.varlen() ? t : b * p.seq_k + t;
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        const size_t at = static_cast<size_t>((row * p.heads_kv + h) * p.dim);
        for (int64_t d = 0; d < p.dim; ++d) {
          StoreRounded(p.dtype, bp.dk, bp.dk_offset(b, t, h) + d * bp.dk_stride[3],
                       dk[at + static_cast<size_t>(d)]);
          StoreRounded(p.dtype, bp.dv, bp.dv_offset(b, t, h) + d * bp.dv_stride[3],
                       dv[at + static_cast<size_t>(d)]);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status AttentionBackward(const AttentionBackwardParams& params, const Context& ctx) try {
  AttentionBackwardProblem problem;
  Status status = ValidateAttentionBackward(params, &problem);
  if (!status.ok()) return status;
  // No work: no gradient to write, or (dense batch) no query row or no key, where every
  // gradient is 0.
  if (params.dq.numel() == 0 && params.dk.numel() == 0) return Status::Ok();
  if (!problem.fwd.varlen() && (params.forward.out.numel() == 0 || problem.fwd.seq_k == 0)) {
    FillView(params.dq, 0.0f);
    FillView(params.dk, 0.0f);
    FillView(params.dv, 0.0f);
    return Status::Ok();
  }
  if (ctx.path == Path::kReference) return RunReferenceBackward(params, problem);
  bool fast = false;
  status = ChooseKernel(ctx, problem.fwd.dim, &fast);
  if (!status.ok()) return status;
  // bf16 on AMX tiles (flash_bwd_amx.cc) when the CPU has them, on the default path only:
  // Path::kGeneric and Path::kFast force the Highway kernel (so does the AVX512-BF16 engine, which
  // the backward does not implement).
  if (ctx.path == Path::kAuto && AmxBackwardHandles(problem) && Bf16DotEngine() == Bf16Dot::kAmx) {
    if (!AmxBackward(problem, ResolveThreads(ctx))) {
      return Status::Internal("AttentionBackward: could not allocate the AMX packs or scratch");
    }
    return Status::Ok();
  }
  if (!HWY_DYNAMIC_DISPATCH(FlashBackward)(problem, ResolveThreads(ctx), fast)) {
    return Status::Internal("AttentionBackward: could not allocate the Delta buffer or scratch");
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("AttentionBackward")

}  // namespace tessera
#endif  // HWY_ONCE
