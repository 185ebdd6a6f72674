// SPDX-License-Identifier: Apache-2.0
// Internal: asynchronous reads of a KV file into the chunk buffers of DecodeFromFile. A reader
// serves a fixed number of slots (one per chunk buffer); Submit starts the reads of one slot,
// Wait blocks until they are all done. Requests are cut into pieces of at most kPieceBytes so
// that a chunk's reads are in flight together (the device sees a queue, not one request).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/kv_file.h"
#include "tessera/status.h"

namespace tessera {
namespace kvfile {

constexpr int64_t kPieceBytes = int64_t{1} << 20;

struct ReadRequest {
  int64_t offset = 0;  // in the file (aligned to 4096 for O_DIRECT)
  int64_t bytes = 0;   // (a multiple of 4096 for O_DIRECT)
  uint8_t* dst = nullptr;
};

class Reader {
 public:
  virtual ~Reader() = default;
  // Starts the reads of `slot` (which has none in flight).
  virtual Status Submit(int slot, const std::vector<ReadRequest>& requests) = 0;
  // Waits for every read of `slot`; an I/O error or an unexpected end of file is an error.
  virtual Status Wait(int slot) = 0;
  virtual KVFileReader kind() const = 0;
};

// A reader of `fd` (which the caller keeps open for the reader's life) with `slots` slots.
// kIoUring fails with Unimplemented when the build has no liburing or the kernel refuses
// io_uring (a seccomp filter, an old kernel); kAuto is kThreadPool.
Status MakeReader(KVFileReader which, int fd, const std::string& path, int slots,
                  int32_t io_threads, std::unique_ptr<Reader>* reader);

// True when this build has the io_uring reader.
bool HaveIoUring();

}  // namespace kvfile
}  // namespace tessera
