// Persistent thread pool of the CPU byte engine (see copy_pool.h).
#include "copy_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace amoeba {

namespace {

int read_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

class CopyPool {
 public:
  CopyPool() : affinity_(read_affinity()) {}
  CopyPool(const CopyPool&) = delete;
  CopyPool& operator=(const CopyPool&) = delete;

  int affinity() const { return affinity_; }

  void run(int threads, int64_t parts, const std::function<void(int64_t)>& task) {
    std::lock_guard<std::mutex> job(job_mu_);
    const int helpers = static_cast<int>(std::min<int64_t>(threads, parts)) - 1;
    start_workers(helpers);
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      parts_ = parts;
      next_.store(0, std::memory_order_relaxed);
      helpers_ = helpers;
      pending_ = helpers;
      ++generation_;
      ++jobs_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return pending_ == 0; });
    task_ = nullptr;
  }

  CopyPoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int>(workers_.size()), jobs_, threads_started_};
  }

 private:
  // Claims parts until none is left. Called by the job's caller and its helpers.
  void work() {
    for (int64_t p = next_.fetch_add(1, std::memory_order_relaxed); p < parts_;
         p = next_.fetch_add(1, std::memory_order_relaxed))
      (*task_)(p);
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      // Workers beyond this job's helper count sit it out. A helper's job cannot be replaced before it finishes
      // (the caller waits for pending_ == 0 while holding job_mu_), so every helper sees its own job here.
      if (index >= helpers_) continue;
      lock.unlock();
      work();
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  // Called with job_mu_ held (so no job is running).
  void start_workers(int wanted) {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int>(workers_.size()) < wanted) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { worker_loop(index); });
      ++threads_started_;
    }
  }

  const int affinity_;
  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;      // guards everything below except next_
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;  // never joined: the pool lives until the process exits
  uint64_t generation_ = 0;
  int helpers_ = 0, pending_ = 0;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t parts_ = 0;
  std::atomic<int64_t> next_{0};
  int64_t jobs_ = 0, threads_started_ = 0;
};

// The pool is created on first use and deliberately leaked: destroying it at exit would have to join threads that
// may be blocked in a job of another thread. After fork() only the forking thread exists in the child, so the
// child drops its copy of the pool (with its mutexes in whatever state) and creates a fresh one on first use.
std::atomic<CopyPool*> g_pool{nullptr};
std::atomic<int> g_default_threads{0};  // 0: the affinity count

void forget_pool_in_child() { g_pool.store(nullptr); }

CopyPool& pool() {
  CopyPool* p = g_pool.load();
  if (p != nullptr) return *p;
  static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)registered;
  CopyPool* fresh = new CopyPool();  // starts no thread
  if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
  delete fresh;  // another thread created it first
  return *p;
}

}  // namespace

int affinity_cpu_count() { return pool().affinity(); }

int default_copy_threads() {
  const int n = g_default_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : affinity_cpu_count();
}

void set_copy_threads(int n) { g_default_threads.store(std::max(0, std::min(n, kMaxCopyThreads))); }

void parallel_for_parts(int threads, int64_t parts, const std::function<void(int64_t)>& task) {
  threads = std::min(threads, kMaxCopyThreads);
  if (threads <= 1 || parts <= 1) {
    for (int64_t p = 0; p < parts; ++p) task(p);
    return;
  }
  pool().run(threads, parts, task);
}

CopyPoolStats copy_pool_stats() { return pool().stats(); }

}  // namespace amoeba
