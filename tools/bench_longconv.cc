// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op longconv`: LongConv1D (tessera/longconv.h) on random inputs, by a chosen
// path (auto, direct, fft, or stream: LongConvStream in blocks of --conv-block tokens), and with
// --vs direct the direct O(N L) sum in the same process: speedup and max_abs_diff relative to the
// output's scale (max |y_direct|). With --backward, LongConv1DBackward (du and dfilter) instead:
// ms is the backward's, forward_ms the forward's, and --vs direct compares the direct path's
// backward (max_abs_diff: the larger of du's and dfilter's, each relative to its own scale).
//
// `tessera bench --op h3`: H3Layer (or with --backward H3LayerBackward, every gradient) on random
// q, k, v [B, N, H, d] with decaying filters, and with --vs direct the same call on the direct
// path.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "tessera/longconv.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

// A decaying filter [L, C], as the long-convolution models learn: exp(-3 s / L) on normal-ish
// taps, scaled so that the output's scale stays O(1).
void DecayFilter(float* h, int64_t L, int64_t C) {
  for (int64_t s = 0; s < L; ++s) {
    const float w = std::exp(-3.0f * static_cast<float>(s) / static_cast<float>(L));
    for (int64_t c = 0; c < C; ++c) h[s * C + c] *= w / std::sqrt(static_cast<float>(L) / 8);
  }
}

// max |got - want| / max |want| over n elements (the absolute difference when want is all
// zero); *scale gets max |want|. NaN when a difference is.
double RelativeDiff(const float* got, const float* want, int64_t n, double* scale) {
  double diff = 0.0;
  *scale = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    diff = MaxOrNaN(std::abs(static_cast<double>(got[i]) - want[i]), diff);
    *scale = std::max(*scale, std::abs(static_cast<double>(want[i])));
  }
  return *scale > 0.0 ? diff / *scale : diff;
}

bool ParseBenchConvPath(const std::string& text, bool allow_stream, LongConvPath* path,
                        std::string* error) {
  if (text == "auto" || (allow_stream && text == "stream")) {
    *path = LongConvPath::kAuto;
  } else if (text == "direct") {
    *path = LongConvPath::kDirect;
  } else if (text == "fft") {
    *path = LongConvPath::kFft;
  } else {
    *error = std::string("--conv-path: expected ") +
             (allow_stream ? "auto, direct, fft or stream" : "auto, direct or fft") + ", got '" +
             text + "'";
    return false;
  }
  return true;
}

// One output of a timed call and its copy from the direct path, for max_abs_diff.
struct Compared {
  const float* got;
  const float* direct;
  int64_t n;
};

// --vs direct: times `direct_call` (no warm-up, about 2 s worth, at most as many runs as the
// timed path had) and records the baseline's keys: speedup over `timing` and max_abs_diff, the
// largest over `outputs` of the difference relative to each output's scale.
Status CompareWithDirect(const std::function<Status()>& direct_call, const Timing& timing,
                         const std::vector<Compared>& outputs, Json* result) {
  Timing direct_timing;
  Status st =
      TimeRuns(direct_call, 0, 0, &direct_timing, AutoReps{2.0, 1, std::max(timing.reps, 1)});
  if (!st.ok()) return st;
  double diff = 0.0, largest_scale = 0.0;
  for (const Compared& c : outputs) {
    double scale = 0.0;
    diff = MaxOrNaN(RelativeDiff(c.got, c.direct, c.n, &scale), diff);
    largest_scale = std::max(largest_scale, scale);
  }
  (*result)["baseline"] = "direct";
  (*result)["baseline_ms"] = direct_timing.median_ms;
  (*result)["baseline_reps"] = direct_timing.reps;
  (*result)["speedup"] = direct_timing.median_ms / timing.median_ms;
  (*result)["max_abs_diff"] = diff;
  (*result)["output_scale"] = largest_scale;
  return Status::Ok();
}

