// ParallelFor over XLA:CPU's intra-op thread pool, shared by the CPU kernels.
#ifndef PLT_JAX_KERNELS_CPU_PARALLEL_H_
#define PLT_JAX_KERNELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace plt_cpu {

// Runs fn(i) for every i in [0, n) on the calling thread and on up to `max_helpers` tasks
// scheduled on the pool. Tasks are claimed through an atomic counter. The caller never waits for
// a helper that has not started (it may never start while the pool is busy); it only waits for
// tasks already claimed. A helper starting after the return finds nothing left and touches only
// the shared counter, which it keeps alive.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t max_helpers, Fn fn) {
  struct State {
    explicit State(Fn f, int64_t count) : fn(std::move(f)), n(count) {}
    Fn fn;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= n) return;
        fn(i);
        done.fetch_add(1);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn), n);
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), n - 1, max_helpers});
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state] { state->Run(); });
  }
  state->Run();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace plt_cpu

#endif  // PLT_JAX_KERNELS_CPU_PARALLEL_H_
