// SPDX-License-Identifier: Apache-2.0
// Internal: pieces shared by the sequence-parallel drivers (ring.cc, ulysses.cc, lasp2.cc): the
// agreement collective that checks every rank's arguments before any compute, views of row
// ranges, packing of strided views into contiguous buffers, and timing.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/attention_problem.h"
#include "tessera/distributed.h"

namespace tessera {
namespace dist {

// One named option that must be equal on every rank.
struct AgreedOption {
  const char* name;
  int64_t value;
};

// The collective every driver runs first. Each rank contributes whether its local validation
// passed, its token count and its options; afterwards every rank returns the same verdict: the
// failing rank its own status, the others an InvalidArgument naming the failing rank; an option
// that differs across ranks is an InvalidArgument naming it, with both values. On success,
// `lengths` holds every rank's token count.
Status Agree(Communicator& comm, const Status& local, int64_t local_length,
             const std::vector<AgreedOption>& options, std::vector<int64_t>* lengths);

// Which driver a rank runs (the first agreed option: ranks running different drivers fail).
enum class Operation : int64_t {
  kRingForward = 1,
  kRingBackward,
  kUlyssesForward,
  kUlyssesBackward,
  kLasp2Forward,
  kLasp2Backward,
};

// Local checks of a ring / Ulysses shard (ValidateAttention plus what sequence parallelism does
// not carry), and the options every rank must share.
Status CheckLocalForward(const AttentionParams& local, AttentionProblem* problem);
Status CheckLocalBackward(const AttentionBackwardParams& local, AttentionBackwardProblem* problem);
std::vector<AgreedOption> AttentionOptions(Operation op, ShardLayout layout,
                                           const AttentionProblem& p, const AttentionParams& a);

// The agreement of a ring / Ulysses call (its local status, token count and AttentionOptions),
// then the shard plan of every rank: on success `lengths` and `segments` hold every rank's.
Status AgreeOnShards(Communicator& comm, const Status& local, const AttentionProblem& prob,
                     const AttentionParams& a, Operation op, ShardLayout layout,
                     std::vector<int64_t>* lengths,
                     std::vector<std::vector<ShardSegment>>* segments);

// The bits of a float as an agreed option value.
int64_t FloatBits(float x);

// View of `length` entries starting at `start` along axis `axis`.
TensorView Slice(const TensorView& t, int axis, int64_t start, int64_t length);

// Copies a strided view into a contiguous buffer (dst: numel * element size bytes) and back.
void PackView(const TensorView& src, void* dst);
void UnpackView(const void* src, const TensorView& dst);

// A contiguous view over a raw buffer.
TensorView View4(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2, int64_t d3);
TensorView View3(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2);

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

// Waits for an exchange, adding the blocked time and the transfer time to `timing`.
Status TimedWait(Communicator& comm, int64_t handle, DistributedTiming* timing);

}  // namespace dist
}  // namespace tessera
