// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op approx`: an approximate method (tessera/approx.h) timed next to the exact
// kernel on the same inputs, with the error of its output measured in the same run.
//
// Everything the method needs (random features, hashing, sorting, gathers, k-means) is inside the
// timed call. `--vs exact` also times AttentionForward (same causal flag, f32, same inputs, as
// many runs) and reports speedup = baseline_ms / ms, rel_error = |O - O_exact|_F / |O_exact|_F
// and, for the methods with an LSE (hyper, routing, hilo), lse_error = the largest
// |lse - lse_exact| over the rows where both are finite (natural log), and lse_error_mean.
//
// Inputs (--inputs): random = normal-ish q, k, v (FillNormalish); peaked = keys clustered around
// 8 unit directions per KV head (key j near direction j mod 8, times sqrt(4 sqrt(D)), plus unit
// noise) and queries near one of the same directions, so each query's attention concentrates
// on one cluster of keys (+4 on its logits): what trained models' attention looks like.
// Routing's centroids: CentroidsFromKeys, then 3 k-means steps through routing's own update
// (ema 0); WERSA runs with unit gates.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "approx_options.h"
#include "bench_harness.h"
#include "tessera/approx.h"
#include "tessera/attention.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

constexpr int64_t kPeakDirections = 8;
constexpr int kLloydSteps = 3;  // k-means steps of routing's centroids before the timed runs

// q [B, N, Hq, D], k, v [B, N, Hkv, D] for --inputs.
void FillInputs(const std::string& inputs, int64_t B, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
                uint64_t seed, float* q, float* k, float* v) {
  Random rng(seed);
  FillNormalish(q, B * N * Hq * D, &rng);
  FillNormalish(k, B * N * Hkv * D, &rng);
  FillNormalish(v, B * N * Hkv * D, &rng);
  if (inputs != "peaked") return;
  // Unit directions per KV head.
  std::vector<float> dirs(static_cast<size_t>(Hkv * kPeakDirections * D));
  FillNormalish(dirs.data(), static_cast<int64_t>(dirs.size()), &rng);
  for (int64_t i = 0; i < Hkv * kPeakDirections; ++i) {
    float* u = &dirs[static_cast<size_t>(i * D)];
    double norm = 0.0;
    for (int64_t d = 0; d < D; ++d) norm += double(u[d]) * u[d];
    for (int64_t d = 0; d < D; ++d) u[d] = static_cast<float>(u[d] / std::sqrt(norm));
  }
  const float amp = static_cast<float>(std::sqrt(4.0 * std::sqrt(static_cast<double>(D))));
  const int64_t group = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* u =
            &dirs[static_cast<size_t>((h * kPeakDirections + t % kPeakDirections) * D)];
        float* row = k + ((b * N + t) * Hkv + h) * D;
        for (int64_t d = 0; d < D; ++d) row[d] += amp * u[d];
      }
      for (int64_t h = 0; h < Hq; ++h) {
        // A direction that changes every 64 tokens: queries near each other share a cluster.
        const int64_t c = (t / 64 + h) % kPeakDirections;
        const float* u = &dirs[static_cast<size_t>(((h / group) * kPeakDirections + c) * D)];
        float* row = q + ((b * N + t) * Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) row[d] += amp * u[d];
      }
    }
  }
}

}  // namespace

