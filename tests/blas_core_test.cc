// SPDX-License-Identifier: Apache-2.0
// The OpenBLAS core choice of the command-line tool (tools/blas_core.h): which core replaces a
// generic one, and which command lines call BLAS at all.
#include "blas_core.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tessera {
namespace cli {
namespace {

CpuIsa Avx512(bool bf16) {
  CpuIsa isa;
  isa.avx = isa.avx2 = isa.fma = isa.avx512 = true;
  isa.avx512_bf16 = bf16;
  return isa;
}

CpuIsa Avx2() {
  CpuIsa isa;
  isa.avx = isa.avx2 = isa.fma = true;
  return isa;
}

TEST(BlasCore, LevelsOfKnownNames) {
  EXPECT_EQ(BlasCoreLevel("Prescott"), IsaLevel::kSse);
  EXPECT_EQ(BlasCoreLevel("prescott"), IsaLevel::kSse);
  EXPECT_EQ(BlasCoreLevel("Nehalem"), IsaLevel::kSse);
  EXPECT_EQ(BlasCoreLevel("Sandybridge"), IsaLevel::kAvx);
  EXPECT_EQ(BlasCoreLevel("Haswell"), IsaLevel::kAvx2);
  EXPECT_EQ(BlasCoreLevel("Zen"), IsaLevel::kAvx2);
  EXPECT_EQ(BlasCoreLevel("SkylakeX"), IsaLevel::kAvx512);
  EXPECT_EQ(BlasCoreLevel("Cooperlake"), IsaLevel::kAvx512);
  EXPECT_EQ(BlasCoreLevel("SapphireRapids"), IsaLevel::kAvx512);
  EXPECT_EQ(BlasCoreLevel("Zen5"), IsaLevel::kUnknown);
  EXPECT_EQ(BlasCoreLevel(""), IsaLevel::kUnknown);
}

TEST(BlasCore, GenericCoreOnAvx512IsForcedToSkylakeX) {
  for (const char* weak : {"Prescott", "Core2", "Nehalem", "Sandybridge", "generic"}) {
    EXPECT_EQ(BlasCoreToForce(weak, Avx512(false)), "SkylakeX") << weak;
    EXPECT_EQ(BlasCoreToForce(weak, Avx512(true)), "SkylakeX") << weak;
  }
}

TEST(BlasCore, GenericCoreOnAvx2IsForcedToHaswell) {
  EXPECT_EQ(BlasCoreToForce("Prescott", Avx2()), "Haswell");
  EXPECT_EQ(BlasCoreToForce("Sandybridge", Avx2()), "Haswell");
}

TEST(BlasCore, GoodOrUnknownCoresAreKept) {
  EXPECT_EQ(BlasCoreToForce("SkylakeX", Avx512(true)), "");
  EXPECT_EQ(BlasCoreToForce("Cooperlake", Avx512(true)), "");
  EXPECT_EQ(BlasCoreToForce("Haswell", Avx2()), "");
  // A core with FMA is OpenBLAS's own choice (Zen 4 runs Zen / Haswell kernels): kept.
  EXPECT_EQ(BlasCoreToForce("Zen", Avx512(true)), "");
  EXPECT_EQ(BlasCoreToForce("Haswell", Avx512(false)), "");
  EXPECT_EQ(BlasCoreToForce("SomeFutureCore", Avx512(true)), "");
}

TEST(BlasCore, NothingBetterOnOldCpus) {
  CpuIsa sse;
  EXPECT_EQ(BlasCoreToForce("Prescott", sse), "");
  CpuIsa avx;
  avx.avx = true;
  EXPECT_EQ(BlasCoreToForce("Prescott", avx), "Sandybridge");
  EXPECT_EQ(BlasCoreToForce("Sandybridge", avx), "");
  CpuIsa no_fma = Avx2();
  no_fma.fma = false;  // AVX2 without FMA is no Haswell
  EXPECT_EQ(BlasCoreToForce("Prescott", no_fma), "Sandybridge");
}

bool Uses(std::vector<const char*> args) {
  args.insert(args.begin(), "tessera");
  return CommandUsesBlas(static_cast<int>(args.size()), args.data());
}

TEST(BlasCore, CommandsThatCallBlas) {
  EXPECT_TRUE(Uses({"info"}));
  EXPECT_TRUE(Uses({"info", "--json"}));
  EXPECT_TRUE(Uses({"bench", "--seq", "64", "--vs", "naive"}));
  EXPECT_TRUE(Uses({"bench", "--vs=naive"}));
  EXPECT_TRUE(Uses({"bench", "--op", "backward", "--baseline-only"}));
  EXPECT_TRUE(Uses({"bench", "--op=forward", "--vs", "naive"}));
  EXPECT_FALSE(Uses({"bench", "--seq", "64"}));
  EXPECT_FALSE(Uses({"bench", "--vs", "dense"}));
  EXPECT_FALSE(Uses({"bench", "--op", "decode", "--vs", "naive"}));
  EXPECT_FALSE(Uses({"bench", "--op", "linear", "--vs", "exact"}));
  EXPECT_FALSE(Uses({"run", "--q", "naive"}));
  EXPECT_FALSE(Uses({"--version"}));
  EXPECT_FALSE(Uses({}));
}

TEST(BlasCore, ProbeIsConsistent) {
  const CpuIsa isa = ProbeCpuIsa();
  EXPECT_TRUE(!isa.avx512 || isa.avx2);
  EXPECT_TRUE(!isa.avx512_bf16 || isa.avx512);
  EXPECT_TRUE(!isa.fma || isa.avx);
}

}  // namespace
}  // namespace cli
}  // namespace tessera
