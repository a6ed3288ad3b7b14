// Persistent process-wide thread pool of the CPU byte engine.
//
// Copies are memory-bound, so the pool is sized to the CPUs this process may run on (its affinity mask), not to
// the machine: an engine that runs several ranks per host pins or limits each rank and calls set_copy_threads(n)
// to give each its share. Workers are started on first need and live until the process exits (never joined); a
// child created by fork() starts with a fresh, empty pool.
#pragma once

#include <cstdint>
#include <functional>

namespace amoeba {

// CPUs in this process's affinity mask (sched_getaffinity), read when the pool is created; at least 1.
int affinity_cpu_count();

// Threads a copy uses when its caller passes num_threads <= 0: the last set_copy_threads(n > 0), otherwise
// affinity_cpu_count().
int default_copy_threads();

// n > 0: the default thread count of later copies; n <= 0: back to the affinity count. Starts no thread.
void set_copy_threads(int n);

// Most threads one copy may use (a guard against absurd requests).
constexpr int kMaxCopyThreads = 256;

// Runs task(part) for every part in [0, parts) on min(threads, parts) threads: the calling thread plus workers of
// the persistent pool, each taking the next unclaimed part. Returns when every part has run. One job runs at a
// time (a second caller waits for the first); threads <= 1 or parts <= 1 run everything on the calling thread
// without touching the pool. task must not throw.
void parallel_for_parts(int threads, int64_t parts, const std::function<void(int64_t)>& task);

struct CopyPoolStats {
  int workers;              // pool threads alive now (the calling thread is not counted)
  int64_t jobs;             // parallel jobs run on the pool since it was created
  int64_t threads_started;  // workers ever started (stays equal to workers: the pool never replaces a thread)
};
CopyPoolStats copy_pool_stats();

}  // namespace amoeba
