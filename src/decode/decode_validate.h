// SPDX-License-Identifier: Apache-2.0
// Internal: validation of a DecodeParams and its resolved options, shared by PlanDecode and
// RunDecode.
#pragma once

#include <cstdint>
#include <vector>

#include "core/attention_problem.h"
#include "decode/decode.h"
#include "tessera/decode.h"
#include "tessera/status.h"

namespace tessera {

// Validates a DecodeParams and builds the kernel's problem (queries, outputs, options) and KV
// source, and the key length of every sequence. The option checks are the forward's
// (ValidateAttention on the same q / out / lse / options with a stand-in K/V of the cache's
// shape); the cache and the batch are checked by ValidateKVCache; outputs may not overlap q, the
// cache or the batch's arrays. A window_left no query needs (>= max(Q, longest sequence)) is
// resolved to unbounded. Writes nothing else.
Status ValidateDecode(const DecodeParams& p, AttentionProblem* prob, decode::KVSource* kv,
                      std::vector<int64_t>* lens);

// The split size of the plan: split_tokens, or the default for the cache's page size; at most
// 2^31 (one split holds any sequence).
int64_t ResolveSplitTokens(const DecodeParams& p);

}  // namespace tessera
