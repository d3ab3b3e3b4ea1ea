// Eight-float vectors (one AVX register) through GCC/Clang vector extensions, shared by the CPU
// kernels: explicit enough that -O3 emits packed loads and FMAs, portable across x86 and ARM.
#ifndef PLT_JAX_KERNELS_CPU_SIMD_H_
#define PLT_JAX_KERNELS_CPU_SIMD_H_

#include <cstring>

namespace plt_cpu {

typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 Load(const float* p) {  // unaligned
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace plt_cpu

#endif  // PLT_JAX_KERNELS_CPU_SIMD_H_
