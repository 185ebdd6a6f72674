// SPDX-License-Identifier: Apache-2.0
// Performer: not implemented yet (ApproxAttention returns Unimplemented for it).
#include "approx/approx_internal.h"

namespace tessera {
namespace approx {

Status PerformerForward(const ApproxParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttention: method performer is not implemented yet");
}

Status PerformerBackward(const ApproxBackwardParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttentionBackward: method performer is not implemented yet");
}

}  // namespace approx
}  // namespace tessera
