// SPDX-License-Identifier: Apache-2.0
// Shared pieces of the `tessera` command-line tool: exit codes, error reporting, option parsing
// helpers and process measurements. Each subcommand lives in its own cmd_*.cc and registers
// itself through a Add*Command function, so new subcommands and ops slot in without touching
// the others.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/linear.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace CLI {
class App;
}  // namespace CLI

namespace tessera {
namespace cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 2;  // bad arguments, unreadable files, tessera errors

// Prints "tessera <command>: <message>" to stderr and returns kExitError.
int Fail(const std::string& command, const std::string& message);

// False with *error naming the option when an option of `command` was given an empty value
// ("--window ''"), which would otherwise read as "not given" or as 0.
bool RefuseEmptyValues(const CLI::App& command, std::string* error);

// A subcommand's entry point, run after parsing when that subcommand was selected.
using CommandMain = std::function<int()>;

// Register the subcommands; each returns the function to run when it is selected.
CommandMain AddRunCommand(CLI::App& app);
CommandMain AddBenchCommand(CLI::App& app);
CommandMain AddInfoCommand(CLI::App& app);

// Parses "L,R" (each an integer >= -1) into *left, *right; false with *error set otherwise.
bool ParseWindow(const std::string& text, int64_t* left, int64_t* right, std::string* error);

// Most worker threads --threads takes: kMaxThreadsPerHardwareThread per hardware thread, and
// never more than kMaxThreads (a typo such as 100000 would exhaust the process's threads).
constexpr int32_t kMaxThreads = 4096;
constexpr int32_t kMaxThreadsPerHardwareThread = 64;
int32_t MaxThreads();

// Checks --threads: 0 (all hardware threads) .. MaxThreads(); false with *error otherwise.
bool CheckThreads(int32_t threads, std::string* error);

// --target NAME: forces the SIMD target every later tessera call runs (SetSimdTarget, process
// wide); "auto" keeps dynamic dispatch. False with *error (naming --target and the choices) for
// a target this build did not compile or this CPU cannot run.
bool ApplySimdTarget(const std::string& name, std::string* error);
// The --target option's help text, listing the compiled targets.
std::string SimdTargetHelp();

// Parses "auto", "reference", "generic" or "fast".
bool ParsePath(const std::string& text, Path* path, std::string* error);

// Parses "f32", "bf16" or "f16".
bool ParseDType(const std::string& text, DType* dtype, std::string* error);

// Parses "f32", "bf16", "f16", "int8" or "int4" (the --kv-dtype option).
bool ParseKVDType(const std::string& text, KVDType* dtype, std::string* error);

// Parses "L1,L2,..." (each an integer in 1..2^31-1) into *lens (the --lens option).
bool ParseLens(const std::string& text, std::vector<int32_t>* lens, std::string* error);

// Parses a whole-string integer >= 0 given to `flag` (used in its error message).
bool ParseNonNegative(const std::string& flag, const std::string& text, int64_t* value,
                      std::string* error);

// The backward's gradient files go together: true (*backward = true) when --dout, --dq, --dk and
// --dv are all given, true (*backward = false) when none is; false with *error when only some are
// (one without the others is almost certainly a mistake).
bool GradientFiles(const std::string& dout, const std::string& dq, const std::string& dk,
                   const std::string& dv, bool* backward, std::string* error);

// ---------------------------------------------------------------------------------------------
// Linear attention (--op linear of run and bench): the family of tessera/linear.h as variants.
//   plain  no decay, no gates (optionally the JRT prefix form)
//   decay  a constant decay per query head (RetNet, TransNormerLLM / Lightning Attention)
//   gla    data-dependent log-space gates per query head and key channel (GLA)
//   based  the Taylor feature map, normalized, plus an exact sliding window (BASED)
enum class LinearVariant : int32_t { kPlain, kDecay, kGla, kBased };

// BASED's sliding window in keys (Arora et al. 2024): --variant based's default --window.
constexpr int64_t kBasedWindow = 64;

// "plain", "decay", "gla", "based".
const char* LinearVariantName(LinearVariant variant);
// "identity", "elu1", "relu", "taylor2".
const char* FeatureMapName(LinearFeatureMap map);

// The linear options as typed; an empty string (or -1 for normalize) means "not given", so the
// variant's default applies.
struct LinearOptionText {
  std::string variant = "plain";
  std::string feature_map;
  int normalize = -1;  // -1: not given, 0: --no-normalize, 1: --normalize
  std::string window;
};

// The resolved choice: BASED defaults to the Taylor map, normalize on and a window of
// kBasedWindow keys; the other variants to identity, unnormalized, no window.
struct LinearChoice {
  LinearVariant variant = LinearVariant::kPlain;
  LinearFeatureMap feature_map = LinearFeatureMap::kIdentity;
  bool normalize = false;
  int64_t window = 0;
};

// Resolves the options above; false with *error naming the offending flag (--variant,
// --feature-map, --window) otherwise. Rejects a feature map the variant cannot take (gla:
// identity only; based: taylor2 only) here, where the flag can be named.
bool ResolveLinearOptions(const LinearOptionText& text, LinearChoice* choice, std::string* error);

// Parses --form: "chunked" (LinearAttentionForward) or "recurrent" (LinearAttentionRecurrent).
bool ParseLinearForm(const std::string& text, bool* recurrent, std::string* error);

// Parses --decay "L1,L2,...": each a finite number in (0, 1].
bool ParseDecay(const std::string& text, std::vector<float>* lambdas, std::string* error);

// A linear-attention Status as text. The library's messages name LinearAttentionParams fields,
// the user typed flags: when the message starts with a field that one flag sets, that flag is
// named in front ("--chunk: invalid argument: chunk_size: ...").
std::string LinearStatusMessage(const Status& status);

// Peak resident set size of this process so far, in MiB.
double PeakRssMiB();

}  // namespace cli
}  // namespace tessera
