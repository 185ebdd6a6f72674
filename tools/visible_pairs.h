// SPDX-License-Identifier: Apache-2.0
// Counting the (query, key) pairs an attention call leaves visible: the density `tessera bench`
// reports and the FLOPs its GFLOP/s counts under a mask.
//
// The count follows tessera/mask.h's definition of visible(i, j) (causal, window, sinks, prefix,
// token groups, block mask, neighborhood, documents, tree, dense mask), written here a second
// time, independently of the kernels' mask policy, from the header and docs/algorithms.md. It is
// cheap where the structure allows: rows whose visible keys are a union of intervals (causal,
// window, sinks, prefix, documents) inside the kept blocks of a block mask cost O(kept blocks)
// each, and batches / heads the mask does not tell apart are counted once. Other rows
// (neighborhood, groups, tree, dense) are tested key by key; past `budget` tests, an evenly spread,
// jittered sample of the rows is counted and scaled (exact = false).
#pragma once

#include <cstdint>

#include "tessera/attention.h"

namespace tessera {
namespace cli {

struct VisiblePairs {
  double visible = 0.0;  // visible (batch, head, query, key) pairs, estimated when !exact
  double total = 0.0;    // B * Hq * Sq * Sk
  bool exact = true;
  double density() const { return total > 0.0 ? visible / total : 0.0; }
};

// params: a dense batch (no cu_seqlens), q [B, Sq, Hq, D] and k [B, Sk, Hkv, D] (only their
// shapes are read), its causal flag, window, alignment and mask (whose views are read).
VisiblePairs CountVisiblePairs(const AttentionParams& params, int64_t budget = int64_t{1} << 25);

}  // namespace cli
}  // namespace tessera
