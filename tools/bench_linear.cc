// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op linear`: linear attention (LinearAttentionForward, or the recurrent form)
// on random inputs next to the measured FMA peak, and with --vs exact tessera's exact attention.
//
// Linear attention (--op linear, tessera/linear.h) is linear in the sequence length, so it reports
// tokens/s (B * N over the median time) next to ms. Its inputs are normal-ish (q, k, v;
// FillNormalish), the decay variant's rates are RetNet's per-head lambda_h = 1 - 2^(-5 - 4h / (H -
// 1)), and the gla variant's gates are log-sigmoid of normal-ish values over 16 (GLA's gate
// normalizer), so the per-token decay looks like a trained model's. Its FLOPs count the recurrent
// form's work: per token and query head 4 * F * Dv for phi(q) S and the state update (plus 4 * F
// with --normalize), and 2 * (Dk + Dv) per (query, key) pair of BASED's exact window; with --lrpe
// (angles theta_f = 10000^(-f / Dk), RoPE's frequencies, shared by the heads) F = 2 Dk, so the
// count doubles (the cos / sin features themselves are not counted). `--vs exact`
// times tessera's exact AttentionForward on the same B / N / H / Hkv with head dim --dim in f32
// (causal when the linear call is), as many runs, and reports speedup = baseline_ms / ms: where
// linear attention starts to pay off.
#include "bench_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "tessera/attention.h"
#include "tessera/linear.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {

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

std::vector<float> RetNetDecayRates(int64_t heads) {
  std::vector<float> lambdas;
  for (int64_t h = 0; h < heads; ++h) {
    const double t = heads > 1 ? static_cast<double>(h) / static_cast<double>(heads - 1) : 0.0;
    lambdas.push_back(static_cast<float>(1.0 - std::exp2(-5.0 - 4.0 * t)));
  }
  return lambdas;
}

double LinearFlops(double batch_heads, double tokens, int64_t feature_dim, int64_t dim_v,
                   bool normalize, double window_pairs, int64_t dim_k) {
  const double f = static_cast<double>(feature_dim);
  return batch_heads * tokens * (4.0 * f * dim_v + (normalize ? 4.0 * f : 0.0)) +
         batch_heads * window_pairs * 2.0 * static_cast<double>(dim_k + dim_v);
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
  // LRPE doubles phi's features: not the Taylor map's, not under gates (the library refuses both;
  // the flags are named here, before the peak probe).
  if (o.lrpe && choice.variant == LinearVariant::kGla) {
    return Fail(cmd, "--lrpe: not with --variant gla (the gates act on the Dk key channels)");
  }
  if (o.lrpe && choice.feature_map == LinearFeatureMap::kTaylor2) {
    return Fail(cmd, "--lrpe: expected the identity, elu1 or relu feature map, got taylor2" +
                         std::string(based ? " (--variant based)" : ""));
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
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  const int64_t B = o.batch, N = o.seq, H = o.heads;
  const int64_t Dk = based ? (o.feature_dim > 0 ? o.feature_dim : kBasedFeatureDim) : o.dim;
  const int64_t Dv = o.dim_v > 0 ? o.dim_v : o.dim;
  // k and v have at most q's and out's elements (Hkv <= Hq); the Taylor map has Dk^2 features.
  int64_t q_elems = 0, out_elems = 0, unused = 0;
  if (!TensorElements("the queries [B, N, Hq, Dk]", {B, N, H, Dk}, &q_elems, &error) ||
      !TensorElements("the output [B, N, Hq, Dv]", {B, N, H, Dv}, &out_elems, &error) ||
      (choice.feature_map == LinearFeatureMap::kTaylor2 &&
       !TensorElements("the Taylor features [Dk, Dk]", {Dk, Dk}, &unused, &error)) ||
      (o.vs == "exact" && !TensorElements("the exact baseline's queries [B, N, Hq, D]",
                                          {B, N, H, o.dim}, &unused, &error))) {
    return Fail(cmd, error);
  }
  const int64_t F = LinearFeatureDim(choice.feature_map, Dk, o.lrpe);
  if (!TensorElements("the state [B, Hq, F, Dv]", {B, H, F, Dv}, &unused, &error)) {
    return Fail(cmd, error);
  }
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
      LinearFlops(bh, static_cast<double>(N), F, Dv, choice.normalize, window_pairs, Dk);
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
  result["lrpe"] = o.lrpe;
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

  const int64_t k_elems = B * N * kv_heads * Dk, v_elems = B * N * kv_heads * Dv;
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
    lambdas = RetNetDecayRates(H);
    result["decay"] = lambdas;
  }
  std::vector<float> theta;
  if (o.lrpe) {
    for (int64_t f = 0; f < Dk; ++f) {
      theta.push_back(
          static_cast<float>(std::pow(10000.0, -static_cast<double>(f) / static_cast<double>(Dk))));
    }
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
  if (!theta.empty()) params.lrpe_theta = MakeView1(theta.data(), DType::kF32, Dk);

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
            << " Dv=" << Dv << " phi=" << FeatureMapName(choice.feature_map)
            << " lrpe=" << (o.lrpe ? "yes" : "no") << " F=" << F
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

}  // namespace bench
}  // namespace cli
}  // namespace tessera
