// `tessera bench`: times a tessera op on random inputs next to the machine's measured FMA peak
// and, on request, a naive baseline measured in the same process.
//
// Method: fixed-seed inputs uniform in [-1, 1), `--warmup` untimed runs, then the median of
// `--reps` timed runs (by default as many as fit in about 1.5 s, at least 3). FLOPs count
// useful work: 4 * B * Hq * Sq * Sk * D for the exact forward, halved for causal when Sq == Sk
// and otherwise counted from the visible (query, key) pairs; the backward counts 2.5 times the
// forward (dout is random too; the forward runs once first for out and the LSE, outside the
// timing). Peak RSS comes from getrusage; with --vs the tessera figure is read before the
// baseline allocates anything, and --baseline-only measures the baseline alone in a process of
// its own.
//
// Masks (--mask, mask_spec.h): the FLOPs count only the visible (query, key) pairs,
// 4 * D * pairs for the forward (2.5x for the backward), the pairs counted by visible_pairs.h
// (reported as density = pairs / (B * Hq * Sq * Sk)). `--vs dense` times the unmasked kernel on
// the same inputs (causal when the masked call is), with as many runs as the masked one got, so
// the speedup is what the mask buys. select: forms run SelectBlocks on the benchmark's q and k in
// every timed forward run (ms includes it; select_ms is its median alone).
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
// Linear attention (--op linear, tessera/linear.h) is linear in the sequence length, so it reports
// tokens/s (B * N over the median time) next to ms. Its inputs are normal-ish (q, k, v;
// FillNormalish), the decay variant's rates are RetNet's per-head lambda_h = 1 - 2^(-5 - 4h / (H -
// 1)), and the gla variant's gates are log-sigmoid of normal-ish values over 16 (GLA's gate
// normalizer), so the per-token decay looks like a trained model's. Its FLOPs count the recurrent
// form's work: per token and query head 4 * F * Dv for phi(q) S and the state update (plus 4 * F
// with --normalize), and 2 * (Dk + Dv) per (query, key) pair of BASED's exact window. `--vs exact`
// times tessera's exact AttentionForward on the same B / N / H / Hkv with head dim --dim in f32
// (causal when the linear call is), as many runs, and reports speedup = baseline_ms / ms: where
// linear attention starts to pay off.
//
// Ops are a table (kOps): each op is an entry and a function.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_common.h"
#include "mask_spec.h"
#include "naive_attention.h"
#include "naive_decode.h"
#include "npy.h"
#include "tessera/attention.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tessera/linear.h"
#include "tessera/system.h"
#include "tessera/version.h"
#include "visible_pairs.h"

