// SPDX-License-Identifier: Apache-2.0
// `tessera run --op longconv` and `--op h3` (cmd_run_longconv.h). Inputs are f32 .npy files
// handed over as views; the outputs take the shapes of the inputs they differentiate and are
// written only when the whole call (forward and backward) succeeded, all of them or none
// (output_files.h). The library's messages name its params' fields (u, dy, shift_filter, ...);
// the user typed flags, so a message that starts with a field one flag sets gets that flag in
// front, as LinearStatusMessage does for the linear op.
#include "cmd_run_longconv.h"

#include <chrono>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "cli_common.h"
#include "npy.h"
#include "output_files.h"
#include "tessera/longconv.h"

namespace tessera {
namespace cli {
namespace {

constexpr const char* kCmd = "run";

struct FieldFlag {
  const char* field;
  const char* flag;
};

std::string StatusWithFlag(const Status& status, const std::vector<FieldFlag>& fields) {
  const std::string& m = status.message();
  for (const FieldFlag& f : fields) {
    const size_t n = std::strlen(f.field);
    if (m.compare(0, n, f.field) == 0 && (m.size() == n || m[n] == ':' || m[n] == ' ')) {
      return std::string(f.flag) + ": " + status.ToString();
    }
  }
  return status.ToString();
}

bool ParseConvPath(const std::string& text, LongConvPath* path, std::string* error) {
  if (text == "auto") {
    *path = LongConvPath::kAuto;
  } else if (text == "direct") {
    *path = LongConvPath::kDirect;
  } else if (text == "fft") {
    *path = LongConvPath::kFft;
  } else {
    *error = "--conv-path: expected auto, direct or fft, got '" + text + "'";
    return false;
  }
  return true;
}

// A file flag, what was given to it (empty: not given) and where it is loaded.
struct Input {
  const char* flag;
  const std::string& file;
  NpyArray* array;
};

// Loads every given input as f32; with rank > 0 the array must have that rank.
bool LoadInputs(const std::vector<Input>& inputs, size_t rank, const char* layout,
                std::string* error) {
  for (const Input& in : inputs) {
    if (in.file.empty()) continue;
    if (!LoadNpy(in.file, {DType::kF32}, in.array, error)) {
      *error = std::string(in.flag) + " " + *error;
      return false;
    }
    if (rank > 0 && in.array->shape.size() != rank) {
      *error = std::string(in.flag) + " " + in.file + ": expected a rank-" + std::to_string(rank) +
               " array " + layout + ", got shape " + ShapeToString(in.array->shape);
      return false;
    }
  }
  return true;
}

// An f32 array of `like`'s shape in *array; false with *error (naming the output's flag) when it
// cannot be allocated.
bool AllocateLike(const char* what, const NpyArray& like, NpyArray* array, std::string* error) {
  array->dtype = DType::kF32;
  array->shape = like.shape;
  array->data = AllocateAligned(array->nbytes());
  if (!array->data) {
    *error = std::string(what) + ": cannot allocate " + std::to_string(array->nbytes()) + " bytes";
    return false;
  }
  return true;
}

// A gradient file without --dout has nothing to come from.
bool NeedsBackward(const std::vector<FileArg>& gradients, bool backward, const char* backward_flags,
                   std::string* error) {
  if (backward) return true;
  for (const FileArg& g : gradients) {
    if (!g.path.empty()) {
      *error = g.flag + ": the gradients come from the backward; expected " + backward_flags +
               " with it";
      return false;
    }
  }
  return true;
}

// A bias gradient needs the bias in the forward.
bool NeedsBias(const char* grad_flag, const std::string& grad, const char* bias_flag,
               const std::string& bias, std::string* error) {
  if (grad.empty() || !bias.empty()) return true;
  *error = std::string(grad_flag) + ": expected " + bias_flag +
           " with it (without it the forward has no bias to differentiate)";
  return false;
}

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

int RunLongConv(const LongConvRunOptions& o) {
  std::string error;
  if (o.u.empty() || o.filter.empty()) {
    return Fail(kCmd, "--op longconv: expected --u and --filter");
  }
  LongConvParams params;
  if (!ParseConvPath(o.conv_path, &params.path, &error)) return Fail(kCmd, error);
  if (!CheckThreads(o.threads, &error)) return Fail(kCmd, error);
  // The backward: --dout and at least one gradient to write (LongConv1DBackward computes only
  // the requested ones).
  const std::vector<FileArg> gradients = {
      {"--du", o.du}, {"--dfilter", o.dfilter}, {"--dbias", o.dbias}};
  const bool backward = !o.dout.empty();
  if (!NeedsBackward(gradients, backward, "--dout", &error)) return Fail(kCmd, error);
  if (backward && o.du.empty() && o.dfilter.empty() && o.dbias.empty()) {
    return Fail(kCmd, "--dout: expected at least one of --du, --dfilter and --dbias to write");
  }
  if (!NeedsBias("--dbias", o.dbias, "--bias", o.bias, &error)) return Fail(kCmd, error);
  const std::vector<FileArg> inputs = {
      {"--u", o.u}, {"--filter", o.filter}, {"--bias", o.bias}, {"--dout", o.dout}};
  std::vector<FileArg> outputs = {{"--out", o.out}};
  outputs.insert(outputs.end(), gradients.begin(), gradients.end());
  if (!CheckOutputs(inputs, outputs, &error)) return Fail(kCmd, error);
  NpyArray u, h, d, dy;
  if (!LoadInputs({{"--u", o.u, &u}, {"--dout", o.dout, &dy}}, 3, "[B, N, C]", &error) ||
      !LoadInputs({{"--filter", o.filter, &h}, {"--bias", o.bias, &d}}, 0, "", &error)) {
    return Fail(kCmd, error);
  }
  NpyArray y, du, dh, dd;
  if (!AllocateLike("--out", u, &y, &error) ||
      (!o.du.empty() && !AllocateLike("--du", u, &du, &error)) ||
      (!o.dfilter.empty() && !AllocateLike("--dfilter", h, &dh, &error)) ||
      (!o.dbias.empty() && !AllocateLike("--dbias", d, &dd, &error))) {
    return Fail(kCmd, error);
  }
  params.u = u.View();
  params.filter = h.View();
  if (!o.bias.empty()) params.bias = d.View();
  params.y = y.View();
  Context ctx;
  ctx.num_threads = o.threads;
  const std::vector<FieldFlag> fields = {
      {"u", "--u"},   {"filter", "--filter"},   {"bias", "--bias"},   {"dy", "--dout"},
      {"du", "--du"}, {"dfilter", "--dfilter"}, {"dbias", "--dbias"}, {"y", "--out"}};
  auto start = std::chrono::steady_clock::now();
  Status st = LongConv1D(params, ctx);
  const double ms = MillisecondsSince(start);
  if (!st.ok()) return Fail(kCmd, StatusWithFlag(st, fields));
  double backward_ms = 0.0;
  if (backward) {
    LongConvBackwardParams bparams;
    bparams.forward = params;
    bparams.dy = dy.View();
    if (!o.du.empty()) bparams.du = du.View();
    if (!o.dfilter.empty()) bparams.dfilter = dh.View();
    if (!o.dbias.empty()) bparams.dbias = dd.View();
    start = std::chrono::steady_clock::now();
    st = LongConv1DBackward(bparams, ctx);
    backward_ms = MillisecondsSince(start);
    if (!st.ok()) return Fail(kCmd, StatusWithFlag(st, fields));
  }
  std::vector<NpyOutput> files = {{"--out", o.out, &y}};
  if (!o.du.empty()) files.push_back({"--du", o.du, &du});
  if (!o.dfilter.empty()) files.push_back({"--dfilter", o.dfilter, &dh});
  if (!o.dbias.empty()) files.push_back({"--dbias", o.dbias, &dd});
  if (!PublishNpy(inputs, files, &error)) return Fail(kCmd, error);
  if (o.verbose) {
    std::cerr << "tessera run: longconv u " << ShapeToString(u.shape) << " filter "
              << ShapeToString(h.shape) << ", conv path " << o.conv_path << ", threads "
              << ResolveThreads(ctx) << ": " << std::fixed << std::setprecision(3) << ms << " ms";
    if (backward) std::cerr << " forward + " << backward_ms << " ms backward";
    std::cerr << " -> " << o.out << "\n";
  }
  return kExitOk;
}

int RunH3(const H3RunOptions& o) {
  std::string error;
  {
    std::string missing;
    for (const FileArg& f : std::vector<FileArg>{{"--q", o.q},
                                                 {"--k", o.k},
                                                 {"--v", o.v},
                                                 {"--shift-filter", o.shift_filter},
                                                 {"--ssm-filter", o.ssm_filter}}) {
      if (f.path.empty()) missing += (missing.empty() ? "" : ", ") + f.flag;
    }
    if (!missing.empty()) {
      return Fail(kCmd, missing +
                            ": required with --op h3 (q, k, v, the shift filter [Ls, H*d] "
                            "and the SSM filter [L, H])");
    }
  }
  H3Params params;
  if (!ParseConvPath(o.conv_path, &params.path, &error)) return Fail(kCmd, error);
  if (!CheckThreads(o.threads, &error)) return Fail(kCmd, error);
  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) return Fail(kCmd, error);
  const std::vector<FileArg> filter_gradients = {{"--dshift-filter", o.dshift_filter},
                                                 {"--dshift-bias", o.dshift_bias},
                                                 {"--dssm-filter", o.dssm_filter},
                                                 {"--dssm-bias", o.dssm_bias}};
  if (!NeedsBackward(filter_gradients, backward, "--dout, --dq, --dk and --dv", &error) ||
      !NeedsBias("--dshift-bias", o.dshift_bias, "--shift-bias", o.shift_bias, &error) ||
      !NeedsBias("--dssm-bias", o.dssm_bias, "--ssm-bias", o.ssm_bias, &error)) {
    return Fail(kCmd, error);
  }
  const std::vector<FileArg> inputs = {{"--q", o.q},
                                       {"--k", o.k},
                                       {"--v", o.v},
                                       {"--shift-filter", o.shift_filter},
                                       {"--shift-bias", o.shift_bias},
                                       {"--ssm-filter", o.ssm_filter},
                                       {"--ssm-bias", o.ssm_bias},
                                       {"--dout", o.dout}};
  std::vector<FileArg> outputs = {{"--out", o.out}, {"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}};
  outputs.insert(outputs.end(), filter_gradients.begin(), filter_gradients.end());
  if (!CheckOutputs(inputs, outputs, &error)) return Fail(kCmd, error);

  NpyArray q, k, v, sf, sb, hf, hb, dout;
  if (!LoadInputs({{"--q", o.q, &q}, {"--k", o.k, &k}, {"--v", o.v, &v}, {"--dout", o.dout, &dout}},
                  4, "[B, N, H, d]", &error) ||
      !LoadInputs({{"--shift-filter", o.shift_filter, &sf},
                   {"--shift-bias", o.shift_bias, &sb},
                   {"--ssm-filter", o.ssm_filter, &hf},
                   {"--ssm-bias", o.ssm_bias, &hb}},
                  0, "", &error)) {
    return Fail(kCmd, error);
  }
  // Each output takes the shape of what it differentiates (the library checks them all).
  NpyArray out, dq, dk, dv, dsf, dsb, dhf, dhb;
  const struct {
    const char* flag;
    const std::string& file;
    const NpyArray& like;
    NpyArray* array;
  } allocations[] = {{"--out", o.out, q, &out},
                     {"--dq", o.dq, q, &dq},
                     {"--dk", o.dk, k, &dk},
                     {"--dv", o.dv, v, &dv},
                     {"--dshift-filter", o.dshift_filter, sf, &dsf},
                     {"--dshift-bias", o.dshift_bias, sb, &dsb},
                     {"--dssm-filter", o.dssm_filter, hf, &dhf},
                     {"--dssm-bias", o.dssm_bias, hb, &dhb}};
  for (const auto& a : allocations) {
    if (!a.file.empty() && !AllocateLike(a.flag, a.like, a.array, &error)) {
      return Fail(kCmd, error);
    }
  }
  params.q = q.View();
  params.k = k.View();
  params.v = v.View();
  params.shift_filter = sf.View();
  if (!o.shift_bias.empty()) params.shift_bias = sb.View();
  params.ssm_filter = hf.View();
  if (!o.ssm_bias.empty()) params.ssm_bias = hb.View();
  params.out = out.View();
  Context ctx;
  ctx.num_threads = o.threads;
  const std::vector<FieldFlag> fields = {{"q", "--q"},
                                         {"k", "--k"},
                                         {"v", "--v"},
                                         {"shift_filter", "--shift-filter"},
                                         {"shift_bias", "--shift-bias"},
                                         {"ssm_filter", "--ssm-filter"},
                                         {"ssm_bias", "--ssm-bias"},
                                         {"out", "--out"},
                                         {"dout", "--dout"},
                                         {"dq", "--dq"},
                                         {"dk", "--dk"},
                                         {"dv", "--dv"},
                                         {"dshift_filter", "--dshift-filter"},
                                         {"dshift_bias", "--dshift-bias"},
                                         {"dssm_filter", "--dssm-filter"},
                                         {"dssm_bias", "--dssm-bias"}};
  auto start = std::chrono::steady_clock::now();
  Status st = H3Layer(params, ctx);
  const double ms = MillisecondsSince(start);
  if (!st.ok()) return Fail(kCmd, StatusWithFlag(st, fields));
  double backward_ms = 0.0;
  if (backward) {
    H3BackwardParams bparams;
    bparams.forward = params;
    bparams.dout = dout.View();
    bparams.dq = dq.View();
    bparams.dk = dk.View();
    bparams.dv = dv.View();
    if (!o.dshift_filter.empty()) bparams.dshift_filter = dsf.View();
    if (!o.dshift_bias.empty()) bparams.dshift_bias = dsb.View();
    if (!o.dssm_filter.empty()) bparams.dssm_filter = dhf.View();
    if (!o.dssm_bias.empty()) bparams.dssm_bias = dhb.View();
    start = std::chrono::steady_clock::now();
    st = H3LayerBackward(bparams, ctx);
    backward_ms = MillisecondsSince(start);
    if (!st.ok()) return Fail(kCmd, StatusWithFlag(st, fields));
  }
  std::vector<NpyOutput> files;
  for (const auto& a : allocations) {
    if (!a.file.empty()) files.push_back({a.flag, a.file, a.array});
  }
  if (!PublishNpy(inputs, files, &error)) return Fail(kCmd, error);
  if (o.verbose) {
    std::cerr << "tessera run: h3 q " << ShapeToString(q.shape) << " shift filter "
              << ShapeToString(sf.shape) << " ssm filter " << ShapeToString(hf.shape)
              << ", conv path " << o.conv_path << ", threads " << ResolveThreads(ctx) << ": "
              << std::fixed << std::setprecision(3) << ms << " ms";
    if (backward) std::cerr << " forward + " << backward_ms << " ms backward";
    std::cerr << ", peak RSS " << std::setprecision(1) << PeakRssMiB() << " MiB\n";
  }
  return kExitOk;
}

}  // namespace cli
}  // namespace tessera
