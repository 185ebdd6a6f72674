// SPDX-License-Identifier: Apache-2.0
#include "core/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(TESSERA_USE_OPENMP)
#include <omp.h>
#endif

namespace tessera {

void ParallelFor(int32_t threads, int64_t num_tasks,
                 const std::function<void(int64_t, int32_t)>& fn) {
  if (num_tasks <= 0) return;
  const int32_t workers =
      static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(threads, num_tasks)));
  if (workers == 1) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  // An exception may not leave an OpenMP region or a std::thread (std::terminate): the first one
  // is kept, the remaining tasks are skipped, and it is rethrown on the caller's thread.
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker_loop = [&](int32_t worker) {
    try {
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < num_tasks;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        fn(t, worker);
      }
    } catch (...) {
      next.store(num_tasks, std::memory_order_relaxed);
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#if defined(TESSERA_USE_OPENMP)
#pragma omp parallel num_threads(workers)
  { worker_loop(static_cast<int32_t>(omp_get_thread_num())); }
#else
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int32_t w = 1; w < workers; ++w) pool.emplace_back(worker_loop, w);
  worker_loop(0);
  for (auto& t : pool) t.join();
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace tessera
