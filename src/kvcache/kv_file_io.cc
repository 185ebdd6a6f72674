// SPDX-License-Identifier: Apache-2.0
// The two KV file readers (kv_file_io.h): io_uring (liburing, when the build found it) and pread
// on a small thread pool. Both keep every piece of a submitted slot in flight at once and finish
// short reads by reading the rest; both wait for every read in flight before they are destroyed,
// so a buffer is never written after DecodeFromFile returns.
#include "kvcache/kv_file_io.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#if defined(TESSERA_HAVE_LIBURING)
#include <liburing.h>
#endif

namespace tessera {
namespace kvfile {
namespace {

struct Piece {
  int slot = 0;
  int64_t offset = 0;
  int64_t bytes = 0;  // still to read
  uint8_t* dst = nullptr;
};

void CutPieces(int slot, const std::vector<ReadRequest>& requests, std::vector<Piece>* pieces) {
  for (const ReadRequest& r : requests) {
    for (int64_t at = 0; at < r.bytes; at += kPieceBytes) {
      pieces->push_back(
          Piece{slot, r.offset + at, std::min(kPieceBytes, r.bytes - at), r.dst + at});
    }
  }
}

std::string ReadError(const std::string& path, const Piece& p, int err) {
  return "KV file '" + path + "': read of " + std::to_string(p.bytes) + " bytes at offset " +
         std::to_string(p.offset) + " failed: " +
         (err == 0 ? std::string("unexpected end of file") : std::string(std::strerror(err)));
}

// ---------------------------------------------------------------------------------------------
// pread on a pool of threads.

class ThreadPoolReader final : public Reader {
 public:
  ThreadPoolReader(int fd, std::string path, int slots, int32_t threads)
      : fd_(fd), path_(std::move(path)), pending_(size_t(slots), 0), errors_(size_t(slots)) {
    for (int32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~ThreadPoolReader() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;  // workers drain the queue first
    }
    work_cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  Status Submit(int slot, const std::vector<ReadRequest>& requests) override {
    std::vector<Piece> pieces;
    CutPieces(slot, requests, &pieces);
    {
      std::lock_guard<std::mutex> lock(mu_);
      errors_[size_t(slot)].clear();
      pending_[size_t(slot)] += static_cast<int64_t>(pieces.size());
      for (Piece& p : pieces) queue_.push_back(p);
    }
    work_cv_.notify_all();
    return Status::Ok();
  }

  Status Wait(int slot) override {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return pending_[size_t(slot)] == 0; });
    if (!errors_[size_t(slot)].empty()) return Status::Internal(errors_[size_t(slot)]);
    return Status::Ok();
  }

  KVFileReader kind() const override { return KVFileReader::kThreadPool; }

 private:
  void Work() {
    for (;;) {
      Piece p;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and nothing left
        p = queue_.front();
        queue_.pop_front();
      }
      int err = 0;
      bool ok = true;
      while (p.bytes > 0) {
        const ssize_t r =
            ::pread(fd_, p.dst, static_cast<size_t>(p.bytes), static_cast<off_t>(p.offset));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
          err = r < 0 ? errno : 0;
          ok = false;
          break;
        }
        p.dst += r;
        p.offset += r;
        p.bytes -= r;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!ok && errors_[size_t(p.slot)].empty())
          errors_[size_t(p.slot)] = ReadError(path_, p, err);
        --pending_[size_t(p.slot)];
      }
      done_cv_.notify_all();
    }
  }

  int fd_;
  std::string path_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Piece> queue_;
  std::vector<int64_t> pending_;
  std::vector<std::string> errors_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// ---------------------------------------------------------------------------------------------
// io_uring.

#if defined(TESSERA_HAVE_LIBURING)
class IoUringReader final : public Reader {
 public:
  static constexpr unsigned kEntries = 128;

  IoUringReader(int fd, std::string path, int slots)
      : fd_(fd),
        path_(std::move(path)),
        pieces_(size_t(slots)),
        pending_(size_t(slots), 0),
        errors_(size_t(slots)) {}
  ~IoUringReader() override {
    if (!ready_) return;
    // Reads still in flight write into the caller's buffers: reap them all first.
    while (in_flight_ > 0) {
      if (!Reap(true)) break;
    }
    io_uring_queue_exit(&ring_);
  }

