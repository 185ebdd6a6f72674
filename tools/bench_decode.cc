// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op decode`: RunDecode over a KV cache, next to the measured read bandwidth.
//
// Decode (--op decode) is memory-bound, so it reports GB/s instead: the bytes of the KV cache it
// must read (K and V rows of every token, plus the per-row step/min pairs of the quantized
// dtypes) over the median time, next to the read bandwidth MeasureReadBandwidthGBps measures in
// the same process (after the timings and the RSS readings, so its 512 MiB buffer neither
// competes with them nor counts in them). Its cache is built with KVCache + AppendKV in chunks
// (the first chunk calibrates the quantized dtypes' channel normalizers), contiguous or paged
// with a shuffled block table; its inputs are normal-ish (a sum of four uniforms) so softmax
// weights and quantization ranges look like real activations. Its baseline is naive_decode.h;
// `--vs stream` instead pairs each of reps decode runs with a plain read of exactly the bytes it
// reads (TimeReadSeconds over the used K/V rows and scales), so frac_stream compares the two at
// the same moment, where frac_bw compares a median against the best read of another buffer.
//
// `--kv-file PATH` decodes one sequence streamed from a KV file instead (DecodeFromFile,
// kv_file.h); a missing file is first built from the same kind of random data with KVFileWriter
// (one page in RAM). Each timed run is paired with a plain sequential read of the whole file
// (8 MiB read() calls through the page cache): disk_gbps is its median rate, frac_disk the
// decode's read rate (the bytes it read over its median time) over disk_gbps; disk_direct_gbps
// and frac_disk_direct the same for an O_DIRECT sequential read of 8 MiB blocks (one request at a
// time, no readahead), and disk_qd8_gbps / frac_disk_qd8 for 8 threads reading the file's 1 MiB
// blocks with O_DIRECT (the queue depth of the decode's own reads). With --cold the file is dropped
// from the page cache (fsync, then posix_fadvise DONTNEED) before every run of each.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_harness.h"
#include "naive_decode.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tessera/kv_file.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

constexpr int64_t kAppendChunkTokens = 256;
constexpr size_t kSequentialReadBytes = size_t{8} << 20;

// The cache and the batch view over it that the decode benchmark reads.
struct DecodeCache {
  KVCache cache;
  std::vector<int32_t> lens;         // [B]
  std::vector<int32_t> block_table;  // [B, max_pages], empty for the contiguous layout
  int64_t max_pages = 0;
  int64_t page_size = 0;  // as allocated (contiguous: the longest sequence)

  KVBatchView Batch() {
    KVBatchView kv;
    kv.batch = static_cast<int64_t>(lens.size());
    kv.seq_lens = MakeView1(lens.data(), DType::kI32, kv.batch);
    if (!block_table.empty()) {
      const int64_t shape[2] = {kv.batch, max_pages};
      kv.block_table = MakeContiguousView(block_table.data(), DType::kI32, 2, shape);
    }
    return kv;
  }
};

// The bytes decode reads: for every sequence, page and KV head, the K and V rows of its tokens
// (and their scales for a quantized cache), each a contiguous run in the head-major layout.
std::vector<ByteRange> DecodeReadRanges(DecodeCache& dc, int64_t kv_heads, int64_t dim) {
  const KVCacheView view = dc.cache.view();
  const size_t row = static_cast<size_t>(KVRowBytes(view.dtype, dim));
  const bool quantized = KVDTypeIsQuantized(view.dtype);
  std::vector<ByteRange> ranges;
  for (size_t b = 0; b < dc.lens.size(); ++b) {
    const int64_t len = dc.lens[b];
    const int64_t pages = dc.block_table.empty() ? 1 : (len + dc.page_size - 1) / dc.page_size;
    for (int64_t i = 0; i < pages; ++i) {
      const int64_t page =
          dc.block_table.empty()
              ? static_cast<int64_t>(b)
              : dc.block_table[b * static_cast<size_t>(dc.max_pages) + static_cast<size_t>(i)];
      const int64_t rows =
          dc.block_table.empty() ? len : std::min(dc.page_size, len - i * dc.page_size);
      for (int64_t h = 0; h < kv_heads; ++h) {
        const size_t first = static_cast<size_t>((page * kv_heads + h) * dc.page_size);
        const size_t n = static_cast<size_t>(rows);
        ranges.push_back({static_cast<const uint8_t*>(view.k) + first * row, n * row});
        ranges.push_back({static_cast<const uint8_t*>(view.v) + first * row, n * row});
        if (quantized) {
          ranges.push_back({view.k_scales + 2 * first, 2 * n * sizeof(float)});
          ranges.push_back({view.v_scales + 2 * first, 2 * n * sizeof(float)});
        }
      }
    }
  }
  return ranges;
}

