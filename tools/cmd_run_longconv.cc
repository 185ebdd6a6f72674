// SPDX-License-Identifier: Apache-2.0
#include "cmd_run_longconv.h"

#include <iostream>
#include <string>
#include <vector>

#include "cli_common.h"
#include "npy.h"
#include "output_files.h"
#include "tessera/longconv.h"

namespace tessera {
namespace cli {

int RunLongConv(const LongConvRunOptions& o) {
  const char* cmd = "run";
  std::string error;
  if (o.u.empty() || o.filter.empty()) {
    return Fail(cmd, "--op longconv: expected --u and --filter");
  }
  LongConvParams params;
  if (o.conv_path == "direct") {
    params.path = LongConvPath::kDirect;
  } else if (o.conv_path == "fft") {
    params.path = LongConvPath::kFft;
  } else if (o.conv_path != "auto") {
    return Fail(cmd, "--conv-path: expected auto, direct or fft, got '" + o.conv_path + "'");
  }
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  const std::vector<FileArg> inputs = {{"--u", o.u}, {"--filter", o.filter}, {"--bias", o.bias}};
  const std::vector<FileArg> outputs = {{"--out", o.out}};
  if (!CheckOutputs(inputs, outputs, &error)) return Fail(cmd, error);
  NpyArray u, h, d;
  if (!LoadNpy(o.u, {DType::kF32}, &u, &error) || !LoadNpy(o.filter, {DType::kF32}, &h, &error) ||
      (!o.bias.empty() && !LoadNpy(o.bias, {DType::kF32}, &d, &error))) {
    return Fail(cmd, error);
  }
  NpyArray y;
  y.dtype = DType::kF32;
  y.shape = u.shape;
  if (u.shape.size() == 3) {
    y.data = AllocateAligned(y.nbytes());
    if (!y.data && y.nbytes() > 0) return Fail(cmd, "cannot allocate the output");
  }
  params.u = u.View();
  params.filter = h.View();
  if (!o.bias.empty()) params.bias = d.View();
  if (u.shape.size() == 3) params.y = y.View();
  Context ctx;
  ctx.num_threads = o.threads;
  const Status st = LongConv1D(params, ctx);
  if (!st.ok()) return Fail(cmd, st.ToString());
  if (!PublishNpy(inputs, {{"--out", o.out, &y}}, &error)) return Fail(cmd, error);
  if (o.verbose) {
    std::cerr << "tessera run: longconv u " << ShapeToString(u.shape) << " filter "
              << ShapeToString(h.shape) << " -> " << o.out << "\n";
  }
  return kExitOk;
}

}  // namespace cli
}  // namespace tessera
