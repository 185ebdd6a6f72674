// SPDX-License-Identifier: Apache-2.0
#include "io_model.h"

#include <linux/perf_event.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "attention/flash_tiles.h"

namespace tessera {
namespace cli {
namespace {

int64_t DivCeil(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return DivCeil(a, b) * b; }

// Query blocks that must read a K/V row before the forward packs K and V (PackedHeads::kMinReuse
// in src/attention/flash_fwd-inl.h).
constexpr int64_t kPackMinReuse = 4;
// The backward's dQ partial rows are padded to the vector width (16 floats on AVX-512) and their
// memory bounded (kTargetTasks, kMaxPartialBytes in src/attention/flash_bwd-inl.h).
constexpr int64_t kPartialPad = 16;
constexpr int64_t kBackwardTargetTasks = 16;
constexpr int64_t kMaxPartialBytes = int64_t{512} << 20;

// Keys a query at index i sees (bottom-right causal: position i + Sk - Sq), rounded up to whole
// tiles of `tile` keys as the kernels load them.
int64_t VisibleKeys(const IoProblem& p, int64_t last_query, int64_t tile) {
  int64_t keys = p.seq_k;
  if (p.causal) keys = std::clamp<int64_t>(last_query + 1 + p.seq_k - p.seq_q, 0, p.seq_k);
  return std::min(p.seq_k, RoundUp(keys, tile));
}

}  // namespace

IoTraffic ForwardTraffic(const IoProblem& p) {
  IoTraffic t;
  const double e = static_cast<double>(p.elem_bytes), d = static_cast<double>(p.dim);
  const double rows = static_cast<double>(p.batch * p.heads_q * p.seq_q);
  t.q = rows * d * e;
  t.out = rows * d * e;
  t.other = rows * 4.0;  // the LSE
  const int64_t group = std::max<int64_t>(1, p.heads_q / std::max<int64_t>(1, p.heads_kv));
  const int64_t block = flash::QueryBlock(group);
  double key_rows = 0;  // K/V rows read by the query blocks of one (sequence, KV head)
  for (int64_t i0 = 0; i0 < p.seq_q; i0 += block) {
    key_rows +=
        static_cast<double>(VisibleKeys(p, std::min(p.seq_q, i0 + block) - 1, flash::kKeyTile));
  }
  // Packing (f32 copies of K and V per head) when the rows are converted or strided (the bench's
  // [B, S, H, D] layout puts a head's rows H d apart when Hkv > 1) and reused enough.
  const bool packed =
      (p.elem_bytes != 4 || p.heads_kv > 1) && DivCeil(p.seq_q, block) >= kPackMinReuse;
  const double sk = static_cast<double>(p.seq_k);
  const double per_head =
      packed ? 2 * sk * d * e + 2 * sk * d * 4 + key_rows * 2 * d * 4 : key_rows * 2 * d * e;
  t.kv = static_cast<double>(p.batch * p.heads_kv) * per_head;
  return t;
}

IoTraffic BackwardTraffic(const IoProblem& p) {
  IoTraffic t;
  const double e = static_cast<double>(p.elem_bytes), d = static_cast<double>(p.dim);
  const double dp = static_cast<double>(RoundUp(p.dim, kPartialPad));
  const int64_t group = std::max<int64_t>(1, p.heads_q / std::max<int64_t>(1, p.heads_kv));
  const double rows = static_cast<double>(p.batch * p.heads_q * p.seq_q);
  // Delta's pre-pass: O and dO read, Delta written.
  t.q += rows * 2 * d * e;
  t.other += rows * 4.0;
  // Per (sequence, KV head) and key block: the query rows of the group that see it (whole query
  // tiles) bring Q, dO, LSE and Delta and read and write their dQ partial rows.
  double row_visits = 0;
  for (int64_t k0 = 0; k0 < p.seq_k; k0 += flash::kKeyBlock) {
    int64_t first = 0;  // first query that sees key k0
    if (p.causal) first = std::clamp<int64_t>(k0 - (p.seq_k - p.seq_q), 0, p.seq_q);
    first = first / flash::kQueryTile * flash::kQueryTile;
    row_visits += static_cast<double>((p.seq_q - first) * group);
  }
  const double units = static_cast<double>(p.batch * p.heads_kv);
  t.q += units * row_visits * 2 * d * e;
  t.other += units * row_visits * 8.0;
  t.out += units * row_visits * 2 * dp * 4;
  // K and V read once, dK and dV written once.
  const double sk = static_cast<double>(p.seq_k);
  t.kv += units * 2 * sk * d * e;
  t.out += units * 2 * sk * d * e;
  // The partials summed into dQ.
  const int64_t blocks = DivCeil(p.seq_k, flash::kKeyBlock);
  const int64_t partial_bytes = p.batch * p.seq_q * p.heads_q * RoundUp(p.dim, kPartialPad) * 4;
  const int64_t groups =
      std::max<int64_t>(1, std::min({blocks, DivCeil(kBackwardTargetTasks, p.batch * p.heads_kv),
                                     kMaxPartialBytes / std::max<int64_t>(partial_bytes, 1)}));
  t.out += static_cast<double>(groups) * rows * dp * 4 + rows * d * e;
  return t;
}

double LowerBoundBytes(const IoProblem& p, int64_t l2_bytes) {
  if (l2_bytes <= 0) return 0.0;
  const double m = static_cast<double>(l2_bytes) / static_cast<double>(p.elem_bytes);
  const double d = static_cast<double>(p.dim);
  return static_cast<double>(p.batch * p.heads_q) * static_cast<double>(p.seq_q) *
         static_cast<double>(p.seq_k) * d * d / m * static_cast<double>(p.elem_bytes);
}

LlcMissCounter::LlcMissCounter() {
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  const uint64_t ops[2] = {PERF_COUNT_HW_CACHE_OP_READ, PERF_COUNT_HW_CACHE_OP_WRITE};
  for (long cpu = 0; cpu < cpus && count_ + 2 <= kMaxFds; ++cpu) {
    for (const uint64_t op : ops) {
      perf_event_attr attr;
      std::memset(&attr, 0, sizeof(attr));
      attr.size = sizeof(attr);
      attr.type = PERF_TYPE_HW_CACHE;
      attr.config = PERF_COUNT_HW_CACHE_LL | (op << 8) | (PERF_COUNT_HW_CACHE_RESULT_MISS << 16);
      attr.disabled = 1;
      const long fd = syscall(SYS_perf_event_open, &attr, -1, static_cast<int>(cpu), -1, 0);
      if (fd < 0) {
        // Write misses are not counted on every CPU; read misses are the essential part.
        if (op == PERF_COUNT_HW_CACHE_OP_WRITE && count_ > 0) continue;
        reason_ = std::string("perf_event_open (last-level cache misses): ") + std::strerror(errno);
        for (int i = 0; i < count_; ++i) close(fds_[i]);
        count_ = 0;
        return;
      }
      fds_[count_++] = static_cast<int>(fd);
    }
  }
  available_ = count_ > 0;
  if (!available_) reason_ = "no CPU to count on";
}

LlcMissCounter::~LlcMissCounter() {
  for (int i = 0; i < count_; ++i) close(fds_[i]);
}

void LlcMissCounter::Start() {
  for (int i = 0; i < count_; ++i) {
    ioctl(fds_[i], PERF_EVENT_IOC_RESET, 0);
    ioctl(fds_[i], PERF_EVENT_IOC_ENABLE, 0);
  }
}

int64_t LlcMissCounter::Stop() {
  int64_t total = 0;
  for (int i = 0; i < count_; ++i) {
    ioctl(fds_[i], PERF_EVENT_IOC_DISABLE, 0);
    uint64_t value = 0;
    if (read(fds_[i], &value, sizeof(value)) == static_cast<ssize_t>(sizeof(value))) {
      total += static_cast<int64_t>(value);
    }
  }
  return total;
}

}  // namespace cli
}  // namespace tessera
