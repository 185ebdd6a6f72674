// SPDX-License-Identifier: Apache-2.0
// Fuzzes the --mask spec parser (tools/mask_spec.cc) and, for a spec that parses, the library's
// validation of the mask it builds, through AttentionForward on small real buffers.
//
// Input: 6 bytes of problem (batch, Sq, Sk, heads, head dim, dtype, flags; at most 2 x 255 x 255
// x 4 heads x 32 dims, so buffers stay under a few MB), then the spec text. File forms may only
// name the harness's own small .npy files, written as '@NAME' ('@b.npy', '@d.npy', '@f.npy',
// '@t.npy'); a spec with a '/' is skipped, so no other file is ever opened.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "mask_spec.h"
#include "npy.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/types.h"

namespace {

using namespace tessera;  // NOLINT: a harness, not library code
using fuzz::Buffer;
using fuzz::Check;

// The directory of the harness's .npy files, ending in '/'.
std::string MakeFiles() {
  const char* tmp = std::getenv("TMPDIR");
  std::string dir =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/tessera_fuzz_mask.XXXXXX";
  Check(mkdtemp(&dir[0]) != nullptr, "cannot create a temporary directory");
  dir += "/";
  std::string error;
  // b.npy: a 4 x 4 block mask (Sq = Sk = 64 with 16 x 16 blocks), a checkerboard.
  std::vector<uint8_t> blocks(16);
  for (int i = 0; i < 16; ++i) blocks[i] = static_cast<uint8_t>((i + i / 4) % 2);
  Check(cli::SaveNpy(dir + "b.npy", DType::kU8, {4, 4}, blocks.data(), &error), error);
  // d.npy: a bool [8, 8] lower-triangular mask; f.npy: an additive f32 [1, 2, 8, 8] one.
  std::vector<uint8_t> dense(64);
  std::vector<float> bias(128);
  for (int i = 0; i < 64; ++i) dense[i] = i % 8 <= i / 8;
  for (int i = 0; i < 128; ++i)
    bias[i] = i % 9 == 0 ? -std::numeric_limits<float>::infinity() : static_cast<float>(i % 5);
  Check(cli::SaveNpy(dir + "d.npy", DType::kBool, {8, 8}, dense.data(), &error), error);
  Check(cli::SaveNpy(dir + "f.npy", DType::kF32, {1, 2, 8, 8}, bias.data(), &error), error);
  // t.npy: an 8-node tree.
  const std::vector<int32_t> parents = {-1, 0, 0, 1, 1, 2, -1, 6};
  Check(cli::SaveNpy(dir + "t.npy", DType::kI32, {8}, parents.data(), &error), error);
  return dir;
}

// Input values: a fixed pseudo-random stream (the spec is what is fuzzed, not the numbers).
void FillInputs(Buffer* b, DType dtype, uint64_t seed) {
  const size_t n = b->bytes() / DTypeSize(dtype);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    const float x = static_cast<float>(static_cast<int64_t>(seed >> 40) % 2001 - 1000) / 500.0f;
    uint8_t* p = b->data() + i * DTypeSize(dtype);
    if (dtype == DType::kF32) {
      std::memcpy(p, &x, 4);
    } else {
      const uint16_t h = dtype == DType::kF16 ? FloatToF16(x) : FloatToBF16(x);
      std::memcpy(p, &h, 2);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = MakeFiles();
  constexpr size_t kHeader = 6;
  if (size < kHeader || size > 4096) return 0;
  std::string spec(reinterpret_cast<const char*>(data + kHeader), size - kHeader);
  if (spec.find('/') != std::string::npos) return 0;
  for (size_t at = spec.find('@'); at != std::string::npos; at = spec.find('@', at)) {
    spec.replace(at, 1, dir);
    at += dir.size();
  }

  cli::MaskProblem problem;
  const int64_t batch = 1 + (data[0] & 1);
  problem.batch = batch;
  problem.causal = (data[0] & 2) != 0;
  problem.allow_random = (data[0] & 4) != 0;
  const DType dtype = data[0] >> 6 == 1   ? DType::kF16
                      : data[0] >> 6 == 2 ? DType::kBF16
                                          : DType::kF32;
  problem.seq_q = data[1];
  problem.seq_k = data[2];
  const int64_t heads_q = 1 + (data[3] & 3);
  const int64_t heads_kv = (data[3] & 4) != 0 && heads_q % 2 == 0 ? heads_q / 2 : heads_q;
  problem.heads_q = heads_q;
  problem.seed = data[3] >> 3;
  const int64_t dim = 1 + (data[4] & 31);
  const bool want_lse = (data[5] & 1) != 0;
  Context ctx;
  ctx.num_threads = 1 + ((data[5] >> 1) & 1);
  ctx.path = (data[5] & 4) != 0 ? Path::kReference : Path::kAuto;

  cli::MaskSpec mask;
  std::string error;
  if (!mask.Parse(spec, problem, &error)) {
    Check(!error.empty(), "a failed parse left the error empty");
    return 0;
  }
  AttentionParams params;
  params.causal = problem.causal;
  if ((data[5] & 8) != 0) params.window_left = data[5] >> 4;
  if (!mask.Apply(&params, &error)) return 0;

  const size_t elem = DTypeSize(dtype);
  const int64_t sq = problem.seq_q, sk = problem.seq_k;
  Buffer q(static_cast<size_t>(batch * sq * heads_q * dim) * elem);
  Buffer k(static_cast<size_t>(batch * sk * heads_kv * dim) * elem);
  Buffer v(k.bytes());
  Buffer out(q.bytes());
  Buffer lse(want_lse ? static_cast<size_t>(batch * heads_q * sq) * 4 : 0);
  FillInputs(&q, dtype, 1);
  FillInputs(&k, dtype, 2);
  FillInputs(&v, dtype, 3);
  params.q = MakeView4(q.data(), dtype, batch, sq, heads_q, dim);
  params.k = MakeView4(k.data(), dtype, batch, sk, heads_kv, dim);
  params.v = MakeView4(v.data(), dtype, batch, sk, heads_kv, dim);
  params.out = MakeView4(out.data(), dtype, batch, sq, heads_q, dim);
  if (want_lse) params.lse = MakeView3(lse.data(), DType::kF32, batch, heads_q, sq);
  const std::vector<uint8_t> q0 = q.Copy(), k0 = k.Copy(), v0 = v.Copy();

  if (mask.needs_selection()) {
    const Status s = mask.Select(params, ctx);
    if (!s.ok()) {
      Check(!s.message().empty(), "an error without a message");
      return 0;
    }
  }
  const Status s = AttentionForward(params, ctx);
  if (!s.ok()) {
    Check(!s.message().empty(), "an error without a message");
    Check(out.AllSentinel() && lse.AllSentinel(),
          "AttentionForward wrote its outputs and failed: " + s.ToString());
  }
  Check(q.Equals(q0) && k.Equals(k0) && v.Equals(v0), "AttentionForward wrote an input");
  return 0;
}
