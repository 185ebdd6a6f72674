// SPDX-License-Identifier: Apache-2.0
// Internal, SIMD-free: which instantiation of a tiled kernel a call runs. The exact forward, the
// backward and decode all check ctx.path with ChooseKernel and turn the head dim into a
// compile-time constant with DispatchHeadDim (decode its own way, with the same head dims), and
// every op bounds its head dims by kMaxHeadDim. Kept apart from the kernels so that each kernel
// family depends on this header rather than on another family.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "tessera/context.h"
#include "tessera/status.h"

namespace tessera {

// Largest supported head dim (attention, decode's KV cache, linear attention's Dk and Dv).
constexpr int64_t kMaxHeadDim = 512;

// Head dims with a compile-time instantiation (Path::kFast).
inline bool HasFastHeadDim(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }

// Checks ctx.path for a tiled-kernel call with head dim `dim` and sets *fast to whether the
// compile-time head-dim instantiation runs (Path::kReference is the caller's to handle first).
inline Status ChooseKernel(const Context& ctx, int64_t dim, bool* fast) {
  switch (ctx.path) {
    case Path::kFast:
      if (!HasFastHeadDim(dim)) {
        return Status::InvalidArgument(
            "ctx.path: expected a head dim with a fast instantiation (64, 128 or 256) for "
            "Path::kFast, got " +
            std::to_string(dim));
      }
      break;
    case Path::kAuto:
    case Path::kGeneric:
      break;
    default:
      return Status::InvalidArgument("ctx.path: expected a valid Path, got " +
                                     std::to_string(static_cast<int>(ctx.path)));
  }
  *fast = ctx.path != Path::kGeneric && HasFastHeadDim(dim);
  return Status::Ok();
}

// Calls fn(std::integral_constant<int, D>()) with the compile-time head dim D when `fast`, else
// with D = 0 (the run-time head-dim instantiation).
template <class Fn>
void DispatchHeadDim(bool fast, int64_t dim, const Fn& fn) {
  if (fast && dim == 64) return fn(std::integral_constant<int, 64>());
  if (fast && dim == 128) return fn(std::integral_constant<int, 128>());
  if (fast && dim == 256) return fn(std::integral_constant<int, 256>());
  fn(std::integral_constant<int, 0>());
}

}  // namespace tessera
