// SPDX-License-Identifier: Apache-2.0
// `tessera run --op longconv` and `--op h3`: LongConv1D and H3Layer (tessera/longconv.h) on .npy
// files, and with --dout their backwards (LongConv1DBackward, H3LayerBackward).
#pragma once

#include <cstdint>
#include <string>

namespace tessera {
namespace cli {

struct LongConvRunOptions {
  std::string u, filter, bias, out;  // u [B, N, C], filter [L, C], bias [C] (optional), out
  // Backward: dout [B, N, C] and at least one of the gradients to write.
  std::string dout, du, dfilter, dbias;
  std::string conv_path = "auto";  // auto, direct or fft
  int32_t threads = 0;
  bool verbose = false;
};

int RunLongConv(const LongConvRunOptions& o);

// H3: q, k, v, out [B, N, H, d], shift_filter [Ls, H d], shift_bias [H d], ssm_filter [L, H],
// ssm_bias [H] (the biases optional).
struct H3RunOptions {
  std::string q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, out;
  // Backward: dout with dq, dk and dv (all four or none), and optionally the filter and bias
  // gradients.
  std::string dout, dq, dk, dv, dshift_filter, dshift_bias, dssm_filter, dssm_bias;
  std::string conv_path = "auto";
  int32_t threads = 0;
  bool verbose = false;
};

int RunH3(const H3RunOptions& o);

}  // namespace cli
}  // namespace tessera
