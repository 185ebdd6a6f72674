// `tessera run`: exact attention forward on .npy inputs and, with --dout, its backward.
//
// Inputs are read straight into buffers of their own dtype and handed to AttentionForward (and
// AttentionBackward) as views, so peak memory is inputs + outputs + the kernels' scratch;
// nothing is written unless the whole call succeeds. --mask (mask_spec.h) is parsed against the
// inputs' shapes; its select: forms run SelectBlocks on these q and k before the forward.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "mask_spec.h"
#include "npy.h"
#include "tessera/attention.h"
#include "visible_pairs.h"

namespace tessera {
namespace cli {
namespace {

struct RunOptions {
  std::string q, k, v, out, lse, alibi;
  std::string dout, dq, dk, dv;  // backward: all four or none
  bool causal = false;
  std::string window;
  std::string mask;
  float softcap = 0.0f;
  double scale = 0.0;  // only used when --scale is given
  int32_t threads = 0;
  std::string path = "auto";
  bool verbose = false;
  CLI::Option* scale_option = nullptr;
  CLI::Option* mask_option = nullptr;  // --mask '' is an error, not "no mask"
};

int RunMain(const RunOptions& o) {
  const char* cmd = "run";
  std::string error;
  AttentionParams params;
  Context ctx;
  ctx.num_threads = o.threads;
  if (o.threads < 0)
    return Fail(cmd, "--threads: expected >= 0 (0 = all), got " + std::to_string(o.threads));
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(cmd, error);
  if (!o.window.empty() &&
      !ParseWindow(o.window, &params.window_left, &params.window_right, &error)) {
    return Fail(cmd, error);
  }
  params.causal = o.causal;
  params.softcap = o.softcap;
  if (o.scale_option != nullptr && o.scale_option->count() > 0) {
    params.scale = static_cast<float>(o.scale);
  }

  // The backward flags go together: one without the others is almost certainly a mistake.
  const struct {
    const char* flag;
    const std::string& file;
  } grad_flags[] = {{"--dout", o.dout}, {"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}};
  std::string given, missing;
  for (const auto& g : grad_flags) {
    std::string& list = g.file.empty() ? missing : given;
    list += (list.empty() ? "" : ", ") + std::string(g.flag);
  }
  const bool backward = missing.empty();
  if (!backward && !given.empty()) {
    return Fail(cmd, "the backward needs --dout, --dq, --dk and --dv together; got " + given +
                         " without " + missing);
  }

  // Each output goes to a temporary name first; two outputs on one path would clobber each other.
  const struct {
    const char* flag;
    const std::string& file;
  } output_flags[] = {
      {"--out", o.out}, {"--lse", o.lse}, {"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}};
  for (size_t i = 0; i < std::size(output_flags); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (!output_flags[i].file.empty() && output_flags[i].file == output_flags[j].file) {
        return Fail(cmd, std::string(output_flags[j].flag) + " and " + output_flags[i].flag +
                             ": expected different files, got '" + output_flags[i].file +
                             "' for both");
      }
    }
  }

  NpyArray q, k, v, dout, alibi;
  const struct {
    const char* flag;
    const std::string& file;
    NpyArray* array;
  } inputs[] = {{"--q", o.q, &q}, {"--k", o.k, &k}, {"--v", o.v, &v}, {"--dout", o.dout, &dout}};
  for (const auto& in : inputs) {
    if (in.file.empty()) continue;  // --dout without the backward
    if (!LoadNpy(in.file, in.array, &error)) return Fail(cmd, error);
    if (in.array->shape.size() != 4) {
      return Fail(cmd, std::string(in.flag) + " " + in.file +
                           ": expected a rank-4 array [B, S, H, D], got shape " +
                           ShapeToString(in.array->shape));
    }
  }
  if (!o.alibi.empty()) {
    if (!LoadNpy(o.alibi, &alibi, &error)) return Fail(cmd, error);
    params.alibi_slopes = alibi.View();
  }

  MaskSpec mask;
  if (o.mask_option != nullptr && o.mask_option->count() > 0) {
    MaskProblem problem;
    problem.batch = q.shape[0];
    problem.seq_q = q.shape[1];
    problem.heads_q = q.shape[2];
    problem.seq_k = k.shape[1];
    problem.causal = params.causal;
    if (!mask.Parse(o.mask, problem, &error) || !mask.Apply(&params, &error)) {
      return Fail(cmd, error);
    }
    if (mask.sigmoid() && !o.lse.empty()) {
      return Fail(cmd, "--lse: sigmoid attention (--mask '" + o.mask +
                           "') has no log-sum-exp; expected no --lse with it");
    }
  }

  // The output and dq take q's shape and dtype, dk and dv those of k and v; LSE is [B, Hq, Sq]
  // f32, allocated even without --lse when the backward needs it.
  NpyArray out, lse, dq, dk, dv;
  const struct {
    const char* what;
    const NpyArray& like;
    NpyArray* array;
    bool wanted;
  } outputs[] = {{"output", q, &out, true},
                 {"dq", q, &dq, backward},
                 {"dk", k, &dk, backward},
                 {"dv", v, &dv, backward}};
  for (const auto& r : outputs) {
    if (!r.wanted) continue;
    r.array->dtype = r.like.dtype;
    r.array->shape = r.like.shape;
    r.array->data = AllocateAligned(r.array->nbytes());
    if (!r.array->data) {
      return Fail(cmd, std::string("cannot allocate the ") + r.what + " (" +
                           std::to_string(r.array->nbytes()) + " bytes)");
    }
  }
  params.q = q.View();
  params.k = k.View();
  params.v = v.View();
  params.out = out.View();
  // Sigmoid attention has no log-sum-exp: none is computed for the forward nor handed to the
  // backward.
  if (!o.lse.empty() || (backward && !mask.sigmoid())) {
    lse.dtype = DType::kF32;
    lse.shape = {q.shape[0], q.shape[2], q.shape[1]};
    lse.data = AllocateAligned(lse.nbytes());
    if (!lse.data) return Fail(cmd, "cannot allocate the LSE output");
    params.lse = lse.View();
  }

  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  Status status;
  double select_ms = 0.0;
  if (mask.needs_selection()) {
    status = mask.Select(params, ctx);
    select_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (!status.ok()) return Fail(cmd, "--mask '" + o.mask + "': " + status.ToString());
    start = Clock::now();
  }
  status = AttentionForward(params, ctx);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (!status.ok()) return Fail(cmd, status.ToString());
  double backward_ms = 0.0;
  if (backward) {
    AttentionBackwardParams bparams;
    bparams.forward = params;
    bparams.dout = dout.View();
    bparams.dq = dq.View();
    bparams.dk = dk.View();
    bparams.dv = dv.View();
    start = Clock::now();
    status = AttentionBackward(bparams, ctx);
    backward_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (!status.ok()) return Fail(cmd, status.ToString());
  }

  // Write to temporary names and rename only when every file is complete, so a failure (say,
  // an unwritable --lse path) leaves no partial or mismatched outputs behind.
  const std::string suffix = ".tmp." + std::to_string(static_cast<long>(getpid()));
  struct Pending {
    const std::string& path;
    const NpyArray& array;
  };
  std::vector<Pending> pending = {{o.out, out}};
  if (!o.lse.empty()) pending.push_back({o.lse, lse});
  if (backward) {
    pending.push_back({o.dq, dq});
    pending.push_back({o.dk, dk});
    pending.push_back({o.dv, dv});
  }
  for (size_t i = 0; i < pending.size(); ++i) {
    const Pending& p = pending[i];
    if (!SaveNpy(p.path + suffix, p.array.dtype, p.array.shape, p.array.data.get(), &error)) {
      for (size_t j = 0; j <= i; ++j) std::remove((pending[j].path + suffix).c_str());
      // Name the user's path, not the temporary one.
      const std::string tmp = p.path + suffix;
      if (error.compare(0, tmp.size(), tmp) == 0) error.replace(0, tmp.size(), p.path);
      return Fail(cmd, error);
    }
  }
  for (const Pending& p : pending) {
    if (std::rename((p.path + suffix).c_str(), p.path.c_str()) != 0) {
      const std::string why = std::strerror(errno);
      for (const Pending& r : pending) std::remove((r.path + suffix).c_str());
      return Fail(cmd, p.path + ": cannot write: " + why);
    }
  }
  if (o.verbose) {
    std::cerr << "tessera run: q " << ShapeToString(q.shape) << " k " << ShapeToString(k.shape)
              << " " << DTypeName(q.dtype) << ", path " << PathName(ctx.path) << ", threads "
              << ResolveThreads(ctx) << ": " << std::fixed << std::setprecision(3) << ms << " ms";
    if (backward) std::cerr << " forward + " << backward_ms << " ms backward";
    std::cerr << ", peak RSS " << std::setprecision(1) << PeakRssMiB() << " MiB\n";
    if (!mask.empty()) {
      const VisiblePairs pairs = CountVisiblePairs(params);
      std::cerr << "tessera run: mask '" << mask.text() << "': density " << std::setprecision(4)
                << pairs.density() << (pairs.exact ? "" : " (sampled rows)");
      if (mask.needs_selection()) {
        std::cerr << ", selection " << std::setprecision(3) << select_ms << " ms";
      }
      std::cerr << "\n";
    }
  }
  return kExitOk;
}

}  // namespace

CommandMain AddRunCommand(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  CLI::App* sub = app.add_subcommand(
      "run", "Exact attention forward (and backward) on .npy inputs (float32 or float16, C order)");
  sub->add_option("--q", o->q, "queries [B, Sq, Hq, D]")->required();
  sub->add_option("--k", o->k, "keys [B, Sk, Hkv, D], Hq % Hkv == 0")->required();
  sub->add_option("--v", o->v, "values [B, Sk, Hkv, D]")->required();
  sub->add_option("--out", o->out, "output [B, Sq, Hq, D], written in the input dtype")->required();
  sub->add_option("--lse", o->lse, "also write the log-sum-exp, float32 [B, Hq, Sq]");
  sub->add_option("--dout", o->dout,
                  "backward: gradient w.r.t. the output [B, Sq, Hq, D], dtype of Q; needs --dq, "
                  "--dk, --dv");
  sub->add_option("--dq", o->dq, "backward: write dL/dQ, shape and dtype of Q");
  sub->add_option("--dk", o->dk, "backward: write dL/dK, shape and dtype of K");
  sub->add_option("--dv", o->dv, "backward: write dL/dV, shape and dtype of V");
  sub->add_flag("--causal", o->causal, "causal mask (bottom-right aligned when Sq != Sk)");
  sub->add_option("--window", o->window,
                  "sliding window LEFT,RIGHT (-1 = unbounded); -1,0 equals --causal");
  o->mask_option =
      sub->add_option("--mask", o->mask,
                      "programmable mask, e.g. nbhd2d:16x16:5x5, sink:4:256, block:M.npy:64x64, "
                      "sigmoid+doc:100,156 (grammar below)");
  sub->add_option("--softcap", o->softcap, "tanh logit softcap (0 = off)");
  o->scale_option = sub->add_option("--scale", o->scale, "softmax scale (default 1/sqrt(D))");
  sub->add_option("--alibi", o->alibi, "ALiBi slopes, float32 [Hq]");
  sub->add_option("--threads", o->threads, "worker threads (0 = all)");
  sub->add_option("--path", o->path, "force a kernel path: auto|reference|generic|fast")
      ->group("");  // hidden: for tests and benchmarks
  sub->add_flag("--verbose,-v", o->verbose,
                "print timing and peak memory (and the mask's density) to stderr");
  sub->footer(MaskSpecHelp());
  return [o] { return RunMain(*o); };
}

}  // namespace cli
}  // namespace tessera
