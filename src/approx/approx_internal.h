// SPDX-License-Identifier: Apache-2.0
// Internal: what ApproxAttention (approx.cc) validated for every method, and each method's entry
// points. approx.cc checks the shapes, dtypes, strides, aliasing and scale common to all methods;
// each method validates its own options (and rejects the lse output if it has none) before it
// writes anything.
#pragma once

#include <cstdint>

#include "tessera/approx.h"
#include "tessera/context.h"
#include "tessera/status.h"

namespace tessera {
namespace approx {

struct ApproxShape {
  int64_t batch = 0, seq = 0, heads_q = 0, heads_kv = 0, dim = 0;
  float scale = 1.0f;  // params.scale or 1/sqrt(D)
  int64_t group() const { return heads_q / heads_kv; }
};

// Forward of each method (wersa.cc, hyper_attention.cc, performer.cc, agent.cc, routing.cc,
// hilo.cc). Called with S >= 1 and every common check passed.
Status WersaForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);
Status HyperForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);
Status PerformerForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);
Status AgentForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);
Status RoutingForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);
Status HiLoForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx);

// Backward of the methods that have one; dout, dq, dk, dv checked like q, k, v.
Status WersaBackward(const ApproxBackwardParams& params, const ApproxShape& shape,
                     const Context& ctx);
Status PerformerBackward(const ApproxBackwardParams& params, const ApproxShape& shape,
                         const Context& ctx);

}  // namespace approx
}  // namespace tessera