// The text report's table: the timed call and, with --vs direct, the baseline.
void PrintTable(const char* name, const Timing& timing, const Json& result, bool backward) {
  std::printf("%-22s %10s %10s %5s\n", "impl", "median ms", "min ms", "reps");
  std::printf("%-22s %10.3f %10.3f %5d\n", name, timing.median_ms, timing.min_ms, timing.reps);
  if (backward) std::printf("%-22s %10.3f\n", "(forward)", result["forward_ms"].get<double>());
  if (result.contains("baseline")) {
    std::printf("%-22s %10.3f %10s %5d\n", "direct", result["baseline_ms"].get<double>(), "",
                result["baseline_reps"].get<int>());
    std::printf("\nspeedup %.2fx over the direct sum, max_abs_diff %.3g of the output's scale\n",
                result["speedup"].get<double>(), result["max_abs_diff"].get<double>());
  }
}

}  // namespace

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
  LongConvPath path = LongConvPath::kAuto;
  if (!ParseBenchConvPath(o.lc_path, true, &path, &error)) return Fail(cmd, error);
  const bool streamed = o.lc_path == "stream";
  if (streamed && o.backward) {
    return Fail(cmd,
                "--backward: the stream has no backward; expected --conv-path auto, direct or fft");
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
  DecayFilter(h, L, C);
  LongConvParams params;
  params.u = MakeView3(u, DType::kF32, B, N, C);
  const int64_t hshape[2] = {L, C};
  params.filter = MakeContiguousView(h, DType::kF32, 2, hshape);
  params.y = MakeView3(y, DType::kF32, B, N, C);
  params.path = path;
  std::unique_ptr<LongConvStream> stream;
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

  // The backward's buffers: dy random like u, du and dfilter written.
  AlignedBytes dy_buf, du_buf, dh_buf;
  LongConvBackwardParams bparams;
  if (o.backward) {
    float* dy = AllocateF32(n_u, &dy_buf);
    float* du = AllocateF32(n_u, &du_buf);
    float* dh = AllocateF32(n_h, &dh_buf);
    if (dy == nullptr || du == nullptr || dh == nullptr) {
      return Fail(cmd, "cannot allocate the backward's buffers");
    }
    FillNormalish(dy, n_u, &rng);
    bparams.forward = params;
    bparams.dy = MakeView3(dy, DType::kF32, B, N, C);
    bparams.du = MakeView3(du, DType::kF32, B, N, C);
    bparams.dfilter = MakeContiguousView(dh, DType::kF32, 2, hshape);
  }

  Json result;
  result["op"] = "longconv";
  result["conv_path"] = o.lc_path;
  result["backward"] = o.backward;
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
  if (o.backward) {
    result["forward_ms"] = timing.median_ms;
    st = TimeRuns([&] { return LongConv1DBackward(bparams, ctx); }, o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
  }
  result["ms"] = timing.median_ms;
  result["ms_min"] = timing.min_ms;
  result["reps"] = timing.reps;
  result["tokens_per_s"] = static_cast<double>(B * N) / (timing.median_ms * 1e-3);
  result["peak_rss_mb"] = PeakRssMiB();

  if (o.vs == "direct") {
    // The direct path's results in buffers of their own.
    AlignedBytes yd_buf, dud_buf, dhd_buf;
    float* yd = AllocateF32(o.backward ? 0 : n_u, &yd_buf);
    float* dud = AllocateF32(o.backward ? n_u : 0, &dud_buf);
    float* dhd = AllocateF32(o.backward ? n_h : 0, &dhd_buf);
    if (yd == nullptr || dud == nullptr || dhd == nullptr) {
      return Fail(cmd, "--vs direct: cannot allocate the direct path's outputs");
    }
    std::function<Status()> direct_call;
    std::vector<Compared> compared;
    LongConvParams direct = params;
    direct.path = LongConvPath::kDirect;
    LongConvBackwardParams direct_backward = bparams;
    if (o.backward) {
      direct_backward.forward.path = LongConvPath::kDirect;
      direct_backward.du = MakeView3(dud, DType::kF32, B, N, C);
      direct_backward.dfilter = MakeContiguousView(dhd, DType::kF32, 2, hshape);
      direct_call = [&] { return LongConv1DBackward(direct_backward, ctx); };
      compared = {{static_cast<const float*>(bparams.du.data), dud, n_u},
                  {static_cast<const float*>(bparams.dfilter.data), dhd, n_h}};
    } else {
      direct.y = MakeView3(yd, DType::kF32, B, N, C);
      direct_call = [&] { return LongConv1D(direct, ctx); };
      compared = {{y, yd, n_u}};
    }
    st = CompareWithDirect(direct_call, timing, compared, &result);
    if (!st.ok()) return Fail(cmd, "--vs direct: " + st.ToString());
  }
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=longconv" << (o.backward ? " backward" : "")
            << " path=" << o.lc_path << " B=" << B << " N=" << N << " C=" << C << " L=" << L;
  if (streamed) std::cout << " block=" << o.block;
  std::cout << " threads=" << threads << "\n\n";
  PrintTable(o.backward ? "tessera longconv bwd" : "tessera longconv", timing, result, o.backward);
  if (streamed) std::printf("stream state %.2f MiB\n", result["state_mb"].get<double>());
  std::fflush(stdout);
  return kExitOk;
}

int BenchH3(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  const int64_t B = o.batch, N = o.seq, H = o.heads, d = o.dim;
  const int64_t L = o.filter_len == 0 ? N : o.filter_len, Ls = o.shift_len;
  if (B < 1 || N < 1 || H < 1 || d < 1) {
    return Fail(cmd, "expected --batch, --seq, --heads and --dim >= 1, got " + std::to_string(B) +
                         ", " + std::to_string(N) + ", " + std::to_string(H) + ", " +
                         std::to_string(d));
  }
  if (L < 1 || L > N) {
    return Fail(cmd, "--filter-len: expected a length in [1, --seq " + std::to_string(N) +
                         "] (0: --seq), got " + std::to_string(o.filter_len));
  }
  if (Ls < 1 || Ls > N) {
    return Fail(cmd, "--shift-len: expected a length in [1, --seq " + std::to_string(N) +
                         "], got " + std::to_string(Ls));
  }
  H3Params params;
  if (!ParseBenchConvPath(o.lc_path, false, &params.path, &error)) return Fail(cmd, error);
  if (!o.vs.empty() && o.vs != "direct") {
    return Fail(cmd, "--vs: expected direct with --op h3, got '" + o.vs + "'");
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  if (o.warmup < 0 || o.reps < 0) return Fail(cmd, "expected --warmup and --reps >= 0");
  int64_t n_x = 0, n_sf = 0, n_hf = 0;
  if (!TensorElements("q [B, N, H, d]", {B, N, H, d}, &n_x, &error) ||
      !TensorElements("shift filter [Ls, H d]", {Ls, H, d}, &n_sf, &error) ||
      !TensorElements("ssm filter [L, H]", {L, H}, &n_hf, &error)) {
    return Fail(cmd, error);
  }
  Context ctx;
  ctx.num_threads = o.threads;
  const int32_t threads = ResolveThreads(ctx);

  // Inputs and the output, then (with --backward) dout and every gradient, each one buffer.
  struct Buffer {
    int64_t n = 0;
    AlignedBytes bytes;
    float* data = nullptr;
  };
  enum { kQ, kK, kV, kShift, kSsm, kOut, kDout, kDq, kDk, kDv, kDshift, kDssm, kBuffers };
  const int64_t sizes[kBuffers] = {n_x, n_x, n_x, n_sf, n_hf, n_x, n_x, n_x, n_x, n_x, n_sf, n_hf};
  Buffer buf[kBuffers];
  for (int i = 0; i < kBuffers; ++i) buf[i].n = sizes[i];
  const int used = o.backward ? kBuffers : kDout;
  for (int i = 0; i < used; ++i) {
    buf[i].data = AllocateF32(buf[i].n, &buf[i].bytes);
    if (buf[i].data == nullptr) return Fail(cmd, "cannot allocate the inputs and outputs");
  }
  Random rng(o.seed);
  for (int i : {kQ, kK, kV, kShift, kSsm}) FillNormalish(buf[i].data, buf[i].n, &rng);
  DecayFilter(buf[kShift].data, Ls, H * d);
  DecayFilter(buf[kSsm].data, L, H);
  const auto x_view = [&](int i) { return MakeView4(buf[i].data, DType::kF32, B, N, H, d); };
  const int64_t sf_shape[2] = {Ls, H * d}, hf_shape[2] = {L, H};
  params.q = x_view(kQ);
  params.k = x_view(kK);
  params.v = x_view(kV);
  params.shift_filter = MakeContiguousView(buf[kShift].data, DType::kF32, 2, sf_shape);
  params.ssm_filter = MakeContiguousView(buf[kSsm].data, DType::kF32, 2, hf_shape);
  params.out = x_view(kOut);
  H3BackwardParams bparams;
  if (o.backward) {
    FillNormalish(buf[kDout].data, n_x, &rng);
    bparams.forward = params;
    bparams.dout = x_view(kDout);
    bparams.dq = x_view(kDq);
    bparams.dk = x_view(kDk);
    bparams.dv = x_view(kDv);
    bparams.dshift_filter = MakeContiguousView(buf[kDshift].data, DType::kF32, 2, sf_shape);
    bparams.dssm_filter = MakeContiguousView(buf[kDssm].data, DType::kF32, 2, hf_shape);
  }

  Json result;
  result["op"] = "h3";
  result["conv_path"] = o.lc_path;
  result["backward"] = o.backward;
  result["batch"] = B;
  result["seq"] = N;
  result["heads"] = H;
  result["dim"] = d;
  result["filter_len"] = L;
  result["shift_len"] = Ls;
  result["threads"] = threads;
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  Timing timing;
  Status st = TimeRuns([&] { return H3Layer(params, ctx); }, o.warmup, o.reps, &timing);
  if (!st.ok()) return Fail(cmd, st.ToString());
  if (o.backward) {
    result["forward_ms"] = timing.median_ms;
    st = TimeRuns([&] { return H3LayerBackward(bparams, ctx); }, o.warmup, o.reps, &timing);
    if (!st.ok()) return Fail(cmd, st.ToString());
  }
  result["ms"] = timing.median_ms;
  result["ms_min"] = timing.min_ms;
  result["reps"] = timing.reps;
  result["tokens_per_s"] = static_cast<double>(B * N) / (timing.median_ms * 1e-3);
  result["peak_rss_mb"] = PeakRssMiB();

  if (o.vs == "direct") {
    // The direct path writes buffers of its own: each output of the timed call gets a twin.
    std::vector<int> outputs = {kOut};
    if (o.backward) outputs = {kDq, kDk, kDv, kDshift, kDssm};
    Buffer twin[kBuffers];
    std::vector<Compared> compared;
    for (int i : outputs) {
      twin[i].n = buf[i].n;
      twin[i].data = AllocateF32(buf[i].n, &twin[i].bytes);
      if (twin[i].data == nullptr) {
        return Fail(cmd, "--vs direct: cannot allocate the direct path's outputs");
      }
      compared.push_back({buf[i].data, twin[i].data, buf[i].n});
    }
    const auto twin_view = [&](int i) { return MakeView4(twin[i].data, DType::kF32, B, N, H, d); };
    H3Params direct = params;
    direct.path = LongConvPath::kDirect;
    H3BackwardParams direct_backward = bparams;
    std::function<Status()> direct_call;
    if (o.backward) {
      direct_backward.forward.path = LongConvPath::kDirect;
      direct_backward.dq = twin_view(kDq);
      direct_backward.dk = twin_view(kDk);
      direct_backward.dv = twin_view(kDv);
      direct_backward.dshift_filter =
          MakeContiguousView(twin[kDshift].data, DType::kF32, 2, sf_shape);
      direct_backward.dssm_filter = MakeContiguousView(twin[kDssm].data, DType::kF32, 2, hf_shape);
      direct_call = [&] { return H3LayerBackward(direct_backward, ctx); };
    } else {
      direct.out = twin_view(kOut);
      direct_call = [&] { return H3Layer(direct, ctx); };
    }
    st = CompareWithDirect(direct_call, timing, compared, &result);
    if (!st.ok()) return Fail(cmd, "--vs direct: " + st.ToString());
  }
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: op=h3" << (o.backward ? " backward" : "") << " path=" << o.lc_path
            << " B=" << B << " N=" << N << " H=" << H << " d=" << d << " L=" << L << " Ls=" << Ls
            << " threads=" << threads << "\n\n";
  PrintTable(o.backward ? "tessera h3 bwd" : "tessera h3", timing, result, o.backward);
  std::printf("%.0f tokens/s\n", result["tokens_per_s"].get<double>());
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