namespace tessera {
namespace cli {
namespace {

using Json = nlohmann::ordered_json;

constexpr double kAutoRepSeconds = 1.5;
constexpr int kMinReps = 3;
constexpr int kMaxAutoReps = 100;
constexpr double kPeakProbeSeconds = 0.3;
// Decode runs are short: about 1 s of them, at least 5.
constexpr double kDecodeRepSeconds = 1.0;
constexpr int kDecodeMinReps = 5;
constexpr int kDecodeMaxReps = 2000;
constexpr int64_t kAppendChunkTokens = 256;

struct BenchOptions {
  std::string op = "forward";
  int64_t batch = 1;
  int64_t heads = 8;
  int64_t kv_heads = 0;  // 0: same as heads
  int64_t seq = 1024;
  int64_t seq_k = -1;  // -1: same as seq
  int64_t dim = 128;
  bool causal = false;
  std::string dtype = "f32";
  int32_t threads = 0;
  std::string vs;
  bool baseline_only = false;
  bool json = false;
  int warmup = 1;
  int reps = 0;  // 0: automatic
  std::string path = "auto";
  uint64_t seed = 42;
  std::string mask;       // forward / backward only
  bool has_mask = false;  // --mask given (even empty, which is an error)
  // decode only
  int64_t queries = 1;
  std::string kv_dtype = "f16";
  int64_t page_size = 0;     // 0: contiguous
  std::string lens;          // empty: every sequence has seq_k tokens
  int64_t split_tokens = 0;  // 0: the default (DecodeParams::split_tokens)
  // linear only
  std::string variant = "plain";
  std::string feature_map;  // empty: the variant's default
  int normalize = -1;       // -1: the variant's default, 0 / 1: --no-normalize / --normalize
  std::string window;       // empty: 0 (bench times the linear part unless asked)
  int64_t dim_v = 0;        // 0: --dim
  int64_t feature_dim = 0;  // based: the q/k head dim; 0: kBasedFeatureDim
  int64_t chunk = 64;
  std::string form = "chunked";
  bool non_causal = false;
  // Options that belong to one side only, refused by name on the other (set at parse time).
  std::vector<std::string> given_linear_only, given_other_only, given_decode_only;
};

struct Timing {
  double median_ms = 0.0;
  double min_ms = 0.0;
  int reps = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// How many timed runs `--reps 0` (automatic) means: about `seconds` worth, within [min, max].
struct AutoReps {
  double seconds = kAutoRepSeconds;
  int min = kMinReps;
  int max = kMaxAutoReps;
};

// Times fn() (which returns a Status) with warm-ups and repeats; stops at the first error.
template <typename Fn>
Status TimeRuns(const Fn& fn, int warmup, int reps, Timing* timing, AutoReps auto_reps = {}) {
  using Clock = std::chrono::steady_clock;
  auto timed = [&](double* ms) {
    const auto t0 = Clock::now();
    Status s = fn();
    *ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    return s;
  };
  std::vector<double> times;
  double last = 0.0;
  for (int w = 0; w < warmup; ++w) {
    Status s = timed(&last);
    if (!s.ok()) return s;
  }
  if (reps <= 0) {
    if (warmup == 0) {  // no warm-up to estimate from: the first timed run serves
      Status s = timed(&last);
      if (!s.ok()) return s;
      times.push_back(last);
    }
    const double per_run_s = std::max(last, 1e-3) * 1e-3;
    reps = static_cast<int>(std::clamp(std::lround(auto_reps.seconds / per_run_s),
                                       static_cast<long>(auto_reps.min),
                                       static_cast<long>(auto_reps.max)));
  }
  while (static_cast<int>(times.size()) < reps) {
    double ms = 0.0;
    Status s = timed(&ms);
    if (!s.ok()) return s;
    times.push_back(ms);
  }
  timing->median_ms = Median(times);
  timing->min_ms = *std::min_element(times.begin(), times.end());
  timing->reps = reps;
  return Status::Ok();
}

// Deterministic uniform [-1, 1) values (splitmix64): 24 random bits, exact in f32.
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  float Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
  }

 private:
  uint64_t state_;
};

// Fills n elements of `dtype` at dst with Random(seed) values rounded to the dtype.
void FillRandom(void* dst, DType dtype, int64_t n, uint64_t seed) {
  Random rng(seed);
  switch (dtype) {
    case DType::kF32: {
      float* p = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = rng.Next();
      break;
    }
    case DType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToBF16(rng.Next());
      break;
    }
    case DType::kF16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToF16(rng.Next());
      break;
    }
    default:  // ParseDType admits only the float types
      break;
  }
}

// The same values as FillRandom(dtype), as f32 (what the baseline computes on).
void FillRandomAsF32(float* dst, DType dtype, int64_t n, uint64_t seed) {
  Random rng(seed);
  for (int64_t i = 0; i < n; ++i) {
    const float x = rng.Next();
    dst[i] = dtype == DType::kBF16  ? BF16ToFloat(FloatToBF16(x))
             : dtype == DType::kF16 ? F16ToFloat(FloatToF16(x))
                                    : x;
  }
}

float ToFloat(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kBF16:
      return BF16ToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kF16:
      return F16ToFloat(static_cast<const uint16_t*>(data)[i]);
    default:  // ParseDType admits only the float types
      break;
  }
  return 0.0f;
}

// A random tensor of n elements of `dtype`, or of f32 holding dtype-rounded values.
AlignedBytes RandomBuffer(DType dtype, int64_t n, uint64_t seed, bool as_f32) {
  const size_t elem = as_f32 ? sizeof(float) : DTypeSize(dtype);
  AlignedBytes buf = AllocateAligned(static_cast<size_t>(n) * elem);
  if (!buf) return buf;
  if (as_f32) {
    FillRandomAsF32(reinterpret_cast<float*>(buf.get()), dtype, n, seed);
  } else {
    FillRandom(buf.get(), dtype, n, seed);
  }
  return buf;
}

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

std::string Fixed(double x, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", precision, x);
  return buf;
}

// Largest |got[i] - want[i]| over n elements; NaN when any difference is NaN.
double MaxAbsDiff(const void* got, DType dtype, const float* want, int64_t n) {
  double max_diff = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(ToFloat(got, dtype, i)) - want[i]);
    if (!(d <= max_diff)) max_diff = d;  // also propagates NaN
  }
  return max_diff;
}

