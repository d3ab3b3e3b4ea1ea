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
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
// Columns per block. Long contiguous runs of each row of w matter more than keeping the
// accumulators in L1: 4096 beat 256..2048 and an even split over the threads (bench, 2-core EPYC).
constexpr int64_t kBlock = 4096;
constexpr int64_t kMinBlock = 128;

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
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  // At least one block per thread (pool + caller) down to kMinBlock columns: inside a decode
  // step most products depend on the previous one, so each call must use every core itself.
  const int64_t threads = pool.num_threads() + 1;
  const int64_t num_blocks = std::max((f + kBlock - 1) / kBlock,
                                      std::min(threads, (f + kMinBlock - 1) / kMinBlock));
  const int64_t block = ((f + num_blocks - 1) / num_blocks + 15) / 16 * 16;
  plt_cpu::ParallelFor(pool, num_blocks, num_blocks, [=](int64_t b) {
    const int64_t c0 = b * block;
    if (c0 < f) fn(xp, wp, op, d, f, c0, std::min(f, c0 + block));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PltRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
