// SPDX-License-Identifier: Apache-2.0
// `tessera run --op linear`: linear attention on .npy inputs.
//
// The variants map onto LinearAttentionParams as follows: plain sets neither decay nor gates;
// decay fills an f32 [Hq] rate vector from --decay (one value is broadcast to every head); gla
// reads the f32 log-space gates of --gates, [B, S, Hq, Dk] per channel or [B, S, Hq] one per token
// and head (dgates takes the same shape); based selects the Taylor feature map
// with normalize on and a window of 64 keys unless told otherwise. --lrpe-theta adds LRPE to
// plain and decay (the identity, elu1 or relu map; not gla, not the Taylor map): the f32 angles
// [Dk] or [Hq, Dk] of THETA.npy, positions from --position-offset, states 2 Dk features wide.
// Like the exact run, inputs are
// read in their own dtype and handed over as views, every flag is checked before any work (the
// ones only the CLI knows about here, the rest by the library), and outputs are written only when
// the whole call succeeded, all of them or none (output_files.h).
#include "cmd_run_linear.h"

#include <chrono>
#include <iomanip>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "npy.h"
#include "output_files.h"
#include "tessera/linear.h"

namespace tessera {
namespace cli {
namespace {

constexpr const char* kCmd = "run";

// A file flag and what was given to it (empty: not given).
struct Flag {
  const char* flag;
  const std::string& file;
};

// Loads `path` (given to `flag`) with one of `accepted` dtypes; with rank > 0 the array must
// have that rank.
bool LoadInput(const char* flag, const std::string& path, const std::vector<DType>& accepted,
               size_t rank, const char* layout, NpyArray* array, std::string* error) {
  if (!LoadNpy(path, accepted, array, error)) {
    *error = std::string(flag) + " " + *error;
    return false;
  }
  if (rank > 0 && array->shape.size() != rank) {
    *error = std::string(flag) + " " + path + ": expected a rank-" + std::to_string(rank) +
             " array " + layout + ", got shape " + ShapeToString(array->shape);
    return false;
  }
  return true;
}

bool ExpectShape(const char* flag, const std::string& path, const NpyArray& array,
                 const std::vector<int64_t>& want, const char* layout, std::string* error) {
  if (array.shape == want) return true;
  *error = std::string(flag) + " " + path + ": expected shape " + ShapeToString(want) + " " +
           layout + ", got " + ShapeToString(array.shape);
  return false;
}

bool Allocate(const char* what, DType dtype, std::vector<int64_t> shape, NpyArray* array,
              std::string* error) {
  array->dtype = dtype;
  array->shape = std::move(shape);
  array->data = AllocateAligned(array->nbytes());
  if (!array->data) {
    *error = std::string("cannot allocate the ") + what + " (" + std::to_string(array->nbytes()) +
             " bytes)";
    return false;
  }
  return true;
}

// The library names LRPE's fields; the user gave flags.
std::string RunStatusMessage(const Status& status) {
  for (const auto& [field, flag] :
       {std::pair<std::string, const char*>{"lrpe_theta", "--lrpe-theta"},
        {"position_offset", "--position-offset"}}) {
    if (status.message().compare(0, field.size() + 1, field + ":") == 0) {
      return std::string(flag) + ": " + status.ToString();
    }
  }
  return LinearStatusMessage(status);
}

}  // namespace

bool CheckVariantInputs(const LinearRunOptions& o, LinearVariant variant, bool backward,
                        std::vector<float>* lambdas, std::string* error) {
  const std::string variant_name = LinearVariantName(variant);
  if (variant == LinearVariant::kDecay) {
    if (o.decay.empty()) {
      *error =
          "--decay: --variant decay needs the decay rates 'L1,L2,...' (one per query head, or "
          "one for all)";
      return false;
    }
    if (!ParseDecay(o.decay, lambdas, error)) return false;
  } else if (!o.decay.empty()) {
    *error = "--decay: only with --variant decay, got --variant " + variant_name;
    return false;
  }
  if (variant == LinearVariant::kGla) {
    if (o.gates.empty()) {
      *error = "--gates: --variant gla needs the log-space gates G.npy (float32 [B, S, Hq, Dk])";
      return false;
    }
  } else if (!o.gates.empty()) {
    *error = "--gates: only with --variant gla, got --variant " + variant_name;
    return false;
  }
  if (!o.dgates.empty() && variant != LinearVariant::kGla) {
    *error = "--dgates: only with --variant gla, got --variant " + variant_name;
    return false;
  }
  if (!backward && !o.dgates.empty()) {
    *error =
        "--dgates: the gates' gradient comes from the backward; expected --dout, --dq, --dk and "
        "--dv with it";
    return false;
  }
  return true;
}

bool ExpandDecay(const std::string& text, int64_t heads_q, std::vector<float>* lambdas,
                 std::string* error) {
  if (lambdas->size() == 1) lambdas->assign(static_cast<size_t>(heads_q), (*lambdas)[0]);
  if (static_cast<int64_t>(lambdas->size()) == heads_q) return true;
  *error = "--decay: expected one decay rate per query head (Hq = " + std::to_string(heads_q) +
           ") or one for all, got " + std::to_string(lambdas->size()) + " in '" + text + "'";
  return false;
}

int RunLinear(const LinearRunOptions& o) {
  std::string error;
  Context ctx;
  ctx.num_threads = o.threads;
  if (!CheckThreads(o.threads, &error)) return Fail(kCmd, error);
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(kCmd, error);

  LinearChoice choice;
  if (!ResolveLinearOptions(o.text, &choice, &error)) return Fail(kCmd, error);
  const LinearVariant variant = choice.variant;
  const std::string variant_name = LinearVariantName(variant);
  bool recurrent = false;
  if (!ParseLinearForm(o.form, &recurrent, &error)) return Fail(kCmd, error);
  if (o.causal && o.non_causal) {
    return Fail(kCmd, "--causal and --non-causal: expected at most one of them");
  }
  if (o.non_causal && choice.window > 0) {
    return Fail(kCmd,
                "--non-causal: the exact window part is causal (--variant based has --window " +
                    std::to_string(kBasedWindow) + " by default); expected --window 0 with it");
  }
  int64_t prefix = 0, chunk = 64;
  if (!o.prefix.empty() && !ParseNonNegative("--prefix", o.prefix, &prefix, &error)) {
    return Fail(kCmd, error);
  }
  // Decay and gates are defined along the causal order; the library refuses the other orders
  // too, but naming the flag that changed the order is clearer than naming the decay.
  const bool decayed = variant == LinearVariant::kDecay || variant == LinearVariant::kGla;
  if (decayed && o.non_causal) {
    return Fail(kCmd, "--non-causal: --variant " + variant_name +
                          " decays along the causal order; expected causal attention with it");
  }
  if (decayed && prefix > 0) {
    return Fail(kCmd, "--prefix: --variant " + variant_name +
                          " decays along the causal order; the prefix form takes plain or based "
                          "only, got --prefix " +
                          std::to_string(prefix));
  }
  if (!o.chunk.empty() && !ParseNonNegative("--chunk", o.chunk, &chunk, &error)) {
    return Fail(kCmd, error);
  }
  // LRPE doubles phi's features: not the Taylor map's, and not under gates, which act on the Dk
  // key channels (the library refuses both too; the flags are named here).
  const bool lrpe = !o.lrpe_theta.empty();
  int64_t position_offset = 0;
  if (!o.position_offset.empty()) {
    if (!lrpe) {
      return Fail(kCmd,
                  "--position-offset: only with --lrpe-theta (it is the position of LRPE's first "
                  "token)");
    }
    if (!ParseNonNegative("--position-offset", o.position_offset, &position_offset, &error)) {
      return Fail(kCmd, error);
    }
  }
  if (lrpe && variant == LinearVariant::kGla) {
    return Fail(kCmd,
                "--lrpe-theta: not with --variant gla (the gates act on the Dk key channels, LRPE "
                "doubles them)");
  }
  if (lrpe && choice.feature_map == LinearFeatureMap::kTaylor2) {
    return Fail(kCmd,
                "--lrpe-theta: expected the identity, elu1 or relu feature map, got taylor2" +
                    std::string(variant == LinearVariant::kBased ? " (--variant based)" : ""));
  }

  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) return Fail(kCmd, error);
  std::vector<float> lambdas;
  if (!CheckVariantInputs(o, variant, backward, &lambdas, &error)) return Fail(kCmd, error);

