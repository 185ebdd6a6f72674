// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op ssm`: DiagonalSsmScan (tessera/longconv.h) over a random stable model and
// random inputs, streamed in calls of --conv-block tokens chained through the state (the
// state-passing form: memory the state alone), and with --vs fft the same model as a one-shot
// FFT long convolution (its kernel materialized by DiagonalSsmKernel, L = N, not timed) in the
// same process: ratio of the streamed time to the one-shot time, and max_abs_diff.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

#include "bench_harness.h"
#include "tessera/longconv.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {

int BenchSsm(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  const int64_t B = o.batch, N = o.seq, C = o.channels, n = o.modes, block = o.block;
  if (B < 1 || N < 1 || C < 1 || n < 1) {
    return Fail(cmd, "expected --batch, --seq, --channels and --modes >= 1, got " +
                         std::to_string(B) + ", " + std::to_string(N) + ", " + std::to_string(C) +
                         ", " + std::to_string(n));
  }
  if (block < 1) return Fail(cmd, "--conv-block: expected >= 1, got " + std::to_string(block));
  if (!o.vs.empty() && o.vs != "fft") {
    return Fail(cmd, "--vs: expected fft with --op ssm, got '" + o.vs + "'");
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  int64_t n_u = 0, n_modes = 0, n_state = 0;
  if (!TensorElements("u [B, N, C]", {B, N, C}, &n_u, &error) ||
      !TensorElements("a [C, n, 2]", {C, n, 2}, &n_modes, &error) ||
      !TensorElements("state [B, C, n, 2]", {B, C, n, 2}, &n_state, &error)) {
    return Fail(cmd, error);
  }
  Context ctx;
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);

  AlignedBytes u_buf, y_buf, a_buf, b_buf, w_buf, state_buf;
  float* u = AllocateF32(n_u, &u_buf);
  float* y = AllocateF32(n_u, &y_buf);
  float* a = AllocateF32(n_modes, &a_buf);
  float* bm = AllocateF32(n_modes, &b_buf);
  float* w = AllocateF32(n_modes, &w_buf);
  float* state = AllocateF32(n_state, &state_buf);
  if (!u || !y || !a || !bm || !w || !state) return Fail(cmd, "cannot allocate the buffers");
  Random rng(o.seed);
  FillNormalish(u, n_u, &rng);
  FillNormalish(bm, n_modes, &rng);
  FillNormalish(w, n_modes, &rng);
  // A stable model with long and short memories: |a| from 0.9 to 0.9999, any phase; b and w
  // scaled so the output stays O(1).
  FillNormalish(a, n_modes, &rng);
  for (int64_t i = 0; i < C * n; ++i) {
    const float t = 0.5f + 0.5f * std::tanh(a[2 * i]);
    const float radius = 0.9f + 0.0999f * t, phase = a[2 * i + 1];
    a[2 * i] = radius * std::cos(phase);
    a[2 * i + 1] = radius * std::sin(phase);
  }
  const float mul = 0.3f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n_modes; ++i) bm[i] *= mul, w[i] *= mul;
  const int64_t mshape[3] = {C, n, 2}, sshape[4] = {B, C, n, 2};
  DiagonalSsmScanParams params;
  params.ssm.a = MakeContiguousView(a, DType::kF32, 3, mshape);
  params.ssm.b = MakeContiguousView(bm, DType::kF32, 3, mshape);
  params.ssm.w = MakeContiguousView(w, DType::kF32, 3, mshape);
  const TensorView state_view = MakeContiguousView(state, DType::kF32, 4, sshape);
  const auto run = [&]() -> Status {
    std::fill(state, state + n_state, 0.0f);
    DiagonalSsmScanParams call = params;
    call.state = state_view;
    for (int64_t t0 = 0; t0 < N; t0 += block) {
      const int64_t T = std::min(block, N - t0);
      call.u = MakeView3(u + t0 * C, DType::kF32, B, T, C);
      call.u.strides[0] = N * C;
      call.y = MakeView3(y + t0 * C, DType::kF32, B, T, C);
      call.y.strides[0] = N * C;
      Status st = DiagonalSsmScan(call, ctx);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  };

  Json result;
  result["op"] = "ssm";
  result["batch"] = B;
  result["seq"] = N;
  result["channels"] = C;
  result["modes"] = n;
  result["block"] = block;
  result["state_kb"] = static_cast<double>(n_state) * 4.0 / 1024.0;
  result["threads"] = threads;
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  Timing timing;
  Status st = TimeRuns(run, o.warmup, o.reps, &timing);
  if (!st.ok()) return Fail(cmd, st.ToString());
  result["ms"] = timing.median_ms;
  result["ms_min"] = timing.min_ms;
  result["reps"] = timing.reps;
  result["tokens_per_s"] = static_cast<double>(B * N) / (timing.median_ms * 1e-3);
  // Mode updates per second: about 10 flops each (x = a x + b u, y += Re(w x)).
  result["gflops"] = 10.0 * static_cast<double>(B * N) * C * n / (timing.median_ms * 1e-3) * 1e-9;
  result["peak_rss_mb"] = PeakRssMiB();

  if (o.vs == "fft") {
    AlignedBytes h_buf, yf_buf;
    float* h = AllocateF32(N * C, &h_buf);
    float* yf = AllocateF32(n_u, &yf_buf);
    if (!h || !yf) return Fail(cmd, "--vs fft: cannot allocate the kernel and the output");
    const int64_t hshape[2] = {N, C};
    LongConvParams conv;
    conv.u = MakeView3(u, DType::kF32, B, N, C);
    conv.filter = MakeContiguousView(h, DType::kF32, 2, hshape);
    conv.y = MakeView3(yf, DType::kF32, B, N, C);
    conv.path = LongConvPath::kFft;
    const auto start = std::chrono::steady_clock::now();
    st = DiagonalSsmKernel(params.ssm, conv.filter, ctx);
    if (!st.ok()) return Fail(cmd, "--vs fft: " + st.ToString());
    result["kernel_ms"] = MillisecondsSince(start);
    Timing fft;
    st = TimeRuns([&] { return LongConv1D(conv, ctx); }, o.warmup, o.reps, &fft);
    if (!st.ok()) return Fail(cmd, "--vs fft: " + st.ToString());
    double diff = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n_u; ++i) {
      diff = MaxOrNaN(std::abs(static_cast<double>(y[i]) - yf[i]), diff);
      scale = std::max(scale, std::abs(static_cast<double>(yf[i])));
    }
    result["baseline"] = "fft";
    result["baseline_ms"] = fft.median_ms;
    result["baseline_reps"] = fft.reps;
    result["ratio"] = timing.median_ms / fft.median_ms;  // streamed / one-shot
    result["max_abs_diff"] = scale > 0.0 ? diff / scale : diff;
    result["baseline_kernel_mb"] = static_cast<double>(N * C) * 4.0 / (1024.0 * 1024.0);
    result["process_peak_rss_mb"] = PeakRssMiB();
  }
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=ssm B=" << B << " N=" << N << " C=" << C << " modes=" << n
            << " block=" << block << " threads=" << threads << "\n\n";
  std::printf("%-22s %10s %10s %5s\n", "impl", "median ms", "min ms", "reps");
  std::printf("%-22s %10.3f %10.3f %5d\n", "tessera ssm scan", timing.median_ms, timing.min_ms,
              timing.reps);
  if (o.vs == "fft") {
    std::printf("%-22s %10.3f %10s %5d\n", "one-shot fft (L = N)",
                result["baseline_ms"].get<double>(), "", result["baseline_reps"].get<int>());
    std::printf(
        "\nstreamed / one-shot %.3f, max_abs_diff %.3g of the output's scale; state %.1f KiB, "
        "the one-shot kernel %.1f MiB\n",
        result["ratio"].get<double>(), result["max_abs_diff"].get<double>(),
        result["state_kb"].get<double>(), result["baseline_kernel_mb"].get<double>());
  }
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
