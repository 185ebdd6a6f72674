// SPDX-License-Identifier: Apache-2.0
// `tessera run --op longconv`: LongConv1D (tessera/longconv.h) on .npy files.
#pragma once

#include <cstdint>
#include <string>

namespace tessera {
namespace cli {

struct LongConvRunOptions {
  std::string u, filter, bias, out;  // u [B, N, C], filter [L, C], bias [C] (optional), out
  std::string conv_path = "auto";    // auto, direct or fft
  int32_t threads = 0;
  bool verbose = false;
};

int RunLongConv(const LongConvRunOptions& o);

}  // namespace cli
}  // namespace tessera