  // The recurrent state: f32 files; under --normalize the normalizer travels with it, since a
  // state without its normalizer cannot continue a normalized sequence.
  if (!choice.normalize) {
    const Flag normalizer_flags[] = {{"--normalizer-in", o.normalizer_in},
                                     {"--normalizer-out", o.normalizer_out}};
    for (const Flag& f : normalizer_flags) {
      if (!f.file.empty()) {
        return Fail(kCmd, std::string(f.flag) +
                              ": the normalizer exists only with --normalize "
                              "(the default of --variant based)");
      }
    }
  } else {
    if (o.state_in.empty() != o.normalizer_in.empty()) {
      return Fail(kCmd,
                  "--state-in and --normalizer-in: with --normalize the state and its "
                  "normalizer go together; got only " +
                      std::string(o.state_in.empty() ? "--normalizer-in" : "--state-in"));
    }
    if (o.state_out.empty() != o.normalizer_out.empty()) {
      return Fail(kCmd,
                  "--state-out and --normalizer-out: with --normalize the state and its "
                  "normalizer go together; got only " +
                      std::string(o.state_out.empty() ? "--normalizer-out" : "--state-out"));
    }
  }
  const Flag state_flags[] = {{"--state-in", o.state_in},
                              {"--state-out", o.state_out},
                              {"--normalizer-in", o.normalizer_in},
                              {"--normalizer-out", o.normalizer_out}};
  if (o.non_causal) {
    // A state carries the causal prefix of a sequence; without causality there is none.
    for (const Flag& f : state_flags) {
      if (!f.file.empty()) {
        return Fail(kCmd, std::string(f.flag) +
                              ": a recurrent state carries the causal prefix; expected no state "
                              "files with --non-causal");
      }
    }
  }
  if (backward) {
    // LinearAttentionBackward differentiates the chunked linear part alone.
    if (choice.window > 0) {
      return Fail(kCmd,
                  "--window: the backward does not cover the exact window part; expected "
                  "--window 0 with --dout (--variant based defaults to --window " +
                      std::to_string(kBasedWindow) + ")");
    }
    for (const Flag& f : state_flags) {
      if (!f.file.empty()) {
        return Fail(kCmd, std::string(f.flag) +
                              ": the backward takes no recurrent state; expected no state "
                              "files with --dout");
      }
    }
  }

