// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op longconv`: LongConv1D (tessera/longconv.h) on random inputs, by a chosen
// path (auto, direct, fft, or stream: LongConvStream in blocks of --conv-block tokens), and with
// --vs direct the direct O(N L) sum in the same process: speedup and max_abs_diff relative to the
// output's scale (max |y_direct|).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "bench_harness.h"
#include "tessera/longconv.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {

int BenchLongConv(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  const int64_t B = o.batch, N = o.seq, C = o.channels;
  const int64_t L = o.filter_len == 0 ? N : o.filter_len;
  if (B < 1 || N < 1 || C < 1) {
    return Fail(cmd, "expected --batch, --seq and --channels >= 1, got " + std::to_string(B) +
                         ", " + std::to_string(N) + ", " + std::to_string(C));
  }
  if (L < 1 || L > N) {
    return Fail(cmd, "--filter-len: expected a length in [1, --seq " + std::to_string(N) +
                         "] (0: --seq), got " + std::to_string(o.filter_len));
  }
  if (o.lc_path != "auto" && o.lc_path != "direct" && o.lc_path != "fft" && o.lc_path != "stream") {
    return Fail(cmd, "--conv-path: expected auto, direct, fft or stream, got '" + o.lc_path + "'");
  }
  if (o.block < 1) return Fail(cmd, "--conv-block: expected >= 1, got " + std::to_string(o.block));
  if (!o.vs.empty() && o.vs != "direct") {
    return Fail(cmd, "--vs: expected direct with --op longconv, got '" + o.vs + "'");
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  int64_t n_u = 0, n_h = 0;
  if (!TensorElements("u [B, N, C]", {B, N, C}, &n_u, &error) ||
      !TensorElements("filter [L, C]", {L, C}, &n_h, &error)) {
    return Fail(cmd, error);
  }
  Context ctx;
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);

  AlignedBytes u_buf, h_buf, y_buf, d_buf;
  float* u = AllocateF32(n_u, &u_buf);
  float* h = AllocateF32(n_h, &h_buf);
  float* y = AllocateF32(n_u, &y_buf);
  if (u == nullptr || h == nullptr || y == nullptr) {
    return Fail(cmd, "cannot allocate the inputs and output");
  }
  Random rng(o.seed);
  FillNormalish(u, n_u, &rng);
  FillNormalish(h, n_h, &rng);
  // A decaying filter, as the long-convolution models learn: the output's scale stays O(1).
  for (int64_t s = 0; s < L; ++s) {
    const float w = std::exp(-3.0f * static_cast<float>(s) / static_cast<float>(L));
    for (int64_t c = 0; c < C; ++c) h[s * C + c] *= w / std::sqrt(static_cast<float>(L) / 8);
  }
  LongConvParams params;
  params.u = MakeView3(u, DType::kF32, B, N, C);
  const int64_t hshape[2] = {L, C};
  params.filter = MakeContiguousView(h, DType::kF32, 2, hshape);
  params.y = MakeView3(y, DType::kF32, B, N, C);
  params.path = o.lc_path == "direct" ? LongConvPath::kDirect
                : o.lc_path == "fft"  ? LongConvPath::kFft
                                      : LongConvPath::kAuto;
  std::unique_ptr<LongConvStream> stream;
  const bool streamed = o.lc_path == "stream";
  if (streamed) {
    Status st = LongConvStream::Create(params.filter, params.bias, o.block, B, &stream);
    if (!st.ok()) return Fail(cmd, st.ToString());
  }
  const auto run = [&]() -> Status {
    if (!streamed) return LongConv1D(params, ctx);
    stream->Reset();
    for (int64_t t0 = 0; t0 < N; t0 += o.block) {
      TensorView ub = params.u, yb = params.y;
      const int64_t T = std::min(o.block, N - t0);
      ub.data = u + t0 * C;
      yb.data = y + t0 * C;
      ub.shape[1] = yb.shape[1] = T;
      Status st = stream->Push(ub, yb, ctx);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  };

  Json result;
  result["op"] = "longconv";
  result["conv_path"] = o.lc_path;
  result["batch"] = B;
  result["seq"] = N;
  result["channels"] = C;
  result["filter_len"] = L;
  if (streamed) {
    result["block"] = o.block;
    result["state_mb"] = static_cast<double>(stream->state_bytes()) / (1024.0 * 1024.0);
  }
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
  result["peak_rss_mb"] = PeakRssMiB();

  if (o.vs == "direct") {
    AlignedBytes yd_buf;
    float* yd = AllocateF32(n_u, &yd_buf);
    if (yd == nullptr) return Fail(cmd, "--vs direct: cannot allocate the output");
    LongConvParams direct = params;
    direct.y = MakeView3(yd, DType::kF32, B, N, C);
    direct.path = LongConvPath::kDirect;
    Timing direct_timing;
    // No warm-up: the first run times itself, the others as many as fit in a few seconds.
    st = TimeRuns([&] { return LongConv1D(direct, ctx); }, 0, 0, &direct_timing,
                  AutoReps{2.0, 1, std::max(timing.reps, 1)});
    if (!st.ok()) return Fail(cmd, "--vs direct: " + st.ToString());
    double diff = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n_u; ++i) {
      diff = MaxOrNaN(std::abs(static_cast<double>(y[i]) - yd[i]), diff);
      scale = std::max(scale, std::abs(static_cast<double>(yd[i])));
    }
    result["baseline"] = "direct";
    result["baseline_ms"] = direct_timing.median_ms;
    result["baseline_reps"] = direct_timing.reps;
    result["speedup"] = direct_timing.median_ms / timing.median_ms;
    result["max_abs_diff"] = scale > 0.0 ? diff / scale : diff;
    result["output_scale"] = scale;
  }
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=longconv path=" << o.lc_path << " B=" << B << " N=" << N
            << " C=" << C << " L=" << L;
  if (streamed) std::cout << " block=" << o.block;
  std::cout << " threads=" << threads << "\n\n";
  std::printf("%-18s %10s %10s %5s\n", "impl", "median ms", "min ms", "reps");
  std::printf("%-18s %10.3f %10.3f %5d\n", "tessera longconv", timing.median_ms, timing.min_ms,
              timing.reps);
  if (o.vs == "direct") {
    std::printf("%-18s %10.3f %10s %5d\n", "direct", result["baseline_ms"].get<double>(), "",
                result["baseline_reps"].get<int>());
    std::printf("\nspeedup %.2fx over the direct sum, max_abs_diff %.3g of the output's scale\n",
                result["speedup"].get<double>(), result["max_abs_diff"].get<double>());
  }
  if (streamed) std::printf("stream state %.2f MiB\n", result["state_mb"].get<double>());
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