double MaxOrNaN(double a, double b) { return std::isnan(a) || a > b ? a : b; }

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// What every op's benchmark shares: the checked options, the thread count, the measured peak
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
  if (o.threads < 0 || o.warmup < 0 || o.reps < 0) {
    return Fail(cmd, "expected --threads, --warmup and --reps >= 0");
  }
  s->run_tessera = !o.baseline_only;
  s->run_naive = o.baseline_only || o.vs == "naive";
  s->run_dense = o.vs == "dense";
  s->ctx.num_threads = o.threads;
  s->threads = ResolveThreads(s->ctx);

  // Probe the peak first, while no other work competes for the cores.
  s->peak = MeasureFmaPeakGflops(s->threads, kPeakProbeSeconds);
  s->flops = flop_factor * ForwardFlops(o, s->seq_k, o.causal);
  s->q_elems = o.batch * o.seq * o.heads * o.dim;
  s->kv_elems = o.batch * s->seq_k * s->kv_heads * o.dim;

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
  if (s.run_tessera && o.has_mask) {
    std::printf("\nmask '%s': density %.4f%s", o.mask.c_str(), result["density"].get<double>(),
                result["density_exact"].get<bool>() ? "" : " (sampled rows)");
    if (result.contains("select_ms")) {
      std::printf(", block selection %.2f ms per run (in the median)",
                  result["select_ms"].get<double>());
    }
    std::printf("\n");
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

float* AllocateF32(int64_t n, AlignedBytes* buffer) {
  *buffer = AllocateAligned(static_cast<size_t>(n) * sizeof(float));
  return reinterpret_cast<float*>(buffer->get());
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
    if (mask.needs_selection()) {
      s.result["select_ms"] = Median(
          std::vector<double>(select_ms.end() - timing.reps, select_ms.end()));  // timed runs
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
    const Status st = TimeRuns(
        [&] {
          naive.Run();
          return Status::Ok();
        },
        o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
    const double diff = s.run_tessera ? MaxAbsDiff(out.get(), dtype, np.out, s.q_elems) : 0.0;
    RecordBaseline(o, timing, naive.score_bytes(), naive.heads_per_chunk(), diff, &s);
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
    const Status st = TimeRuns(
        [&] {
          naive.Run();
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
  }
  return Report(o, s);
}

// ---------------------------------------------------------------------------------------------
// Decode

// Normal-ish values with mean 0 and variance 1: the sum of four uniforms on [-1, 1) (variance
// 4/3) times sqrt(3) / 2.
void FillNormalish(float* dst, int64_t n, Random* rng) {
  constexpr float kScale = 0.8660254f;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = (rng->Next() + rng->Next() + rng->Next() + rng->Next()) * kScale;
  }
}

// The cache and the batch view over it that the decode benchmark reads.
struct DecodeCache {
  KVCache cache;
  std::vector<int32_t> lens;         // [B]
  std::vector<int32_t> block_table;  // [B, max_pages], empty for the contiguous layout
  int64_t max_pages = 0;
  int64_t page_size = 0;  // as allocated (contiguous: the longest sequence)

  KVBatchView Batch() const {
    KVBatchView kv;
    kv.batch = static_cast<int64_t>(lens.size());
    kv.seq_lens = lens.data();
    kv.block_table = block_table.empty() ? nullptr : block_table.data();
    kv.max_pages_per_seq = max_pages;
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
      one.block_table = &dc->block_table[b * dc->max_pages];
      one.max_pages_per_seq = dc->max_pages;
    }
    for (int32_t pos = 0; pos < dc->lens[b];) {
      const int64_t n = std::min<int64_t>(kAppendChunkTokens, dc->lens[b] - pos);
      FillNormalish(k_new.data(), n * row, &rng);
      FillNormalish(v_new.data(), n * row, &rng);
      AppendKVParams ap;
      ap.k_new = MakeView4(k_new.data(), DType::kF32, 1, n, kv_heads, D);
      ap.v_new = MakeView4(v_new.data(), DType::kF32, 1, n, kv_heads, D);
      ap.cache = target;
      one.seq_lens = &pos;
      ap.batch = one;
      st = AppendKV(ap, ctx);
      if (!st.ok()) return st;
      pos += static_cast<int32_t>(n);
    }
  }
  return Status::Ok();
}

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
  if (o.threads < 0 || o.warmup < 0 || o.reps < 0) {
    return Fail(cmd, "expected --threads, --warmup and --reps >= 0");
  }
  DecodeCache dc;
  if (!o.lens.empty()) {
    if (!ParseLens(o.lens, &dc.lens, &error)) return Fail(cmd, error);
    if (static_cast<int64_t>(dc.lens.size()) != o.batch) {
      return Fail(cmd, "--lens: expected " + std::to_string(o.batch) +
                           " lengths (one per sequence of --batch), got " +
                           std::to_string(dc.lens.size()));
    }
  } else {
    const int64_t seq_k = o.seq_k < 0 ? o.seq : o.seq_k;
    if (seq_k < 1 || seq_k > std::numeric_limits<int32_t>::max()) {
      return Fail(cmd, "--seq-k: expected a cache length >= 1, got " + std::to_string(seq_k));
    }
    dc.lens.assign(static_cast<size_t>(o.batch), static_cast<int32_t>(seq_k));
  }
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
  const int64_t q_elems = o.batch * Q * H * D;

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
    DecodePlan plan;
    Status st = PlanDecode(params, ctx, &plan);
    if (!st.ok()) return Fail(cmd, st.ToString());
    Timing timing;
    st = TimeRuns([&] { return RunDecode(plan, params, ctx); }, o.warmup, o.reps, &timing,
                  auto_reps);
    if (!st.ok()) return Fail(cmd, st.ToString());
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

// ---------------------------------------------------------------------------------------------
// Linear attention

constexpr int64_t kBasedFeatureDim = 16;  // BASED's q/k projection (Arora et al. 2024)

// n normal-ish values (FillNormalish) rounded to `dtype`, in a buffer of that dtype.
AlignedBytes NormalBuffer(DType dtype, int64_t n, uint64_t seed) {
  std::vector<float> values(static_cast<size_t>(n));
  Random rng(seed);
  FillNormalish(values.data(), n, &rng);
  AlignedBytes buf = AllocateAligned(static_cast<size_t>(n) * DTypeSize(dtype));
  if (!buf) return buf;
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::kBF16:
        reinterpret_cast<uint16_t*>(buf.get())[i] = FloatToBF16(values[i]);
        break;
      case DType::kF16:
        reinterpret_cast<uint16_t*>(buf.get())[i] = FloatToF16(values[i]);
        break;
      default:
        reinterpret_cast<float*>(buf.get())[i] = values[i];
        break;
    }
  }
  return buf;
}