  // 0 or -errno.
  int Init() {
    const int r = io_uring_queue_init(kEntries, &ring_, 0);
    ready_ = r == 0;
    return r;
  }

  Status Submit(int slot, const std::vector<ReadRequest>& requests) override {
    std::vector<Piece>& pieces = pieces_[size_t(slot)];
    pieces.clear();
    CutPieces(slot, requests, &pieces);
    errors_[size_t(slot)].clear();
    pending_[size_t(slot)] = static_cast<int64_t>(pieces.size());
    for (Piece& p : pieces) Queue(&p);
    const int r = io_uring_submit(&ring_);
    if (r < 0)
      return Status::Internal("KV file '" + path_ + "': io_uring_submit: " + std::strerror(-r));
    return Status::Ok();
  }

  Status Wait(int slot) override {
    while (pending_[size_t(slot)] > 0) {
      if (!Reap(true)) {
        return Status::Internal("KV file '" + path_ + "': io_uring_wait_cqe failed");
      }
    }
    if (!errors_[size_t(slot)].empty()) return Status::Internal(errors_[size_t(slot)]);
    return Status::Ok();
  }

  KVFileReader kind() const override { return KVFileReader::kIoUring; }

 private:
  void Queue(Piece* p) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {  // the ring is full: submit and make room
      io_uring_submit(&ring_);
      Reap(true);
      sqe = io_uring_get_sqe(&ring_);
    }
    io_uring_prep_read(sqe, fd_, p->dst, static_cast<unsigned>(p->bytes),
                       static_cast<uint64_t>(p->offset));
    io_uring_sqe_set_data(sqe, p);
    ++in_flight_;
  }

  // Handles one completion (waiting for it when `block`); false when waiting failed.
  bool Reap(bool block) {
    io_uring_cqe* cqe = nullptr;
    int r = block ? io_uring_wait_cqe(&ring_, &cqe) : io_uring_peek_cqe(&ring_, &cqe);
    if (r == -EINTR) return true;
    if (r < 0 || cqe == nullptr) return false;
    Piece* p = static_cast<Piece*>(io_uring_cqe_get_data(cqe));
    const int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    --in_flight_;
    if (res == -EINTR || res == -EAGAIN) {
      Queue(p);
      io_uring_submit(&ring_);
      return true;
    }
    if (res <= 0) {
      if (errors_[size_t(p->slot)].empty()) {
        errors_[size_t(p->slot)] = ReadError(path_, *p, res < 0 ? -res : 0);
      }
      --pending_[size_t(p->slot)];
      return true;
    }
    p->dst += res;
    p->offset += res;
    p->bytes -= res;
    if (p->bytes > 0) {  // a short read: read the rest
      Queue(p);
      io_uring_submit(&ring_);
      return true;
    }
    --pending_[size_t(p->slot)];
    return true;
  }

  int fd_;
  std::string path_;
  io_uring ring_{};
  bool ready_ = false;
  int64_t in_flight_ = 0;
  std::vector<std::vector<Piece>> pieces_;  // per slot; addresses stay put while in flight
  std::vector<int64_t> pending_;
  std::vector<std::string> errors_;
};
#endif

}  // namespace

bool HaveIoUring() {
#if defined(TESSERA_HAVE_LIBURING)
  return true;
#else
  return false;
#endif
}

Status MakeReader(KVFileReader which, int fd, const std::string& path, int slots,
                  int32_t io_threads, std::unique_ptr<Reader>* reader) {
  // kAuto is the thread pool: as fast as io_uring on this project's measurements
  // (docs/decode.md), and the same on every build and kernel.
  if (which == KVFileReader::kIoUring) {
#if defined(TESSERA_HAVE_LIBURING)
    auto ring = std::make_unique<IoUringReader>(fd, path, slots);
    const int r = ring->Init();
    if (r == 0) {
      *reader = std::move(ring);
      return Status::Ok();
    }
    return Status::Unimplemented(
        "reader: io_uring was refused by the kernel (io_uring_queue_init: " +
        std::string(std::strerror(-r)) + "); use KVFileReader::kThreadPool");
#else
    return Status::Unimplemented(
        "reader: io_uring needs a build with liburing (liburing-dev); use "
        "KVFileReader::kThreadPool");
#endif
  }
  *reader = std::make_unique<ThreadPoolReader>(fd, path, slots, io_threads);
  return Status::Ok();
}

}  // namespace kvfile
}  // namespace tessera