  // Every destination is checked before any work (output_files.h) and again when publishing.
  const std::vector<FileArg> input_files = {{"--q", o.q},
                                            {"--k", o.k},
                                            {"--v", o.v},
                                            {"--dout", o.dout},
                                            {"--gates", o.gates},
                                            {"--lrpe-theta", o.lrpe_theta},
                                            {"--state-in", o.state_in},
                                            {"--normalizer-in", o.normalizer_in}};
  const std::vector<FileArg> output_files = {{"--out", o.out},
                                             {"--dq", o.dq},
                                             {"--dk", o.dk},
                                             {"--dv", o.dv},
                                             {"--dgates", o.dgates},
                                             {"--state-out", o.state_out},
                                             {"--normalizer-out", o.normalizer_out}};
  if (!CheckOutputs(input_files, output_files, &error)) return Fail(kCmd, error);

  // Inputs, in their own dtype (f32 or f16; the library checks that they agree).
  const std::vector<DType> floats = {DType::kF32, DType::kF16};
  const std::vector<DType> f32_only = {DType::kF32};
  NpyArray q, k, v, dout, gates, theta, state_in, normalizer_in;
  const struct {
    const char* flag;
    const std::string& file;
    NpyArray* array;
  } inputs[] = {{"--q", o.q, &q}, {"--k", o.k, &k}, {"--v", o.v, &v}, {"--dout", o.dout, &dout}};
  for (const auto& in : inputs) {
    if (in.file.empty()) continue;  // --dout without the backward
    if (!LoadInput(in.flag, in.file, floats, 4, "[B, S, H, D]", in.array, &error)) {
      return Fail(kCmd, error);
    }
  }
  const int64_t B = q.shape[0], S = q.shape[1], Hq = q.shape[2], Dk = q.shape[3];
  const int64_t Dv = v.shape[3];
  const int64_t F = LinearFeatureDim(choice.feature_map, Dk, lrpe);
  // Before any state buffer of F x Dv floats is allocated (the library checks it again).
  if (F > kMaxLinearFeatureDim) {
    return Fail(kCmd, "--q: expected a feature dim F <= " + std::to_string(kMaxLinearFeatureDim) +
                          " for the " + FeatureMapName(choice.feature_map) +
                          " map, got Dk = " + std::to_string(Dk));
  }
  if (prefix > S) {
    return Fail(kCmd, "--prefix: expected 0 <= P <= S = " + std::to_string(S) + ", got " +
                          std::to_string(prefix));
  }
  if (!lambdas.empty() && !ExpandDecay(o.decay, Hq, &lambdas, &error)) return Fail(kCmd, error);
  // Gates per channel [B, S, Hq, Dk], or scalar per token and head [B, S, Hq] (GLA's simple form).
  std::vector<int64_t> gates_shape = {B, S, Hq, Dk};
  if (!o.gates.empty()) {
    if (!LoadInput("--gates", o.gates, f32_only, 0, "", &gates, &error)) return Fail(kCmd, error);
    if (gates.shape.size() == 3) gates_shape = {B, S, Hq};
    if (!ExpectShape("--gates", o.gates, gates, gates_shape,
                     gates.shape.size() == 3 ? "[B, S, Hq] (from q)"
                                             : "[B, S, Hq, Dk] or [B, S, Hq] (from q)",
                     &error)) {
      return Fail(kCmd, error);
    }
  }
  if (lrpe) {
    if (!LoadInput("--lrpe-theta", o.lrpe_theta, f32_only, 0, "", &theta, &error)) {
      return Fail(kCmd, error);
    }
    const std::vector<int64_t> shared = {Dk}, per_head = {Hq, Dk};
    if (theta.shape != shared && theta.shape != per_head) {
      return Fail(kCmd, "--lrpe-theta " + o.lrpe_theta + ": expected shape " +
                            ShapeToString(shared) + " or " + ShapeToString(per_head) +
                            " ([Dk] or [Hq, Dk] from q), got " + ShapeToString(theta.shape));
    }
  }
  const std::vector<int64_t> state_shape = {B, Hq, F, Dv};
  const std::vector<int64_t> normalizer_shape = {B, Hq, F};
  const std::string state_layout = "[B, Hq, F, Dv] (F = " + std::to_string(F) + " for the " +
                                   FeatureMapName(choice.feature_map) +
                                   " map at Dk = " + std::to_string(Dk) +
                                   (lrpe ? " with LRPE" : "") + ")";
  const std::string normalizer_layout = "[B, Hq, F] (F = " + std::to_string(F) + ")";
  if (!o.state_in.empty()) {
    if (!LoadInput("--state-in", o.state_in, f32_only, 0, "", &state_in, &error) ||
        !ExpectShape("--state-in", o.state_in, state_in, state_shape, state_layout.c_str(),
                     &error)) {
      return Fail(kCmd, error);
    }
  }
  if (!o.normalizer_in.empty()) {
    if (!LoadInput("--normalizer-in", o.normalizer_in, f32_only, 0, "", &normalizer_in, &error) ||
        !ExpectShape("--normalizer-in", o.normalizer_in, normalizer_in, normalizer_shape,
                     normalizer_layout.c_str(), &error)) {
      return Fail(kCmd, error);
    }
  }

