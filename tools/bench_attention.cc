// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op forward` and `--op backward`: exact attention (AttentionForward,
// AttentionBackward) on random inputs next to the measured FMA peak and, on request, a naive
// baseline measured in the same process.
//
// FLOPs count useful work: 4 * B * Hq * Sq * Sk * D for the exact forward, halved for causal
// when Sq == Sk and otherwise counted from the visible (query, key) pairs; the backward counts
// 2.5 times the forward (dout is random too; the forward runs once first for out and the LSE,
// outside the timing). With --vs the tessera figure for peak RSS is read before the baseline
// allocates anything, and --baseline-only measures the baseline alone in a process of its own.
//
// Masks (--mask, mask_spec.h): the FLOPs count only the visible (query, key) pairs,
// 4 * D * pairs for the forward (2.5x for the backward), the pairs counted by visible_pairs.h
// (reported as density = pairs / (B * Hq * Sq * Sk)). `--vs dense` times the unmasked kernel on
// the same inputs (causal when the masked call is), with as many runs as the masked one got, so
// the speedup is what the mask buys. select: forms run SelectBlocks on the benchmark's q and k in
// every timed forward run (ms includes it; select_ms is its median alone).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "blas_core.h"
#include "io_model.h"
#include "mask_spec.h"
#include "naive_attention.h"
#include "tessera/attention.h"
#include "tessera/system.h"
#include "tessera/version.h"
#include "visible_pairs.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

// Useful FLOPs of the exact forward without a mask (causal: half the pairs when Sq == Sk).
double ForwardFlops(const BenchOptions& o, int64_t seq_k, bool causal) {
  const double per_pair = 4.0 * static_cast<double>(o.batch * o.heads * o.dim);
  if (!causal) return per_pair * static_cast<double>(o.seq) * static_cast<double>(seq_k);
  if (o.seq == seq_k)
    return 0.5 * per_pair * static_cast<double>(o.seq) * static_cast<double>(o.seq);
  double pairs = 0.0;  // bottom-right aligned: query i sees keys j <= i + Sk - Sq
  for (int64_t i = 0; i < o.seq; ++i) {
    pairs += static_cast<double>(std::clamp<int64_t>(i + seq_k - o.seq + 1, 0, seq_k));
  }
  return per_pair * pairs;
}

// and the result object, filled in key order as the phases run.
struct BenchSetup {
  DType dtype = DType::kF32;
  Context ctx;
  int64_t kv_heads = 0;
  int64_t seq_k = 0;
  int32_t threads = 1;
  bool run_tessera = true;
  bool run_naive = false;
  bool run_dense = false;  // --vs dense
  double peak = 0.0;
  double flops = 0.0;
  int64_t q_elems = 0;   // B * Sq * Hq * D
  int64_t kv_elems = 0;  // B * Sk * Hkv * D
  double tessera_ms = 0.0;
  Json result;
};

