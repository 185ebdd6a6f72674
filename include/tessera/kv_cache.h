// SPDX-License-Identifier: Apache-2.0
// tessera: a KV cache whose memory the caller owns, paged or contiguous, optionally quantized.
//
// Storage is a pool of pages. A page holds `page_size` tokens of every KV head, head-major (the
// HND layout of FlashInfer and of vLLM's CPU backend): the (page, slot, head) row of K lives at
//   k + ((page * num_kv_heads + head) * page_size + slot) * KVRowBytes(dtype, head_dim)
// and likewise for V. Head-major pages let decode read each head's keys as one sequential stream
// per page, which is what the hardware prefetcher needs to reach full memory bandwidth. Two ways to
// map sequences onto pages (KVBatchView):
//   paged:      block_table i32 [batch, max_pages_per_seq]; token t of sequence b lives at
//               page block_table[b][t / page_size], slot t % page_size (pages in any order,
//               shared or not; page_size 1..256);
//   contiguous: block_table.data == nullptr; sequence b owns page b, so page_size is the
//               capacity per sequence (any size) and the pool is a dense
//               [batch, Hkv, capacity, D] tensor.
//
// KV dtypes: f32, bf16, f16 store the values. int8 and int4 store ZipCache's channel-separable
// token-wise quantization: every channel c of a head is first divided by a normalizer n[h][c]
// (n = sqrt(max_t |x[t][c]|), from the first append, or set by the caller), then each (token,
// head) row is quantized asymmetrically with its own step and minimum:
//   y[c] = x[c] / n[c],  step = (max y - min y) / (2^bits - 1),  code[c] = round((y[c] - min) /
//   step) x^[c] = n[c] * (min + step * code[c])                             (the dequantized value)
// Codes are unsigned: int8 one byte per channel; int4 two channels per byte, channel 2i in the
// low nibble of byte i and channel 2i + 1 in the high nibble. Per-row (step, min) pairs live in
// k_scales / v_scales [num_pages, num_kv_heads, page_size, 2] f32, the normalizers in
// k_channel_scales / v_channel_scales [num_kv_heads, head_dim] f32. Attention kernels dequantize
// inside the kernel; the dequantized cache is never materialized. docs/decode.md lists the error
// each dtype adds to attention outputs.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

enum class KVDType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kInt8 = 3, kInt4 = 4 };

// "f32", "bf16", "f16", "int8", "int4".
const char* KVDTypeName(KVDType dtype);
// True for the quantized dtypes (int8, int4).
bool KVDTypeIsQuantized(KVDType dtype);
// Bytes of one (token, head) row of `head_dim` channels: 4D, 2D, 2D, D, ceil(D / 2).
int64_t KVRowBytes(KVDType dtype, int64_t head_dim);

// The storage of one layer's cache (non-owning; see KVCache for an owning one).
struct KVCacheView {
  KVDType dtype = KVDType::kF16;
  int64_t num_pages = 0;     // pages in the pool
  int64_t page_size = 0;     // tokens per page (contiguous layout: capacity per sequence)
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D (1..512)
  void* k = nullptr;         // [num_pages, Hkv, page_size, KVRowBytes] bytes
  void* v = nullptr;         // same
  // Quantized dtypes only (else ignored): per-row (step, min), f32 [num_pages, Hkv, page_size, 2].
  float* k_scales = nullptr;
  float* v_scales = nullptr;
  // Quantized dtypes only: per-channel normalizers, f32 [Hkv, D]. All zero = not yet calibrated:
  // the next AppendKV sets them from the tokens it appends.
  float* k_channel_scales = nullptr;
  float* v_channel_scales = nullptr;
};

// Which tokens of the cache each sequence of a batch uses. Both arrays are i32 views with unit
// stride in the last dim (read in place, never copied).
struct KVBatchView {
  int64_t batch = 0;
  TensorView seq_lens;     // i32 [batch] tokens per sequence (>= 0)
  TensorView block_table;  // i32 [batch, max_pages_per_seq] page ids; data == nullptr: contiguous
};

// An owning cache: allocates the pool (zeroed) and hands out views. The K and V pools are
// page-aligned and, from 2 MiB up, advised for transparent huge pages (decode streams through
// them; docs/decode.md). Move-only.
class KVCache {
 public:
  KVCache() = default;
  // Allocates num_pages pages. Returns an error for non-positive sizes or an unsupported dtype.
  Status Allocate(KVDType dtype, int64_t num_pages, int64_t page_size, int64_t num_kv_heads,
                  int64_t head_dim);
  KVCacheView view();
  int64_t bytes() const;  // total bytes of the pool, scales included

