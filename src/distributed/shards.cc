// SPDX-License-Identifier: Apache-2.0
// Shard layouts and the pieces every sequence-parallel driver shares (dist_common.h).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/element.h"
#include "distributed/dist_common.h"
#include "tessera/distributed.h"

namespace tessera {

const char* ShardLayoutName(ShardLayout layout) {
  switch (layout) {
    case ShardLayout::kContiguous:
      return "contiguous";
    case ShardLayout::kZigzag:
      return "zigzag";
  }
  return "?";
}

double DistributedTiming::hidden_fraction() const {
  if (transfer_s <= 0) return 1.0;
  return std::clamp(1.0 - wait_s / transfer_s, 0.0, 1.0);
}

namespace {

// Chunk c of the 2P-chunk cut of `total` tokens: its first token and length.
std::pair<int64_t, int64_t> ZigzagChunk(int64_t total, int size, int64_t c) {
  const int64_t chunks = 2 * int64_t{size};
  const int64_t base = total / chunks, extra = total % chunks;
  const int64_t start = c * base + std::min(c, extra);
  return {start, base + (c < extra ? 1 : 0)};
}

}  // namespace

int64_t ZigzagShardLength(int64_t total, int size, int rank) {
  return ZigzagChunk(total, size, rank).second +
         ZigzagChunk(total, size, 2 * int64_t{size} - 1 - rank).second;
}

Status PlanShards(ShardLayout layout, const std::vector<int64_t>& local_lengths,
                  std::vector<std::vector<ShardSegment>>* segments) {
  const int size = static_cast<int>(local_lengths.size());
  if (size < 1) return Status::InvalidArgument("local_lengths: expected >= 1 rank, got 0");
  int64_t total = 0;
  for (int r = 0; r < size; ++r) {
    if (local_lengths[r] < 0) {
      return Status::InvalidArgument("local_lengths[" + std::to_string(r) +
                                     "]: expected >= 0, got " + std::to_string(local_lengths[r]));
    }
    total += local_lengths[r];
  }
  std::vector<std::vector<ShardSegment>> result(size);
  if (layout == ShardLayout::kContiguous) {
    int64_t start = 0;
    for (int r = 0; r < size; ++r) {
      result[r].push_back({start, 0, local_lengths[r]});
      start += local_lengths[r];
    }
  } else if (layout == ShardLayout::kZigzag) {
    for (int r = 0; r < size; ++r) {
      const int64_t expected = ZigzagShardLength(total, size, r);
      if (local_lengths[r] != expected) {
        return Status::InvalidArgument(
            "shard of rank " + std::to_string(r) + ": expected " + std::to_string(expected) +
            " tokens (chunks " + std::to_string(r) + " and " + std::to_string(2 * size - 1 - r) +
            " of the zigzag cut of " + std::to_string(total) + " tokens into " +
            std::to_string(2 * size) + "), got " + std::to_string(local_lengths[r]));
      }
      const auto first = ZigzagChunk(total, size, r);
      const auto second = ZigzagChunk(total, size, 2 * int64_t{size} - 1 - r);
      result[r].push_back({first.first, 0, first.second});
      result[r].push_back({second.first, first.second, second.second});
    }
  } else {
    return Status::InvalidArgument("layout: expected contiguous or zigzag, got " +
                                   std::to_string(static_cast<int>(layout)));
  }
  *segments = std::move(result);
  return Status::Ok();
}

namespace dist {

int64_t FloatBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

Status Agree(Communicator& comm, const Status& local, int64_t local_length,
             const std::vector<AgreedOption>& options, std::vector<int64_t>* lengths) {
  const int size = comm.size();
  // Record: [ok, length, option count, options..., zero padding]: the same size on every rank
  // whatever it passes (a rank that failed its local checks sends no options), and the option
  // count guards against ranks running different drivers.
  constexpr int64_t kMaxOptions = 32;
  constexpr int64_t words = 3 + kMaxOptions;
  if (static_cast<int64_t>(options.size()) > kMaxOptions) {
    return Status::Internal("Agree: more than 32 options");
  }
  std::vector<int64_t> mine(words, 0);
  mine[0] = local.ok() ? 1 : 0;
  mine[1] = local_length;
  mine[2] = static_cast<int64_t>(options.size());
  for (size_t i = 0; i < options.size(); ++i) mine[3 + i] = options[i].value;
  std::vector<int64_t> all(words * size);
  Status gathered = comm.AllGather(mine.data(), words * 8, all.data());
  if (!gathered.ok()) return gathered;
  if (!local.ok()) return local;
  for (int r = 0; r < size; ++r) {
    if (all[r * words] != 1) {
      return Status::InvalidArgument("rank " + std::to_string(r) +
                                     ": invalid arguments on that rank (its error names them); "
                                     "nothing was computed on any rank");
    }
  }
  for (int r = 1; r < size; ++r) {
    for (int64_t i = 2; i < words; ++i) {
      if (all[r * words + i] == all[i]) continue;
      const std::string name = i == 2 || i - 3 >= static_cast<int64_t>(options.size())
                                   ? std::string("operation")
                                   : options[i - 3].name;
      return Status::InvalidArgument(
          name + ": expected the same value on every rank, got " + std::to_string(all[i]) +
          " on rank 0 and " + std::to_string(all[r * words + i]) + " on rank " + std::to_string(r));
    }
  }
  lengths->resize(size);
  for (int r = 0; r < size; ++r) (*lengths)[r] = all[r * words + 1];
  return Status::Ok();
}

TensorView Slice(const TensorView& t, int axis, int64_t start, int64_t length) {
  TensorView r = t;
  if (t.data != nullptr && length > 0) {
    r.data = static_cast<char*>(t.data) + start * t.strides[axis] * int64_t(DTypeSize(t.dtype));
  }
  r.shape[axis] = length;
  return r;
}

namespace {

// Calls f(element offset in the view, linear index) for every element, last axis innermost.
template <class F>
void ForEachElement(const TensorView& t, F&& f) {
  int64_t shape[4] = {1, 1, 1, 1}, strides[4] = {0, 0, 0, 0};
  for (int i = 0; i < t.rank; ++i) {
    shape[4 - t.rank + i] = t.shape[i];
    strides[4 - t.rank + i] = t.strides[i];
  }
  int64_t linear = 0;
  for (int64_t a = 0; a < shape[0]; ++a)
    for (int64_t b = 0; b < shape[1]; ++b)
      for (int64_t c = 0; c < shape[2]; ++c) {
        const int64_t base = a * strides[0] + b * strides[1] + c * strides[2];
        if (shape[3] > 0) f(base, strides[3], shape[3], linear);
        linear += shape[3];
      }
}

}  // namespace

void PackView(const TensorView& src, void* dst) {
  const size_t elem = DTypeSize(src.dtype);
  ForEachElement(src, [&](int64_t base, int64_t stride, int64_t n, int64_t linear) {
    const char* from = static_cast<const char*>(src.data) + base * int64_t(elem);
    char* to = static_cast<char*>(dst) + linear * int64_t(elem);
    if (stride == 1) {
      std::memcpy(to, from, n * elem);
    } else {
      for (int64_t i = 0; i < n; ++i) std::memcpy(to + i * elem, from + i * stride * elem, elem);
    }
  });
}

void UnpackView(const void* src, const TensorView& dst) {
  const size_t elem = DTypeSize(dst.dtype);
  ForEachElement(dst, [&](int64_t base, int64_t stride, int64_t n, int64_t linear) {
    char* to = static_cast<char*>(dst.data) + base * int64_t(elem);
    const char* from = static_cast<const char*>(src) + linear * int64_t(elem);
    if (stride == 1) {
      std::memcpy(to, from, n * elem);
    } else {
      for (int64_t i = 0; i < n; ++i) std::memcpy(to + i * stride * elem, from + i * elem, elem);
    }
  });
}

TensorView View4(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  return MakeView4(data, dtype, d0, d1, d2, d3);
}
TensorView View3(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2) {
  return MakeView3(data, dtype, d0, d1, d2);
}

Status TimedWait(Communicator& comm, int64_t handle, DistributedTiming* timing) {
  Stopwatch blocked;
  double transfer = 0;
  Status s = comm.WaitExchange(handle, &transfer);
  if (timing != nullptr) {
    timing->wait_s += blocked.seconds();
    timing->transfer_s += transfer;
  }
  return s;
}

}  // namespace dist

Status JoinWithError(Communicator& comm, const Status& error) {
  const Status failed = error.ok() ? Status::InvalidArgument("a local error") : error;
  std::vector<int64_t> lengths;
  (void)dist::Agree(comm, failed, 0, {}, &lengths);
  return failed;
}

}  // namespace tessera