// Checks the options, measures the peak and starts the result; the op counts flop_factor times
// the forward's useful FLOPs.
int SetUpBench(const BenchOptions& o, double flop_factor, BenchSetup* s) {
  const char* cmd = "bench";
  std::string error;
  if (!ParseDType(o.dtype, &s->dtype, &error)) return Fail(cmd, error);
  if (!ParsePath(o.path, &s->ctx.path, &error)) return Fail(cmd, error);
  if (!o.vs.empty() && o.vs != "naive" && o.vs != "dense") {
    return Fail(cmd, "--vs: expected 'naive' or 'dense', got '" + o.vs + "'");
  }
  if (o.has_mask && o.vs == "naive") {
    return Fail(cmd,
                "--vs naive: the naive baseline computes unmasked attention; expected "
                "--vs dense with --mask");
  }
  if (o.baseline_only && (o.vs == "dense" || o.has_mask)) {
    return Fail(cmd,
                "--baseline-only times the naive baseline alone; expected neither --mask "
                "nor --vs dense with it");
  }
  s->kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  s->seq_k = o.seq_k < 0 ? o.seq : o.seq_k;
  if (o.batch < 1 || o.heads < 1 || s->kv_heads < 1 || o.dim < 1 || o.seq < 0 || o.kv_heads < 0 ||
      o.seq_k < -1) {
    return Fail(cmd, "expected --batch, --heads, --kv-heads, --dim >= 1 and --seq, --seq-k >= 0");
  }
  if (o.heads % s->kv_heads != 0) {
    return Fail(cmd, "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) +
                         ", got " + std::to_string(s->kv_heads));
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  if (!TensorElements("the queries [B, Sq, Hq, D]", {o.batch, o.seq, o.heads, o.dim}, &s->q_elems,
                      &error) ||
      !TensorElements("the keys [B, Sk, Hkv, D]", {o.batch, s->seq_k, s->kv_heads, o.dim},
                      &s->kv_elems, &error)) {
    return Fail(cmd, error);
  }
  s->run_tessera = !o.baseline_only;
  s->run_naive = o.baseline_only || o.vs == "naive";
  s->run_dense = o.vs == "dense";
  s->ctx.num_threads = o.threads;
  s->threads = ResolveThreads(s->ctx);

  // Probe the peak first, while no other work competes for the cores.
  s->peak = MeasureFmaPeakGflops(s->threads, kPeakProbeSeconds);
  s->flops = flop_factor * ForwardFlops(o, s->seq_k, o.causal);

  Json& result = s->result;
  result["op"] = o.op;
  result["dtype"] = DTypeName(s->dtype);
  result["batch"] = o.batch;
  result["heads"] = o.heads;
  result["kv_heads"] = s->kv_heads;
  result["seq_q"] = o.seq;
  result["seq_k"] = s->seq_k;
  result["dim"] = o.dim;
  result["causal"] = o.causal;
  result["threads"] = s->threads;
  result["path"] = PathName(s->ctx.path);
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["flops"] = s->flops;
  result["peak_gflops"] = s->peak;
  return kExitOk;
}

// --io: the DRAM <-> L2 traffic model of the forward and the backward (io_model.h), the lower
// bound for this machine's L2, the model's bytes over the timed run's median, and the
// last-level-cache misses of one more run of `op` where the CPU counts them.
int RecordIo(const BenchOptions& o, const std::function<Status()>& op, BenchSetup* s) {
  if (!o.io) return kExitOk;
  if (o.has_mask) {
    return Fail("bench", "--io: the traffic model covers unmasked attention; expected no --mask");
  }
  IoProblem p;
  p.batch = o.batch;
  p.heads_q = o.heads;
  p.heads_kv = s->kv_heads;
  p.seq_q = o.seq;
  p.seq_k = s->seq_k;
  p.dim = o.dim;
  p.elem_bytes = static_cast<int64_t>(DTypeSize(s->dtype));
  p.causal = o.causal;
  const int64_t l2 = DescribeCpu().l2_bytes;
  const IoTraffic fwd = ForwardTraffic(p), bwd = BackwardTraffic(p);
  const double bound = LowerBoundBytes(p, l2);
  Json& r = s->result;
  const auto traffic = [](const IoTraffic& t) {
    Json j;
    j["q_bytes"] = t.q;
    j["kv_bytes"] = t.kv;
    j["out_bytes"] = t.out;
    j["other_bytes"] = t.other;
    j["total_bytes"] = t.total();
    return j;
  };
  r["io_l2_bytes"] = l2;
  r["io_forward"] = traffic(fwd);
  r["io_backward"] = traffic(bwd);
  r["io_lower_bound_bytes"] = bound;
  const IoTraffic& mine = o.op == "backward" ? bwd : fwd;
  r["io_model_bytes"] = mine.total();
  r["io_model_over_bound"] = bound > 0.0 ? mine.total() / bound : 0.0;
  r["io_model_gbps"] = s->tessera_ms > 0.0 ? mine.total() / (s->tessera_ms * 1e-3) * 1e-9 : 0.0;
  LlcMissCounter counter;
  if (!counter.available()) {
    r["io_measured_bytes"] = nullptr;
    r["io_measured_unavailable"] = counter.reason();
    return kExitOk;
  }
  counter.Start();
  const Status st = op();
  const int64_t misses = counter.Stop();
  if (!st.ok()) return Fail("bench", st.ToString());
  r["io_measured_bytes"] = static_cast<double>(misses) * 64.0;  // one cache line per miss
  return kExitOk;
}

// Records tessera's timing and its peak RSS (call before the baseline allocates anything).
void RecordTessera(const BenchOptions& o, const Timing& t, BenchSetup* s) {
  const double gflops = s->flops / (t.median_ms * 1e-3) * 1e-9;
  Json& result = s->result;
  s->tessera_ms = t.median_ms;
  result["ms"] = t.median_ms;
  result["ms_min"] = t.min_ms;
  result["reps"] = t.reps;
  result["warmup"] = o.warmup;
  result["gflops"] = gflops;
  result["frac_peak"] = s->peak > 0.0 ? gflops / s->peak : 0.0;
  result["peak_rss_mb"] = PeakRssMiB();
}

// Records the baseline's timing and, next to tessera, the speedup and max_abs_diff.
void RecordBaseline(const BenchOptions& o, const Timing& t, size_t score_bytes,
                    int64_t heads_per_chunk, double max_abs_diff, BenchSetup* s) {
  const double gflops = s->flops / (t.median_ms * 1e-3) * 1e-9;
  Json& result = s->result;
  result["baseline"] = "naive-openblas";
  result["baseline_ms"] = t.median_ms;
  result["baseline_ms_min"] = t.min_ms;
  result["baseline_reps"] = t.reps;
  result["baseline_gflops"] = gflops;
  result["baseline_frac_peak"] = s->peak > 0.0 ? gflops / s->peak : 0.0;
  result["baseline_score_mb"] = static_cast<double>(score_bytes) / (1024.0 * 1024.0);
  result["baseline_heads_per_chunk"] = heads_per_chunk;
  if (s->run_tessera) {
    result["speedup"] = t.median_ms / s->tessera_ms;
    result["max_abs_diff"] = max_abs_diff;
    // Both phases together; tessera's buffers are still resident during the baseline.
    result["process_peak_rss_mb"] = PeakRssMiB();
  } else {
    result["baseline_only"] = true;
    result["warmup"] = o.warmup;
    result["baseline_peak_rss_mb"] = PeakRssMiB();
  }
}

// The plain sgemm the baseline's GEMMs are held against: large enough for OpenBLAS's best rate.
constexpr int64_t kSgemmProbeN = 2048;
constexpr int kSgemmPairs = 3;
// A baseline run longer than this gets one pair only (N = 16K takes seconds per run).
constexpr double kLongBaselineMs = 2000.0;

// Records the baseline's GEMM rate (the median over its timed runs of the GEMM FLOPs of a run /
// the time of its sgemm calls), the BLAS core that ran it, and two references in the same
// process: plain sgemms of the baseline's own shapes on contiguous operands, timed alone
// (sgemm_shapes_gflops: what the same BLAS does with these GEMMs; the target is
// sgemm_shapes_over_baseline_gemm <= 1.3) and a plain 2048^3 sgemm (OpenBLAS's best rate here).
// The ratios are medians over kSgemmPairs rounds of one more baseline run and both probes back
// to back, so a neighbour's load shifts all alike (no more rounds than timed runs, and one when a
// baseline run takes over kLongBaselineMs). run_baseline runs the baseline once and returns its
// GemmStats.
template <class Fn>
void RecordBaselineGemm(std::vector<double> gemm_gflops, const Timing& timing,
                        const Fn& run_baseline, BenchSetup* s) {
  const int reps = timing.reps;
  if (static_cast<int>(gemm_gflops.size()) > reps) {
    gemm_gflops.erase(gemm_gflops.begin(), gemm_gflops.end() - reps);  // the timed runs
  }
  std::vector<double> square, shapes, square_ratios, shape_ratios;
  const int pairs = timing.median_ms > kLongBaselineMs ? 1 : std::min(kSgemmPairs, reps);
  for (int i = 0; i < pairs; ++i) {
    const GemmStats base = run_baseline();
    shapes.push_back(MeasureShapesGflops(base.shapes, s->threads));
    square.push_back(MeasureSgemmGflops(kSgemmProbeN, s->threads, 1));
    if (base.gflops() > 0.0) {
      shape_ratios.push_back(shapes.back() / base.gflops());
      square_ratios.push_back(square.back() / base.gflops());
    }
  }
  const BlasReport blas = GetBlasReport();
  const auto median = [](const std::vector<double>& v) { return v.empty() ? 0.0 : Median(v); };
  Json& result = s->result;
  result["baseline_gemm_gflops"] = median(gemm_gflops);
  result["sgemm_shapes_gflops"] = median(shapes);
  result["sgemm_shapes_over_baseline_gemm"] = median(shape_ratios);
  result["sgemm_gflops"] = median(square);
  result["sgemm_n"] = kSgemmProbeN;
  result["sgemm_over_baseline_gemm"] = median(square_ratios);
  result["blas_core"] = blas.core;
  result["blas_core_forced_from"] = blas.forced_from.empty() ? Json() : Json(blas.forced_from);
}

// Records the dense baseline (--vs dense): the unmasked kernel's timing and the speedup the
// mask buys. Its GFLOP/s counts the dense pairs (halved when causal with Sq == Sk).
void RecordDense(const Timing& t, double dense_flops, bool causal, BenchSetup* s) {
  const double gflops = dense_flops / (t.median_ms * 1e-3) * 1e-9;
  Json& result = s->result;
  result["baseline"] = "dense";
  result["baseline_causal"] = causal;
  result["baseline_ms"] = t.median_ms;
  result["baseline_ms_min"] = t.min_ms;
  result["baseline_reps"] = t.reps;
  result["baseline_flops"] = dense_flops;
  result["baseline_gflops"] = gflops;
  result["baseline_frac_peak"] = s->peak > 0.0 ? gflops / s->peak : 0.0;
  result["speedup"] = t.median_ms / s->tessera_ms;
}

// Parses --mask for the benchmark's shape and applies it to params (the causal flag and views
// already set); a select: spec selects once here so the density counts the chosen blocks.
// Records the mask, the effective causal flag and the density, and for a mask counts the FLOPs
// of the visible pairs only (flop_factor * 4 * D * pairs).
int SetUpMask(const BenchOptions& o, double flop_factor, MaskSpec* mask, AttentionParams* params,
              BenchSetup* s) {
  const char* cmd = "bench";
  std::string error;
  if (o.has_mask) {
    MaskProblem problem;
    problem.batch = o.batch;
    problem.seq_q = o.seq;
    problem.seq_k = s->seq_k;
    problem.heads_q = o.heads;
    problem.causal = o.causal;
    problem.seed = o.seed;
    problem.allow_random = true;
    if (!mask->Parse(o.mask, problem, &error) || !mask->Apply(params, &error)) {
      return Fail(cmd, error);
    }
    s->result["mask"] = o.mask;
    if (mask->needs_selection()) {
      const auto start = std::chrono::steady_clock::now();
      const Status st = mask->Select(*params, s->ctx);
      if (!st.ok()) return Fail(cmd, "--mask '" + o.mask + "': " + st.ToString());
      s->result["select_ms"] = MillisecondsSince(start);  // the forward times it again
    }
  }
  const VisiblePairs pairs = CountVisiblePairs(*params);
  Json& result = s->result;
  result["causal"] = params->causal;
  if (o.has_mask) {
    s->flops = flop_factor * 4.0 * static_cast<double>(o.dim) * pairs.visible;
    result["flops"] = s->flops;
  }
  result["density"] = pairs.density();
  result["density_exact"] = pairs.exact;
  return kExitOk;
}

// Prints the result: one JSON object with --json, a table otherwise.
int Report(const BenchOptions& o, const BenchSetup& s) {
  const Json& result = s.result;
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=" << o.op << " dtype=" << DTypeName(s.dtype) << " B=" << o.batch
            << " H=" << o.heads << " Hkv=" << s.kv_heads << " Sq=" << o.seq << " Sk=" << s.seq_k
            << " D=" << o.dim << " causal=" << (result.value("causal", o.causal) ? "yes" : "no")
            << " threads=" << s.threads << "\n"
            << "simd target " << SimdTargetName() << ", fp32 FMA peak " << Fixed(s.peak, 1)
            << " GFLOP/s on " << s.threads << " thread(s)\n\n";
  std::printf("%-16s %10s %10s %5s %9s %7s %13s\n", "impl", "median ms", "min ms", "reps",
              "GFLOP/s", "% peak", "peak RSS MiB");
  auto row = [&](const char* name, const char* prefix, const char* rss_key) {
    const std::string p = prefix;
    std::printf("%-16s %10.2f %10.2f %5d %9.1f %7.1f %13s\n", name, result[p + "ms"].get<double>(),
                result[p + "ms_min"].get<double>(), result[p + "reps"].get<int>(),
                result[p + "gflops"].get<double>(), 100.0 * result[p + "frac_peak"].get<double>(),
                rss_key ? Fixed(result[rss_key].get<double>(), 1).c_str() : "(shared)");
  };
  if (s.run_tessera) row(o.has_mask ? "tessera masked" : "tessera", "", "peak_rss_mb");
  if (s.run_naive) {
    row("naive-openblas", "baseline_", o.baseline_only ? "baseline_peak_rss_mb" : nullptr);
  }
  if (s.run_dense) row("tessera dense", "baseline_", nullptr);
  if (result.contains("io_model_bytes")) {
    const double mib = 1024.0 * 1024.0;
    std::printf(
        "\nI/O model (DRAM <-> L2 of %.1f MiB): forward %.1f MiB, backward %.1f MiB; lower bound "
        "%.1f MiB; this op %.2fx the bound, %.1f GB/s at the median\n",
        result["io_l2_bytes"].get<double>() / mib,
        result["io_forward"]["total_bytes"].get<double>() / mib,
        result["io_backward"]["total_bytes"].get<double>() / mib,
        result["io_lower_bound_bytes"].get<double>() / mib,
        result["io_model_over_bound"].get<double>(), result["io_model_gbps"].get<double>());
    if (result["io_measured_bytes"].is_null()) {
      std::printf("measured: unavailable (%s)\n",
                  result["io_measured_unavailable"].get<std::string>().c_str());
    } else {
      std::printf("measured: %.1f MiB of last-level-cache misses in one run\n",
                  result["io_measured_bytes"].get<double>() / mib);
    }
  }
  if (s.run_tessera && o.has_mask) {
    std::printf("\nmask '%s': density %.4f%s", o.mask.c_str(), result["density"].get<double>(),
                result["density_exact"].get<bool>() ? "" : " (sampled rows)");
    if (result.contains("select_ms")) {
      std::printf(", block selection %.2f ms per run (in the median)",
                  result["select_ms"].get<double>());
    }
    std::printf("\n");
  }
  if (s.run_naive) {
    const std::string from = result["blas_core_forced_from"].is_null()
                                 ? ""
                                 : " (forced from " +
                                       result["blas_core_forced_from"].get<std::string>() +
                                       " by tessera)";
    std::printf(
        "\nnaive GEMMs %.1f GFLOP/s; plain sgemms of their shapes %.1f GFLOP/s (%.2fx), of "
        "%lld^3 %.1f GFLOP/s (%.2fx); OpenBLAS core %s%s\n",
        result["baseline_gemm_gflops"].get<double>(), result["sgemm_shapes_gflops"].get<double>(),
        result["sgemm_shapes_over_baseline_gemm"].get<double>(), result["sgemm_n"].get<long long>(),
        result["sgemm_gflops"].get<double>(), result["sgemm_over_baseline_gemm"].get<double>(),
        result["blas_core"].get<std::string>().c_str(), from.c_str());
  }
  if (s.run_tessera && s.run_naive) {
    std::printf("\nspeedup %.2fx, max |tessera - naive| = %.3g\n", result["speedup"].get<double>(),
                result["max_abs_diff"].get<double>());
  }
  if (s.run_dense) {
    std::printf("\nspeedup %.2fx over the dense kernel\n", result["speedup"].get<double>());
  }
  std::fflush(stdout);
  return kExitOk;
}

// The baseline's f32 copy of a random input: tessera's own buffer when that is already f32,
// otherwise the same values regenerated as f32 (outside any timing). Null on allocation failure.
const float* BaselineInput(const BenchSetup& s, const AlignedBytes& tessera_buffer, int64_t n,
                           uint64_t seed, AlignedBytes* own) {
  if (tessera_buffer && s.dtype == DType::kF32) {
    return reinterpret_cast<const float*>(tessera_buffer.get());
  }
  *own = RandomBuffer(s.dtype, n, seed, true);
  return reinterpret_cast<const float*>(own->get());
}

// The baseline's problem description for the forward (out and lse left null).
NaiveProblem BaselineProblem(const BenchOptions& o, const BenchSetup& s, const float* q,
                             const float* k, const float* v) {
  NaiveProblem np;
  np.batch = o.batch;
  np.seq_q = o.seq;
  np.seq_k = s.seq_k;
  np.heads_q = o.heads;
  np.heads_kv = s.kv_heads;
  np.dim = o.dim;
  np.causal = o.causal;
  np.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(o.dim)));
  np.q = q;
  np.k = k;
  np.v = v;
  return np;
}