// Allocates the cache (contiguous when page_size == 0, else paged over a pool exactly large
// enough, pages handed out in a shuffled order) and appends random K and V to every sequence in
// chunks of kAppendChunkTokens.
Status BuildDecodeCache(const BenchOptions& o, KVDType kv_dtype, int64_t kv_heads,
                        const Context& ctx, DecodeCache* dc) {
  const int64_t B = o.batch, D = o.dim;
  const int64_t max_len = *std::max_element(dc->lens.begin(), dc->lens.end());
  int64_t num_pages = B;
  if (o.page_size > 0) {
    dc->page_size = o.page_size;
    num_pages = 0;
    for (int32_t len : dc->lens) {
      const int64_t pages = (len + o.page_size - 1) / o.page_size;
      num_pages += pages;
      dc->max_pages = std::max(dc->max_pages, pages);
    }
    std::vector<int32_t> order(static_cast<size_t>(num_pages));
    for (int64_t i = 0; i < num_pages; ++i) order[i] = static_cast<int32_t>(i);
    uint64_t state = o.seed + 7;  // Fisher-Yates with a splitmix64 stream
    for (int64_t i = num_pages - 1; i > 0; --i) {
      uint64_t z = (state += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      std::swap(order[i], order[z % static_cast<uint64_t>(i + 1)]);
    }
    dc->block_table.assign(static_cast<size_t>(B * dc->max_pages), 0);
    size_t next = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pages = (dc->lens[b] + o.page_size - 1) / o.page_size;
      for (int64_t i = 0; i < pages; ++i) dc->block_table[b * dc->max_pages + i] = order[next++];
    }
  } else {
    dc->page_size = max_len;
  }
  Status st = dc->cache.Allocate(kv_dtype, num_pages, dc->page_size, kv_heads, D);
  if (!st.ok()) return st;

  const KVCacheView view = dc->cache.view();
  const int64_t row = kv_heads * D;
  std::vector<float> k_new(static_cast<size_t>(kAppendChunkTokens * row));
  std::vector<float> v_new(k_new.size());
  Random rng(o.seed + 1);
  for (int64_t b = 0; b < B; ++b) {
    // Sequence b alone, as a batch of one: its own block-table row; for the contiguous layout, a
    // one-page view of the pool starting at page b (the channel normalizers stay shared).
    KVCacheView target = view;
    KVBatchView one;
    one.batch = 1;
    if (dc->block_table.empty()) {
      const int64_t page_rows = dc->page_size * kv_heads;
      target.num_pages = 1;
      target.k = static_cast<uint8_t*>(view.k) + b * page_rows * KVRowBytes(kv_dtype, D);
      target.v = static_cast<uint8_t*>(view.v) + b * page_rows * KVRowBytes(kv_dtype, D);
      if (view.k_scales != nullptr) target.k_scales = view.k_scales + b * page_rows * 2;
      if (view.v_scales != nullptr) target.v_scales = view.v_scales + b * page_rows * 2;
    } else {
      const int64_t shape[2] = {1, dc->max_pages};
      one.block_table =
          MakeContiguousView(&dc->block_table[b * dc->max_pages], DType::kI32, 2, shape);
    }
    for (int32_t pos = 0; pos < dc->lens[b];) {
      const int64_t n = std::min<int64_t>(kAppendChunkTokens, dc->lens[b] - pos);
      FillNormalish(k_new.data(), n * row, &rng);
      FillNormalish(v_new.data(), n * row, &rng);
      AppendKVParams ap;
      ap.k_new = MakeView4(k_new.data(), DType::kF32, 1, n, kv_heads, D);
      ap.v_new = MakeView4(v_new.data(), DType::kF32, 1, n, kv_heads, D);
      ap.cache = target;
      one.seq_lens = MakeView1(&pos, DType::kI32, 1);
      ap.batch = one;
      st = AppendKV(ap, ctx);
      if (!st.ok()) return st;
      pos += static_cast<int32_t>(n);
    }
  }
  return Status::Ok();
}

// Drops a file from the page cache: fsync (dirty pages cannot be dropped), then DONTNEED.
bool DropFromPageCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0 && ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0;
  ::close(fd);
  return ok;
}

