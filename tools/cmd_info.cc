// SPDX-License-Identifier: Apache-2.0
// `tessera info`: version, the CPU (vendor, model, caches, AMX), the SIMD target dynamic dispatch
// picks (and the targets this build compiled and this CPU supports, the choices of --target),
// the kernel each op runs (KernelReport), the BLAS the naive baseline runs, threads, and the
// measured fp32 FMA peak and memory read bandwidth on one thread and on all hardware threads (and
// on the threads a call would use, `peak_gbps`, the ceiling `tessera bench --op decode` reports
// against). With --target, the kernels and the peak are those of the forced target.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "blas_core.h"
#include "cli_common.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace {

struct InfoOptions {
  int32_t threads = 0;
  bool json = false;
  std::string target = "auto";
};

std::string MiB(int64_t bytes) {
  if (bytes <= 0) return "?";
  if (bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes >> 10) + " KiB";
}

int InfoMain(const InfoOptions& o) {
  std::string error;
  if (!CheckThreads(o.threads, &error)) return Fail("info", error);
  if (!ApplySimdTarget(o.target, &error)) return Fail("info", error);
  const CpuDescription cpu = DescribeCpu();
  const std::vector<KernelChoice> kernels = KernelReport();
  const BlasReport blas = GetBlasReport();
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
    j["cpu_vendor"] = cpu.vendor;
    j["cpu_model_name"] = cpu.model_name;
    j["cpu_family"] = cpu.family;
    j["cpu_model"] = cpu.model;
    j["cpu_stepping"] = cpu.stepping;
    j["l1d_bytes"] = cpu.l1d_bytes;
    j["l2_bytes"] = cpu.l2_bytes;
    j["l3_bytes"] = cpu.l3_bytes;
    j["amx_present"] = cpu.amx_present;
    j["amx_usable"] = cpu.amx_usable;
    j["simd_target"] = SimdTargetName();
    j["simd_targets_compiled"] = CompiledSimdTargets();
    j["simd_targets_supported"] = SupportedSimdTargets();
    j["kernels"] = nlohmann::ordered_json::array();
    for (const KernelChoice& k : kernels) {
      j["kernels"].push_back({{"op", k.op}, {"dtype", k.dtype}, {"variant", k.variant}});
    }
    j["blas"] = blas.library;
    j["blas_config"] = blas.config;
    j["blas_core"] = blas.core;
    j["blas_core_forced_from"] = blas.forced_from.empty()
                                     ? nlohmann::ordered_json()
                                     : nlohmann::ordered_json(blas.forced_from);
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
  std::printf("cpu                %s (%s, family %d model %d stepping %d)\n",
              cpu.model_name.c_str(), cpu.vendor.c_str(), cpu.family, cpu.model, cpu.stepping);
  std::printf("caches             L1d %s, L2 %s, L3 %s\n", MiB(cpu.l1d_bytes).c_str(),
              MiB(cpu.l2_bytes).c_str(), MiB(cpu.l3_bytes).c_str());
  std::printf("amx                %s\n", !cpu.amx_present ? "no"
                                         : cpu.amx_usable ? "present, usable"
                                                          : "present, not usable");
  std::printf("simd target        %s\n", SimdTargetName().c_str());
  const auto print_targets = [](const char* label, const std::vector<std::string>& names) {
    std::string line;
    for (const std::string& name : names) line += (line.empty() ? "" : " ") + name;
    std::printf("%-19s%s\n", label, line.c_str());
  };
  print_targets("compiled targets", CompiledSimdTargets());
  print_targets("supported targets", SupportedSimdTargets());
  std::printf("kernels\n");
  for (const KernelChoice& k : kernels) {
    std::printf("  %-9s %-5s  %s\n", k.op.c_str(), k.dtype.c_str(), k.variant.c_str());
  }
  std::printf("blas               %s\n", BlasLine(blas).c_str());
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
      "info",
      "Version, CPU, SIMD targets, kernels, BLAS, threads, measured FMA peak and read bandwidth");
  sub->add_option("--threads", o->threads, "threads a call would use (0 = all)");
  sub->add_option("--target", o->target,
                  SimdTargetHelp() + "; the kernels and the FMA peak are the forced target's")
      ->capture_default_str();
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  return [o] { return InfoMain(*o); };
}

}  // namespace cli
}  // namespace tessera
