// SPDX-License-Identifier: Apache-2.0
// MakeLocalGroup: ranks as threads of one process. A send posts a pointer to the sender's buffer;
// the receiver copies from it and marks it consumed, and the sender's wait returns once it is.
// Messages between a pair of ranks match in the order they were sent.
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "tessera/distributed.h"

namespace tessera {
namespace {

using Clock = std::chrono::steady_clock;

struct Message {
  const void* data = nullptr;
  int64_t bytes = 0;
  bool consumed = false;
  Clock::time_point posted;
  Clock::time_point done;
};

struct Group {
  explicit Group(int n) : size(n), sent(n * n, 0), slots(n, nullptr) {}
  const int size;
  std::mutex mutex;
  std::condition_variable changed;
  // (src, dst, sequence number) -> message posted by src.
  std::map<std::tuple<int, int, int64_t>, std::shared_ptr<Message>> mailbox;
  std::vector<int64_t> sent;  // [src * size + dst]: messages posted so far
  // All-gather: each rank's contribution, a generation counter and an arrival count.
  std::vector<const void*> slots;
  int64_t generation = 0;
  int arrived = 0;
  int departed = 0;
};

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<Group> group, int rank)
      : group_(std::move(group)), rank_(rank), received_(group_->size, 0) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size; }

  Status StartExchange(const void* send, int64_t send_bytes, int dst, void* recv,
                       int64_t recv_bytes, int src, int64_t* handle) override {
    if (dst < 0 || dst >= size() || src < 0 || src >= size()) {
      return Status::InvalidArgument("StartExchange: expected peers in [0, " +
                                     std::to_string(size()) + "), got dst " + std::to_string(dst) +
                                     " and src " + std::to_string(src));
    }
    Pending p;
    p.recv = recv;
    p.recv_bytes = recv_bytes;
    p.src = src;
    p.message = std::make_shared<Message>();
    p.message->data = send;
    p.message->bytes = send_bytes;
    p.message->posted = Clock::now();
    {
      std::lock_guard<std::mutex> lock(group_->mutex);
      p.recv_seq = received_[src]++;
      const int64_t seq = group_->sent[rank_ * size() + dst]++;
      group_->mailbox[{rank_, dst, seq}] = p.message;
    }
    group_->changed.notify_all();
    *handle = next_handle_++;
    pending_[*handle] = p;
    return Status::Ok();
  }

  Status WaitExchange(int64_t handle, double* transfer_seconds) override {
    auto it = pending_.find(handle);
    if (it == pending_.end()) {
      return Status::InvalidArgument("WaitExchange: unknown handle " + std::to_string(handle));
    }
    Pending p = it->second;
    pending_.erase(it);
    std::unique_lock<std::mutex> lock(group_->mutex);
    const auto key = std::make_tuple(p.src, rank_, p.recv_seq);
    group_->changed.wait(lock, [&] { return group_->mailbox.count(key) != 0; });
    std::shared_ptr<Message> incoming = group_->mailbox[key];
    group_->mailbox.erase(key);
    Status status = Status::Ok();
    if (incoming->bytes != p.recv_bytes) {
      status = Status::Internal("exchange from rank " + std::to_string(p.src) + ": expected " +
                                std::to_string(p.recv_bytes) + " bytes, got " +
                                std::to_string(incoming->bytes));
    } else if (p.recv_bytes > 0) {
      lock.unlock();
      std::memcpy(p.recv, incoming->data, p.recv_bytes);
      lock.lock();
    }
    incoming->consumed = true;
    incoming->done = Clock::now();
    group_->changed.notify_all();
    group_->changed.wait(lock, [&] { return p.message->consumed; });
    if (transfer_seconds != nullptr) {
      *transfer_seconds =
          std::chrono::duration<double>(p.message->done - p.message->posted).count();
    }
    return status;
  }

  Status AllGather(const void* send, int64_t bytes, void* recv) override {
    Group& g = *group_;
    std::unique_lock<std::mutex> lock(g.mutex);
    // Wait until the previous all-gather has been left by everyone.
    g.changed.wait(lock, [&] { return g.departed == 0; });
    const int64_t generation = g.generation;
    g.slots[rank_] = send;
    if (++g.arrived == g.size) {
      g.generation++;
      g.changed.notify_all();
    } else {
      g.changed.wait(lock, [&] { return g.generation != generation; });
    }
    lock.unlock();
    for (int r = 0; r < g.size; ++r) {
      std::memcpy(static_cast<char*>(recv) + r * bytes, g.slots[r], bytes);
    }
    lock.lock();
    // The slots point into the ranks' buffers: nobody returns before everyone has copied.
    if (++g.departed == g.size) {
      g.arrived = 0;
      g.departed = 0;
      g.changed.notify_all();
    } else {
      g.changed.wait(lock, [&] { return g.departed == 0; });
    }
    return Status::Ok();
  }

 private:
  struct Pending {
    void* recv = nullptr;
    int64_t recv_bytes = 0;
    int src = 0;
    int64_t recv_seq = 0;
    std::shared_ptr<Message> message;
  };
  std::shared_ptr<Group> group_;
  int rank_;
  std::vector<int64_t> received_;  // per source: exchanges started that receive from it
  std::map<int64_t, Pending> pending_;
  int64_t next_handle_ = 0;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> MakeLocalGroup(int size) {
  std::vector<std::unique_ptr<Communicator>> result;
  if (size < 1) return result;
  auto group = std::make_shared<Group>(size);
  for (int r = 0; r < size; ++r) result.push_back(std::make_unique<LocalCommunicator>(group, r));
  return result;
}

}  // namespace tessera
