// SPDX-License-Identifier: Apache-2.0
// `tessera run`: exact attention forward on .npy inputs and, with --dout, its backward; with
// --op linear, linear attention instead (cmd_run_linear.cc); with --op approx, an approximate
// method (cmd_run_approx.cc); with --op longconv or --op h3, a long convolution or the H3 layer
// (cmd_run_longconv.cc).
//
// Inputs are read straight into buffers of their own dtype and handed to AttentionForward (and
// AttentionBackward) as views, so peak memory is inputs + outputs + the kernels' scratch;
// nothing is written unless the whole call succeeds. --mask (mask_spec.h) is parsed against the
// inputs' shapes; its select: forms run SelectBlocks on these q and k before the forward. With
// --dist, the exact op (ring, ulysses) or the linear op (lasp2) runs sequence-parallel under
// mpirun (cmd_dist.cc).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.h"
#include "cmd_dist.h"
#include "cmd_run_approx.h"
#include "cmd_run_linear.h"
#include "cmd_run_longconv.h"
#include "mask_spec.h"
#include "npy.h"
#include "output_files.h"
#include "tessera/attention.h"
#include "tessera/system.h"
#include "visible_pairs.h"

namespace tessera {
namespace cli {
namespace {

struct RunOptions {
  std::string op = "exact";
  std::string q, k, v, out, lse, alibi;
  std::string dout, dq, dk, dv;  // backward: all four or none
  // AttentionStats of the last stats_window query rows (0: off), written to these files.
  int64_t stats_window = 0;
  bool stats_sum_gqa = false;
  std::string key_mass, key_mass_sq, row_entropy;
  bool causal = false;
  std::string window;
  std::string mask;
  float softcap = 0.0f;
  double scale = 0.0;  // only used when --scale is given
  int32_t threads = 0;
  std::string path = "auto";
  std::string target = "auto";
  bool verbose = false;
  CLI::Option* scale_option = nullptr;
  CLI::Option* mask_option = nullptr;  // --mask '' is an error, not "no mask"
  // --op linear: its own options, and the shared ones copied in before it runs.
  LinearRunOptions linear;
  // --op approx: its knobs and files, and the shared ones copied in before it runs.
  ApproxRunOptions approx;
  // --op longconv and --op h3: their files and path (--conv-path is stored in longconv's and
  // copied to h3's).
  LongConvRunOptions longconv;
  H3RunOptions h3;
  uint64_t seed = 0;
  // --dist: sequence-parallel attention (cmd_dist.h); only the options it takes.
  std::string dist, layout = "contiguous";
  CLI::Option* dist_option = nullptr;
  CLI::Option* layout_option = nullptr;
  const CLI::App* command = nullptr;
  // The options of one op only, to refuse them (by name) under the others; conv_only: of longconv
  // and h3; attention_only: of exact, linear and approx (beside --q, --k, --v and the backward).
  std::vector<CLI::Option*> exact_only, linear_only, approx_only, longconv_only, h3_only, conv_only,
      attention_only;
};

int RunMain(const RunOptions& o) {
  const char* cmd = "run";
  std::string error;
  AttentionParams params;
  Context ctx;
  ctx.num_threads = o.threads;
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
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

  // The backward flags go together (GradientFiles).
  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) {
    return Fail(cmd, error);
  }

  // Every destination is checked before any work (output_files.h) and again when publishing.
  const std::vector<FileArg> input_files = {
      {"--q", o.q}, {"--k", o.k}, {"--v", o.v}, {"--dout", o.dout}, {"--alibi", o.alibi}};
  const std::vector<FileArg> output_files = {{"--out", o.out},
                                             {"--lse", o.lse},
                                             {"--dq", o.dq},
                                             {"--dk", o.dk},
                                             {"--dv", o.dv},
                                             {"--key-mass", o.key_mass},
                                             {"--key-mass-sq", o.key_mass_sq},
                                             {"--row-entropy", o.row_entropy}};
  const bool stats_files = !o.key_mass.empty() || !o.key_mass_sq.empty() || !o.row_entropy.empty();
  if (o.stats_window != 0 && o.key_mass.empty()) {
    return Fail(cmd,
                "--stats-window: expected --key-mass FILE (and optionally --key-mass-sq, "
                "--row-entropy) to write the statistics to");
  }
  if (o.stats_window == 0 && stats_files) {
    return Fail(cmd,
                "--key-mass, --key-mass-sq, --row-entropy: expected --stats-window W >= 1 "
                "with them");
  }
  if (!CheckOutputs(input_files, output_files, &error)) return Fail(cmd, error);

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

