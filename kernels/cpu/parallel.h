// ParallelFor for the CPU kernels: our own helper threads, which spin briefly between calls.
//
// Why not XLA's intra-op pool: a decode step is a long chain of short kernel calls, each
// depending on the one before. A helper woken from sleep for every call starts late (an idle
// vCPU has to be woken first), and on a small machine that delay can cost more than the extra
// core gives (docs/kernels.md has the measurement). Helpers here spin for a moment after each
// job, so the next call of the chain finds them awake, then sleep.
#ifndef PLT_JAX_KERNELS_CPU_PARALLEL_H_
#define PLT_JAX_KERNELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace plt_cpu {

// Threads the kernels may use, caller included: set from Python (PltSetNumThreads) to the cores
// this process may run on (affinity mask, cgroup CPU quota) before the pool starts; 0 = unset.
inline std::atomic<int>& ConfiguredThreads() {
  static std::atomic<int> n{0};
  return n;
}

inline int64_t NumThreads() {
  const int n = ConfiguredThreads().load();
  return n > 0 ? n : std::max(1u, std::thread::hardware_concurrency());
}

class SpinPool {
 public:
  // Calls fn(i) for every i in [0, n) on the caller and the helpers, and returns when all are
  // done. Each job has its own counters, kept alive by whoever still holds it, so a helper that
  // wakes late finds its job fully claimed and touches nothing else.
  template <typename Fn>
  void ParallelFor(int64_t n, Fn& fn) {
    if (helpers_ == 0 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->run = [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); };
    job->ctx = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Work();
    while (job->done.load(std::memory_order_acquire) < n) {
    }
  }

  static SpinPool& Get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: helpers live with the process
    return *pool;
  }

 private:
  struct Job {
    void (*run)(void*, int64_t) = nullptr;
    void* ctx = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Work() {
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= n) return;
        run(ctx, i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  SpinPool() {
    helpers_ = NumThreads() - 1;
    for (int64_t i = 0; i < helpers_; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      // Spin up to kSpin for the next job, then sleep until one is published.
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until) {
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        job = job_;
      }
      job->Work();
    }
  }

  static constexpr std::chrono::microseconds kSpin{2000};
  int64_t helpers_ = 0;
  std::mutex mu_;  // guards job_ and the sleeping helpers' wake-up
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

// Runs fn(i) for every i in [0, n) on the calling thread and the spinning helpers.
template <typename Fn>
void ParallelFor(int64_t n, Fn fn) {
  SpinPool::Get().ParallelFor(n, fn);
}

}  // namespace plt_cpu

#endif  // PLT_JAX_KERNELS_CPU_PARALLEL_H_
