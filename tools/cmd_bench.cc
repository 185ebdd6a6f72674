// `tessera bench`: times a tessera op on random inputs next to the machine's measured FMA peak
// and, on request, a naive baseline measured in the same process.
//
// Method: fixed-seed inputs uniform in [-1, 1), `--warmup` untimed runs, then the median of
// `--reps` timed runs (by default as many as fit in about 1.5 s, at least 3). FLOPs count
// useful work: 4 * B * Hq * Sq * Sk * D for the exact forward, halved for causal when Sq == Sk
// and otherwise counted from the visible (query, key) pairs. Peak RSS comes from getrusage;
// with --vs the tessera figure is read before the baseline allocates anything, and
// --baseline-only measures the baseline alone in a process of its own.
//
// Ops are a table (kOps): later ops (backward, decode, linear) add an entry and a function.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "naive_attention.h"
#include "npy.h"
#include "tessera/attention.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace {

using Json = nlohmann::ordered_json;

constexpr double kAutoRepSeconds = 1.5;
constexpr int kMinReps = 3;
constexpr int kMaxAutoReps = 100;
constexpr double kPeakProbeSeconds = 0.3;

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

// Times fn() (which returns a Status) with warm-ups and repeats; stops at the first error.
template <typename Fn>
Status TimeRuns(const Fn& fn, int warmup, int reps, Timing* timing) {
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
    reps =
        static_cast<int>(std::clamp(std::lround(kAutoRepSeconds / per_run_s),
                                    static_cast<long>(kMinReps), static_cast<long>(kMaxAutoReps)));
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
    case DType::kF32: return static_cast<const float*>(data)[i];
    case DType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kF16: return F16ToFloat(static_cast<const uint16_t*>(data)[i]);
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

// Useful FLOPs of the exact forward.
double ForwardFlops(const BenchOptions& o, int64_t seq_k) {
  const double per_pair = 4.0 * static_cast<double>(o.batch * o.heads * o.dim);
  if (!o.causal) return per_pair * static_cast<double>(o.seq) * static_cast<double>(seq_k);
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

int BenchForward(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  DType dtype;
  Context ctx;
  if (!ParseDType(o.dtype, &dtype, &error)) return Fail(cmd, error);
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(cmd, error);
  if (!o.vs.empty() && o.vs != "naive") {
    return Fail(cmd, "--vs: expected 'naive', got '" + o.vs + "'");
  }
  const int64_t kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  const int64_t seq_k = o.seq_k < 0 ? o.seq : o.seq_k;
  if (o.batch < 1 || o.heads < 1 || kv_heads < 1 || o.dim < 1 || o.seq < 0 || o.kv_heads < 0 ||
      o.seq_k < -1) {
    return Fail(cmd, "expected --batch, --heads, --kv-heads, --dim >= 1 and --seq, --seq-k >= 0");
  }
  if (o.heads % kv_heads != 0) {
    return Fail(cmd, "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) +
                         ", got " + std::to_string(kv_heads));
  }
  if (o.threads < 0 || o.warmup < 0 || o.reps < 0) {
    return Fail(cmd, "expected --threads, --warmup and --reps >= 0");
  }
  const bool run_tessera = !o.baseline_only;
  const bool run_naive = o.baseline_only || o.vs == "naive";
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);

  // Probe the peak first, while no other work competes for the cores.
  const double peak = MeasureFmaPeakGflops(threads, kPeakProbeSeconds);
  const double flops = ForwardFlops(o, seq_k);
  const int64_t q_elems = o.batch * o.seq * o.heads * o.dim;
  const int64_t kv_elems = o.batch * seq_k * kv_heads * o.dim;

  Json result;
  result["op"] = o.op;
  result["dtype"] = DTypeName(dtype);
  result["batch"] = o.batch;
  result["heads"] = o.heads;
  result["kv_heads"] = kv_heads;
  result["seq_q"] = o.seq;
  result["seq_k"] = seq_k;
  result["dim"] = o.dim;
  result["causal"] = o.causal;
  result["threads"] = threads;
  result["path"] = PathName(ctx.path);
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["flops"] = flops;
  result["peak_gflops"] = peak;

  AlignedBytes q, k, v, out;
  Timing tessera_time;
  if (run_tessera) {
    q = RandomBuffer(dtype, q_elems, o.seed, false);
    k = RandomBuffer(dtype, kv_elems, o.seed + 1, false);
    v = RandomBuffer(dtype, kv_elems, o.seed + 2, false);
    out = AllocateAligned(static_cast<size_t>(q_elems) * DTypeSize(dtype));
    if (!q || !k || !v || !out) return Fail(cmd, "cannot allocate the inputs and output");
    AttentionParams params;
    params.q = MakeView4(q.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.k = MakeView4(k.get(), dtype, o.batch, seq_k, kv_heads, o.dim);
    params.v = MakeView4(v.get(), dtype, o.batch, seq_k, kv_heads, o.dim);
    params.out = MakeView4(out.get(), dtype, o.batch, o.seq, o.heads, o.dim);
    params.causal = o.causal;
    Status s =
        TimeRuns([&] { return AttentionForward(params, ctx); }, o.warmup, o.reps, &tessera_time);
    if (!s.ok()) return Fail(cmd, s.ToString());
    const double gflops = flops / (tessera_time.median_ms * 1e-3) * 1e-9;
    result["ms"] = tessera_time.median_ms;
    result["ms_min"] = tessera_time.min_ms;
    result["reps"] = tessera_time.reps;
    result["warmup"] = o.warmup;
    result["gflops"] = gflops;
    result["frac_peak"] = peak > 0.0 ? gflops / peak : 0.0;
    // Read before the baseline allocates: this is tessera's own footprint.
    result["peak_rss_mb"] = PeakRssMiB();
  }

  if (run_naive) {
    // The baseline computes in f32; 16-bit inputs are converted here, outside the timing.
    AlignedBytes qf, kf, vf;
    const float *nq, *nk, *nv;
    if (run_tessera && dtype == DType::kF32) {
      nq = reinterpret_cast<const float*>(q.get());
      nk = reinterpret_cast<const float*>(k.get());
      nv = reinterpret_cast<const float*>(v.get());
    } else {
      qf = RandomBuffer(dtype, q_elems, o.seed, true);
      kf = RandomBuffer(dtype, kv_elems, o.seed + 1, true);
      vf = RandomBuffer(dtype, kv_elems, o.seed + 2, true);
      if (!qf || !kf || !vf) return Fail(cmd, "cannot allocate the baseline's f32 inputs");
      nq = reinterpret_cast<const float*>(qf.get());
      nk = reinterpret_cast<const float*>(kf.get());
      nv = reinterpret_cast<const float*>(vf.get());
    }
    AlignedBytes naive_out = AllocateAligned(static_cast<size_t>(q_elems) * sizeof(float));
    if (!naive_out) return Fail(cmd, "cannot allocate the baseline's output");
    NaiveProblem np;
    np.batch = o.batch;
    np.seq_q = o.seq;
    np.seq_k = seq_k;
    np.heads_q = o.heads;
    np.heads_kv = kv_heads;
    np.dim = o.dim;
    np.causal = o.causal;
    np.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(o.dim)));
    np.q = nq;
    np.k = nk;
    np.v = nv;
    np.out = reinterpret_cast<float*>(naive_out.get());
    NaiveAttention naive(np, threads);
    if (!naive.ok()) {
      return Fail(cmd, "cannot allocate the baseline's score buffer (" +
                           std::to_string(naive.score_bytes()) + " bytes)");
    }
    Timing naive_time;
    Status s = TimeRuns(
        [&] {
          naive.Run();
          return Status::Ok();
        },
        o.warmup, o.reps, &naive_time);
    if (!s.ok()) return Fail(cmd, s.ToString());
    const double gflops = flops / (naive_time.median_ms * 1e-3) * 1e-9;
    result["baseline"] = "naive-openblas";
    result["baseline_ms"] = naive_time.median_ms;
    result["baseline_ms_min"] = naive_time.min_ms;
    result["baseline_reps"] = naive_time.reps;
    result["baseline_gflops"] = gflops;
    result["baseline_frac_peak"] = peak > 0.0 ? gflops / peak : 0.0;
    result["baseline_score_mb"] = static_cast<double>(naive.score_bytes()) / (1024.0 * 1024.0);
    result["baseline_heads_per_chunk"] = naive.heads_per_chunk();
    if (run_tessera) {
      result["speedup"] = naive_time.median_ms / tessera_time.median_ms;
      double max_diff = 0.0;
      const float* ref = np.out;
      for (int64_t i = 0; i < q_elems; ++i) {
        const double d = std::fabs(static_cast<double>(ToFloat(out.get(), dtype, i)) - ref[i]);
        if (!(d <= max_diff)) max_diff = d;  // also propagates NaN
      }
      result["max_abs_diff"] = max_diff;
      // Both phases together; tessera's inputs are still resident during the baseline.
      result["process_peak_rss_mb"] = PeakRssMiB();
    } else {
      result["baseline_only"] = true;
      result["warmup"] = o.warmup;
      result["baseline_peak_rss_mb"] = PeakRssMiB();
    }
  }

  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=" << o.op << " dtype=" << DTypeName(dtype) << " B=" << o.batch
            << " H=" << o.heads << " Hkv=" << kv_heads << " Sq=" << o.seq << " Sk=" << seq_k
            << " D=" << o.dim << " causal=" << (o.causal ? "yes" : "no") << " threads=" << threads
            << "\n"
            << "simd target " << SimdTargetName() << ", fp32 FMA peak " << Fixed(peak, 1)
            << " GFLOP/s on " << threads << " thread(s)\n\n";
  std::printf("%-16s %10s %10s %5s %9s %7s %13s\n", "impl", "median ms", "min ms", "reps",
              "GFLOP/s", "% peak", "peak RSS MiB");
  auto row = [&](const char* name, const char* prefix, const char* rss_key) {
    const std::string p = prefix;
    std::printf("%-16s %10.2f %10.2f %5d %9.1f %7.1f %13s\n", name, result[p + "ms"].get<double>(),
                result[p + "ms_min"].get<double>(), result[p + "reps"].get<int>(),
                result[p + "gflops"].get<double>(), 100.0 * result[p + "frac_peak"].get<double>(),
                rss_key ? Fixed(result[rss_key].get<double>(), 1).c_str() : "(shared)");
  };
  if (run_tessera) row("tessera", "", "peak_rss_mb");
  if (run_naive) {
    row("naive-openblas", "baseline_", o.baseline_only ? "baseline_peak_rss_mb" : nullptr);
  }
  if (run_tessera && run_naive) {
    std::printf("\nspeedup %.2fx, max |tessera - naive| = %.3g\n", result["speedup"].get<double>(),
                result["max_abs_diff"].get<double>());
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
    {"backward", nullptr},
    {"decode", nullptr},
    {"linear", nullptr},
};

int BenchMain(const BenchOptions& o) {
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
  sub->add_option("--op", o->op, "operation: forward (backward, decode, linear: later)")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "batch size B")->capture_default_str();
  sub->add_option("--heads", o->heads, "query heads Hq")->capture_default_str();
  sub->add_option("--kv-heads", o->kv_heads, "key/value heads Hkv (default: Hq)");
  sub->add_option("--seq", o->seq, "query length Sq")->capture_default_str();
  sub->add_option("--seq-k", o->seq_k, "key length Sk (default: Sq)");
  sub->add_option("--dim", o->dim, "head dim D")->capture_default_str();
  sub->add_flag("--causal", o->causal, "causal mask");
  sub->add_option("--dtype", o->dtype, "input dtype: f32, bf16 or f16")->capture_default_str();
  sub->add_option("--threads", o->threads, "threads (0 = all)");
  sub->add_option("--vs", o->vs, "also time a baseline in the same process: naive");
  sub->add_flag("--baseline-only", o->baseline_only,
                "time only the naive baseline (its memory measured alone)");
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  sub->add_option("--warmup", o->warmup, "untimed warm-up runs")->capture_default_str();
  sub->add_option("--reps", o->reps, "timed runs (default: ~1.5 s worth, at least 3)");
  sub->add_option("--seed", o->seed, "random seed")->capture_default_str();
  sub->add_option("--path", o->path, "force a kernel path: auto|reference|generic|fast")
      ->group("");  // hidden: for kernel developers
  return [o] { return BenchMain(*o); };
}

}  // namespace cli
}  // namespace tessera
