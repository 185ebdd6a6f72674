// SPDX-License-Identifier: Apache-2.0
// Routing: not implemented yet (ApproxAttention returns Unimplemented for it).
#include "approx/approx_internal.h"

namespace tessera {
namespace approx {

Status RoutingForward(const ApproxParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttention: method routing is not implemented yet");
}

}  // namespace approx
}  // namespace tessera