  // Statistics: key mass (and its square) [B, H, Sk] with H = Hq, or Hkv with
  // --stats-sum-gqa; row entropy [B, Hq, W]. Shapes and W are checked by AttentionForward.
  NpyArray key_mass, key_mass_sq, row_entropy;
  if (o.stats_window != 0) {
    const int64_t heads = o.stats_sum_gqa ? k.shape[2] : q.shape[2];
    const struct {
      const std::string& file;
      NpyArray* array;
      std::vector<int64_t> shape;
      TensorView* view;
    } stats[] = {
        {o.key_mass, &key_mass, {q.shape[0], heads, k.shape[1]}, &params.stats.key_mass},
        {o.key_mass_sq, &key_mass_sq, {q.shape[0], heads, k.shape[1]}, &params.stats.key_mass_sq},
        {o.row_entropy,
         &row_entropy,
         {q.shape[0], q.shape[2], std::max<int64_t>(o.stats_window, 0)},
         &params.stats.row_entropy}};
    for (const auto& st : stats) {
      if (st.file.empty()) continue;
      st.array->dtype = DType::kF32;
      st.array->shape = st.shape;
      st.array->data = AllocateAligned(std::max<size_t>(st.array->nbytes(), 1));
      if (!st.array->data) return Fail(cmd, "cannot allocate the statistics outputs");
      *st.view = st.array->View();
    }
    params.stats.window = o.stats_window;
    params.stats.sum_gqa_group = o.stats_sum_gqa;
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
    bparams.forward.stats = AttentionStats();  // written by the forward above
    bparams.dout = dout.View();
    bparams.dq = dq.View();
    bparams.dk = dk.View();
    bparams.dv = dv.View();
    start = Clock::now();
    status = AttentionBackward(bparams, ctx);
    backward_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (!status.ok()) return Fail(cmd, status.ToString());
  }