// --stats-window W: AttentionStats outputs for params (key mass and its square, row entropy;
// per KV head when Hkv < Hq), in one buffer.
int SetUpStats(const BenchOptions& o, BenchSetup& s, AlignedBytes* buffer,
               AttentionParams* params) {
  const int64_t heads = s.kv_heads < o.heads ? s.kv_heads : o.heads;
  const int64_t key_elems = o.batch * heads * s.seq_k;
  const int64_t row_elems = o.batch * o.heads * std::max<int64_t>(o.stats_window, 0);
  *buffer = AllocateAligned(static_cast<size_t>(2 * key_elems + row_elems) * sizeof(float));
  if (!*buffer) return Fail("bench", "cannot allocate the statistics outputs");
  float* base = reinterpret_cast<float*>(buffer->get());
  AttentionStats& st = params->stats;
  st.window = o.stats_window;
  st.sum_gqa_group = heads < o.heads;
  st.key_mass = MakeView3(base, DType::kF32, o.batch, heads, s.seq_k);
  st.key_mass_sq = MakeView3(base + key_elems, DType::kF32, o.batch, heads, s.seq_k);
  st.row_entropy = MakeView3(base + 2 * key_elems, DType::kF32, o.batch, o.heads, o.stats_window);
  s.result["stats_window"] = o.stats_window;
  return kExitOk;
}

}  // namespace

