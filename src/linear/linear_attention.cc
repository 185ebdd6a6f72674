// SPDX-License-Identifier: Apache-2.0
// Linear attention: validation and per-target dispatch. The kernels and their design notes are in
// linear_forward-inl.h and linear_backward-inl.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "linear/linear_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "linear/linear_backward-inl.h"
#include "linear/linear_forward-inl.h"

#if HWY_ONCE
#include "core/check.h"
#include "core/guard.h"
#include "linear/linear_problem.h"
#include "tessera/linear.h"

namespace tessera {

HWY_EXPORT(LinearForward);
HWY_EXPORT(LinearBackward);

namespace {

Status CheckPath(const Context& ctx) {
  if (ctx.path != Path::kAuto && ctx.path != Path::kGeneric && ctx.path != Path::kFast) {
    return Status::InvalidArgument(
        "ctx.path: expected kAuto, kGeneric or kFast for linear attention (its fp64 reference "
        "is src/ref/linear_ref.h), got " +
        std::to_string(static_cast<int>(ctx.path)));
  }
  return Status::Ok();
}

Status RunForward(const LinearAttentionParams& params, const Context& ctx, bool recurrent) {
  // out unset: a state-only call (chunked form, final_state set), else an error. An empty out
  // (a shaped view with no elements) may have data == nullptr.
  const bool state_only =
      !recurrent && params.out.data == nullptr && params.final_state.data != nullptr;
  if (!state_only && params.out.data == nullptr && params.out.rank == 0) {
    return Status::InvalidArgument(Expected(
        "out",
        recurrent ? "an output view [B, S, Hq, Dv] (the recurrent form has no state-only call)"
                  : "an output view [B, S, Hq, Dv], or final_state for a state-only call",
        "none"));
  }
  LinearProblem problem;
  Status status = ValidateLinearAttention(params, &problem, /*with_out=*/!state_only);
  if (!status.ok()) return status;
  status = CheckPath(ctx);
  if (!status.ok()) return status;
  if (state_only) problem.out = nullptr;
  // No work: no output element and no final state to write.
  if ((state_only || params.out.numel() == 0) &&
      (params.final_state.data == nullptr || params.final_state.numel() == 0) &&
      (params.final_normalizer.data == nullptr || params.final_normalizer.numel() == 0)) {
    return Status::Ok();
  }
  if (!HWY_DYNAMIC_DISPATCH(LinearForward)(problem, ResolveThreads(ctx), recurrent)) {
    return Status::Internal("linear attention: could not allocate per-worker scratch");
  }
  return Status::Ok();
}

}  // namespace

Status LinearAttentionForward(const LinearAttentionParams& params, const Context& ctx) try {
  return RunForward(params, ctx, /*recurrent=*/false);
}
TESSERA_CATCH_ALL("LinearAttentionForward")

Status LinearAttentionRecurrent(const LinearAttentionParams& params, const Context& ctx) try {
  return RunForward(params, ctx, /*recurrent=*/true);
}
TESSERA_CATCH_ALL("LinearAttentionRecurrent")

Status LinearAttentionBackward(const LinearAttentionBackwardParams& params,
                               const Context& ctx) try {
  LinearBackwardProblem problem;
  Status status = ValidateLinearAttentionBackward(params, &problem);
  if (!status.ok()) return status;
  status = CheckPath(ctx);
  if (!status.ok()) return status;
  // No work: no gradient element to write.
  const auto empty = [](const TensorView& t) { return t.data == nullptr || t.numel() == 0; };
  if (empty(params.dq) && empty(params.dk) && empty(params.dv) && empty(params.dgates) &&
      empty(params.d_initial_state) && empty(params.d_initial_normalizer)) {
    return Status::Ok();
  }
  if (!HWY_DYNAMIC_DISPATCH(LinearBackward)(problem, ResolveThreads(ctx))) {
    return Status::Internal("linear attention backward: could not allocate per-worker buffers");
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("LinearAttentionBackward")

}  // namespace tessera
#endif  // HWY_ONCE
