// SPDX-License-Identifier: Apache-2.0
// The command-line tool's input parsers (tools/mask_spec.cc, tools/npy.cc): regression tests for
// what the fuzzers (fuzz/) found, and the in-memory .npy entry point they drive.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mask_spec.h"
#include "npy.h"

namespace tessera {
namespace cli {
namespace {

MaskProblem Problem(int64_t seq_q, int64_t seq_k, int64_t heads = 2) {
  MaskProblem p;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.heads_q = heads;
  return p;
}

// Parses `spec` for the problem; returns the error ("" when it parsed).
std::string ParseError(const std::string& spec, const MaskProblem& problem) {
  MaskSpec mask;
  std::string error;
  return mask.Parse(spec, problem, &error) ? std::string() : error;
}

TEST(MaskSpecParse, OverflowingWindowTimesDilationIsRejected) {
  // window * dilation wrapped to a negative number and passed "<= grid".
  const std::string err = ParseError("nbhd1d:32:9223372036854775807:dil=2", Problem(32, 32));
  EXPECT_NE(err.find("nbhd1d"), std::string::npos) << err;
  EXPECT_NE(err.find("9223372036854775807"), std::string::npos) << err;
  EXPECT_NE(ParseError("nbhd1d:32:16:dil=576460752303423488", Problem(32, 32)), "");
  EXPECT_NE(ParseError("nbhd1d:32:17:dil=2", Problem(32, 32)).find("window x dilation <= grid"),
            std::string::npos);
  EXPECT_EQ(ParseError("nbhd1d:32:16:dil=2", Problem(32, 32)), "");
}

TEST(MaskSpecParse, OverflowingGridProductIsRejected) {
  // 576460752303423489 * 32 wraps to 32 = Sq = Sk.
  const std::string err = ParseError("nbhd2d:576460752303423489x32:1x1", Problem(32, 32));
  EXPECT_NE(err.find("nbhd2d"), std::string::npos) << err;
  EXPECT_NE(err.find("576460752303423489"), std::string::npos) << err;
  // Within the per-value range, but the product overflows int64.
  EXPECT_NE(ParseError("nbhd3d:1099511627776x1099511627776x16:1x1x1", Problem(16, 16))
                .find("more than 2^63"),
            std::string::npos);
  EXPECT_EQ(ParseError("nbhd2d:4x8:3x3", Problem(32, 32)), "");
}

TEST(MaskSpecParse, S2HugeLocalAndStrideAreRejected) {
  const std::string err =
      ParseError("s2:16:9223372036854775807:9223372036854775807", Problem(64, 64));
  EXPECT_NE(err.find("LOCAL"), std::string::npos) << err;
  EXPECT_NE(err.find("2^40"), std::string::npos) << err;
  EXPECT_NE(ParseError("s2:16:1:9223372036854775807", Problem(64, 64)), "");
  // A block larger than the sequence is one block; a huge multiple of 16 no longer overflows
  // ceil(S / BLOCK).
  EXPECT_NE(ParseError("s2:9223372036854775792:1:1", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("s2:1099511627776:1:1", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("s2:16:1099511627776:1099511627776", Problem(64, 64)), "");
}

TEST(MaskSpecParse, SelectBlockSizesAndTopKAreRangeChecked) {
  // A huge block size made ceil(Sq / BQ) negative and the block mask allocation abort.
  const std::string err = ParseError("select:topk=1:9223372036854775792x16", Problem(64, 64));
  EXPECT_NE(err.find("BQxBK"), std::string::npos) << err;
  // topk was parsed as a double and cast to int64 (undefined for 1e300).
  EXPECT_NE(ParseError("select:topk=1e300", Problem(64, 64)).find("topk=K"), std::string::npos);
  EXPECT_NE(ParseError("select:topk=1e3", Problem(64, 64)), "");
  EXPECT_NE(ParseError("select:topk=2.5", Problem(64, 64)), "");
  EXPECT_NE(ParseError("select:topk=9223372036854775807", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("select:topk=2:16x32", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("select:thr=0.5", Problem(64, 64)), "");
}

TEST(MaskSpecParse, OtherIntegersAreRangeChecked) {
  EXPECT_NE(ParseError("radial:4294967296:4294967296", Problem(64, 64)), "");
  EXPECT_NE(ParseError("radial:3037000500:3037000500:16", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("radial:4:16:16", Problem(64, 64)), "");
  EXPECT_NE(ParseError("sink:9223372036854775807:4", Problem(64, 64)), "");
  EXPECT_NE(ParseError("sink:4:9223372036854775807", Problem(64, 64)), "");
  EXPECT_EQ(ParseError("sink:4:8", Problem(64, 64)), "");
  EXPECT_NE(ParseError("doc:9223372036854775807,9223372036854775807", Problem(64, 64)), "");
  EXPECT_NE(ParseError("block-random:0.5:9223372036854775792x16", Problem(64, 64)), "");
}

TEST(MaskSpecParse, SigmoidBiasMustFitFloat) {
  EXPECT_NE(ParseError("sigmoid:1e300", Problem(8, 8)).find("BIAS"), std::string::npos);
  EXPECT_NE(ParseError("sigmoid:-1e39", Problem(8, 8)), "");
  EXPECT_EQ(ParseError("sigmoid:-1e30", Problem(8, 8)), "");
}

TEST(MaskSpecParse, RandomBlocksWithNoKeys) {
  MaskProblem p = Problem(32, 0);
  p.allow_random = true;
  EXPECT_EQ(ParseError("block-random:0.5:16x16", p), "");
}

// ---------------------------------------------------------------------------------------------
// .npy in memory.

std::string NpyBytes(const std::string& dict, const std::string& payload, int major = 1) {
  std::string header = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string s("\x93NUMPY", 6);
  s.push_back(static_cast<char>(major));
  s.push_back(0);
  const size_t n = header.size();
  s.push_back(static_cast<char>(n & 0xff));
  s.push_back(static_cast<char>((n >> 8) & 0xff));
  if (major != 1) s.append(2, '\0');
  return s + header + payload;
}

TEST(NpyParse, ReadsFromMemory) {
  const float values[3] = {1.0f, -2.5f, 3.0f};
  const std::string bytes =
      NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
               std::string(reinterpret_cast<const char*>(values), sizeof(values)), 2);
  NpyArray a;
  std::string error;
  ASSERT_TRUE(ParseNpy(bytes.data(), bytes.size(), {DType::kF32}, &a, &error)) << error;
  EXPECT_EQ(a.dtype, DType::kF32);
  EXPECT_EQ(a.shape, std::vector<int64_t>{3});
  EXPECT_EQ(std::memcmp(a.data.get(), values, sizeof(values)), 0);
}

TEST(NpyParse, RejectsBadInput) {
  NpyArray a;
  std::string error;
  auto fails = [&](const std::string& bytes, const std::string& needle) {
    error.clear();
    EXPECT_FALSE(ParseNpy(bytes.data(), bytes.size(), {DType::kU8, DType::kF32}, &a, &error));
    EXPECT_NE(error.find(needle), std::string::npos) << error;
  };
  fails("", "magic");
  fails(std::string("\x93NUMPY\x04\x00", 8), "version 4.0");
  fails(NpyBytes("{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }", "abc"), "truncated");
  fails(NpyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", "12345678"),
        "float64");
  fails(
      NpyBytes("{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999999999,), }", ""),
      "too large");
  // Zero elements, but the strides of the other dimensions would overflow int64.
  fails(NpyBytes("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 4611686018427387904, 4), }",
                 ""),
        "too large");
  const std::string ok =
      NpyBytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }", "abcd");
  for (size_t cut = 0; cut < ok.size(); ++cut) {
    EXPECT_FALSE(ParseNpy(ok.data(), cut, {DType::kU8}, &a, &error)) << cut;
  }
  EXPECT_TRUE(ParseNpy(ok.data(), ok.size(), {DType::kU8}, &a, &error)) << error;
}

}  // namespace
}  // namespace cli
}  // namespace tessera