// Reads the whole file sequentially in 8 MiB read() calls into `buffer` (4096-aligned), through
// the page cache or with O_DIRECT; returns the seconds, or -1.
double SequentialReadSeconds(const std::string& path, bool direct, uint8_t* buffer) {
  const auto start = std::chrono::steady_clock::now();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd < 0) return -1.0;
  if (!direct) (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  for (;;) {
    const ssize_t r = ::read(fd, buffer, kSequentialReadBytes);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      ::close(fd);
      return -1.0;
    }
    if (r == 0) break;
  }
  ::close(fd);
  return MillisecondsSince(start) * 1e-3;
}

// Reads the whole file with O_DIRECT as kParallelReads threads each reading every
// kParallelReads-th 1 MiB block in order: the same queue depth and request size as
// DecodeFromFile's reads with two chunks in flight, without the decode. Returns the seconds, or -1.
constexpr int kParallelReads = 8;
constexpr size_t kParallelReadBytes = size_t{1} << 20;
static_assert(kParallelReads * kParallelReadBytes <= kSequentialReadBytes,
              "one buffer serves both");
double ParallelDirectReadSeconds(const std::string& path, int64_t file_bytes, uint8_t* buffer) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0) return -1.0;
  const auto start = std::chrono::steady_clock::now();
  const int64_t blocks =
      (file_bytes + int64_t(kParallelReadBytes) - 1) / int64_t(kParallelReadBytes);
  std::vector<std::thread> workers;
  std::atomic<bool> failed{false};
  for (int t = 0; t < kParallelReads; ++t) {
    workers.emplace_back([&, t] {
      uint8_t* dst = buffer + size_t(t) * kParallelReadBytes;
      for (int64_t b = t; b < blocks && !failed; b += kParallelReads) {
        const ssize_t r = ::pread(fd, dst, kParallelReadBytes, static_cast<off_t>(b) << 20);
        if (r <= 0) failed = true;
      }
    });
  }
  for (std::thread& w : workers) w.join();
  ::close(fd);
  return failed ? -1.0 : MillisecondsSince(start) * 1e-3;
}

// Builds a KV file of `tokens` random tokens (the in-RAM benchmark's data) with KVFileWriter.
Status BuildKVFile(const BenchOptions& o, const std::string& path, KVDType kv_dtype,
                   int64_t kv_heads, int64_t tokens, const Context& ctx) {
  KVFileWriter writer;
  const int64_t page = o.page_size > 0 ? o.page_size : kKVFileMaxPageSize;
  Status st = KVFileWriter::Create(path, kv_dtype, page, kv_heads, o.dim, tokens, &writer);
  if (!st.ok()) return st;
  const int64_t row = kv_heads * o.dim;
  std::vector<float> k_new(static_cast<size_t>(kAppendChunkTokens * row)), v_new(k_new.size());
  Random rng(o.seed + 1);
  for (int64_t pos = 0; pos < tokens;) {
    const int64_t n = std::min<int64_t>(kAppendChunkTokens, tokens - pos);
    FillNormalish(k_new.data(), n * row, &rng);
    FillNormalish(v_new.data(), n * row, &rng);
    st = writer.Append(MakeView4(k_new.data(), DType::kF32, 1, n, kv_heads, o.dim),
                       MakeView4(v_new.data(), DType::kF32, 1, n, kv_heads, o.dim), RotaryParams(),
                       ctx);
    if (!st.ok()) return st;
    pos += n;
  }
  return writer.Finish();
}

