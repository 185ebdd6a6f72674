// SPDX-License-Identifier: Apache-2.0
// Internal, SIMD-free: tile sizes of the exact forward and backward kernels, shared with their
// mask tiling (mask_tiles-inl.h), tests and benchmarks.
// (Kernel selection and head-dim dispatch, shared by every kernel family, are in core/dispatch.h.)
#pragma once

#include <atomic>
#include <cstdint>

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

// Backward: keys per block (the SIMD lanes of a task's tiles) and query rows per inner tile of a
// task. Tile boundaries are fixed multiples of these from 0, which fixes every reduction order.
constexpr int64_t kKeyBlock = 96;
constexpr int64_t kQueryTile = 128;

// Forward: bytes of packed f32 K and V per round of heads (PackedHeads in flash_fwd-inl.h), which
// bounds the memory the packing adds; 0 turns the packing off. Tests lower it to run many rounds.
inline std::atomic<int64_t>& ForwardPackBudget() {
  static std::atomic<int64_t> budget{int64_t{32} << 20};
  return budget;
}

}  // namespace flash
}  // namespace tessera
