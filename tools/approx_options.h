// SPDX-License-Identifier: Apache-2.0
// The approximate-attention knobs shared by `tessera bench --op approx` and `tessera run --op
// approx`: one flag per knob (--features, --block, ...), mapped onto the options struct of the
// chosen method (tessera/approx.h). A knob the method does not read is refused by name, so a
// typo'd method never runs with silently ignored settings.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/approx.h"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace tessera {
namespace cli {

struct ApproxKnobs {
  std::string method;
  int64_t features = 0;      // wersa / performer: random features (0: the struct's default)
  int64_t block = 0;         // hyper
  int64_t samples = -1;      // hyper (-1: default)
  int64_t lsh_bits = 0;      // hyper
  int64_t min_seq_len = -1;  // hyper (-1: default)
  int64_t clusters = 0;      // routing
  int64_t agents = 0;        // agent
  int64_t window = -1;       // routing: tokens per cluster; hilo: s (-1: default)
  int64_t levels = 0;        // wersa
  double bandwidth = 0;      // wersa (0: default)
  double ema = -1;           // routing (-1: default)
  std::string grid;          // hilo: "HxW" (empty: the most square factorization of S)
  int64_t lofi_heads = -1;   // hilo (-1: half the heads)
  // The knob options as registered, to tell given from default.
  std::vector<CLI::Option*> options;
};

// Registers the knob flags (not --window, which bench and run share with other ops; pass it in
// `window_option` when given) in option group `group`.
void AddApproxKnobs(CLI::App* app, ApproxKnobs* knobs, const std::string& group);

// Fills params->method and the method's options struct from the knobs for a problem of S tokens
// and Hq query heads; false with *error naming the flag for an unknown method, a knob the method
// does not read, or a malformed value (the library validates the ranges). Routing's centroids
// and other tensors are the caller's.
bool ApplyApproxKnobs(const ApproxKnobs& knobs, bool window_given, int64_t seq, int64_t heads_q,
                      ApproxParams* params, std::string* error);

// Routing's initial centroids [Hq, C, D] when none are given: the L2-normalized keys of batch 0
// at C spread tokens (token (c * S / C + c) mod S), of each query head's KV head.
std::vector<float> CentroidsFromKeys(const float* k, int64_t seq, int64_t heads_q, int64_t heads_kv,
                                     int64_t dim, int64_t clusters);

}  // namespace cli
}  // namespace tessera
