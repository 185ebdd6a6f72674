// SPDX-License-Identifier: Apache-2.0
// The timing harness every `tessera bench` op shares: the options as parsed, warm-ups and
// repeated runs reduced to a median, deterministic random inputs, and the small numeric and
// formatting helpers of the reports. Each op lives in a bench_*.cc of its own (attention,
// decode, linear) and is listed in cmd_bench.cc's table of ops.
//
// Method: fixed-seed inputs uniform in [-1, 1), `--warmup` untimed runs, then the median of
// `--reps` timed runs (by default as many as fit in about 1.5 s, at least 3). Peak RSS comes
// from getrusage.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "approx_options.h"
#include "cli_common.h"
#include "npy.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {
namespace cli {
namespace bench {

using Json = nlohmann::ordered_json;

constexpr double kAutoRepSeconds = 1.5;
constexpr int kMinReps = 3;
constexpr int kMaxAutoReps = 100;
constexpr double kPeakProbeSeconds = 0.3;
// Decode runs are short: about 1 s of them, at least 5.
constexpr double kDecodeRepSeconds = 1.0;
constexpr int kDecodeMinReps = 5;
constexpr int kDecodeMaxReps = 2000;

// The options of `tessera bench` as parsed (cmd_bench.cc); each op checks the ones it takes.
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
  std::string target = "auto";
  uint64_t seed = 42;
  std::string mask;          // forward / backward only
  int64_t stats_window = 0;  // forward only: AttentionStats of the last W query rows (0: off)
  std::string decode_stats;  // decode only: probs, accumulated or both (empty: off)
  bool has_mask = false;     // --mask given (even empty, which is an error)
  // decode only
  int64_t queries = 1;
  std::string kv_dtype = "f16";
  int64_t page_size = 0;     // 0: contiguous
  std::string lens;          // empty: every sequence has seq_k tokens
  int64_t split_tokens = 0;  // 0: the default (DecodeParams::split_tokens)
  std::string kv_file;       // non-empty: DecodeFromFile over this file (bench_decode.cc)
  bool cold = false;         // --kv-file: drop the file from the page cache before each run
  std::string kv_reader = "auto";
  int64_t kv_chunk_tokens = 0;
  int32_t kv_buffers = 0;
  int32_t kv_decode_threads = 0;
  int64_t kv_select_top_k = 0;
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
  bool lrpe = false;  // LRPE with theta_f = 10000^(-f / Dk), shared by the heads (F = 2 Dk)
  // evict only (also --kv-dtype, --page-size and --window)
  std::string policy;
  double budget = 0.2;  // fraction of the cache tokens kept per layer
  int64_t layers = 0;   // 0: 4 synthetic layers, or every layer of --data
  int64_t held_out = 16;
  std::string data = "synthetic";
  int64_t sinks = 4;
  double gamma = 200.0;
  double tau1 = 1.0;
  double tau2 = 1.0;
  // longconv (h3: also filter_len and lc_path)
  int64_t channels = 256;
  int64_t filter_len = 0;  // 0: --seq
  int64_t block = 4096;    // --conv-path stream: tokens per pushed block
  std::string lc_path = "auto";
  bool backward = false;  // longconv, h3: time the backward (--backward without --dist)
  // h3 only (also --heads, --dim)
  int64_t shift_len = 4;
  // ssm only (also --channels, --conv-block)
  int64_t modes = 32;
  // forward / backward: also report the DRAM <-> L2 traffic model, its lower bound and the
  // measured last-level-cache misses where the CPU counts them (io_model.h)
  bool io = false;
  // Options that belong to one side only, refused by name on the other (set at parse time).
  // --op approx (bench_approx.cc): the method and its knobs, and the inputs' kind.
  ApproxKnobs approx;
  std::string inputs = "random";
  double qk_scale = 1.0;  // q and k multiplied by it (the logits' spread: FAVOR+'s variance)
  std::vector<std::string> given_linear_only, given_other_only, given_decode_only, given_evict_only,
      given_approx_only, given_longconv_only, given_h3_only, given_ssm_only;
};

struct Timing {
  double median_ms = 0.0;
  double min_ms = 0.0;
  int reps = 0;
};

// The median of v (the mean of the middle two for an even count).
double Median(std::vector<double> v);

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

// Tensors the benchmarks allocate hold at most this many elements, so that their byte counts
// (and the FLOP counts' integer products) stay far from overflowing.
constexpr int64_t kMaxElements = int64_t{1} << 56;

// *n = the product of `dims` (each >= 0), the element count of the tensor `what` names with its
// layout ("the queries [B, Sq, Hq, D]"); false with *error when the dims, zeros counted as ones,
// multiply past kMaxElements.
bool TensorElements(const std::string& what, const std::vector<int64_t>& dims, int64_t* n,
                    std::string* error);

// Fills n elements of `dtype` at dst with Random(seed) values rounded to the dtype.
void FillRandom(void* dst, DType dtype, int64_t n, uint64_t seed);

// The same values as FillRandom(dtype), as f32 (what the baseline computes on).
void FillRandomAsF32(float* dst, DType dtype, int64_t n, uint64_t seed);

// Element i of a float tensor (f32, bf16 or f16) as f32.
float ToFloat(const void* data, DType dtype, int64_t i);

// A random tensor of n elements of `dtype`, or of f32 holding dtype-rounded values.
AlignedBytes RandomBuffer(DType dtype, int64_t n, uint64_t seed, bool as_f32);

// Normal-ish values with mean 0 and variance 1: the sum of four uniforms on [-1, 1) (variance
// 4/3) times sqrt(3) / 2.
void FillNormalish(float* dst, int64_t n, Random* rng);

// An uninitialized f32 buffer of n elements in *buffer; null on allocation failure.
float* AllocateF32(int64_t n, AlignedBytes* buffer);

// x with `precision` digits after the point.
std::string Fixed(double x, int precision);

// Largest |got[i] - want[i]| over n elements; NaN when any difference is NaN.
double MaxAbsDiff(const void* got, DType dtype, const float* want, int64_t n);

// The larger of a and b, NaN when a is.
double MaxOrNaN(double a, double b);

double MillisecondsSince(std::chrono::steady_clock::time_point start);

// The ops, one per file; each checks its options, runs and prints its report, and returns the
// process exit code.
int BenchForward(const BenchOptions& o);  // bench_attention.cc
// Times a call with statistics (--stats-window, --decode-stats) and the plain call in
// alternating runs; records stats_ms, plain_ms and stats_overhead (bench_attention.cc).
Status TimeStatsOverhead(const std::function<Status()>& with_stats,
                         const std::function<Status()>& plain, const BenchOptions& o, int pairs,
                         Json* result);
int BenchBackward(const BenchOptions& o);  // bench_attention.cc
int BenchDecode(const BenchOptions& o);    // bench_decode.cc
int BenchLinear(const BenchOptions& o);    // bench_linear.cc
int BenchEvict(const BenchOptions& o);     // bench_evict.cc
int BenchApprox(const BenchOptions& o);    // bench_approx.cc
int BenchLongConv(const BenchOptions& o);  // bench_longconv.cc
int BenchSsm(const BenchOptions& o);       // bench_ssm.cc
int BenchH3(const BenchOptions& o);        // bench_longconv.cc

}  // namespace bench
}  // namespace cli
}  // namespace tessera
