// SPDX-License-Identifier: Apache-2.0
// Internal: the window statistics of AttentionStats (tessera/attention.h), computed after the
// forward from its LSE (window_stats.cc).
#pragma once

#include <cstdint>

#include "core/attention_problem.h"
#include "tessera/attention.h"

namespace tessera {

// Writes stats.key_mass (and key_mass_sq, row_entropy when set) for a validated dense-batch
// problem without params.mask, from the natural-log LSE of every query row: element (b, h, i) at
// lse[b * lse_stride[0] + h * lse_stride[1] + i * lse_stride[2]]. Dispatches to the best target.
// Returns false when scratch could not be allocated (nothing written then).
bool ComputeWindowStats(const AttentionProblem& problem, const AttentionStats& stats,
                        const float* lse, const int64_t* lse_stride, int32_t threads);

}  // namespace tessera
