// Internal, SIMD-free: tile sizes of the exact forward kernel, shared with tests and benchmarks.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "tessera/context.h"
#include "tessera/status.h"

namespace tessera {
namespace flash {

// Query rows per task: a task owns (sequence, KV head, block of query positions) and packs the
// G = Hq/Hkv query heads of the group as G * block rows, so each K/V tile is loaded and
// converted once per group. The block is kRowsTarget / G positions (at least 1). 192 rows keep
// the K/V traffic per FLOP low enough for 16K-token heads streamed from DRAM while the task's
// tiles still fit in a 1 MiB L2 (see flash_fwd-inl.h).
constexpr int64_t kRowsTarget = 192;
// Keys per K/V tile. Tile boundaries are fixed multiples of kKeyTile from key 0, which makes
// every row's reduction order independent of the batch, the thread count and the task shape.
constexpr int64_t kKeyTile = 128;

// Query positions per task for a GQA group of `group` heads.
inline int64_t QueryBlock(int64_t group) {
  return group >= kRowsTarget ? 1 : kRowsTarget / (group > 0 ? group : 1);
}

// Largest supported head dim.
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

}  // namespace flash
}  // namespace tessera
