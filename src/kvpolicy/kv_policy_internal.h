// SPDX-License-Identifier: Apache-2.0
// Internal: the pieces the eviction policies (kv_policy.cc) and CompactKV (kv_compact.cc) share.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/kv_policy.h"

namespace tessera {
namespace kvpolicy {

std::string Str(int64_t x);
// InvalidArgument "<name>: expected <what>, got <got>".
Status Invalid(const std::string& name, const std::string& what, const std::string& got);

// Checks an EvictionTarget and copies its seq_lens into *lens.
Status ValidateTarget(const EvictionTarget& t, std::vector<int32_t>* lens);

// Checks a statistics view: f32 of `rank` (3: [B, H, S]; 4: [B, H, Q, S]), H a positive multiple
// of num_kv_heads, S >= the longest length, and every entry a policy reads finite.
Status ValidateStats(const char* name, const TensorView& t, int32_t rank, int64_t B,
                     int64_t num_kv_heads, const std::vector<int32_t>& lens);

// Element [b, h, j] of a rank-3 f32 view.
float StatAt(const TensorView& t, int64_t b, int64_t h, int64_t j);

// out[j] = max (kMax) or mean (kAvg) of score[i] over i in [j - kernel/2, j + kernel/2] within
// [0, n) (the window is cut at the ends: the mean divides by the keys inside).
void Pool(const double* score, int64_t n, int64_t kernel, PoolKind pool, double* out);

// Writes min(count, len) ascending indices to out: all of [0, len) when count >= len; else the
// first `front`, the last `back` and the top count - front - back of [front, len - back) by
// score (higher first, ties to the larger index). front + back <= count.
void SelectKeep(int64_t len, int64_t count, int64_t front, int64_t back, const double* score,
                std::vector<int32_t>* scratch, int32_t* out);

// Sizes a KeepSet for min(budget, lens[b]) tokens per (b, head).
void InitKeep(const std::vector<int32_t>& lens, int64_t num_kv_heads, int64_t budget,
              KeepSet* keep);

}  // namespace kvpolicy
}  // namespace tessera
