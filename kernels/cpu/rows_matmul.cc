// out[M, F] = x[M, D] @ w[D, F] in float32 for a few rows (M <= kMaxRows), on CPU.
//
// Why this exists: at decode time PLT multiplies R rows (one per loop) by every weight matrix.
// On CPU that product is memory-bound: the cost is streaming w once. XLA:CPU (and OpenBLAS)
// send 1 row to a matrix-vector kernel that streams w at full bandwidth, but 2..8 rows to a
// general GEMM that packs w first and runs ~3x slower, so R rows cost ~R times one row.
// This kernel streams w exactly once for all rows: for a block of columns it walks down w four
// rows at a time (contiguous runs the prefetcher follows) while the M partial sums of the block
// stay in cache.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
// Columns per block. Long contiguous runs of each row of w matter more than keeping the
// accumulators in L1: 4096 beat 256..2048 and an even split over the threads (bench, 2-core EPYC).
constexpr int64_t kBlock = 4096;

// Columns [c0, c1) of out for M rows; w rows are read 4 at a time (fewer accumulator passes).
template <int M>
void RowsBlock(const float* x, const float* w, float* out, int64_t d, int64_t f, int64_t c0,
               int64_t c1) {
  const int64_t n = c1 - c0;
  thread_local std::vector<float> buffer;  // per thread, reused across calls (no page faults)
  buffer.assign(M * kBlock, 0.0f);
  float(*acc)[kBlock] = reinterpret_cast<float(*)[kBlock]>(buffer.data());
  int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    const float* w0 = w + k * f + c0;
    const float* w1 = w0 + f;
    const float* w2 = w1 + f;
    const float* w3 = w2 + f;
    float a0[M], a1[M], a2[M], a3[M];
    for (int r = 0; r < M; ++r) {
      a0[r] = x[r * d + k];
      a1[r] = x[r * d + k + 1];
      a2[r] = x[r * d + k + 2];
      a3[r] = x[r * d + k + 3];
    }
    for (int64_t j = 0; j < n; ++j) {
      const float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
      for (int r = 0; r < M; ++r) acc[r][j] += a0[r] * v0 + a1[r] * v1 + a2[r] * v2 + a3[r] * v3;
    }
  }
  for (; k < d; ++k) {
    const float* w0 = w + k * f + c0;
    for (int r = 0; r < M; ++r) {
      const float a = x[r * d + k];
      for (int64_t j = 0; j < n; ++j) acc[r][j] += a * w0[j];
    }
  }
  for (int r = 0; r < M; ++r) std::memcpy(out + r * f + c0, acc[r], sizeof(float) * n);
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

BlockFn BlockFor(int64_t m) {
  switch (m) {
    case 1: return RowsBlock<1>;
    case 2: return RowsBlock<2>;
    case 3: return RowsBlock<3>;
    case 4: return RowsBlock<4>;
    case 5: return RowsBlock<5>;
    case 6: return RowsBlock<6>;
    case 7: return RowsBlock<7>;
    case 8: return RowsBlock<8>;
    default: return nullptr;
  }
}

// Column blocks are handed out through an atomic counter to the calling thread and to helpers
// scheduled on XLA's intra-op pool. The caller never waits for a helper that has not started
// (it may never start while the pool is busy): it only waits for blocks already claimed.
struct Work {
  const float* x;
  const float* w;
  float* out;
  int64_t d, f, num_blocks;
  BlockFn fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Returns after claiming no more blocks.
  void Run() {
    for (;;) {
      const int64_t b = next.fetch_add(1);
      if (b >= num_blocks) return;
      const int64_t c0 = b * kBlock;
      fn(x, w, out, d, f, c0, std::min(f, c0 + kBlock));
      done.fetch_add(1);
    }
  }
};

ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("plt_rows_matmul: expects x [M, D] and w [D, F]");
  }
  const int64_t m = xd[0], d = xd[1], f = wd[1];
  BlockFn fn = BlockFor(m);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument("plt_rows_matmul: 1 <= M <= 8 rows");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->out = out->typed_data();
  work->d = d;
  work->f = f;
  work->num_blocks = (f + kBlock - 1) / kBlock;
  work->fn = fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_blocks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work] { work->Run(); });  // the shared_ptr outlives a late start
  }
  work->Run();
  while (work->done.load() < work->num_blocks) std::this_thread::yield();
  // A helper starting after this point finds no block left and touches nothing.
  work->next.store(work->num_blocks);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PltRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
