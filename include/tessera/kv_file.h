// SPDX-License-Identifier: Apache-2.0
// tessera: a KV cache whose pages live in a file (one layer, one sequence), decoded by streaming
// the pages from storage.
//
// File format (version 1, little-endian, every section 4096-byte aligned so the pages can be read
// with O_DIRECT):
//   [0, 4096)       header: magic "TSRKVFIL", format version, dtype, page_size, num_kv_heads,
//                   head_dim, num_pages, tokens, row bytes, the byte offset of every section and
//                   the file size, then an FNV-1a 64 checksum of the header bytes before it
//   k pages         [num_pages, Hkv, page_size, KVRowBytes] bytes: the in-RAM pool's layout
//                   (kv_cache.h, head-major pages); token t is in page t / page_size, slot
//                   t % page_size
//   v pages         same
//   k scales        quantized dtypes only: per-row (step, min), f32 [num_pages, Hkv, page_size, 2]
//   v scales        same
//   k normalizers   quantized dtypes only: f32 [Hkv, D] channel normalizers
//   v normalizers   same
//   k means         f32 [num_pages, Hkv, D]: the mean of each page's dequantized keys (block
//                   selection scores chunks with them without reading their keys)
// A file is filled either from an in-RAM cache (SaveKVFile) or token by token with KVFileWriter,
// which holds one page in RAM (quantized through AppendKV) and writes each page when it is full;
// both write to "<path>.partial" and rename it to `path` only once the file is complete, so an
// error leaves no file behind.
//
// DecodeFromFile streams the pages in chunks of a few MiB through a small ring of aligned
// buffers: the reads of the next chunks are in flight (io_uring, or O_DIRECT preads on a small
// thread pool) while the current chunk is decoded by RunDecode over a view of its buffer. The
// chunk states are merged with the log-sum-exp merge (merge.h) in chunk order, so the result
// depends only on the file and the chunk / split sizes, never on the thread count.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// Format version written and accepted.
constexpr int32_t kKVFileVersion = 1;
// Largest page size a file may have (the paged layout's limit).
constexpr int64_t kKVFileMaxPageSize = 256;

// What a file's header says.
struct KVFileInfo {
  KVDType dtype = KVDType::kF16;
  int64_t page_size = 0;     // tokens per page (1..256)
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D
  int64_t num_pages = 0;     // pages the file has room for
  int64_t tokens = 0;        // tokens stored (<= num_pages * page_size)
  int64_t file_bytes = 0;    // the file's size
};

// An open cache file (validated; read-only). Move-only.
class KVFile {
 public:
  KVFile();
  ~KVFile();
  KVFile(KVFile&&) noexcept;
  KVFile& operator=(KVFile&&) noexcept;

  // Opens and validates `path`: its header (magic, version, checksum, a consistent layout) against
  // the file's size, and the channel normalizers of a quantized cache. A missing, short,
  // truncated or corrupt file, or one of another format or version, is InvalidArgument naming the
  // path, what was expected and what was found.
  static Status Open(const std::string& path, KVFile* file);

  bool is_open() const { return impl_ != nullptr; }
  const KVFileInfo& info() const;
  const std::string& path() const;
  // Quantized dtypes: the channel normalizers f32 [Hkv, D]; else null.
  const float* k_channel_scales() const;
  const float* v_channel_scales() const;

  struct Impl;
  const Impl* impl() const { return impl_.get(); }

 private:
  std::unique_ptr<Impl> impl_;
};

// Writes tokens [0, seq_lens[b]) of sequence b of an in-RAM cache to a new file at `path` (an
// existing file is replaced), with `page_size` tokens per file page (0: the cache's page size
// when it is at most 256, else 256). Rows and their quantization parameters are copied bitwise.
Status SaveKVFile(const KVCacheView& cache, const KVBatchView& batch, int64_t b,
                  const std::string& path, int64_t page_size = 0);

// Builds a file token by token with one page in RAM. Usage: Create, Append any number of times,
// Finish. Without Finish (or after an error) the partial file is removed.
class KVFileWriter {
 public:
  KVFileWriter();
  ~KVFileWriter();
  KVFileWriter(KVFileWriter&&) noexcept;
  KVFileWriter& operator=(KVFileWriter&&) noexcept;

