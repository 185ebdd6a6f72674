// SPDX-License-Identifier: Apache-2.0
// Wersa: not implemented yet (ApproxAttention returns Unimplemented for it).
#include "approx/approx_internal.h"

namespace tessera {
namespace approx {

Status WersaForward(const ApproxParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttention: method wersa is not implemented yet");
}

Status WersaBackward(const ApproxBackwardParams&, const ApproxShape&, const Context&) {
  return Status::Unimplemented("ApproxAttentionBackward: method wersa is not implemented yet");
}

}  // namespace approx
}  // namespace tessera
