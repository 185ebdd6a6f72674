// SPDX-License-Identifier: Apache-2.0
// `tessera run --op approx`: the inputs are float32 .npy files read into buffers and handed to
// ApproxAttention (then ApproxAttentionBackward with --dout) as views; every flag is checked before
// any work (the ones only the CLI knows here, the ranges by the library) and outputs are written
// only when the whole call succeeded, all of them or none (output_files.h). Routing reads its
// centroids from --centroids (default: CentroidsFromKeys, approx_options.h) and writes the EMA
// update to --centroids-out.
#include "cmd_run_approx.h"

#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include "npy.h"
#include "output_files.h"
#include "tessera/approx.h"

namespace tessera {
namespace cli {
namespace {

constexpr const char* kCmd = "run";

bool Load(const char* flag, const std::string& path, size_t rank, const char* layout,
          NpyArray* array, std::string* error) {
  if (!LoadNpy(path, {DType::kF32}, array, error)) {
    *error = std::string(flag) + " " + *error;
    return false;
  }
  if (array->shape.size() != rank) {
    *error = std::string(flag) + " " + path + ": expected a rank-" + std::to_string(rank) +
             " float32 array " + layout + ", got shape " + ShapeToString(array->shape);
    return false;
  }
  return true;
}

bool Allocate(const char* what, std::vector<int64_t> shape, NpyArray* array, std::string* error) {
  array->dtype = DType::kF32;
  array->shape = std::move(shape);
  array->data = AllocateAligned(array->nbytes());
  if (!array->data) {
    *error = std::string("cannot allocate the ") + what;
    return false;
  }
  return true;
}

}  // namespace

int RunApprox(const ApproxRunOptions& o) {
  std::string error;
  Context ctx;
  ctx.num_threads = o.threads;
  if (!CheckThreads(o.threads, &error)) return Fail(kCmd, error);
  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) return Fail(kCmd, error);
  NpyArray q, k, v;
  if (!Load("--q", o.q, 4, "[B, S, Hq, D]", &q, &error) ||
      !Load("--k", o.k, 4, "[B, S, Hkv, D]", &k, &error) ||
      !Load("--v", o.v, 4, "[B, S, Hkv, D]", &v, &error)) {
    return Fail(kCmd, error);
  }
  const int64_t B = q.shape[0], S = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[2];
  ApproxKnobs knobs = o.knobs;
  const bool window_given = !o.window.empty();
  if (window_given && !ParseNonNegative("--window", o.window, &knobs.window, &error)) {
    return Fail(kCmd, error);
  }
  ApproxParams params;
  if (!ApplyApproxKnobs(knobs, window_given, S, Hq, &params, &error)) return Fail(kCmd, error);
  const bool routing = params.method == ApproxMethod::kRouting;
  const bool wersa = params.method == ApproxMethod::kWersa;
  if (!routing && (!o.centroids.empty() || !o.centroids_out.empty())) {
    return Fail(kCmd, std::string(o.centroids.empty() ? "--centroids-out" : "--centroids") +
                          ": only with --method routing");
  }
  if (!wersa && !o.gates.empty()) return Fail(kCmd, "--wersa-gates: only with --method wersa");
  if (backward && params.method != ApproxMethod::kWersa &&
      params.method != ApproxMethod::kPerformer) {
    return Fail(kCmd, std::string("--dout: method ") + ApproxMethodName(params.method) +
                          " has no backward (wersa and performer have one)");
  }
  params.q = q.View();
  params.k = k.View();
  params.v = v.View();
  params.causal = o.causal;
  params.scale = o.scale;
  params.seed = o.seed;
  NpyArray centroids, gates, out, lse, centroids_out, dout, dq, dk, dv;
  std::vector<float> derived;
  if (routing) {
    if (!o.centroids.empty()) {
      if (!Load("--centroids", o.centroids, 3, "[Hq, C, D]", &centroids, &error)) {
        return Fail(kCmd, error);
      }
      params.routing.centroids = centroids.View();
    } else if (Hkv >= 1 && Hq % Hkv == 0 && k.shape[1] == S && k.shape[3] == D) {
      derived = CentroidsFromKeys(reinterpret_cast<const float*>(k.data.get()), S, Hq, Hkv, D,
                                  params.routing.clusters);
      params.routing.centroids =
          MakeView3(derived.data(), DType::kF32, Hq, params.routing.clusters, D);
    }
  }
  if (wersa && !o.gates.empty()) {
    if (!Load("--wersa-gates", o.gates, 3, "[B, S, levels]", &gates, &error))
      return Fail(kCmd, error);
    params.wersa.gates = gates.View();
  }
  std::vector<FileArg> inputs = {{"--q", o.q},
                                 {"--k", o.k},
                                 {"--v", o.v},
                                 {"--centroids", o.centroids},
                                 {"--wersa-gates", o.gates},
                                 {"--dout", o.dout}};
  // The forward always runs (--out is written with the backward too, as the exact run does).
  std::vector<FileArg> outputs = {
      {"--out", o.out}, {"--lse", o.lse}, {"--centroids-out", o.centroids_out}};
  if (backward) outputs.insert(outputs.end(), {{"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}});
  if (!CheckOutputs(inputs, outputs, &error)) return Fail(kCmd, error);
  std::vector<NpyOutput> publish;
  if (!Allocate("output", {B, S, Hq, D}, &out, &error)) return Fail(kCmd, error);
  params.out = out.View();
  publish.push_back({"--out", o.out, &out});
  if (!o.lse.empty()) {
    if (!Allocate("lse", {B, Hq, S}, &lse, &error)) return Fail(kCmd, error);
    params.lse = lse.View();
    publish.push_back({"--lse", o.lse, &lse});
  }
  if (!o.centroids_out.empty()) {
    const TensorView& c = params.routing.centroids;
    if (!Allocate("centroids", {c.shape[0], c.shape[1], c.shape[2]}, &centroids_out, &error)) {
      return Fail(kCmd, error);
    }
    params.routing.updated_centroids = centroids_out.View();
    publish.push_back({"--centroids-out", o.centroids_out, &centroids_out});
  }
  ApproxBackwardParams bp;
  if (backward) {
    if (!Load("--dout", o.dout, 4, "[B, S, Hq, D]", &dout, &error) ||
        !Allocate("dq", q.shape, &dq, &error) || !Allocate("dk", k.shape, &dk, &error) ||
        !Allocate("dv", v.shape, &dv, &error)) {
      return Fail(kCmd, error);
    }
    bp.forward = params;
    bp.forward.out = TensorView();
    bp.forward.lse = TensorView();
    bp.dout = dout.View();
    bp.dq = dq.View();
    bp.dk = dk.View();
    bp.dv = dv.View();
    publish.insert(publish.end(), {{"--dq", o.dq, &dq}, {"--dk", o.dk, &dk}, {"--dv", o.dv, &dv}});
  }
  const auto start = std::chrono::steady_clock::now();
  Status st = ApproxAttention(params, ctx);
  if (st.ok() && backward) st = ApproxAttentionBackward(bp, ctx);
  if (!st.ok()) return Fail(kCmd, st.ToString());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!PublishNpy(inputs, publish, &error)) return Fail(kCmd, error);
  if (o.verbose) {
    std::cerr << "tessera run: approx " << ApproxMethodName(params.method) << " "
              << (backward ? "backward" : "forward") << " " << ms << " ms, peak RSS "
              << PeakRssMiB() << " MiB\n";
  }
  return kExitOk;
}

}  // namespace cli
}  // namespace tessera
