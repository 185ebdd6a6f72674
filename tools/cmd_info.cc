// SPDX-License-Identifier: Apache-2.0
// `tessera info`: version, the SIMD target dynamic dispatch picks (and the targets this build
// compiled and this CPU supports, the choices of --target), threads, and the measured
// fp32 FMA peak and memory read bandwidth on one thread and on all hardware threads (and on the
// threads a call would use, `peak_gbps`, the ceiling `tessera bench --op decode` reports against).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_common.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace {

struct InfoOptions {
  int32_t threads = 0;
  bool json = false;
};

int InfoMain(const InfoOptions& o) {
  std::string error;
  if (!CheckThreads(o.threads, &error)) return Fail("info", error);
  Context ctx;
  ctx.num_threads = o.threads;
  const int32_t hw = HardwareThreads();
  const int32_t used = ResolveThreads(ctx);
  const double peak1 = MeasureFmaPeakGflops(1);
  const double peak_all = hw > 1 ? MeasureFmaPeakGflops(hw) : peak1;
  const double gbps1 = MeasureReadBandwidthGBps(1);
  const double gbps_all = hw > 1 ? MeasureReadBandwidthGBps(hw) : gbps1;
  const double gbps_used = used == 1    ? gbps1
                           : used == hw ? gbps_all
                                        : MeasureReadBandwidthGBps(used);
  if (o.json) {
    nlohmann::ordered_json j;
    j["version"] = Version();
    j["simd_target"] = SimdTargetName();
    j["simd_targets_compiled"] = CompiledSimdTargets();
    j["simd_targets_supported"] = SupportedSimdTargets();
    j["hardware_threads"] = hw;
    j["threads"] = used;
    j["peak_gflops_1t"] = peak1;
    j["peak_gflops_all"] = peak_all;
    j["peak_gbps_1t"] = gbps1;
    j["peak_gbps_all"] = gbps_all;
    j["peak_gbps"] = gbps_used;
    std::cout << j.dump() << std::endl;
    return kExitOk;
  }
  std::printf("tessera %s\n", Version());
  std::printf("simd target        %s\n", SimdTargetName().c_str());
  const auto print_targets = [](const char* label, const std::vector<std::string>& names) {
    std::string line;
    for (const std::string& name : names) line += (line.empty() ? "" : " ") + name;
    std::printf("%-19s%s\n", label, line.c_str());
  };
  print_targets("compiled targets", CompiledSimdTargets());
  print_targets("supported targets", SupportedSimdTargets());
  std::printf("hardware threads   %d\n", hw);
  std::printf("threads used       %d\n", used);
  std::printf("fp32 FMA peak      %.1f GFLOP/s (1 thread), %.1f GFLOP/s (%d threads)\n", peak1,
              peak_all, hw);
  std::printf("read bandwidth     %.1f GB/s (1 thread), %.1f GB/s (%d threads)", gbps1, gbps_all,
              hw);
  if (used != 1 && used != hw) std::printf(", %.1f GB/s (%d threads)", gbps_used, used);
  std::printf("\n");
  return kExitOk;
}

}  // namespace

CommandMain AddInfoCommand(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* sub = app.add_subcommand(
      "info", "Version, SIMD targets, threads, measured FMA peak and read bandwidth");
  sub->add_option("--threads", o->threads, "threads a call would use (0 = all)");
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  return [o] { return InfoMain(*o); };
}

}  // namespace cli
}  // namespace tessera
