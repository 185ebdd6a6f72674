// SPDX-License-Identifier: Apache-2.0
// `tessera run --op linear`: linear attention (tessera/linear.h) on .npy inputs: the chunked or
// the recurrent form, recurrent state handed in and out through files, LRPE, and the backward.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"

namespace tessera {
namespace cli {

struct LinearRunOptions {
  std::string q, k, v, out;
  std::string dout, dq, dk, dv, dgates;  // backward: the first four together, dgates for gla
  LinearOptionText text;                 // --variant, --feature-map, --normalize, --window
  std::string decay;                     // --decay L1,L2,... (decay)
  std::string gates;                     // --gates G.npy (gla)
  bool causal = false;                   // --causal: the default, accepted for symmetry
  bool non_causal = false;
  std::optional<float> scale;
  std::string prefix;  // integers as text, so that a negative value is our error, not CLI11's
  std::string chunk;
  std::string form = "chunked";
  std::string state_in, state_out, normalizer_in, normalizer_out;
  std::string lrpe_theta;       // --lrpe-theta THETA.npy: LRPE's angles, f32 [Dk] or [Hq, Dk]
  std::string position_offset;  // --position-offset N (with --lrpe-theta), as text like --prefix
  int32_t threads = 0;
  std::string path = "auto";
  bool verbose = false;
};

// Runs the command; returns the process exit code (errors printed as "tessera run: ...").
int RunLinear(const LinearRunOptions& o);

// The variant's own inputs, shared with `run --op linear --dist lasp2`: --decay with decay (its
// rates parsed into *lambdas), --gates with gla, --dgates with gla and the backward; each refused
// elsewhere, since it would be silently ignored. False with *error naming the flag.
bool CheckVariantInputs(const LinearRunOptions& o, LinearVariant variant, bool backward,
                        std::vector<float>* lambdas, std::string* error);

// One decay rate is broadcast to every one of the heads_q query heads; otherwise there must be
// one per head. False with *error naming --decay.
bool ExpandDecay(const std::string& text, int64_t heads_q, std::vector<float>* lambdas,
                 std::string* error);

}  // namespace cli
}  // namespace tessera
