// out[M, F] = x[M, D] @ w[D, F] in float32 for a few rows (M <= 8), on CPU.
//
// Why this exists: at decode time PLT multiplies R rows (one per loop) by every weight matrix.
// On CPU that product is memory-bound: the cost is streaming w once. XLA:CPU (and OpenBLAS)
// send 1 row to a matrix-vector kernel and 2..8 rows to a general GEMM that packs w first and
// streams it far below the memory bandwidth, so R rows cost about what R single rows cost.
// This kernel streams w exactly once for all rows. Each thread takes a contiguous range of w's
// rows (the reduction axis), so every core reads one sequential stretch of memory, and keeps M
// partial sums per column in L1 (column blocks of 4096 / M); the partial sums of the threads are
// added at the end. In a decode step each product depends on the one before, so each call must
// use every core itself. Splitting columns instead gives each core shorter, strided runs of
// memory, which stream slower (docs/kernels.md has the measurement).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinRowsPerTask = 64;  // rows of w per thread below which splitting cannot pay

using plt_cpu::Load;
using plt_cpu::Store;
using plt_cpu::Vec8;

// acc[r, :] = sum over k in [k0, k1) of x[r, k] * w[k, :], for M rows, all F columns.
// acc has row stride f. w's rows are taken 4 at a time (fewer passes over the accumulators).
template <int M>
void PartialProduct(const float* __restrict x, const float* __restrict w, float* __restrict acc,
                    int64_t d, int64_t f, int64_t k0, int64_t k1) {
  for (int r = 0; r < M; ++r) std::memset(acc + r * f, 0, sizeof(float) * f);
  const int64_t block = std::max<int64_t>(256, 4096 / M);  // M x block partial sums: <= 16 KiB
  for (int64_t c0 = 0; c0 < f; c0 += block) {
    const int64_t c1 = std::min(f, c0 + block);
    const int64_t c8 = c0 + (c1 - c0) / 8 * 8;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const float* w0 = w + k * f;
      float a[4][M];
      for (int g = 0; g < 4; ++g) {
        for (int r = 0; r < M; ++r) a[g][r] = x[r * d + k + g];
      }
      for (int64_t j = c0; j < c8; j += 8) {
        const Vec8 v0 = Load(w0 + j), v1 = Load(w0 + f + j), v2 = Load(w0 + 2 * f + j),
                   v3 = Load(w0 + 3 * f + j);
        for (int r = 0; r < M; ++r) {
          float* p = acc + r * f + j;
          Store(p, Load(p) + a[0][r] * v0 + a[1][r] * v1 + a[2][r] * v2 + a[3][r] * v3);
        }
      }
      for (int64_t j = c8; j < c1; ++j) {
        for (int r = 0; r < M; ++r) {
          acc[r * f + j] += a[0][r] * w0[j] + a[1][r] * w0[f + j] + a[2][r] * w0[2 * f + j] +
                            a[3][r] * w0[3 * f + j];
        }
      }
    }
    for (; k < k1; ++k) {
      const float* wk = w + k * f;
      for (int r = 0; r < M; ++r) {
        const float a = x[r * d + k];
        for (int64_t j = c0; j < c1; ++j) acc[r * f + j] += a * wk[j];
      }
    }
  }
}

using PartialFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                           int64_t);

PartialFn PartialFor(int64_t m) {
  switch (m) {
    case 1: return PartialProduct<1>;
    case 2: return PartialProduct<2>;
    case 3: return PartialProduct<3>;
    case 4: return PartialProduct<4>;
    case 5: return PartialProduct<5>;
    case 6: return PartialProduct<6>;
    case 7: return PartialProduct<7>;
    case 8: return PartialProduct<8>;
    default: return nullptr;
  }
}

ffi::Error RowsMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("plt_rows_matmul: expects x [M, D] and w [D, F]");
  }
  const int64_t m = xd[0], d = xd[1], f = wd[1];
  PartialFn fn = PartialFor(m);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument("plt_rows_matmul: 1 <= M <= 8 rows");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  // Task t covers rows [t * chunk, (t + 1) * chunk) of w; task 0 writes out, the others their
  // own partial sums, added to out once all are done.
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(plt_cpu::NumThreads(), d / kMinRowsPerTask));
  const int64_t chunk = ((d + tasks - 1) / tasks + 3) / 4 * 4;
  thread_local std::vector<float> scratch;  // reused across calls (no allocation per product)
  scratch.resize((tasks - 1) * m * f);
  float* partials = scratch.data();
  plt_cpu::ParallelFor(tasks, [=](int64_t t) {
    const int64_t k0 = std::min(d, t * chunk), k1 = std::min(d, (t + 1) * chunk);
    fn(xp, wp, t == 0 ? op : partials + (t - 1) * m * f, d, f, k0, k1);
  });
  for (int64_t t = 1; t < tasks; ++t) {
    const float* p = partials + (t - 1) * m * f;
    for (int64_t i = 0; i < m * f; ++i) op[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PltRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The cores this process may use (Python reads the affinity mask and cgroup quota); effective
// only before the first kernel call starts the helper threads.
extern "C" void PltSetNumThreads(int n) { plt_cpu::ConfiguredThreads().store(n > 0 ? n : 0); }
