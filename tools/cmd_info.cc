// `tessera info`: version, the SIMD target dynamic dispatch picks, threads, and the measured
// fp32 FMA peak on one thread and on all hardware threads.
#include <cstdio>
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

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
  if (o.threads < 0) {
    return Fail("info", "--threads: expected >= 0 (0 = all), got " + std::to_string(o.threads));
  }
  Context ctx;
  ctx.num_threads = o.threads;
  const int32_t hw = HardwareThreads();
  const int32_t used = ResolveThreads(ctx);
  const double peak1 = MeasureFmaPeakGflops(1);
  const double peak_all = hw > 1 ? MeasureFmaPeakGflops(hw) : peak1;
  if (o.json) {
    nlohmann::ordered_json j;
    j["version"] = Version();
    j["simd_target"] = SimdTargetName();
    j["hardware_threads"] = hw;
    j["threads"] = used;
    j["peak_gflops_1t"] = peak1;
    j["peak_gflops_all"] = peak_all;
    std::cout << j.dump() << std::endl;
    return kExitOk;
  }
  std::printf("tessera %s\n", Version());
  std::printf("simd target        %s\n", SimdTargetName().c_str());
  std::printf("hardware threads   %d\n", hw);
  std::printf("threads used       %d\n", used);
  std::printf("fp32 FMA peak      %.1f GFLOP/s (1 thread), %.1f GFLOP/s (%d threads)\n", peak1,
              peak_all, hw);
  return kExitOk;
}

}  // namespace

CommandMain AddInfoCommand(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* sub = app.add_subcommand("info", "Version, SIMD target, threads and measured peak");
  sub->add_option("--threads", o->threads, "threads a call would use (0 = all)");
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  return [o] { return InfoMain(*o); };
}

}  // namespace cli
}  // namespace tessera