int BenchApprox(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  Context ctx;
  if (!o.vs.empty() && o.vs != "exact") {
    return Fail(cmd,
                "--vs: expected 'exact' with --op approx (tessera's exact attention on the "
                "same inputs), got '" +
                    o.vs + "'");
  }
  if (o.dtype != "f32") {
    return Fail(cmd, "--dtype: expected f32 with --op approx (the methods compute in f32), got '" +
                         o.dtype + "'");
  }
  if (o.inputs != "random" && o.inputs != "peaked") {
    return Fail(cmd, "--inputs: expected random or peaked, got '" + o.inputs + "'");
  }
  const int64_t Hkv = o.kv_heads == 0 ? o.heads : o.kv_heads;
  if (o.batch < 1 || o.heads < 1 || o.kv_heads < 0 || o.dim < 1 || o.seq < 1) {
    return Fail(cmd, "expected --batch, --heads, --dim, --seq >= 1 and --kv-heads >= 0");
  }
  if (o.heads % Hkv != 0) {
    return Fail(cmd, "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) +
                         ", got " + std::to_string(Hkv));
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  const int64_t B = o.batch, N = o.seq, Hq = o.heads, D = o.dim;
  int64_t q_elems = 0;
  if (!TensorElements("the queries [B, N, Hq, D]", {B, N, Hq, D}, &q_elems, &error)) {
    return Fail(cmd, error);
  }
  ApproxKnobs knobs = o.approx;
  const bool window_given = !o.window.empty();
  if (window_given && !ParseNonNegative("--window", o.window, &knobs.window, &error)) {
    return Fail(cmd, error);
  }
  ApproxParams params;
  if (!ApplyApproxKnobs(knobs, window_given, N, Hq, &params, &error)) return Fail(cmd, error);
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);
  const bool vs_exact = o.vs == "exact";
  const double peak = vs_exact ? MeasureFmaPeakGflops(threads, kPeakProbeSeconds) : 0.0;

  const int64_t kv_elems = B * N * Hkv * D;
  AlignedBytes qb, kb, vb, ob, lb;
  float* q = AllocateF32(q_elems, &qb);
  float* k = AllocateF32(kv_elems, &kb);
  float* v = AllocateF32(kv_elems, &vb);
  float* out = AllocateF32(q_elems, &ob);
  const bool has_lse = params.method == ApproxMethod::kHyper ||
                       params.method == ApproxMethod::kRouting ||
                       params.method == ApproxMethod::kHiLo;
  float* lse = has_lse ? AllocateF32(B * Hq * N, &lb) : nullptr;
  if (!q || !k || !v || !out || (has_lse && !lse)) {
    return Fail(cmd, "cannot allocate the inputs and output");
  }
  FillInputs(o.inputs, B, N, Hq, Hkv, D, o.seed, q, k, v);
  params.q = MakeView4(q, DType::kF32, B, N, Hq, D);
  params.k = MakeView4(k, DType::kF32, B, N, Hkv, D);
  params.v = MakeView4(v, DType::kF32, B, N, Hkv, D);
  params.out = MakeView4(out, DType::kF32, B, N, Hq, D);
  if (has_lse) params.lse = MakeView3(lse, DType::kF32, B, Hq, N);
  params.causal = o.causal;
  params.seed = o.seed;
  std::vector<float> centroids;
  if (params.method == ApproxMethod::kRouting) {
    // Centroids as training would leave them: kLloydSteps k-means steps (routing with ema 0
    // writes each cluster's mean) from CentroidsFromKeys, before the timed runs.
    const int64_t C = params.routing.clusters;
    centroids = CentroidsFromKeys(k, N, Hq, Hkv, D, C);
    if (C >= 1 && C <= N) {
      std::vector<float> next(centroids.size());
      ApproxParams step = params;
      step.lse = TensorView();
      step.routing.ema = 0.0f;
      for (int i = 0; i < kLloydSteps; ++i) {
        step.routing.centroids = MakeView3(centroids.data(), DType::kF32, Hq, C, D);
        step.routing.updated_centroids = MakeView3(next.data(), DType::kF32, Hq, C, D);
        const Status s = ApproxAttention(step, ctx);
        if (!s.ok()) return Fail(cmd, s.ToString());
        // The means are not unit vectors; routing scores against them as given.
        centroids.swap(next);
      }
    }
    params.routing.centroids = MakeView3(centroids.data(), DType::kF32, Hq, C, D);
  }

  Json result;
  result["op"] = "approx";
  result["method"] = ApproxMethodName(params.method);
  result["inputs"] = o.inputs;
  result["batch"] = B;
  result["heads"] = Hq;
  result["kv_heads"] = Hkv;
  result["seq"] = N;
  result["dim"] = D;
  result["causal"] = o.causal;
  result["seed"] = o.seed;
  result["threads"] = threads;
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  switch (params.method) {
    case ApproxMethod::kWersa:
      result["features"] = params.wersa.features;
      result["levels"] = params.wersa.levels;
      result["bandwidth"] = params.wersa.bandwidth;
      break;
    case ApproxMethod::kPerformer:
      result["features"] = params.performer.features;
      break;
    case ApproxMethod::kHyper:
      result["block"] = params.hyper.block;
      result["samples"] = params.hyper.samples;
      result["lsh_bits"] = params.hyper.lsh_bits;
      result["min_seq_len"] = params.hyper.min_seq_len;
      break;
    case ApproxMethod::kAgent:
      result["agents"] = params.agent.agents;
      break;
    case ApproxMethod::kRouting:
      result["clusters"] = params.routing.clusters;
      result["window"] = params.routing.window;
      result["lloyd_steps"] = kLloydSteps;
      break;
    case ApproxMethod::kHiLo:
      result["grid"] =
          std::to_string(params.hilo.grid_h) + "x" + std::to_string(params.hilo.grid_w);
      result["window"] = params.hilo.window;
      result["lofi_heads"] = params.hilo.lofi_heads;
      break;
  }

  Timing timing;
  Status st = TimeRuns([&] { return ApproxAttention(params, ctx); }, o.warmup, o.reps, &timing);
  if (!st.ok()) return Fail(cmd, st.ToString());
  const double tokens = static_cast<double>(B * N);
  result["ms"] = timing.median_ms;
  result["ms_min"] = timing.min_ms;
  result["reps"] = timing.reps;
  result["warmup"] = o.warmup;
  result["tokens_per_s"] = tokens / (timing.median_ms * 1e-3);
  result["peak_rss_mb"] = PeakRssMiB();  // before the baseline allocates anything

  if (vs_exact) {
    AlignedBytes eob, elb;
    float* exact_out = AllocateF32(q_elems, &eob);
    float* exact_lse = AllocateF32(B * Hq * N, &elb);
    if (!exact_out || !exact_lse) return Fail(cmd, "--vs exact: cannot allocate the output");
    AttentionParams exact;
    exact.q = params.q;
    exact.k = params.k;
    exact.v = params.v;
    exact.out = MakeView4(exact_out, DType::kF32, B, N, Hq, D);
    exact.lse = MakeView3(exact_lse, DType::kF32, B, Hq, N);
    exact.causal = o.causal;
    exact.scale = params.scale;
    Timing exact_timing;
    st = TimeRuns([&] { return AttentionForward(exact, ctx); }, o.warmup, timing.reps,
                  &exact_timing);
    if (!st.ok()) return Fail(cmd, "--vs exact: " + st.ToString());
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < q_elems; ++i) {
      const double d = double(out[i]) - exact_out[i];
      num += d * d;
      den += double(exact_out[i]) * exact_out[i];
    }
    const double exact_flops = (o.causal ? 2.0 : 4.0) * static_cast<double>(B * Hq) *
                               static_cast<double>(N) * static_cast<double>(N) *
                               static_cast<double>(D);
    const double exact_gflops = exact_flops / (exact_timing.median_ms * 1e-3) * 1e-9;
    result["baseline"] = "exact";
    result["baseline_ms"] = exact_timing.median_ms;
    result["baseline_ms_min"] = exact_timing.min_ms;
    result["baseline_reps"] = exact_timing.reps;
    result["baseline_gflops"] = exact_gflops;
    result["peak_gflops"] = peak;
    result["baseline_frac_peak"] = peak > 0.0 ? exact_gflops / peak : 0.0;
    result["speedup"] = exact_timing.median_ms / timing.median_ms;
    result["rel_error"] = den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
    if (has_lse) {
      double worst = 0.0, sum = 0.0;
      int64_t rows = 0;
      for (int64_t i = 0; i < B * Hq * N; ++i) {
        if (!std::isfinite(lse[i]) || !std::isfinite(exact_lse[i])) continue;
        const double d = std::abs(double(lse[i]) - exact_lse[i]);
        worst = std::max(worst, d);
        sum += d;
        ++rows;
      }
      result["lse_error"] = worst;
      result["lse_error_mean"] = rows > 0 ? sum / static_cast<double>(rows) : 0.0;
    }
    result["process_peak_rss_mb"] = PeakRssMiB();
  }

  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=approx method=" << ApproxMethodName(params.method)
            << " inputs=" << o.inputs << " B=" << B << " H=" << Hq << " Hkv=" << Hkv << " N=" << N
            << " D=" << D << " causal=" << (o.causal ? "yes" : "no") << " threads=" << threads
            << "\n\n";
  std::printf("%-16s %10s %10s %5s %12s\n", "impl", "median ms", "min ms", "reps", "tokens/s");
  std::printf("%-16s %10.2f %10.2f %5d %12.0f\n", ApproxMethodName(params.method), timing.median_ms,
              timing.min_ms, timing.reps, tokens / (timing.median_ms * 1e-3));
  if (vs_exact) {
    const double ems = result["baseline_ms"].get<double>();
    std::printf("%-16s %10.2f %10.2f %5d %12.0f\n", "exact", ems,
                result["baseline_ms_min"].get<double>(), result["baseline_reps"].get<int>(),
                tokens / (ems * 1e-3));
    std::printf("\nspeedup %.2fx over exact %s attention, rel_error %.3g",
                result["speedup"].get<double>(), o.causal ? "causal" : "non-causal",
                result["rel_error"].get<double>());
    if (has_lse) std::printf(", lse_error %.3g", result["lse_error"].get<double>());
    std::printf("\n");
  }
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
