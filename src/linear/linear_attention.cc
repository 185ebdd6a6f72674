// Linear attention: validation and per-target dispatch. The kernels and their design notes are in
// linear_forward-inl.h and linear_backward-inl.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "linear/linear_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "linear/linear_backward-inl.h"
#include "linear/linear_forward-inl.h"

#if HWY_ONCE
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
  LinearProblem problem;
  Status status = ValidateLinearAttention(params, &problem);
  if (!status.ok()) return status;
  status = CheckPath(ctx);
  if (!status.ok()) return status;
  if (!HWY_DYNAMIC_DISPATCH(LinearForward)(problem, ResolveThreads(ctx), recurrent)) {
    return Status::Internal("linear attention: could not allocate per-worker scratch");
  }
  return Status::Ok();
}

}  // namespace

Status LinearAttentionForward(const LinearAttentionParams& params, const Context& ctx) {
  return RunForward(params, ctx, /*recurrent=*/false);
}

Status LinearAttentionRecurrent(const LinearAttentionParams& params, const Context& ctx) {
  return RunForward(params, ctx, /*recurrent=*/true);
}

Status LinearAttentionBackward(const LinearAttentionBackwardParams& params, const Context& ctx) {
  LinearBackwardProblem problem;
  Status status = ValidateLinearAttentionBackward(params, &problem);
  if (!status.ok()) return status;
  status = CheckPath(ctx);
  if (!status.ok()) return status;
  if (!HWY_DYNAMIC_DISPATCH(LinearBackward)(problem, ResolveThreads(ctx))) {
    return Status::Internal("linear attention backward: could not allocate per-worker buffers");
  }
  return Status::Ok();
}

}  // namespace tessera
#endif  // HWY_ONCE
