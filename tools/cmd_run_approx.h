// SPDX-License-Identifier: Apache-2.0
// `tessera run --op approx`: an approximate method (tessera/approx.h) on .npy inputs, and the
// backward of the methods that have one.
#pragma once

#include <optional>
#include <string>

#include "approx_options.h"
#include "cli_common.h"

namespace tessera {
namespace cli {

struct ApproxRunOptions {
  std::string q, k, v, out, lse;
  std::string dout, dq, dk, dv;  // backward: all four or none
  ApproxKnobs knobs;
  std::string window;  // routing: tokens per cluster; hilo: s (integer text; empty: default)
  std::string centroids, centroids_out;  // routing
  std::string gates;                     // wersa: float32 [B, S, levels]
  bool causal = false;
  std::optional<float> scale;
  uint64_t seed = 0;
  int32_t threads = 0;
  bool verbose = false;
};

// Runs the command; returns the process exit code (errors printed as "tessera run: ...").
int RunApprox(const ApproxRunOptions& o);

}  // namespace cli
}  // namespace tessera