// GLA's gates: log-sigmoid of normal-ish values over 16, so exp(g) sits just below 1.
AlignedBytes GateBuffer(int64_t n, uint64_t seed) {
  AlignedBytes buf = NormalBuffer(DType::kF32, n, seed);
  if (!buf) return buf;
  float* g = reinterpret_cast<float*>(buf.get());
  for (int64_t i = 0; i < n; ++i) {
    const double x = g[i];
    const double log_sigmoid = x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
    g[i] = static_cast<float>(log_sigmoid / 16.0);
  }
  return buf;
}

int BenchLinear(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  DType dtype = DType::kF32;
  Context ctx;
  if (!ParseDType(o.dtype, &dtype, &error)) return Fail(cmd, error);
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(cmd, error);
  if (!o.vs.empty() && o.vs != "exact") {
    return Fail(cmd,
                "--vs: expected 'exact' with --op linear (tessera's exact attention on the "
                "same shape), got '" +
                    o.vs + "'");
  }
  LinearOptionText text;
  text.variant = o.variant;
  text.feature_map = o.feature_map;
  text.normalize = o.normalize;
  text.window = o.window;
  LinearChoice choice;
  if (!ResolveLinearOptions(text, &choice, &error)) return Fail(cmd, error);
  if (o.non_causal && choice.window > 0) {
    return Fail(cmd,
                "--non-causal: the exact window part is causal (--variant based has --window " +
                    std::to_string(kBasedWindow) + " by default); expected --window 0 with it");
  }
  bool recurrent = false;
  if (!ParseLinearForm(o.form, &recurrent, &error)) return Fail(cmd, error);
  const bool based = choice.variant == LinearVariant::kBased;
  if (o.causal && o.non_causal) {
    return Fail(cmd, "--causal and --non-causal: expected at most one of them");
  }
  if (o.non_causal &&
      (choice.variant == LinearVariant::kDecay || choice.variant == LinearVariant::kGla)) {
    return Fail(cmd, std::string("--non-causal: --variant ") + LinearVariantName(choice.variant) +
                         " decays along the causal order; expected causal attention with it");
  }
  if (o.feature_dim != 0 && !based) {
    return Fail(cmd,
                "--feature-dim: only with --variant based (its q/k head dim); the other "
                "variants take theirs from --dim");
  }
  const int64_t kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  if (o.batch < 1 || o.heads < 1 || o.kv_heads < 0 || o.dim < 1 || o.seq < 1 || o.dim_v < 0 ||
      o.feature_dim < 0) {
    return Fail(cmd,
                "expected --batch, --heads, --kv-heads, --dim, --seq >= 1 and --dim-v, "
                "--feature-dim >= 1 when given");
  }
  if (o.heads % kv_heads != 0) {
    return Fail(cmd, "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) +
                         ", got " + std::to_string(kv_heads));
  }
  if (o.threads < 0 || o.warmup < 0 || o.reps < 0) {
    return Fail(cmd, "expected --threads, --warmup and --reps >= 0");
  }
  const int64_t B = o.batch, N = o.seq, H = o.heads;
  const int64_t Dk = based ? (o.feature_dim > 0 ? o.feature_dim : kBasedFeatureDim) : o.dim;
  const int64_t Dv = o.dim_v > 0 ? o.dim_v : o.dim;
  const int64_t F = LinearFeatureDim(choice.feature_map, Dk);
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);
  const bool causal = !o.non_causal;

  // Probe the peak first, while no other work competes for the cores.
  const double peak = MeasureFmaPeakGflops(threads, kPeakProbeSeconds);
  double window_pairs = 0.0;  // per (batch, head): sum over queries of min(t + 1, W)
  if (choice.window > 0) {
    const double w = static_cast<double>(std::min(choice.window, N));
    window_pairs = w * (w + 1.0) / 2.0 + (static_cast<double>(N) - w) * w;
  }
  const double bh = static_cast<double>(B * H);
  const double flops =
      bh * static_cast<double>(N) * (4.0 * F * Dv + (choice.normalize ? 4.0 * F : 0.0)) +
      bh * window_pairs * 2.0 * static_cast<double>(Dk + Dv);
  const double tokens = static_cast<double>(B * N);

  Json result;
  result["op"] = o.op;
  result["variant"] = LinearVariantName(choice.variant);
  result["form"] = recurrent ? "recurrent" : "chunked";
  result["dtype"] = DTypeName(dtype);
  result["batch"] = B;
  result["heads"] = H;
  result["kv_heads"] = kv_heads;
  result["seq"] = N;
  result["dim"] = o.dim;
  result["dim_qk"] = Dk;
  result["dim_v"] = Dv;
  result["feature_map"] = FeatureMapName(choice.feature_map);
  result["feature_dim"] = F;
  result["normalize"] = choice.normalize;
  result["causal"] = causal;
  result["window"] = choice.window;
  result["chunk"] = o.chunk;
  result["threads"] = threads;
  result["path"] = PathName(ctx.path);
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["state_mb"] = bh * static_cast<double>(F * Dv) * sizeof(float) / (1024.0 * 1024.0);
  result["flops"] = flops;
  result["peak_gflops"] = peak;

  const int64_t q_elems = B * N * H * Dk, k_elems = B * N * kv_heads * Dk;
  const int64_t v_elems = B * N * kv_heads * Dv, out_elems = B * N * H * Dv;
  AlignedBytes q = NormalBuffer(dtype, q_elems, o.seed);
  AlignedBytes k = NormalBuffer(dtype, k_elems, o.seed + 1);
  AlignedBytes v = NormalBuffer(dtype, v_elems, o.seed + 2);
  AlignedBytes out = AllocateAligned(static_cast<size_t>(out_elems) * DTypeSize(dtype));
  AlignedBytes gates;
  if (choice.variant == LinearVariant::kGla) gates = GateBuffer(q_elems, o.seed + 3);
  if (!q || !k || !v || !out || (choice.variant == LinearVariant::kGla && !gates)) {
    return Fail(cmd, "cannot allocate the inputs and output");
  }
  std::vector<float> lambdas;
  if (choice.variant == LinearVariant::kDecay) {
    for (int64_t h = 0; h < H; ++h) {
      const double t = H > 1 ? static_cast<double>(h) / static_cast<double>(H - 1) : 0.0;
      lambdas.push_back(static_cast<float>(1.0 - std::exp2(-5.0 - 4.0 * t)));
    }
    result["decay"] = lambdas;
  }
  LinearAttentionParams params;
  params.q = MakeView4(q.get(), dtype, B, N, H, Dk);
  params.k = MakeView4(k.get(), dtype, B, N, kv_heads, Dk);
  params.v = MakeView4(v.get(), dtype, B, N, kv_heads, Dv);
  params.out = MakeView4(out.get(), dtype, B, N, H, Dv);
  params.feature_map = choice.feature_map;
  params.causal = causal;
  params.normalize = choice.normalize;
  params.window = choice.window;
  params.chunk_size = o.chunk;
  if (!lambdas.empty()) params.decay = MakeView1(lambdas.data(), DType::kF32, H);
  if (gates) params.gates = MakeView4(gates.get(), DType::kF32, B, N, H, Dk);

  Timing timing;
  Status st = TimeRuns(
      [&] {
        return recurrent ? LinearAttentionRecurrent(params, ctx)
                         : LinearAttentionForward(params, ctx);
      },
      o.warmup, o.reps, &timing);
  if (!st.ok()) return Fail(cmd, LinearStatusMessage(st));
  const double gflops = flops / (timing.median_ms * 1e-3) * 1e-9;
  result["ms"] = timing.median_ms;
  result["ms_min"] = timing.min_ms;
  result["reps"] = timing.reps;
  result["warmup"] = o.warmup;
  result["tokens_per_s"] = tokens / (timing.median_ms * 1e-3);
  result["gflops"] = gflops;
  result["frac_peak"] = peak > 0.0 ? gflops / peak : 0.0;
  result["peak_rss_mb"] = PeakRssMiB();  // before the baseline allocates anything

  if (o.vs == "exact") {
    // Exact attention at head dim --dim on the same tokens and heads, in f32, as often.
    const int64_t D = o.dim;
    AlignedBytes eq = RandomBuffer(DType::kF32, B * N * H * D, o.seed, false);
    AlignedBytes ek = RandomBuffer(DType::kF32, B * N * kv_heads * D, o.seed + 1, false);
    AlignedBytes ev = RandomBuffer(DType::kF32, B * N * kv_heads * D, o.seed + 2, false);
    AlignedBytes eo = AllocateAligned(static_cast<size_t>(B * N * H * D) * sizeof(float));
    if (!eq || !ek || !ev || !eo) return Fail(cmd, "--vs exact: cannot allocate the inputs");
    AttentionParams exact;
    exact.q = MakeView4(eq.get(), DType::kF32, B, N, H, D);
    exact.k = MakeView4(ek.get(), DType::kF32, B, N, kv_heads, D);
    exact.v = MakeView4(ev.get(), DType::kF32, B, N, kv_heads, D);
    exact.out = MakeView4(eo.get(), DType::kF32, B, N, H, D);
    exact.causal = causal;
    Context exact_ctx = ctx;
    exact_ctx.path = Path::kAuto;  // --path forces linear attention's path, not this one's
    Timing exact_timing;
    st = TimeRuns([&] { return AttentionForward(exact, exact_ctx); }, o.warmup, timing.reps,
                  &exact_timing);
    if (!st.ok()) return Fail(cmd, "--vs exact: " + st.ToString());
    const double exact_flops = (causal ? 2.0 : 4.0) * bh * static_cast<double>(N) *
                               static_cast<double>(N) * static_cast<double>(D);
    const double exact_gflops = exact_flops / (exact_timing.median_ms * 1e-3) * 1e-9;
    result["baseline"] = "exact";
    result["baseline_causal"] = causal;
    result["baseline_dim"] = D;
    result["baseline_ms"] = exact_timing.median_ms;
    result["baseline_ms_min"] = exact_timing.min_ms;
    result["baseline_reps"] = exact_timing.reps;
    result["baseline_tokens_per_s"] = tokens / (exact_timing.median_ms * 1e-3);
    result["baseline_flops"] = exact_flops;
    result["baseline_gflops"] = exact_gflops;
    result["baseline_frac_peak"] = peak > 0.0 ? exact_gflops / peak : 0.0;
    result["speedup"] = exact_timing.median_ms / timing.median_ms;
    result["process_peak_rss_mb"] = PeakRssMiB();
  }

  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=linear variant=" << result["variant"].get<std::string>()
            << " form=" << result["form"].get<std::string>() << " dtype=" << DTypeName(dtype)
            << " B=" << B << " H=" << H << " Hkv=" << kv_heads << " N=" << N << " Dk=" << Dk
            << " Dv=" << Dv << " phi=" << FeatureMapName(choice.feature_map) << " F=" << F
            << " causal=" << (causal ? "yes" : "no")
            << " normalize=" << (choice.normalize ? "yes" : "no") << " window=" << choice.window
            << " chunk=" << o.chunk << " threads=" << threads << "\n"
            << "simd target " << SimdTargetName() << ", fp32 FMA peak " << Fixed(peak, 1)
            << " GFLOP/s on " << threads << " thread(s)\n\n";
  std::printf("%-16s %10s %10s %5s %12s %9s %7s %13s\n", "impl", "median ms", "min ms", "reps",
              "tokens/s", "GFLOP/s", "% peak", "peak RSS MiB");
  auto row = [&](const char* name, const std::string& p, const char* rss_key) {
    std::printf("%-16s %10.2f %10.2f %5d %12.0f %9.1f %7.1f %13s\n", name,
                result[p + "ms"].get<double>(), result[p + "ms_min"].get<double>(),
                result[p + "reps"].get<int>(), result[p + "tokens_per_s"].get<double>(),
                result[p + "gflops"].get<double>(), 100.0 * result[p + "frac_peak"].get<double>(),
                rss_key ? Fixed(result[rss_key].get<double>(), 1).c_str() : "(shared)");
  };
  row("tessera linear", "", "peak_rss_mb");
  if (o.vs == "exact") {
    row("tessera exact", "baseline_", nullptr);
    std::printf("\nspeedup %.2fx over exact %s attention at head dim %lld\n",
                result["speedup"].get<double>(), causal ? "causal" : "non-causal",
                static_cast<long long>(o.dim));
  }
  std::fflush(stdout);
  return kExitOk;
}

