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
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "naive_decode.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

constexpr int64_t kAppendChunkTokens = 256;

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