// Times the call with statistics and the plain call in alternating runs (`pairs` of each, at
// least 3), so that a neighbour's load shifts both alike, and records the medians and
// stats_overhead = with / plain - 1.
Status TimeStatsOverhead(const std::function<Status()>& with_stats,
                         const std::function<Status()>& plain, const BenchOptions& o, int pairs,
                         Json* result) {
  std::vector<double> with_ms, plain_ms;
  for (int i = 0; i < std::max(3, pairs); ++i) {
    Timing t;
    Status st = TimeRuns(with_stats, 0, 1, &t);
    if (!st.ok()) return st;
    with_ms.push_back(t.median_ms);
    st = TimeRuns(plain, i == 0 ? o.warmup : 0, 1, &t);
    if (!st.ok()) return st;
    plain_ms.push_back(t.median_ms);
  }
  const double w = Median(with_ms), p = Median(plain_ms);
  (*result)["stats_ms"] = w;
  (*result)["plain_ms"] = p;
  (*result)["stats_overhead"] = w / p - 1.0;
  return Status::Ok();
}

int BenchForward(const BenchOptions& o) {
  const char* cmd = "bench";
  BenchSetup s;
  if (const int rc = SetUpBench(o, 1.0, &s); rc != kExitOk) return rc;
  const DType dtype = s.dtype;

  AlignedBytes q, k, v, out;
  if (s.run_tessera) {
    q = RandomBuffer(dtype, s.q_elems, o.seed, false);
    k = RandomBuffer(dtype, s.kv_elems, o.seed + 1, false);
    v = RandomBuffer(dtype, s.kv_elems, o.seed + 2, false);
    out = AllocateAligned(static_cast<size_t>(s.q_elems) * DTypeSize(dtype));
    if (!q || !k || !v || !out) return Fail(cmd, "cannot allocate the inputs and output");
    AttentionParams params;
    params.q = MakeView4(q.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.k = MakeView4(k.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    params.v = MakeView4(v.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    params.out = MakeView4(out.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.causal = o.causal;
    MaskSpec mask;
    if (const int rc = SetUpMask(o, 1.0, &mask, &params, &s); rc != kExitOk) return rc;
    const AttentionParams plain = params;
    AlignedBytes stats_buffer;
    if (o.stats_window != 0) {
      if (const int rc = SetUpStats(o, s, &stats_buffer, &params); rc != kExitOk) return rc;
    }
    // select: chooses the blocks from q and k on every run, as a model would.
    std::vector<double> select_ms;
    auto forward = [&] {
      if (mask.needs_selection()) {
        const auto start = std::chrono::steady_clock::now();
        const Status st = mask.Select(params, s.ctx);
        select_ms.push_back(MillisecondsSince(start));
        if (!st.ok()) return st;
      }
      return AttentionForward(params, s.ctx);
    };
    Timing timing;
    Status st = TimeRuns(forward, o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
    RecordTessera(o, timing, &s);
    if (const int rc = RecordIo(o, forward, &s); rc != kExitOk) return rc;
    if (mask.needs_selection()) {
      s.result["select_ms"] = Median(
          std::vector<double>(select_ms.end() - timing.reps, select_ms.end()));  // timed runs
    }

    if (o.stats_window != 0) {
      st = TimeStatsOverhead([&] { return AttentionForward(params, s.ctx); },
                             [&] { return AttentionForward(plain, s.ctx); }, o, timing.reps,
                             &s.result);
      if (!st.ok()) return Fail(cmd, st.ToString());
    }
    if (s.run_dense) {
      // The unmasked kernel on the same inputs: no mask, no window (sink: sets one).
      AttentionParams dense = params;
      dense.mask = MaskParams();
      dense.window_left = dense.window_right = -1;
      Timing dense_timing;
      st = TimeRuns([&] { return AttentionForward(dense, s.ctx); }, o.warmup, timing.reps,
                    &dense_timing);
      if (!st.ok()) return Fail(cmd, "--vs dense: " + st.ToString());
      RecordDense(dense_timing, ForwardFlops(o, s.seq_k, dense.causal), dense.causal, &s);
    }
  }

  if (s.run_naive) {
    // The baseline computes in f32; 16-bit inputs are converted here, outside the timing.
    AlignedBytes qf, kf, vf, naive_out;
    const float* nq = BaselineInput(s, q, s.q_elems, o.seed, &qf);
    const float* nk = BaselineInput(s, k, s.kv_elems, o.seed + 1, &kf);
    const float* nv = BaselineInput(s, v, s.kv_elems, o.seed + 2, &vf);
    if (!nq || !nk || !nv) return Fail(cmd, "cannot allocate the baseline's f32 inputs");
    NaiveProblem np = BaselineProblem(o, s, nq, nk, nv);
    np.out = AllocateF32(s.q_elems, &naive_out);
    if (!np.out) return Fail(cmd, "cannot allocate the baseline's output");
    NaiveAttention naive(np, s.threads);
    if (!naive.ok()) {
      return Fail(cmd, "cannot allocate the baseline's score buffer (" +
                           std::to_string(naive.score_bytes()) + " bytes)");
    }
    Timing timing;
    std::vector<double> gemm_gflops;
    const Status st = TimeRuns(
        [&] {
          naive.Run();
          gemm_gflops.push_back(naive.gemm_stats().gflops());
          return Status::Ok();
        },
        o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
    const double diff = s.run_tessera ? MaxAbsDiff(out.get(), dtype, np.out, s.q_elems) : 0.0;
    RecordBaseline(o, timing, naive.score_bytes(), naive.heads_per_chunk(), diff, &s);
    RecordBaselineGemm(
        gemm_gflops, timing,
        [&] {
          naive.Run();
          return naive.gemm_stats();
        },
        &s);
  }
  return Report(o, s);
}

// Backward: the forward runs once, untimed in the median, for out and the LSE; then repeated
// AttentionBackward calls are timed. FLOPs are 2.5x the forward's (five Sq x Sk x D matrix
// products against the forward's two).
int BenchBackward(const BenchOptions& o) {
  const char* cmd = "bench";
  BenchSetup s;
  if (const int rc = SetUpBench(o, 2.5, &s); rc != kExitOk) return rc;
  const DType dtype = s.dtype;
  const size_t elem = DTypeSize(dtype);
  const int64_t lse_elems = o.batch * o.heads * o.seq;
  const uint64_t dout_seed = o.seed + 3;

  AlignedBytes q, k, v, dout, out, lse, dq, dk, dv;
  if (s.run_tessera) {
    q = RandomBuffer(dtype, s.q_elems, o.seed, false);
    k = RandomBuffer(dtype, s.kv_elems, o.seed + 1, false);
    v = RandomBuffer(dtype, s.kv_elems, o.seed + 2, false);
    dout = RandomBuffer(dtype, s.q_elems, dout_seed, false);
    out = AllocateAligned(static_cast<size_t>(s.q_elems) * elem);
    lse = AllocateAligned(static_cast<size_t>(lse_elems) * sizeof(float));
    dq = AllocateAligned(static_cast<size_t>(s.q_elems) * elem);
    dk = AllocateAligned(static_cast<size_t>(s.kv_elems) * elem);
    dv = AllocateAligned(static_cast<size_t>(s.kv_elems) * elem);
    if (!q || !k || !v || !dout || !out || !lse || !dq || !dk || !dv) {
      return Fail(cmd, "cannot allocate the inputs, outputs and gradients");
    }
    AttentionBackwardParams params;
    AttentionParams& fwd = params.forward;
    fwd.q = MakeView4(q.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    fwd.k = MakeView4(k.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    fwd.v = MakeView4(v.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    fwd.out = MakeView4(out.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    fwd.lse = MakeView3(lse.get(), DType::kF32, o.batch, o.heads, o.seq);
    fwd.causal = o.causal;
    params.dout = MakeView4(dout.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.dq = MakeView4(dq.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.dk = MakeView4(dk.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    params.dv = MakeView4(dv.get(), dtype, o.batch, s.seq_k, s.kv_heads, o.dim);
    // A select: mask is chosen once, before the forward (select_ms), and not timed again.
    MaskSpec mask;
    if (const int rc = SetUpMask(o, 2.5, &mask, &fwd, &s); rc != kExitOk) return rc;
    if (mask.sigmoid()) fwd.lse = TensorView();  // sigmoid attention has no log-sum-exp

    auto start = std::chrono::steady_clock::now();
    Status st = AttentionForward(fwd, s.ctx);
    if (!st.ok()) return Fail(cmd, st.ToString());
    s.result["forward_ms"] = MillisecondsSince(start);  // one cold run, for context
    Timing timing;
    st = TimeRuns([&] { return AttentionBackward(params, s.ctx); }, o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
    RecordTessera(o, timing, &s);
    if (const int rc = RecordIo(
            o, [&] { return AttentionBackward(params, s.ctx); }, &s);
        rc != kExitOk) {
      return rc;
    }

    if (s.run_dense) {
      // The unmasked forward once for its own out and LSE, then its backward timed as often.
      AlignedBytes dense_out = AllocateAligned(static_cast<size_t>(s.q_elems) * elem);
      AlignedBytes dense_lse = AllocateAligned(static_cast<size_t>(lse_elems) * sizeof(float));
      if (!dense_out || !dense_lse) return Fail(cmd, "--vs dense: cannot allocate O and the LSE");
      AttentionBackwardParams dense = params;
      dense.forward.mask = MaskParams();
      dense.forward.window_left = dense.forward.window_right = -1;
      dense.forward.out = MakeView4(dense_out.get(), dtype, o.batch, o.seq, o.heads, o.dim);
      dense.forward.lse = MakeView3(dense_lse.get(), DType::kF32, o.batch, o.heads, o.seq);
      start = std::chrono::steady_clock::now();
      st = AttentionForward(dense.forward, s.ctx);
      if (!st.ok()) return Fail(cmd, "--vs dense: " + st.ToString());
      s.result["baseline_forward_ms"] = MillisecondsSince(start);
      Timing dense_timing;
      st = TimeRuns([&] { return AttentionBackward(dense, s.ctx); }, o.warmup, timing.reps,
                    &dense_timing);
      if (!st.ok()) return Fail(cmd, "--vs dense: " + st.ToString());
      RecordDense(dense_timing, 2.5 * ForwardFlops(o, s.seq_k, dense.forward.causal),
                  dense.forward.causal, &s);
    }
  }

  if (s.run_naive) {
    AlignedBytes qf, kf, vf, doutf, naive_out, naive_lse, naive_dq, naive_dk, naive_dv;
    const float* nq = BaselineInput(s, q, s.q_elems, o.seed, &qf);
    const float* nk = BaselineInput(s, k, s.kv_elems, o.seed + 1, &kf);
    const float* nv = BaselineInput(s, v, s.kv_elems, o.seed + 2, &vf);
    const float* ndout = BaselineInput(s, dout, s.q_elems, dout_seed, &doutf);
    if (!nq || !nk || !nv || !ndout) return Fail(cmd, "cannot allocate the baseline's f32 inputs");
    NaiveBackwardProblem nb;
    nb.forward = BaselineProblem(o, s, nq, nk, nv);
    nb.forward.out = AllocateF32(s.q_elems, &naive_out);
    nb.forward.lse = AllocateF32(lse_elems, &naive_lse);
    nb.dout = ndout;
    nb.dq = AllocateF32(s.q_elems, &naive_dq);
    nb.dk = AllocateF32(s.kv_elems, &naive_dk);
    nb.dv = AllocateF32(s.kv_elems, &naive_dv);
    if (!nb.forward.out || !nb.forward.lse || !nb.dq || !nb.dk || !nb.dv) {
      return Fail(cmd, "cannot allocate the baseline's outputs and gradients");
    }
    {  // The baseline's own forward, for its out and LSE; its score buffer is freed after.
      NaiveAttention forward(nb.forward, s.threads);
      if (!forward.ok()) {
        return Fail(cmd, "cannot allocate the baseline's score buffer (" +
                             std::to_string(forward.score_bytes()) + " bytes)");
      }
      const auto start = std::chrono::steady_clock::now();
      forward.Run();
      s.result["baseline_forward_ms"] = MillisecondsSince(start);
    }
    NaiveAttentionBackward naive(nb, s.threads);
    if (!naive.ok()) {
      return Fail(cmd, "cannot allocate the baseline's score buffers (" +
                           std::to_string(naive.score_bytes()) + " bytes)");
    }
    Timing timing;
    std::vector<double> gemm_gflops;
    const Status st = TimeRuns(
        [&] {
          naive.Run();
          gemm_gflops.push_back(naive.gemm_stats().gflops());
          return Status::Ok();
        },
        o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
    double diff = 0.0;
    if (s.run_tessera) {
      diff = MaxOrNaN(MaxAbsDiff(dq.get(), dtype, nb.dq, s.q_elems),
                      MaxOrNaN(MaxAbsDiff(dk.get(), dtype, nb.dk, s.kv_elems),
                               MaxAbsDiff(dv.get(), dtype, nb.dv, s.kv_elems)));
    }
    RecordBaseline(o, timing, naive.score_bytes(), naive.heads_per_chunk(), diff, &s);
    RecordBaselineGemm(
        gemm_gflops, timing,
        [&] {
          naive.Run();
          return naive.gemm_stats();
        },
        &s);
  }
  return Report(o, s);
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
