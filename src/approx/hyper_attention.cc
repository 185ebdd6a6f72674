// SPDX-License-Identifier: Apache-2.0
// Hyper: not implemented yet (ApproxAttention returns Unimplemented for it).
#include "approx/approx_internal.h"

namespace tessera {
namespace approx {

Status HyperForward(const ApproxParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttention: method hyper is not implemented yet");
}

}  // namespace approx
}  // namespace tessera
