// SPDX-License-Identifier: Apache-2.0
// Agent: not implemented yet (ApproxAttention returns Unimplemented for it).
#include "approx/approx_internal.h"

namespace tessera {
namespace approx {

Status AgentForward(const ApproxParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttention: method agent is not implemented yet");
}

}  // namespace approx
}  // namespace tessera
