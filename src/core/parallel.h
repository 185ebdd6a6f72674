// SPDX-License-Identifier: Apache-2.0
// Internal threading: every kernel parallelizes through ParallelFor, never through omp_* calls.
#pragma once

#include <cstdint>
#include <functional>

namespace tessera {

// Runs fn(task, worker) for every task in [0, num_tasks) on up to `threads` workers
// (worker in [0, threads)). Tasks are claimed dynamically in ascending order; a kernel that
// promises determinism must make each task's result independent of which worker runs it
// (per-worker scratch only, no cross-task floating-point reductions). Returns when all tasks
// are done. With threads <= 1 or a single task, runs inline on the caller. An exception thrown by
// fn stops the claiming of new tasks and is rethrown on the caller once every worker has stopped.
void ParallelFor(int32_t threads, int64_t num_tasks,
                 const std::function<void(int64_t task, int32_t worker)>& fn);

}  // namespace tessera