  // Outputs: out [B, S, Hq, Dv] and the gradients in their inputs' shapes and dtypes, the
  // state files and dgates in f32.
  NpyArray out, dq, dk, dv, dgates, state_out, normalizer_out;
  if (!Allocate("output", q.dtype, {B, S, Hq, Dv}, &out, &error) ||
      (backward && (!Allocate("dq", q.dtype, q.shape, &dq, &error) ||
                    !Allocate("dk", k.dtype, k.shape, &dk, &error) ||
                    !Allocate("dv", v.dtype, v.shape, &dv, &error))) ||
      (!o.dgates.empty() && !Allocate("dgates", DType::kF32, gates_shape, &dgates, &error)) ||
      (!o.state_out.empty() &&
       !Allocate("final state", DType::kF32, state_shape, &state_out, &error)) ||
      (!o.normalizer_out.empty() &&
       !Allocate("final normalizer", DType::kF32, normalizer_shape, &normalizer_out, &error))) {
    return Fail(kCmd, error);
  }

  LinearAttentionParams params;
  params.q = q.View();
  params.k = k.View();
  params.v = v.View();
  params.out = out.View();
  params.feature_map = choice.feature_map;
  params.scale = o.scale;
  params.causal = !o.non_causal;
  params.prefix_len = prefix;
  params.normalize = choice.normalize;
  if (!lambdas.empty()) params.decay = MakeView1(lambdas.data(), DType::kF32, Hq);
  if (gates.data) params.gates = gates.View();
  params.window = choice.window;
  if (state_in.data) params.initial_state = state_in.View();
  if (normalizer_in.data) params.initial_normalizer = normalizer_in.View();
  if (state_out.data) params.final_state = state_out.View();
  if (normalizer_out.data) params.final_normalizer = normalizer_out.View();
  params.chunk_size = chunk;
  if (theta.data) params.lrpe_theta = theta.View();
  params.position_offset = position_offset;

  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  Status status =
      recurrent ? LinearAttentionRecurrent(params, ctx) : LinearAttentionForward(params, ctx);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (!status.ok()) return Fail(kCmd, RunStatusMessage(status));
  double backward_ms = 0.0;
  if (backward) {
    LinearAttentionBackwardParams bparams;
    bparams.forward = params;
    bparams.dout = dout.View();
    bparams.dq = dq.View();
    bparams.dk = dk.View();
    bparams.dv = dv.View();
    if (dgates.data) bparams.dgates = dgates.View();
    start = Clock::now();
    status = LinearAttentionBackward(bparams, ctx);
    backward_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (!status.ok()) return Fail(kCmd, RunStatusMessage(status));
  }

