// SPDX-License-Identifier: Apache-2.0
// TimeReadSeconds: reads exactly the given ranges (the sanitizer builds catch a read past one),
// for any alignment, range sizes that are not whole cache lines, empty inputs and more threads
// than granules.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/system.h"

namespace tessera {
namespace {

// SetSimdTarget forces each supported target in turn (SimdTargetName follows), refuses unknown
// names with the choices in the message, and "auto" restores the default.
TEST(SimdTarget, ForcesEachSupportedTargetAndRestores) {
  const std::string best = SimdTargetName();
  const std::vector<std::string> supported = SupportedSimdTargets();
  ASSERT_FALSE(supported.empty());
  EXPECT_LE(supported.size(), CompiledSimdTargets().size());
  for (const std::string& name : supported) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(SetSimdTarget(name).ok());
    std::string chosen = SimdTargetName();
    for (char& c : chosen) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    // avx3_dl is compiled only by decode (and this probe): the name is the target or, for a
    // target this file lacks, the best one below it.
    if (name != "avx3_dl") {
      EXPECT_EQ(chosen, name);
    }
  }
  const Status bad = SetSimdTarget("avx9000");
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("target"), std::string::npos);
  EXPECT_NE(bad.message().find(supported.back()), std::string::npos);
  EXPECT_NE(bad.message().find("avx9000"), std::string::npos);
  ASSERT_TRUE(SetSimdTarget("auto").ok());
  EXPECT_EQ(SimdTargetName(), best);
}

TEST(TimeReadSeconds, ReadsOnlyTheRanges) {
  // Separate heap blocks sized exactly, so any read beyond a range leaves its allocation.
  const std::vector<size_t> sizes = {1, 63, 64, 65, 200, 4096 + 17, 1 << 20};
  std::vector<std::unique_ptr<uint8_t[]>> blocks;
  std::vector<ByteRange> ranges;
  for (size_t n : sizes) {
    blocks.emplace_back(new uint8_t[n + 3]());
    ranges.push_back({blocks.back().get() + 3, n});  // unaligned start
  }
  for (int32_t threads : {1, 2, 3, 64}) {
    SCOPED_TRACE(threads);
    const double s = TimeReadSeconds(ranges, threads);
    EXPECT_TRUE(std::isfinite(s));
    EXPECT_GE(s, 0.0);
  }
}

TEST(TimeReadSeconds, EmptyInputs) {
  EXPECT_GE(TimeReadSeconds({}, 2), 0.0);
  EXPECT_GE(TimeReadSeconds({{nullptr, 0}}, 2), 0.0);
  uint8_t small[10] = {};
  EXPECT_GE(TimeReadSeconds({{small, sizeof(small)}}, 0), 0.0);  // < one line: nothing to read
}

}  // namespace
}  // namespace tessera