 private:
  struct FreeBytes {
    void operator()(uint8_t* p) const;
  };
  KVCacheView shape_;
  std::unique_ptr<uint8_t[], FreeBytes> k_, v_;
  int64_t pool_bytes_ = 0;  // bytes of each of k_ and v_
  std::vector<float> k_scales_, v_scales_, k_channel_, v_channel_;
};

// Rotary position embedding (RoPE) with rotary dim r (even, <= D) and frequencies
// theta_c = base^(-2c / r), c = 0 .. r/2 - 1. A pair (x1, x2) at position p becomes
// (x1 cos p*theta_c - x2 sin p*theta_c, x1 sin p*theta_c + x2 cos p*theta_c). Pairs are
// (c, c + r/2) in the half-split (NeoX) form and (2c, 2c + 1) in the interleaved (GPT-J) form.
// Channels >= r pass through.
//
// xPos (Sun et al. 2023, "A Length-Extrapolatable Transformer"; RetNet's rotation) scales pair c
// as well: by zeta_c^(p / xpos_scale_base) on queries and zeta_c^(-p / xpos_scale_base) on keys,
// zeta_c = (2c / r + xpos_gamma) / (1 + xpos_gamma), so q_m . k_n gains zeta^((m - n) / scale
// base): a decay with the distance. AppendKV applies the key form (ApplyRotaryParams::keys picks).
// The key scale grows with the position: positions p with p / xpos_scale_base * |ln zeta_0| > 80
// (the scale past about e^80, near the f32 range) are refused.
struct RotaryParams {
  int64_t rotary_dim = 0;  // 0 disables
  float base = 10000.0f;
  bool interleaved = false;
  float xpos_scale_base = 0.0f;  // > 0 enables xPos (512 in the paper); 0: plain RoPE
  float xpos_gamma = 0.4f;       // > 0
};

struct AppendKVParams {
  TensorView k_new;  // [B, n, Hkv, D] f32 / bf16 / f16 (any strides)
  TensorView v_new;  // [B, n, Hkv, D] same dtype
  KVCacheView cache;
  // seq_lens[b] = tokens already in the cache: the new tokens go to positions
  // seq_lens[b] .. seq_lens[b] + n - 1. seq_lens is read, not updated (the caller adds n).
  KVBatchView batch;
  // Applied to k_new at its absolute positions before it is stored (v is stored as given).
  RotaryParams rotary;
};

// Appends n tokens to every sequence of the batch. Validates everything first (shapes, dtypes,
// capacity: seq_lens[b] + n must fit the sequence's pages, page ids in [0, num_pages), finite
// values for the quantized dtypes); on error nothing is written.
Status AppendKV(const AppendKVParams& params, const Context& ctx);

struct ApplyRotaryParams {
  TensorView x;  // [B, S, H, D] f32 / bf16 / f16, rotated in place (any strides)
  // Token s of sequence b is at position positions[b] + s; i32 [B] (unit stride),
  // data == nullptr: position s.
  TensorView positions;
  RotaryParams rotary;
  bool keys = false;  // xPos only: the key form (zeta^-p) instead of the query form (zeta^p)
};

// Applies RoPE in place to params.x (only the first rotary_dim channels are written). Tokens are
// spread over ctx.num_threads workers; each row is rotated by one worker, so the result does not
// depend on the thread count.
Status ApplyRotary(const ApplyRotaryParams& params, const Context& ctx);

struct ReadKVParams {
  KVCacheView cache;
  KVBatchView batch;
  int64_t b = 0;     // the sequence to read, in [0, batch.batch)
  TensorView k_out;  // [seq_lens[b], Hkv, D] f32 (any strides), written
  TensorView v_out;  // [seq_lens[b], Hkv, D] f32 (any strides), written
};

// Reads tokens [0, seq_lens[b]) of sequence b back, dequantized, into k_out / v_out. For tests,
// references and inspection. Tokens are spread over ctx.num_threads workers (each row is
// written by one worker from the cache alone).
Status ReadKV(const ReadKVParams& params, const Context& ctx);

}  // namespace tessera
