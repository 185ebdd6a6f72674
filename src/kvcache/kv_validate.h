// SPDX-License-Identifier: Apache-2.0
// Internal: validation of a KV cache view and the batch that reads it, shared by AppendKV, ReadKV
// and the decode kernels.
#pragma once

#include <vector>

#include "core/check.h"
#include "tessera/kv_cache.h"
#include "tessera/status.h"

namespace tessera {

// Checks the cache and the batch's use of it; messages name `cache_arg` / `batch_arg` and the
// field ("cache.page_size: expected ..., got ..."). Checked:
//   cache: dtype known; num_pages, page_size, num_kv_heads >= 1; head_dim in 1..512; k and v
//     non-null; quantized dtypes: k_scales, v_scales, k_channel_scales, v_channel_scales non-null;
//     the pool's size in bytes (and in scale floats) fits in int64.
//   batch: batch >= 0; when batch > 0, seq_lens set, i32 [batch] with unit stride, every
//     seq_lens[b] >= 0.
//     paged (block_table.data != nullptr): page_size in 1..256; block_table i32
//       [batch, max_pages_per_seq >= 1] with unit stride in the last dim;
//       seq_lens[b] <= max_pages_per_seq * page_size; the page ids of the pages holding tokens
//       [0, seq_lens[b]) in [0, num_pages) (the rest of each row of block_table is not read).
//     contiguous (block_table.data == nullptr): batch <= num_pages; seq_lens[b] <= page_size.
// Reads seq_lens and block_table; O(batch + pages in use).
Status ValidateKVCache(const KVCacheView& cache, const KVBatchView& batch, const char* cache_arg,
                       const char* batch_arg);

// The memory of a validated cache ("<cache_arg>.k", ".v", and for the quantized dtypes the
// scales) and of a batch's arrays ("<batch_arg>.seq_lens", ".block_table"), for CheckDisjoint.
std::vector<Region> KVCacheRegions(const KVCacheView& cache, const char* cache_arg);
std::vector<Region> KVBatchRegions(const KVBatchView& batch, const char* batch_arg);

}  // namespace tessera