// The ops `bench` knows; an entry without a function is announced but not implemented yet.
struct BenchOp {
  const char* name;
  int (*main)(const BenchOptions&);
};
const BenchOp kOps[] = {
    {"forward", BenchForward},
    {"backward", BenchBackward},
    {"decode", BenchDecode},
    {"linear", BenchLinear},
};

int BenchMain(const BenchOptions& o) {
  // Options of one side given to the other would be silently ignored: refuse them by name.
  if (o.op == "linear" && !o.given_other_only.empty()) {
    return Fail("bench", o.given_other_only[0] + ": not with --op linear");
  }
  if (o.op != "linear" && !o.given_linear_only.empty()) {
    return Fail("bench", o.given_linear_only[0] + ": only with --op linear");
  }
  if (o.op != "decode" && o.op != "linear" && !o.given_decode_only.empty()) {
    return Fail("bench", o.given_decode_only[0] + ": only with --op decode");
  }
  std::string supported;
  for (const BenchOp& op : kOps) {
    if (op.main == nullptr) continue;
    supported += supported.empty() ? op.name : std::string(", ") + op.name;
  }
  for (const BenchOp& op : kOps) {
    if (o.op != op.name) continue;
    if (op.main == nullptr) {
      return Fail("bench", "unsupported op '" + o.op +
                               "': not implemented yet in this build (supported: " + supported +
                               ")");
    }
    return op.main(o);
  }
  return Fail("bench", "unknown op '" + o.op + "' (supported: " + supported + ")");
}

}  // namespace