  std::vector<NpyOutput> outputs = {{"--out", o.out, &out}};
  if (backward) {
    outputs.push_back({"--dq", o.dq, &dq});
    outputs.push_back({"--dk", o.dk, &dk});
    outputs.push_back({"--dv", o.dv, &dv});
  }
  if (dgates.data) outputs.push_back({"--dgates", o.dgates, &dgates});
  if (state_out.data) outputs.push_back({"--state-out", o.state_out, &state_out});
  if (normalizer_out.data)
    outputs.push_back({"--normalizer-out", o.normalizer_out, &normalizer_out});
  if (!PublishNpy(input_files, outputs, &error)) return Fail(kCmd, error);

  if (o.verbose) {
    std::cerr << "tessera run: linear " << variant_name << " ("
              << FeatureMapName(choice.feature_map) << " map, F " << F
              << (choice.normalize ? ", normalized" : "") << (params.causal ? "" : ", non-causal")
              << (choice.window > 0 ? ", window " + std::to_string(choice.window) : "")
              << (lrpe ? ", LRPE from position " + std::to_string(position_offset) : "") << ") q "
              << ShapeToString(q.shape) << " k " << ShapeToString(k.shape) << " v "
              << ShapeToString(v.shape) << " " << DTypeName(q.dtype) << ", "
              << (recurrent ? "recurrent" : "chunked C " + std::to_string(chunk)) << ", threads "
              << ResolveThreads(ctx) << ": " << std::fixed << std::setprecision(3) << ms << " ms";
    if (backward) std::cerr << " forward + " << backward_ms << " ms backward";
    std::cerr << ", peak RSS " << std::setprecision(1) << PeakRssMiB() << " MiB\n";
  }
  return kExitOk;
}

}  // namespace cli
}  // namespace tessera