// `bench --op decode --kv-file PATH` (see the file comment).
int BenchDecodeFile(const BenchOptions& o, DType dtype, KVDType kv_dtype, int64_t kv_heads,
                    int64_t tokens, Context ctx) {
  const char* cmd = "bench";
  const std::string& path = o.kv_file;
  KVFileReader reader = KVFileReader::kAuto;
  if (o.kv_reader == "io_uring") {
    reader = KVFileReader::kIoUring;
  } else if (o.kv_reader == "threads") {
    reader = KVFileReader::kThreadPool;
  } else if (o.kv_reader != "auto") {
    return Fail(cmd, "--kv-reader: expected auto, io_uring or threads, got '" + o.kv_reader + "'");
  }
  if (o.batch != 1 || !o.lens.empty()) {
    return Fail(cmd, "--kv-file: expected --batch 1 and no --lens (a file holds one sequence)");
  }
  if (!o.vs.empty() || o.baseline_only) {
    return Fail(cmd, "--kv-file: expected no --vs / --baseline-only (disk_gbps is its baseline)");
  }
  if (o.page_size > kKVFileMaxPageSize) {
    return Fail(cmd, "--kv-file: expected --page-size 0 (256) or 1.." +
                         std::to_string(kKVFileMaxPageSize) + ", got " +
                         std::to_string(o.page_size));
  }
  double build_ms = 0.0;
  if (::access(path.c_str(), F_OK) != 0) {
    std::cerr << "tessera bench: " << path << " does not exist; building it from random data ("
              << tokens << " tokens, " << KVDTypeName(kv_dtype) << ", Hkv " << kv_heads << ", D "
              << o.dim << ")" << std::endl;
    const auto start = std::chrono::steady_clock::now();
    if (const Status st = BuildKVFile(o, path, kv_dtype, kv_heads, tokens, ctx); !st.ok()) {
      return Fail(cmd, st.ToString());
    }
    build_ms = MillisecondsSince(start);
  }
  KVFile file;
  if (const Status st = KVFile::Open(path, &file); !st.ok()) return Fail(cmd, st.ToString());
  const KVFileInfo& info = file.info();
  if (info.dtype != kv_dtype || info.num_kv_heads != kv_heads || info.head_dim != o.dim ||
      info.tokens != tokens) {
    return Fail(cmd, "--kv-file: expected a file of " + std::to_string(tokens) + " tokens, " +
                         KVDTypeName(kv_dtype) + ", Hkv " + std::to_string(kv_heads) + ", D " +
                         std::to_string(o.dim) + " (--seq-k, --kv-dtype, --kv-heads, --dim), got " +
                         std::to_string(info.tokens) + " tokens, " + KVDTypeName(info.dtype) +
                         ", Hkv " + std::to_string(info.num_kv_heads) + ", D " +
                         std::to_string(info.head_dim) + " in " + path);
  }
  const int64_t Q = o.queries, H = o.heads, D = o.dim;
  const int64_t q_elems = Q * H * D;
  AlignedBytes q = RandomBuffer(dtype, q_elems, o.seed, false);
  AlignedBytes out = AllocateAligned(static_cast<size_t>(q_elems) * DTypeSize(dtype));
  if (!q || !out) return Fail(cmd, "cannot allocate the queries and output");
  KVFileDecodeParams params;
  params.q = MakeView4(q.get(), dtype, 1, Q, H, D);
  params.out = MakeView4(out.get(), dtype, 1, Q, H, D);
  params.causal = o.causal;
  params.split_tokens = o.split_tokens;
  params.chunk_tokens = o.kv_chunk_tokens;
  params.buffers = o.kv_buffers;
  params.decode_threads = o.kv_decode_threads;
  params.select_top_k = o.kv_select_top_k;
  params.reader = reader;

  auto drop = [&]() { return !o.cold || DropFromPageCache(path); };
  KVFileDecodeStats stats;
  for (int w = 0; w < o.warmup; ++w) {
    if (!drop()) return Fail(cmd, "--cold: cannot drop " + path + " from the page cache");
    if (const Status st = DecodeFromFile(file, params, ctx, &stats); !st.ok()) {
      return Fail(cmd, st.ToString());
    }
  }
  const int reps = o.reps > 0 ? o.reps : 3;
  std::vector<double> decode_ms, read_s, direct_s, parallel_s, wait_ms, compute_ms;
  // O_DIRECT wants a block-aligned buffer.
  std::unique_ptr<uint8_t, AlignedFree> read_buffer(
      static_cast<uint8_t*>(std::aligned_alloc(4096, kSequentialReadBytes)));
  if (!read_buffer) return Fail(cmd, "cannot allocate the sequential read's buffer");
  for (int r = 0; r < reps; ++r) {
    if (!drop()) return Fail(cmd, "--cold: cannot drop " + path + " from the page cache");
    const auto start = std::chrono::steady_clock::now();
    if (const Status st = DecodeFromFile(file, params, ctx, &stats); !st.ok()) {
      return Fail(cmd, st.ToString());
    }
    decode_ms.push_back(MillisecondsSince(start));
    wait_ms.push_back(stats.wait_ms);
    compute_ms.push_back(stats.decode_ms);
    if (!drop()) return Fail(cmd, "--cold: cannot drop " + path + " from the page cache");
    const double s = SequentialReadSeconds(path, false, read_buffer.get());
    if (s <= 0.0) return Fail(cmd, "cannot read " + path + " sequentially");
    read_s.push_back(s);
    if (!drop()) return Fail(cmd, "--cold: cannot drop " + path + " from the page cache");
    // O_DIRECT may be refused (tmpfs): then this baseline is left out.
    const double sd = SequentialReadSeconds(path, true, read_buffer.get());
    if (sd > 0.0) direct_s.push_back(sd);
    if (!drop()) return Fail(cmd, "--cold: cannot drop " + path + " from the page cache");
    const double sp = ParallelDirectReadSeconds(path, info.file_bytes, read_buffer.get());
    if (sp > 0.0) parallel_s.push_back(sp);
  }
  const double peak_rss = PeakRssMiB();
  const double ms = Median(decode_ms);
  const double disk_gbps = static_cast<double>(info.file_bytes) / Median(read_s) * 1e-9;
  const double read_gbps = static_cast<double>(stats.bytes_read) / (ms * 1e-3) * 1e-9;

  Json result;
  result["op"] = o.op;
  result["kv_file"] = path;
  result["kv_dtype"] = KVDTypeName(kv_dtype);
  result["dtype"] = DTypeName(dtype);
  result["heads"] = H;
  result["kv_heads"] = kv_heads;
  result["queries"] = Q;
  result["seq_k"] = tokens;
  result["tokens"] = tokens;
  result["dim"] = D;
  result["causal"] = o.causal;
  result["page_size"] = info.page_size;
  result["threads"] = ResolveThreads(ctx);
  result["decode_threads"] = std::min(ResolveThreads(ctx), std::max(1, o.kv_decode_threads));
  result["cold"] = o.cold;
  result["reader"] = KVFileReaderName(stats.reader);
  result["direct"] = stats.direct;
  result["chunks"] = stats.chunks;
  result["chunks_total"] = stats.chunks_total;
  result["select_top_k"] = o.kv_select_top_k;
  result["buffers"] = o.kv_buffers == 0 ? 3 : o.kv_buffers;
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["file_bytes"] = info.file_bytes;
  result["file_build_ms"] = build_ms;
  result["bytes_read"] = stats.bytes_read;
  result["ms"] = ms;
  result["ms_min"] = *std::min_element(decode_ms.begin(), decode_ms.end());
  result["reps"] = reps;
  result["warmup"] = o.warmup;
  result["wait_ms"] = Median(wait_ms);        // waiting for reads
  result["compute_ms"] = Median(compute_ms);  // decoding chunks and merging their states
  result["tokens_per_s"] = static_cast<double>(tokens) / (ms * 1e-3);
  result["read_gbps"] = read_gbps;
  result["disk_gbps"] = disk_gbps;
  result["frac_disk"] = read_gbps / disk_gbps;
  if (!direct_s.empty()) {
    const double direct_gbps = static_cast<double>(info.file_bytes) / Median(direct_s) * 1e-9;
    result["disk_direct_gbps"] = direct_gbps;
    result["frac_disk_direct"] = read_gbps / direct_gbps;
  }
  if (!parallel_s.empty()) {
    const double qd_gbps = static_cast<double>(info.file_bytes) / Median(parallel_s) * 1e-9;
    result["disk_qd8_gbps"] = qd_gbps;
    result["frac_disk_qd8"] = read_gbps / qd_gbps;
  }
  result["peak_rss_mib"] = peak_rss;
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: decode from " << path << " kv=" << KVDTypeName(kv_dtype)
            << " H=" << H << " Hkv=" << kv_heads << " Q=" << Q << " Sk=" << tokens << " D=" << D
            << (o.cold ? " cold" : "") << " reader=" << KVFileReaderName(stats.reader)
            << " threads=" << ResolveThreads(ctx) << ": " << Fixed(ms, 3) << " ms, "
            << Fixed(read_gbps, 2) << " GB/s read = " << Fixed(100.0 * read_gbps / disk_gbps, 0)
            << "% of " << Fixed(disk_gbps, 2) << " GB/s sequential, peak RSS " << Fixed(peak_rss, 0)
            << " MiB" << std::endl;
  return kExitOk;
}

}  // namespace