CommandMain AddBenchCommand(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "bench", "Benchmark an op on random inputs against the measured peak and a baseline");
  // Options of the other ops (refused with --op linear), of linear only and of decode only
  // (refused without).
  std::vector<CLI::Option*> other_only, linear_only, decode_only;
  sub->add_option("--op", o->op, "operation: forward, backward, decode or linear")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "batch size B")->capture_default_str();
  sub->add_option("--heads", o->heads, "query heads Hq")->capture_default_str();
  sub->add_option("--kv-heads", o->kv_heads, "key/value heads Hkv (default: Hq)");
  sub->add_option("--seq", o->seq, "query length Sq (linear: the sequence length N)")
      ->capture_default_str();
  other_only.push_back(sub->add_option("--seq-k", o->seq_k,
                                       "key length Sk (default: Sq); decode: the cache length"));
  sub->add_option("--dim", o->dim,
                  "head dim D (linear: of q/k and v, and the --vs exact baseline's)")
      ->capture_default_str();
  sub->add_flag("--causal", o->causal, "causal mask (linear: the default)");
  sub->add_option("--dtype", o->dtype, "input dtype: f32, bf16 or f16 (decode: of q and out)")
      ->capture_default_str();
  // A decode option also counts as not-linear.
  auto decode_option = [&](CLI::Option* opt) {
    other_only.push_back(opt);
    decode_only.push_back(opt);
  };
  decode_option(
      sub->add_option("--queries", o->queries, "decode: query rows per sequence Q (1..16)")
          ->capture_default_str());
  decode_option(sub->add_option("--kv-dtype", o->kv_dtype,
                                "decode: KV cache dtype: f32, bf16, f16, int8, int4")
                    ->capture_default_str());
  decode_option(sub->add_option("--page-size", o->page_size,
                                "decode: tokens per page of a paged cache with shuffled pages (0 = "
                                "contiguous)")
                    ->capture_default_str());
  decode_option(
      sub->add_option("--split-tokens", o->split_tokens,
                      "decode: keys per split (0 = the default for the cache's page size)")
          ->capture_default_str());
  decode_option(sub->add_option(
      "--lens", o->lens,
      "decode: per-sequence cache lengths 'L1,L2,...', one per --batch (default: all --seq-k)"));
  sub->add_option("--threads", o->threads, "threads (0 = all)");
  sub->add_option("--vs", o->vs,
                  "also time a baseline in the same process: naive (OpenBLAS, unmasked) or dense "
                  "(tessera without the mask, same causal flag and number of runs); linear: "
                  "exact (tessera's exact attention, same shape at head dim --dim, f32); decode: "
                  "naive, or stream (a plain read of the bytes decode reads, timed in pairs "
                  "with it: frac_stream = read ms / decode ms)");
  CLI::Option* mask_option =
      sub->add_option("--mask", o->mask,
                      "forward/backward: a programmable mask (grammar below); GFLOP/s then counts "
                      "only the visible (query, key) pairs");
  other_only.push_back(mask_option);
  other_only.push_back(sub->add_flag("--baseline-only", o->baseline_only,
                                     "time only the naive baseline (its memory measured alone)"));
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  sub->add_option("--warmup", o->warmup, "untimed warm-up runs")->capture_default_str();
  sub->add_option("--reps", o->reps,
                  "timed runs (default: ~1.5 s worth, at least 3; decode: ~1 s, at least 5)");
  sub->add_option("--seed", o->seed, "random seed")->capture_default_str();
  sub->add_option("--path", o->path, "force a kernel path: auto|reference|generic|fast")
      ->group("");  // hidden: for kernel developers

  const std::string group = "Linear attention (--op linear)";
  const auto linear_option = [&](CLI::Option* opt) {
    opt->group(group);
    linear_only.push_back(opt);
    return opt;
  };
  auto normalize_value = std::make_shared<bool>(false);
  linear_option(sub->add_option("--variant", o->variant,
                                "plain, decay (RetNet rates), gla (random gates) or based (Taylor "
                                "map, normalized)")
                    ->capture_default_str());
  linear_option(sub->add_option("--feature-map", o->feature_map,
                                "phi: identity (default), elu1, relu or taylor2 (based)"));
  linear_option(sub->add_option("--dim-v", o->dim_v, "value head dim Dv (default: --dim)"));
  linear_option(sub->add_option("--feature-dim", o->feature_dim,
                                "based: the q/k head dim (default 16; F = 1 + Dk + Dk^2)"));
  CLI::Option* normalize_option =
      linear_option(sub->add_flag("--normalize,!--no-normalize", *normalize_value,
                                  "divide by phi(q).sum(phi(k)) (based: on by default)"));
  linear_option(sub->add_option("--window", o->window,
                                "W: add the exact softmax window over the last W keys (based: "
                                "default 64, else 0 = off)"));
  linear_option(sub->add_option("--chunk", o->chunk, "tokens per chunk: 16..256, a multiple of 16")
                    ->capture_default_str());
  linear_option(sub->add_option("--form", o->form, "chunked or recurrent (token by token)")
                    ->capture_default_str());
  linear_option(sub->add_flag("--non-causal", o->non_causal,
                              "every query sees every key (plain / based); the baseline too"));
  sub->footer(
      std::string(R"(FLOPs: forward 4*B*Hq*Sq*Sk*D (causal with Sq == Sk: half of it); with --mask,
4*D*P where P = density*B*Hq*Sq*Sk is the number of visible (query, key) pairs (density in
--json; counted from the mask's structure, or on a sample of rows for large element-wise
masks: density_exact false); backward 2.5x the forward. GFLOP/s = FLOPs / median time; for
select: masks the median includes SelectBlocks (select_ms alone). Linear: 4*B*Hq*N*F*Dv (+4*F
per token and head with --normalize, + 2*(Dk+Dv) per pair of the exact window), and
tokens_per_s = B*N / median time.

)") + MaskSpecHelp());
  return [o, mask_option, normalize_option, normalize_value, other_only, linear_only, decode_only] {
    o->has_mask = mask_option->count() > 0;
    o->normalize = normalize_option->count() > 0 ? (*normalize_value ? 1 : 0) : -1;
    for (const CLI::Option* opt : other_only) {
      if (opt->count() > 0) o->given_other_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : linear_only) {
      if (opt->count() > 0) o->given_linear_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : decode_only) {
      if (opt->count() > 0) o->given_decode_only.push_back(opt->get_name());
    }
    return BenchMain(*o);
  };
}

}  // namespace cli
}  // namespace tessera