  // Room for `capacity_tokens` (>= 1) tokens. page_size in 1..256.
  static Status Create(const std::string& path, KVDType dtype, int64_t page_size,
                       int64_t num_kv_heads, int64_t head_dim, int64_t capacity_tokens,
                       KVFileWriter* writer);
  // Quantized dtypes: sets the channel normalizers f32 [Hkv, D] (positive, finite) before the
  // first Append; otherwise the first Append calibrates them (as AppendKV does).
  Status SetChannelScales(const float* k_channel_scales, const float* v_channel_scales);
  // Appends n tokens: k_new / v_new [1, n, Hkv, D] f32 / bf16 / f16 (any strides), stored as
  // AppendKV stores them (RoPE at the tokens' absolute positions when enabled).
  Status Append(const TensorView& k_new, const TensorView& v_new, const RotaryParams& rotary,
                const Context& ctx);
  // Writes the last partial page, the normalizers and the header, syncs and renames the file.
  Status Finish();
  int64_t tokens() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// How DecodeFromFile reads the file.
enum class KVFileReader : int32_t {
  kAuto = 0,        // the thread pool (measured as fast as io_uring: docs/decode.md)
  kIoUring = 1,     // io_uring (Unimplemented when not built with liburing or refused at run time)
  kThreadPool = 2,  // pread on a small pool of I/O threads
};
// "auto", "io_uring", "threads".
const char* KVFileReaderName(KVFileReader reader);

struct KVFileDecodeParams {
  TensorView q;    // [1, Q, Hq, D] f32 / bf16 / f16, Q in 1..16, Hq a multiple of the file's Hkv
  TensorView out;  // [1, Q, Hq, D], dtype of q, written
  TensorView lse;  // [1, Hq, Q] f32 natural-log LSE, optional (data == nullptr: not written)

  // As in DecodeParams; every key position is the token's index in the file and query row i sits
  // at position tokens - Q + i.
  std::optional<float> scale;
  bool causal = false;
  // Only -1 (or a window covering every key) is supported: a bounded window is Unimplemented.
  int64_t window_left = -1;
  float softcap = 0.0f;
  TensorView alibi_slopes;  // f32 [Hq] or [1, Hq], optional

  // Tokens per chunk, a multiple of the file's page size (0: about 4 MiB of pages).
  int64_t chunk_tokens = 0;
  // Split size of the decode inside a chunk (DecodeParams::split_tokens; 0: its default).
  int64_t split_tokens = 0;
  KVFileReader reader = KVFileReader::kAuto;
  int32_t io_threads = 0;  // kThreadPool: reader threads (0: 4)
  // Threads of each chunk's decode, at most ctx.num_threads (0: 1). One core decodes a chunk
  // several times faster than storage delivers it, and on a busy machine every chunk's parallel
  // region waits for its slowest worker's time slice (docs/decode.md, Out-of-core caches).
  int32_t decode_threads = 0;
  int32_t buffers = 0;  // chunk buffers in the ring, 2..8 (0: 3): buffers - 1 chunks in flight
  bool direct = true;   // O_DIRECT (falls back to buffered reads where the file system refuses)

  // Block selection (approximate attention): > 0 reads only the chunks SelectBlocks (mask.h)
  // keeps with top_k = select_top_k, scoring chunk J for query head h by
  // scale * mean_i(q_i) . mean(K_J) from the file's per-page key means (causal form: the last
  // chunk is always kept and counts as one of the top_k). The union over heads is read, decoded
  // and merged; the other chunks are never read. Needs a chunk size that is a multiple of 16.
  int64_t select_top_k = 0;
};

// What a DecodeFromFile call did (optional output).
struct KVFileDecodeStats {
  KVFileReader reader = KVFileReader::kAuto;  // the reader used
  bool direct = false;                        // O_DIRECT was used
  int64_t chunks = 0;                         // chunks read
  int64_t chunks_total = 0;          // chunks of the file (more than `chunks` with select_top_k)
  std::vector<int64_t> chunks_read;  // their indices, ascending
  int64_t bytes_read = 0;            // bytes read from the file (aligned reads included)
  double wait_ms = 0.0;              // time spent waiting for reads
  double decode_ms = 0.0;            // time spent in decode and merge
};

// Decodes q against the file's cache. Validates everything before any I/O; on error `out` and
// `lse` are not written. Memory: `buffers` chunk buffers plus O(Q * Hq * D).
Status DecodeFromFile(const KVFile& file, const KVFileDecodeParams& params, const Context& ctx,
                      KVFileDecodeStats* stats = nullptr);

}  // namespace tessera
