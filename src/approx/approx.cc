// SPDX-License-Identifier: Apache-2.0
// ApproxAttention / ApproxAttentionBackward: the checks every method shares, then the method.
#include "tessera/approx.h"

#include <cmath>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "core/check.h"
#include "core/guard.h"

namespace tessera {

namespace {

struct MethodName {
  ApproxMethod method;
  const char* name;
};
constexpr MethodName kMethodNames[] = {
    {ApproxMethod::kWersa, "wersa"},         {ApproxMethod::kHyper, "hyper"},
    {ApproxMethod::kPerformer, "performer"}, {ApproxMethod::kAgent, "agent"},
    {ApproxMethod::kRouting, "routing"},     {ApproxMethod::kHiLo, "hilo"},
};

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

// A rank-4 f32 view [B, S, H, D]; a negative extent accepts any.
Status CheckTensor(const char* name, const TensorView& t, int64_t b, int64_t s, int64_t h,
                   int64_t d, bool writable) {
  if (t.data == nullptr && t.numel() != 0) return Invalid(name, "a non-null pointer", "nullptr");
  if (t.dtype != DType::kF32) {
    return Invalid(name, "dtype f32 (approximate methods compute in f32)", DTypeName(t.dtype));
  }
  const int64_t shape[4] = {b, s, h, d};
  return CheckShape(name, t, 4, shape, "[B, S, H, D]", writable);
}

// The checks of q, k, v (and out when `out` is given) shared by the forward and the backward.
Status CheckInputs(const ApproxParams& p, const TensorView* out, approx::ApproxShape* shape) {
  Status s = CheckTensor("q", p.q, -1, -1, -1, -1, false);
  if (!s.ok()) return s;
  const int64_t B = p.q.shape[0], S = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  s = CheckTensor("k", p.k, B, S, -1, D, false);
  if (!s.ok()) return s;
  const int64_t Hkv = p.k.shape[2];
  if (Hkv < 1 || Hq % Hkv != 0) {
    return Invalid("k", "a KV head count dividing q's " + Str(Hq) + " heads", Str(Hkv));
  }
  s = CheckTensor("v", p.v, B, S, Hkv, D, false);
  if (!s.ok()) return s;
  if (D < 1) return Invalid("q", "a head dim >= 1", Str(D));
  if (out != nullptr) {
    s = CheckTensor("out", *out, B, S, Hq, D, true);
    if (!s.ok()) return s;
  }
  if (p.lse.data != nullptr) {
    const int64_t lse_shape[3] = {B, Hq, S};
    if (p.lse.dtype != DType::kF32) return Invalid("lse", "dtype f32", DTypeName(p.lse.dtype));
    s = CheckShape("lse", p.lse, 3, lse_shape, "[B, Hq, S]", true);
    if (!s.ok()) return s;
  }
  float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (p.scale.has_value()) {
    if (!std::isfinite(*p.scale))
      return Invalid("scale", "a finite value", std::to_string(*p.scale));
    scale = *p.scale;
  }
  bool known = false;
  for (const MethodName& m : kMethodNames) known = known || m.method == p.method;
  if (!known) {
    return Invalid("method", "wersa, hyper, performer, agent, routing or hilo",
                   Str(static_cast<int64_t>(p.method)));
  }
  *shape = {B, S, Hq, Hkv, D, scale};
  return Status::Ok();
}

}  // namespace

const char* ApproxMethodName(ApproxMethod method) {
  for (const MethodName& m : kMethodNames) {
    if (m.method == method) return m.name;
  }
  return "unknown";
}

bool ParseApproxMethod(const std::string& name, ApproxMethod* method) {
  for (const MethodName& m : kMethodNames) {
    if (name == m.name) {
      *method = m.method;
      return true;
    }
  }
  return false;
}

Status ApproxAttention(const ApproxParams& params, const Context& ctx) try {
  approx::ApproxShape shape;
  Status s = CheckInputs(params, &params.out, &shape);
  if (!s.ok()) return s;
  std::vector<Region> outputs = {ViewRegion("out", params.out)};
  if (params.lse.data != nullptr) outputs.push_back(ViewRegion("lse", params.lse));
  s = CheckDisjoint(
      outputs, {ViewRegion("q", params.q), ViewRegion("k", params.k), ViewRegion("v", params.v)});
  if (!s.ok()) return s;
  switch (params.method) {
    case ApproxMethod::kWersa:
      return approx::WersaForward(params, shape, ctx);
    case ApproxMethod::kHyper:
      return approx::HyperForward(params, shape, ctx);
    case ApproxMethod::kPerformer:
      return approx::PerformerForward(params, shape, ctx);
    case ApproxMethod::kAgent:
      return approx::AgentForward(params, shape, ctx);
    case ApproxMethod::kRouting:
      return approx::RoutingForward(params, shape, ctx);
    case ApproxMethod::kHiLo:
      return approx::HiLoForward(params, shape, ctx);
  }
  return Status::Internal("ApproxAttention: unhandled method");
}
TESSERA_CATCH_ALL("ApproxAttention")

Status ApproxAttentionBackward(const ApproxBackwardParams& params, const Context& ctx) try {
  const ApproxParams& f = params.forward;
  approx::ApproxShape shape;
  Status s = CheckInputs(f, nullptr, &shape);
  if (!s.ok()) return s;
  if (f.lse.data != nullptr) {
    return Invalid("forward.lse", "unset (the backward does not read it)", "a view");
  }
  const int64_t B = shape.batch, S = shape.seq, Hq = shape.heads_q, Hkv = shape.heads_kv,
                D = shape.dim;
  s = CheckTensor("dout", params.dout, B, S, Hq, D, false);
  if (s.ok()) s = CheckTensor("dq", params.dq, B, S, Hq, D, true);
  if (s.ok()) s = CheckTensor("dk", params.dk, B, S, Hkv, D, true);
  if (s.ok()) s = CheckTensor("dv", params.dv, B, S, Hkv, D, true);
  if (!s.ok()) return s;
  s = CheckDisjoint(
      {ViewRegion("dq", params.dq), ViewRegion("dk", params.dk), ViewRegion("dv", params.dv)},
      {ViewRegion("forward.q", f.q), ViewRegion("forward.k", f.k), ViewRegion("forward.v", f.v),
       ViewRegion("dout", params.dout)});
  if (!s.ok()) return s;
  switch (f.method) {
    case ApproxMethod::kWersa:
      return approx::WersaBackward(params, shape, ctx);
    case ApproxMethod::kPerformer:
      return approx::PerformerBackward(params, shape, ctx);
    default:
      return Status::Unimplemented(std::string("ApproxAttentionBackward: method ") +
                                   ApproxMethodName(f.method) +
                                   " has no backward (WERSA and Performer have one)");
  }
}
TESSERA_CATCH_ALL("ApproxAttentionBackward")

}  // namespace tessera
