// SPDX-License-Identifier: Apache-2.0
// MakeMpiCommunicator: an exchange is an MPI_Irecv + MPI_Isend pair (split into pieces of at most
// 1 GiB, the int count limit) that one worker thread drives to completion, exchanges in start
// order, so they progress while the caller's thread computes; AllGather runs on the same worker,
// so only one thread ever calls MPI.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tessera/distributed_mpi.h"

namespace tessera {
namespace {

constexpr int kTag = 7417;
constexpr int64_t kPiece = int64_t{1} << 30;

Status MpiError(const char* what, int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return Status::Internal(std::string(what) + ": MPI error: " + std::string(text, len));
}

struct Op {
  std::function<Status(double*)> run;
  bool done = false;
  Status status;
  double seconds = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) {
    MPI_Comm_dup(comm, &comm_);
    // Errors come back as codes (turned into Status), not as an abort of the job.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    threaded_ = level >= MPI_THREAD_SERIALIZED;
    if (threaded_) worker_ = std::thread([this] { Work(); });
  }

  ~MpiCommunicator() override {
    if (threaded_) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
      }
      changed_.notify_all();
      worker_.join();
    }
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status StartExchange(const void* send, int64_t send_bytes, int dst, void* recv,
                       int64_t recv_bytes, int src, int64_t* handle) override {
    if (dst < 0 || dst >= size_ || src < 0 || src >= size_) {
      return Status::InvalidArgument("StartExchange: expected peers in [0, " +
                                     std::to_string(size_) + "), got dst " + std::to_string(dst) +
                                     " and src " + std::to_string(src));
    }
    MPI_Comm comm = comm_;
    auto run = [=](double* seconds) -> Status {
      const auto start = std::chrono::steady_clock::now();
      const int64_t pieces =
          std::max((send_bytes + kPiece - 1) / kPiece, (recv_bytes + kPiece - 1) / kPiece);
      std::vector<MPI_Request> requests;
      std::vector<int> expected;
      for (int64_t p = 0; p < std::max<int64_t>(pieces, 1); ++p) {
        const int64_t s_off = std::min(send_bytes, p * kPiece);
        const int64_t r_off = std::min(recv_bytes, p * kPiece);
        const int s_n = static_cast<int>(std::min(kPiece, send_bytes - s_off));
        const int r_n = static_cast<int>(std::min(kPiece, recv_bytes - r_off));
        MPI_Request r[2];
        int rc = MPI_Irecv(static_cast<char*>(recv) + r_off, r_n, MPI_BYTE, src, kTag, comm, &r[0]);
        if (rc == MPI_SUCCESS) {
          rc = MPI_Isend(static_cast<const char*>(send) + s_off, s_n, MPI_BYTE, dst, kTag, comm,
                         &r[1]);
        }
        if (rc != MPI_SUCCESS) return MpiError("exchange", rc);
        requests.insert(requests.end(), r, r + 2);
        expected.push_back(r_n);
      }
      // Poll with a growing sleep rather than block in MPI_Waitall: a blocking MPI call spins,
      // and the spinning worker would take a core from the caller's compute threads.
      std::vector<MPI_Status> statuses(requests.size());
      for (int64_t sleep_us = 10;; sleep_us = std::min<int64_t>(2 * sleep_us, 500)) {
        int done = 0;
        const int rc =
            MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, statuses.data());
        if (rc != MPI_SUCCESS) return MpiError("exchange", rc);
        if (done) break;
        std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      }
      for (size_t p = 0; p < expected.size(); ++p) {
        int got = 0;
        MPI_Get_count(&statuses[2 * p], MPI_BYTE, &got);
        if (got != expected[p]) {
          return Status::Internal("exchange from rank " + std::to_string(src) + ": expected " +
                                  std::to_string(expected[p]) + " bytes, got " +
                                  std::to_string(got));
        }
      }
      *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return Status::Ok();
    };
    *handle = Submit(std::move(run));
    return Status::Ok();
  }

  Status WaitExchange(int64_t handle, double* transfer_seconds) override {
    double seconds = 0;
    Status st = Wait(handle, &seconds);
    if (transfer_seconds != nullptr) *transfer_seconds = seconds;
    return st;
  }

  Status AllGather(const void* send, int64_t bytes, void* recv) override {
    if (bytes > INT32_MAX) {
      return Status::InvalidArgument("AllGather: expected at most 2^31 - 1 bytes per rank, got " +
                                     std::to_string(bytes));
    }
    MPI_Comm comm = comm_;
    const int64_t handle = Submit([=](double* seconds) -> Status {
      const auto start = std::chrono::steady_clock::now();
      const int rc = MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                   static_cast<int>(bytes), MPI_BYTE, comm);
      *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return rc == MPI_SUCCESS ? Status::Ok() : MpiError("all-gather", rc);
    });
    double seconds = 0;
    return Wait(handle, &seconds);
  }

 private:
  int64_t Submit(std::function<Status(double*)> run) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t handle = next_++;
    ops_[handle].run = std::move(run);
    queue_.push_back(handle);
    changed_.notify_all();
    return handle;
  }

  // Without a worker: runs every queued op up to `handle` here, in order.
  Status Wait(int64_t handle, double* seconds) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (ops_.count(handle) == 0) {
      return Status::InvalidArgument("WaitExchange: unknown handle " + std::to_string(handle));
    }
    if (!threaded_) {
      while (!ops_[handle].done) {
        const int64_t h = queue_.front();
        queue_.pop_front();
        Op& op = ops_[h];
        op.status = op.run(&op.seconds);
        op.done = true;
      }
    }
    changed_.wait(lock, [&] { return ops_[handle].done; });
    Status st = ops_[handle].status;
    *seconds = ops_[handle].seconds;
    ops_.erase(handle);
    return st;
  }

  void Work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      const int64_t h = queue_.front();
      queue_.pop_front();
      std::function<Status(double*)> run = ops_[h].run;
      lock.unlock();
      double seconds = 0;
      Status st = run(&seconds);
      lock.lock();
      ops_[h].status = st;
      ops_[h].seconds = seconds;
      ops_[h].done = true;
      changed_.notify_all();
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  bool threaded_ = false;
  std::thread worker_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<int64_t, Op> ops_;
  std::deque<int64_t> queue_;
  int64_t next_ = 0;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<Communicator> MakeMpiCommunicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm);
}

}  // namespace tessera