  // Written only once every output is complete, all of them or none (output_files.h).
  std::vector<NpyOutput> files = {{"--out", o.out, &out}};
  if (!o.lse.empty()) files.push_back({"--lse", o.lse, &lse});
  if (!o.key_mass.empty()) files.push_back({"--key-mass", o.key_mass, &key_mass});
  if (!o.key_mass_sq.empty()) files.push_back({"--key-mass-sq", o.key_mass_sq, &key_mass_sq});
  if (!o.row_entropy.empty()) files.push_back({"--row-entropy", o.row_entropy, &row_entropy});
  if (backward) {
    files.push_back({"--dq", o.dq, &dq});
    files.push_back({"--dk", o.dk, &dk});
    files.push_back({"--dv", o.dv, &dv});
  }
  if (!PublishNpy(input_files, files, &error)) return Fail(cmd, error);
  if (o.verbose) {
    std::cerr << "tessera run: q " << ShapeToString(q.shape) << " k " << ShapeToString(k.shape)
              << " " << DTypeName(q.dtype) << ", path " << PathName(ctx.path) << ", target "
              << SimdTargetName() << ", threads " << ResolveThreads(ctx) << ": " << std::fixed
              << std::setprecision(3) << ms << " ms";
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

// --op linear: the options every op shares, copied into the linear op's own.
LinearRunOptions& LinearOptions(RunOptions& o) {
  LinearRunOptions& l = o.linear;
  l.q = o.q;
  l.k = o.k;
  l.v = o.v;
  l.out = o.out;
  l.dout = o.dout;
  l.dq = o.dq;
  l.dk = o.dk;
  l.dv = o.dv;
  l.causal = o.causal;
  l.text.window = o.window;
  if (o.scale_option->count() > 0) l.scale = static_cast<float>(o.scale);
  l.threads = o.threads;
  l.path = o.path;
  l.verbose = o.verbose;
  return l;
}

// --dist: the exact op with ring or ulysses, the linear op with lasp2, and only the options
// their drivers take; everything else is refused by name.
int RunDistDispatch(RunOptions& o) {
  if (const std::string error = DistRunOptionError(*o.command, o.op, o.dist); !error.empty()) {
    return Fail("run", error);
  }
  std::string error;
  if (!ApplySimdTarget(o.target, &error)) return Fail("run", error);
  if (o.op == "linear") return RunDistLinear(LinearOptions(o), o.layout);
  DistRunOptions d;
  d.dist = o.dist;
  d.layout = o.layout;
  d.q = o.q;
  d.k = o.k;
  d.v = o.v;
  d.out = o.out;
  d.lse = o.lse;
  d.dout = o.dout;
  d.dq = o.dq;
  d.dk = o.dk;
  d.dv = o.dv;
  d.causal = o.causal;
  d.window = o.window;
  if (o.scale_option->count() > 0) d.scale = static_cast<float>(o.scale);
  d.softcap = o.softcap;
  d.threads = o.threads;
  d.path = o.path;
  d.verbose = o.verbose;
  return RunDist(d);
}

// Picks the op, refuses the other ops' options by name, and runs.
int RunDispatch(RunOptions& o) {
  if (o.dist_option->count() > 0) return RunDistDispatch(o);
  if (o.layout_option->count() > 0) return Fail("run", "--layout: only with --dist");
  const bool linear = o.op == "linear", approx = o.op == "approx", longconv = o.op == "longconv",
             h3 = o.op == "h3";
  if (!linear && !approx && !longconv && !h3 && o.op != "exact") {
    return Fail("run", "--op: expected exact (the default), linear, approx, longconv or h3, got '" +
                           o.op + "'");
  }
  const char* op_name = linear     ? "--op linear"
                        : approx   ? "--op approx"
                        : longconv ? "--op longconv"
                        : h3       ? "--op h3"
                                   : "--op exact";
  auto refuse = [&](const std::vector<CLI::Option*>& options, const char* only_with) -> int {
    for (const CLI::Option* opt : options) {
      // --lse is also approx's (the methods with an LSE write it).
      if (approx && opt->get_name() == "--lse") continue;
      if (opt->count() > 0) {
        return Fail("run", opt->get_name() + ": only with " + only_with + ", not with " + op_name);
      }
    }
    return kExitOk;
  };
  const struct {
    bool refused;
    const std::vector<CLI::Option*>& options;
    const char* only_with;
  } refusals[] = {
      {!linear, o.linear_only, "--op linear"},
      {linear || approx || longconv || h3, o.exact_only, "--op exact (the default)"},
      {!approx, o.approx_only, "--op approx"},
      {!longconv, o.longconv_only, "--op longconv"},
      {!h3, o.h3_only, "--op h3"},
      {!longconv && !h3, o.conv_only, "--op longconv or --op h3"},
      {longconv || h3, o.attention_only, "the attention ops (exact, linear, approx)"},
  };
  for (const auto& r : refusals) {
    if (!r.refused) continue;
    if (const int rc = refuse(r.options, r.only_with); rc != kExitOk) return rc;
  }
  if (longconv) {
    // The attention ops' files (the longconv backward has --dout and its own gradients).
    for (const auto& [flag, path] : {std::pair<const char*, const std::string*>{"--q", &o.q},
                                     {"--k", &o.k},
                                     {"--v", &o.v},
                                     {"--dq", &o.dq},
                                     {"--dk", &o.dk},
                                     {"--dv", &o.dv}}) {
      if (!path->empty()) {
        return Fail("run", std::string(flag) +
                               ": not with --op longconv (its backward writes --du, --dfilter "
                               "and --dbias)");
      }
    }
  } else if (!h3) {
    // --q, --k and --v are every attention op's (not required by the parser: longconv has none;
    // h3 names what it misses itself).
    for (const auto& [flag, path] :
         {std::pair<const char*, const std::string*>{"--q", &o.q}, {"--k", &o.k}, {"--v", &o.v}}) {
      if (path->empty()) return Fail("run", std::string(flag) + " is required with " + op_name);
    }
  }
  std::string error;
  if (!ApplySimdTarget(o.target, &error)) return Fail("run", error);
  if (approx) {
    ApproxRunOptions& a = o.approx;
    a.q = o.q;
    a.k = o.k;
    a.v = o.v;
    a.out = o.out;
    a.lse = o.lse;
    a.dout = o.dout;
    a.dq = o.dq;
    a.dk = o.dk;
    a.dv = o.dv;
    a.causal = o.causal;
    a.window = o.window;
    if (o.scale_option->count() > 0) a.scale = static_cast<float>(o.scale);
    a.seed = o.seed;
    a.threads = o.threads;
    a.verbose = o.verbose;
    return RunApprox(a);
  }
  if (longconv) {
    LongConvRunOptions& c = o.longconv;
    c.out = o.out;
    c.dout = o.dout;
    c.threads = o.threads;
    c.verbose = o.verbose;
    return RunLongConv(c);
  }
  if (h3) {
    H3RunOptions& h = o.h3;
    h.q = o.q;
    h.k = o.k;
    h.v = o.v;
    h.out = o.out;
    h.dout = o.dout;
    h.dq = o.dq;
    h.dk = o.dk;
    h.dv = o.dv;
    h.conv_path = o.longconv.conv_path;
    h.threads = o.threads;
    h.verbose = o.verbose;
    return RunH3(h);
  }
  if (!linear) return RunMain(o);
  return RunLinear(LinearOptions(o));
}

}  // namespace

CommandMain AddRunCommand(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  LinearRunOptions& l = o->linear;
  CLI::App* sub = app.add_subcommand(
      "run",
      "Exact attention forward (and backward) on .npy inputs (float32 or float16, C order); "
      "linear attention with --op linear; approximate attention with --op approx; a long "
      "convolution or the H3 layer with --op longconv or --op h3");
  sub->add_option("--op", o->op, "exact (softmax attention), linear, approx, longconv or h3")
      ->capture_default_str();
  sub->add_option("--q", o->q,
                  "queries [B, Sq, Hq, D] (h3: float32 [B, N, H, d]; every op but longconv)");
  sub->add_option("--k", o->k,
                  "keys [B, Sk, Hkv, D], Hq % Hkv == 0 (h3: like q; every op but longconv)");
  sub->add_option("--v", o->v,
                  "values [B, Sk, Hkv, D] (linear: [B, S, Hkv, Dv]; h3: like q; every op but "
                  "longconv)");
  sub->add_option("--out", o->out, "output [B, Sq, Hq, D], written in the input dtype")->required();
  o->exact_only.push_back(
      sub->add_option("--lse", o->lse, "also write the log-sum-exp, float32 [B, Hq, Sq]"));
  sub->add_option("--dout", o->dout,
                  "backward: gradient w.r.t. the output [B, Sq, Hq, D], dtype of Q; needs --dq, "
                  "--dk, --dv (longconv: [B, N, C], with --du, --dfilter or --dbias)");
  sub->add_option("--dq", o->dq, "backward: write dL/dQ, shape and dtype of Q");
  sub->add_option("--dk", o->dk, "backward: write dL/dK, shape and dtype of K");
  sub->add_option("--dv", o->dv, "backward: write dL/dV, shape and dtype of V");
  o->attention_only.push_back(
      sub->add_flag("--causal", o->causal,
                    "causal mask (bottom-right aligned when Sq != Sk); linear: the default"));
  o->attention_only.push_back(
      sub->add_option("--window", o->window,
                      "sliding window LEFT,RIGHT (-1 = unbounded); -1,0 equals --causal. "
                      "Linear: W, the exact softmax window added to the linear part (based: "
                      "default 64, else 0 = off)"));
  o->mask_option =
      sub->add_option("--mask", o->mask,
                      "programmable mask, e.g. nbhd2d:16x16:5x5, sink:4:256, block:M.npy:64x64, "
                      "sigmoid+doc:100,156 (grammar below)");
  o->exact_only.push_back(o->mask_option);
  o->exact_only.push_back(sub->add_option("--softcap", o->softcap, "tanh logit softcap (0 = off)"));
  o->scale_option = sub->add_option(
      "--scale", o->scale,
      "softmax scale (default 1/sqrt(D)); linear: multiplies phi(q).phi(k) (default 1/sqrt(Dk), "
      "1 for taylor2)");
  o->attention_only.push_back(o->scale_option);
  o->exact_only.push_back(sub->add_option("--alibi", o->alibi, "ALiBi slopes, float32 [Hq]"));
  o->exact_only.push_back(sub->add_option(
      "--stats-window", o->stats_window,
      "attention statistics of the last W query rows (for KV eviction): --key-mass FILE "
      "(sum of p over the rows, float32 [B, Hq, Sk]), optional --key-mass-sq FILE (sum of p^2) and "
      "--row-entropy FILE (float32 [B, Hq, W])"));
  o->exact_only.push_back(sub->add_flag("--stats-sum-gqa", o->stats_sum_gqa,
                                        "key statistics per KV head, summed over its query heads "
                                        "([B, Hkv, Sk])"));
  o->exact_only.push_back(sub->add_option("--key-mass", o->key_mass, "with --stats-window"));
  o->exact_only.push_back(sub->add_option("--key-mass-sq", o->key_mass_sq, "with --stats-window"));
  o->exact_only.push_back(sub->add_option("--row-entropy", o->row_entropy, "with --stats-window"));
  sub->add_option("--threads", o->threads, "worker threads (0 = all)");
  sub->add_option("--path", o->path, "force a kernel path: auto|reference|generic|fast")
      ->group("");  // hidden: for tests and benchmarks
  sub->add_option("--target", o->target, SimdTargetHelp())->capture_default_str();
  sub->add_flag("--verbose,-v", o->verbose,
                "print timing and peak memory (and the mask's density) to stderr");

  // Linear attention (tessera/linear.h), refused by name under --op exact.
  const std::string group = "Linear attention (--op linear)";
  auto normalize_value = std::make_shared<bool>(false);
  const auto linear_option = [&](CLI::Option* opt) {
    opt->group(group);
    o->linear_only.push_back(opt);
    return opt;
  };
  linear_option(sub->add_option("--variant", l.text.variant,
                                "plain, decay (--decay), gla (--gates) or based (Taylor map, "
                                "normalized, window 64)")
                    ->capture_default_str());
  linear_option(sub->add_option("--feature-map", l.text.feature_map,
                                "phi: identity (default), elu1, relu or taylor2 (based)"));
  linear_option(sub->add_option("--decay", l.decay,
                                "decay: rates in (0, 1], one per query head or one for all: "
                                "L1,L2,..."));
  linear_option(sub->add_option(
      "--gates", l.gates,
      "gla: log-space gates <= 0, float32 [B, S, Hq, Dk] or one per token and head [B, S, Hq]"));
  CLI::Option* normalize_option = linear_option(sub->add_flag(
      "--normalize,!--no-normalize", *normalize_value,
      "divide by phi(q).sum(phi(k)) (based: on by default; --no-normalize turns it off)"));
  linear_option(sub->add_flag("--non-causal", l.non_causal,
                              "every query sees every key (not with decay, gla, a window or "
                              "state files)"));
  linear_option(
      sub->add_option("--prefix", l.prefix,
                      "JRT prefix: keys [0, P) visible to every query (not with decay, gla)")
          ->type_name("INT"));
  linear_option(sub->add_option("--chunk", l.chunk,
                                "tokens per chunk of the chunked form: 16..256, a multiple of 16 "
                                "(default 64)")
                    ->type_name("INT"));
  linear_option(sub->add_option("--form", l.form, "chunked or recurrent (token by token)")
                    ->capture_default_str());
  linear_option(sub->add_option("--state-in", l.state_in,
                                "initial recurrent state, float32 [B, Hq, F, Dv] (causal)"));
  linear_option(sub->add_option("--state-out", l.state_out,
                                "write the state after the last token, float32 [B, Hq, F, Dv]"));
  linear_option(sub->add_option("--normalizer-in", l.normalizer_in,
                                "with --normalize: initial normalizer, float32 [B, Hq, F]"));
  linear_option(sub->add_option("--normalizer-out", l.normalizer_out,
                                "with --normalize: write the normalizer, float32 [B, Hq, F]"));
  linear_option(sub->add_option("--dgates", l.dgates,
                                "gla backward: write dL/dgates, float32, the shape of --gates"));
  linear_option(sub->add_option("--lrpe-theta", l.lrpe_theta,
                                "LRPE: angles float32 [Dk] or [Hq, Dk]; phi doubles into "
                                "[phi cos(p theta), phi sin(p theta)] (F = 2 Dk; not with gla or "
                                "taylor2)"));
  linear_option(sub->add_option("--position-offset", l.position_offset,
                                "with --lrpe-theta: the position p of token 0 (a continuation: "
                                "the tokens before it; default 0)")
                    ->type_name("INT"));
  // Approximate attention (tessera/approx.h), refused by name under the other ops.
  const std::string approx_group = "Approximate attention (--op approx; also --window, --lse)";
  ApproxRunOptions& a = o->approx;
  AddApproxKnobs(sub, &a.knobs, approx_group);
  o->approx_only = a.knobs.options;
  const auto approx_option = [&](CLI::Option* opt) {
    opt->group(approx_group);
    o->approx_only.push_back(opt);
  };
  approx_option(
      sub->add_option("--seed", o->seed, "random draws of the method")->capture_default_str());
  approx_option(sub->add_option("--centroids", a.centroids,
                                "routing: k-means centroids, float32 [Hq, C, D] (default: the "
                                "normalized keys at C evenly spaced tokens)"));
  approx_option(sub->add_option("--centroids-out", a.centroids_out,
                                "routing: write the EMA-updated centroids, float32 [Hq, C, D]"));
  approx_option(sub->add_option("--wersa-gates", a.gates,
                                "wersa: per-token gates of each level, float32 [B, S, levels]"));
  // Long convolution and H3 (tessera/longconv.h), refused by name under the other ops.
  const std::string lc_group = "Long convolution (--op longconv; also --out, --dout, --threads)";
  LongConvRunOptions& lc = o->longconv;
  for (CLI::Option* opt :
       {sub->add_option("--u", lc.u, "longconv: input u, float32 [B, N, C]"),
        sub->add_option("--filter", lc.filter, "longconv: filter h, float32 [L, C], L <= N"),
        sub->add_option("--bias", lc.bias, "longconv: skip term D, float32 [C] (y += D u)"),
        sub->add_option("--du", lc.du, "longconv backward (with --dout): write dL/du [B, N, C]"),
        sub->add_option("--dfilter", lc.dfilter,
                        "longconv backward (with --dout): write dL/dfilter [L, C]"),
        sub->add_option("--dbias", lc.dbias,
                        "longconv backward (with --dout and --bias): write dL/dbias [C]")}) {
    o->longconv_only.push_back(opt->group(lc_group));
  }
  o->conv_only.push_back(
      sub->add_option("--conv-path", lc.conv_path, "longconv, h3: auto, direct or fft")
          ->capture_default_str()
          ->group(lc_group));
  const std::string h3_group =
      "H3 layer (--op h3; also --q, --k, --v, --out, --conv-path, the backward's --dout, --dq, "
      "--dk, --dv, --threads)";
  H3RunOptions& h3 = o->h3;
  for (CLI::Option* opt :
       {sub->add_option("--shift-filter", h3.shift_filter,
                        "h3: shift SSM filter, float32 [Ls, H*d], Ls <= N"),
        sub->add_option("--shift-bias", h3.shift_bias, "h3: shift SSM skip term, float32 [H*d]"),
        sub->add_option("--ssm-filter", h3.ssm_filter,
                        "h3: diagonal SSM filter, float32 [L, H], L <= N"),
        sub->add_option("--ssm-bias", h3.ssm_bias, "h3: diagonal SSM skip term, float32 [H]"),
        sub->add_option("--dshift-filter", h3.dshift_filter,
                        "h3 backward: write dL/dshift_filter [Ls, H*d]"),
        sub->add_option("--dshift-bias", h3.dshift_bias,
                        "h3 backward (with --shift-bias): write dL/dshift_bias [H*d]"),
        sub->add_option("--dssm-filter", h3.dssm_filter,
                        "h3 backward: write dL/dssm_filter [L, H]"),
        sub->add_option("--dssm-bias", h3.dssm_bias,
                        "h3 backward (with --ssm-bias): write dL/dssm_bias [H]")}) {
    o->h3_only.push_back(opt->group(h3_group));
  }
  // Sequence-parallel attention (tessera/distributed.h), under mpirun.
  const std::string dist_group = "Sequence parallel (--dist; under mpirun -np P)";
  o->dist_option =
      sub->add_option("--dist", o->dist,
                      "ring or ulysses: exact attention with the sequence split across the ranks "
                      "of the MPI job (every rank reads the inputs, rank 0 writes the outputs); "
                      "takes --causal, --scale, --softcap, --lse and the backward files. lasp2 "
                      "(with --op linear): causal linear attention, chunked, any variant and "
                      "feature map, no window, prefix or state files")
          ->group(dist_group);
  o->layout_option = sub->add_option("--layout", o->layout,
                                     "with --dist: contiguous (even runs of tokens) or zigzag "
                                     "(chunks r and 2P-1-r of 2P: balanced causal work; not "
                                     "with lasp2)")
                         ->capture_default_str()
                         ->group(dist_group);
  o->command = sub;
  sub->footer(MaskSpecHelp());
  return [o, normalize_option, normalize_value] {
    RunOptions& r = *o;
    r.linear.text.normalize = normalize_option->count() > 0 ? (*normalize_value ? 1 : 0) : -1;
    return RunDispatch(r);
  };
}

}  // namespace cli
}  // namespace tessera