int BenchDecode(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  DType dtype = DType::kF32;
  KVDType kv_dtype = KVDType::kF16;
  Context ctx;
  if (!ParseDType(o.dtype, &dtype, &error)) return Fail(cmd, error);
  if (!ParseKVDType(o.kv_dtype, &kv_dtype, &error)) return Fail(cmd, error);
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(cmd, error);
  if (!o.vs.empty() && o.vs != "naive" && o.vs != "stream") {
    return Fail(cmd, "--vs: expected 'naive' or 'stream' with --op decode, got '" + o.vs + "'");
  }
  if (o.baseline_only && o.vs == "stream") {
    return Fail(cmd, "--baseline-only times the naive baseline alone; expected no --vs stream");
  }
  if (o.has_mask) {
    return Fail(cmd,
                "--mask: expected --op forward or backward (decode takes no mask), got "
                "--op decode");
  }
  const int64_t kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  if (o.batch < 1 || o.heads < 1 || o.kv_heads < 0 || o.dim < 1) {
    return Fail(cmd, "expected --batch, --heads, --kv-heads and --dim >= 1");
  }
  if (o.heads % kv_heads != 0) {
    return Fail(cmd, "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) +
                         ", got " + std::to_string(kv_heads));
  }
  if (o.queries < 1 || o.queries > kMaxDecodeQueries) {
    return Fail(cmd, "--queries: expected 1.." + std::to_string(kMaxDecodeQueries) + ", got " +
                         std::to_string(o.queries));
  }
  if (o.page_size < 0) {
    return Fail(cmd,
                "--page-size: expected >= 0 (0 = contiguous), got " + std::to_string(o.page_size));
  }
  if (o.split_tokens < 0) {
    return Fail(cmd, "--split-tokens: expected >= 0 (0 = the default), got " +
                         std::to_string(o.split_tokens));
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  int64_t q_elems = 0, cache_elems = 0;
  if (!TensorElements("the queries [B, Q, Hq, D]", {o.batch, o.queries, o.heads, o.dim}, &q_elems,
                      &error)) {
    return Fail(cmd, error);
  }
  DecodeCache dc;
  int64_t max_len = 0;
  if (!o.lens.empty()) {
    if (!ParseLens(o.lens, &dc.lens, &error)) return Fail(cmd, error);
    if (static_cast<int64_t>(dc.lens.size()) != o.batch) {
      return Fail(cmd, "--lens: expected " + std::to_string(o.batch) +
                           " lengths (one per sequence of --batch), got " +
                           std::to_string(dc.lens.size()));
    }
    max_len = *std::max_element(dc.lens.begin(), dc.lens.end());
  } else {
    max_len = o.seq_k < 0 ? o.seq : o.seq_k;
    if (max_len < 1 || max_len > std::numeric_limits<int32_t>::max()) {
      return Fail(cmd, "--seq-k: expected a cache length >= 1, got " + std::to_string(max_len));
    }
  }
  if (!TensorElements("the cache [B, Sk, Hkv, D]", {o.batch, max_len, kv_heads, o.dim},
                      &cache_elems, &error)) {
    return Fail(cmd, error);
  }
  if (o.lens.empty()) dc.lens.assign(static_cast<size_t>(o.batch), static_cast<int32_t>(max_len));
  ctx.num_threads = o.threads;
  if (!o.kv_file.empty()) {
    if (!o.decode_stats.empty()) {
      return Fail(cmd,
                  "--decode-stats: expected a cache in memory (DecodeFromFile writes no "
                  "statistics), got --kv-file");
    }
    return BenchDecodeFile(o, dtype, kv_dtype, kv_heads, max_len, ctx);
  }
  if (o.cold) return Fail(cmd, "--cold: expected --kv-file (it drops that file's cached pages)");
  const int32_t threads = ResolveThreads(ctx);
  const bool run_tessera = !o.baseline_only;
  const bool run_naive = o.baseline_only || o.vs == "naive";

  const auto build_start = std::chrono::steady_clock::now();
  if (const Status st = BuildDecodeCache(o, kv_dtype, kv_heads, ctx, &dc); !st.ok()) {
    return Fail(cmd, st.ToString());
  }
  const double build_ms = MillisecondsSince(build_start);
  const KVBatchView kv = dc.Batch();
  const int64_t Q = o.queries, H = o.heads, D = o.dim;
  double tokens = 0.0;
  for (int32_t len : dc.lens) tokens += len;
  const bool quantized = KVDTypeIsQuantized(kv_dtype);
  const double bytes = tokens * static_cast<double>(kv_heads) * 2.0 *
                       static_cast<double>(KVRowBytes(kv_dtype, D) + (quantized ? 8 : 0));
  const double flops = 4.0 * static_cast<double>(Q * H * D) * tokens;

  Json result;
  result["op"] = o.op;
  result["kv_dtype"] = KVDTypeName(kv_dtype);
  result["dtype"] = DTypeName(dtype);
  result["batch"] = o.batch;
  result["heads"] = H;
  result["kv_heads"] = kv_heads;
  result["queries"] = Q;
  result["seq_k"] = *std::max_element(dc.lens.begin(), dc.lens.end());
  if (!o.lens.empty()) result["lens"] = dc.lens;
  result["tokens"] = tokens;
  result["dim"] = D;
  result["causal"] = o.causal;
  result["paged"] = o.page_size > 0;
  result["page_size"] = dc.page_size;
  result["threads"] = threads;
  result["path"] = PathName(ctx.path);
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["cache_mb"] = static_cast<double>(dc.cache.bytes()) / (1024.0 * 1024.0);
  result["cache_build_ms"] = build_ms;
  result["bytes"] = bytes;
  result["flops"] = flops;
  result["peak_gbps"] = 0.0;  // measured last; the key sits here in the output

  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const AutoReps auto_reps{kDecodeRepSeconds, kDecodeMinReps, kDecodeMaxReps};
  AlignedBytes q, out;
  double tessera_ms = 0.0;
  if (run_tessera) {
    q = RandomBuffer(dtype, q_elems, o.seed, false);
    out = AllocateAligned(static_cast<size_t>(q_elems) * DTypeSize(dtype));
    if (!q || !out) return Fail(cmd, "cannot allocate the queries and output");
    DecodeParams params;
    params.q = MakeView4(q.get(), dtype, o.batch, Q, H, D);
    params.cache = dc.cache.view();
    params.kv = kv;
    params.out = MakeView4(out.get(), dtype, o.batch, Q, H, D);
    params.causal = o.causal;
    params.split_tokens = o.split_tokens;
    // --decode-stats: every timed run writes the statistics; plain decode is timed beside it.
    const DecodeParams plain = params;
    AlignedBytes stats_buffer;
    if (!o.decode_stats.empty()) {
      const bool probs = o.decode_stats == "probs" || o.decode_stats == "both";
      const bool accumulated = o.decode_stats == "accumulated" || o.decode_stats == "both";
      if (!probs && !accumulated) {
        return Fail(cmd, "--decode-stats: expected probs, accumulated or both, got '" +
                             o.decode_stats + "'");
      }
      const int64_t probs_elems = probs ? o.batch * H * Q * max_len : 0;
      const int64_t acc_elems = accumulated ? o.batch * kv_heads * max_len : 0;
      stats_buffer = AllocateAligned(static_cast<size_t>(probs_elems + acc_elems) * sizeof(float));
      if (!stats_buffer) return Fail(cmd, "cannot allocate the statistics outputs");
      float* base = reinterpret_cast<float*>(stats_buffer.get());
      std::fill(base, base + probs_elems + acc_elems, 0.0f);
      if (probs) params.stats.probs = MakeView4(base, DType::kF32, o.batch, H, Q, max_len);
      if (accumulated) {
        params.stats.accumulated =
            MakeView3(base + probs_elems, DType::kF32, o.batch, kv_heads, max_len);
      }
      result["decode_stats"] = o.decode_stats;
    }
    DecodePlan plan;
    Status st = PlanDecode(params, ctx, &plan);
    if (!st.ok()) return Fail(cmd, st.ToString());
    Timing timing;
    st = TimeRuns([&] { return RunDecode(plan, params, ctx); }, o.warmup, o.reps, &timing,
                  auto_reps);
    if (!st.ok()) return Fail(cmd, st.ToString());
    if (!o.decode_stats.empty()) {
      st = TimeStatsOverhead([&] { return RunDecode(plan, params, ctx); },
                             [&] { return RunDecode(plan, plain, ctx); }, o, timing.reps, &result);
      if (!st.ok()) return Fail(cmd, st.ToString());
    }
    tessera_ms = timing.median_ms;
    result["ms"] = timing.median_ms;
    result["ms_min"] = timing.min_ms;
    result["reps"] = timing.reps;
    result["warmup"] = o.warmup;
    result["splits"] = plan.num_units();
    result["split_tokens"] = plan.split_tokens();
    result["gbps"] = bytes / (timing.median_ms * 1e-3) * 1e-9;
    result["frac_bw"] = 0.0;  // filled in with the peak
    result["gflops"] = flops / (timing.median_ms * 1e-3) * 1e-9;
    result["peak_rss_mb"] = PeakRssMiB();
    if (o.vs == "stream") {
      // Pairs of one decode and one plain read of the same bytes, back to back, so both see the
      // same moment of a machine whose bandwidth moves; frac_stream = read time / decode time.
      const std::vector<ByteRange> ranges = DecodeReadRanges(dc, kv_heads, D);
      std::vector<double> decode_ms, read_ms;
      for (int i = 0; i < timing.reps; ++i) {
        const auto start = std::chrono::steady_clock::now();
        st = RunDecode(plan, params, ctx);
        if (!st.ok()) return Fail(cmd, st.ToString());
        decode_ms.push_back(MillisecondsSince(start));
        read_ms.push_back(TimeReadSeconds(ranges, threads) * 1e3);
      }
      const double paired = Median(decode_ms), read = Median(read_ms);
      result["baseline"] = "stream";
      result["baseline_ms"] = read;
      result["baseline_ms_min"] = *std::min_element(read_ms.begin(), read_ms.end());
      result["baseline_reps"] = timing.reps;
      result["baseline_gbps"] = bytes / (read * 1e-3) * 1e-9;
      result["baseline_frac_bw"] = 0.0;  // filled in with the peak
      result["paired_ms"] = paired;
      result["frac_stream"] = read / paired;
      result["speedup"] = read / paired;
    }
  }

  if (run_naive) {
    AlignedBytes qf, naive_out;
    const float* nq = nullptr;
    if (q && dtype == DType::kF32) {
      nq = reinterpret_cast<const float*>(q.get());
    } else {
      qf = RandomBuffer(dtype, q_elems, o.seed, true);
      nq = reinterpret_cast<const float*>(qf.get());
    }
    NaiveDecodeProblem np;
    np.queries = Q;
    np.heads_q = H;
    np.scale = scale;
    np.causal = o.causal;
    np.q = nq;
    np.cache = dc.cache.view();
    np.kv = kv;
    np.out = AllocateF32(q_elems, &naive_out);
    if (!nq || !np.out) return Fail(cmd, "cannot allocate the baseline's queries and output");
    NaiveDecode naive(np, threads);
    if (!naive.ok()) {
      return Fail(cmd, "cannot allocate the baseline's scratch (" +
                           std::to_string(naive.scratch_bytes()) + " bytes)");
    }
    Timing timing;
    const Status st = TimeRuns(
        [&] {
          naive.Run();
          return Status::Ok();
        },
        o.warmup, o.reps, &timing, auto_reps);
    if (!st.ok()) return Fail(cmd, st.ToString());
    result["baseline"] = "naive-decode";
    result["naive_ms"] = timing.median_ms;
    result["baseline_ms"] = timing.median_ms;
    result["baseline_ms_min"] = timing.min_ms;
    result["baseline_reps"] = timing.reps;
    result["baseline_gbps"] = bytes / (timing.median_ms * 1e-3) * 1e-9;
    result["baseline_frac_bw"] = 0.0;  // filled in with the peak
    result["baseline_scratch_mb"] = static_cast<double>(naive.scratch_bytes()) / (1024.0 * 1024.0);
    if (run_tessera) {
      result["speedup"] = timing.median_ms / tessera_ms;
      result["max_abs_diff"] = MaxAbsDiff(out.get(), dtype, np.out, q_elems);
      result["process_peak_rss_mb"] = PeakRssMiB();
    } else {
      result["baseline_only"] = true;
      result["warmup"] = o.warmup;
      result["baseline_peak_rss_mb"] = PeakRssMiB();
    }
  }

  // The read-bandwidth ceiling, measured last (see the file comment).
  const double peak = MeasureReadBandwidthGBps(threads, kPeakProbeSeconds);
  result["peak_gbps"] = peak;
  for (const char* prefix : {"", "baseline_"}) {
    const std::string p = prefix;
    if (result.contains(p + "gbps") && peak > 0.0) {
      result[p + "frac_bw"] = result[p + "gbps"].get<double>() / peak;
    }
  }

  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: decode kv=" << KVDTypeName(kv_dtype) << " B=" << o.batch
            << " H=" << H << " Hkv=" << kv_heads << " Q=" << Q << " Sk=" << result["seq_k"]
            << " D=" << D << (o.page_size > 0 ? " page=" + std::to_string(o.page_size) : "")
            << (o.causal ? " causal" : "") << " threads=" << threads << ":";
  if (run_tessera) {
    std::cout << " " << Fixed(tessera_ms, 3) << " ms, " << Fixed(result["gbps"].get<double>(), 1)
              << " GB/s = " << Fixed(100.0 * result["frac_bw"].get<double>(), 0) << "% of "
              << Fixed(peak, 1) << " GB/s read peak, " << Fixed(result["gflops"].get<double>(), 1)
              << " GFLOP/s";
  }
  if (run_naive) {
    std::cout << (run_tessera ? "; " : " ") << "naive "
              << Fixed(result["naive_ms"].get<double>(), 3) << " ms";
    if (run_tessera) {
      std::cout << " (speedup " << Fixed(result["speedup"].get<double>(), 2) << "x, max |diff| "
                << Fixed(result["max_abs_diff"].get<double>(), 6) << ")";
    } else {
      std::cout << ", " << Fixed(result["baseline_gbps"].get<double>(), 1) << " GB/s of "
                << Fixed(peak, 1) << " GB/s read peak";
    }
  }
  if (o.vs == "stream") {
    std::cout << "; in pairs, decode " << Fixed(result["paired_ms"].get<double>(), 3)
              << " ms vs a plain read of its bytes "
              << Fixed(result["baseline_ms"].get<double>(), 3) << " ms ("
              << Fixed(100.0 * result["frac_stream"].get<double>(), 0) << "%)";
  }
  std::cout << std::endl;
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
