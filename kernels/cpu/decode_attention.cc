// The attention of one cached decode step, for one layer, in one call (CPU, float32).
//
// Why this exists: at batch 1 a decode step's attention is a few hundred kFLOP per layer, but in
// XLA:CPU it is ~20 small ops per branch (cache scatter as a full-buffer select, key/value
// transposes, dot, max, exp, sum, dot, mix), whose fixed costs dominate and grow with every PLT
// row. Here the cache writes are in place (outputs alias the cache inputs) and every query row
// that shares a kv head reads that head's keys and values together.
//
// Math (plt_jax/decode.py is the reference): for sequence b at position p = pos[b]
//   * row 0's key/value go to slot p of the full cache (dropped if p >= T, as XLA's scatter
//     drops them); rows r >= 1 (PLT loops r+1) write theirs to slot p % W of their ring;
//   * every row attends causally over full-cache slots 0..min(p, T-1) (row 0: plain attention;
//     rows >= 1: the global G-SWA branch);
//   * rows r >= 1 also attend over their ring, whose slot s holds position
//     p - ((p - s) mod W) (empty if negative), and mix: g * global + (1 - g) * local.
// Softmax in float32 with the maximum subtracted, scale 1/sqrt(E); GQA: query head h reads kv
// head h / G.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t batch, rows, heads, kv_heads, dim, slots, window;
  const float* q;       // [B, R, H, E]
  const float* k_new;   // [B, R, K, E]
  const float* v_new;   // [B, R, K, E]
  const int32_t* pos;   // [B]
  const float* gate;    // [B, R-1, H] (rows > 1)
  float* k_full;        // [B, T, K, E] (aliases its input)
  float* v_full;
  float* k_ring;        // [B, R-1, W, K, E] (rows > 1; aliases its input)
  float* v_ring;
  float* y;             // [B, R, H, E]
};

using plt_cpu::Load;
using plt_cpu::Store;
using plt_cpu::Vec8;

inline float Dot(const float* a, const float* b, int64_t n) {
  Vec8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += Load(a + i) * Load(b + i);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// o += p * v over n floats.
inline void Axpy(float p, const float* v, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) Store(o + i, Load(o + i) + p * Load(v + i));
  for (; i < n; ++i) o[i] += p * v[i];
}

// out[n, :] = softmax(q[n] . keys) @ values for `nq` queries (pre-scaled) over `nk` keys given by
// their row pointers. logits: scratch of nq * nk floats, laid out [nk, nq].
void Attend(const float* const* qs, int64_t nq, const float* const* keys,
            const float* const* values, int64_t nk, int64_t dim, float* logits, float* const* out) {
  for (int64_t t = 0; t < nk; ++t) {  // each key row is read once for all queries
    for (int64_t n = 0; n < nq; ++n) logits[t * nq + n] = Dot(qs[n], keys[t], dim);
  }
  for (int64_t n = 0; n < nq; ++n) {
    float m = -INFINITY;
    for (int64_t t = 0; t < nk; ++t) m = std::max(m, logits[t * nq + n]);
    float sum = 0.0f;
    for (int64_t t = 0; t < nk; ++t) {
      const float e = std::exp(logits[t * nq + n] - m);
      logits[t * nq + n] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < nk; ++t) logits[t * nq + n] *= inv;
    std::memset(out[n], 0, sizeof(float) * dim);
  }
  for (int64_t t = 0; t < nk; ++t) {  // each value row is read once for all queries
    for (int64_t n = 0; n < nq; ++n) Axpy(logits[t * nq + n], values[t], out[n], dim);
  }
}

// Everything for sequence b and kv head kh: its cache writes, then its query heads in all rows.
void RunTask(const Problem& pb, int64_t b, int64_t kh) {
  const int64_t R = pb.rows, H = pb.heads, K = pb.kv_heads, E = pb.dim, T = pb.slots,
                W = pb.window, G = H / K;
  const int64_t p = pb.pos[b];
  const float scale = 1.0f / std::sqrt(static_cast<float>(E));
  auto kv_new = [&](const float* base, int64_t r) { return base + ((b * R + r) * K + kh) * E; };
  auto full = [&](float* base, int64_t t) { return base + ((b * T + t) * K + kh) * E; };
  auto ring = [&](float* base, int64_t r, int64_t s) {
    return base + (((b * (R - 1) + (r - 1)) * W + s) * K + kh) * E;
  };

  if (p < T) {  // past the end (a finished sequence still stepping): dropped, like XLA's scatter
    std::memcpy(full(pb.k_full, p), kv_new(pb.k_new, 0), sizeof(float) * E);
    std::memcpy(full(pb.v_full, p), kv_new(pb.v_new, 0), sizeof(float) * E);
  }
  for (int64_t r = 1; r < R; ++r) {
    std::memcpy(ring(pb.k_ring, r, p % W), kv_new(pb.k_new, r), sizeof(float) * E);
    std::memcpy(ring(pb.v_ring, r, p % W), kv_new(pb.v_new, r), sizeof(float) * E);
  }

  const int64_t nq = R * G;  // query n = r * G + g is head kh * G + g of row r
  thread_local std::vector<float> scratch;
  thread_local std::vector<const float*> ptrs;
  thread_local std::vector<float*> outs;
  const int64_t nk = std::min(p + 1, T);
  scratch.resize(nq * E * 2 + nq * std::max(nk, W));
  ptrs.resize(nq + 2 * std::max(nk, W));
  outs.resize(nq);
  float* qbuf = scratch.data();            // scaled queries [nq, E]
  float* glob = qbuf + nq * E;             // global outputs [nq, E]
  float* logits = glob + nq * E;
  const float** qs = ptrs.data();
  const float** keys = qs + nq;
  const float** values = keys + std::max(nk, W);
  for (int64_t n = 0; n < nq; ++n) {
    const int64_t r = n / G, h = kh * G + n % G;
    const float* src = pb.q + ((b * R + r) * H + h) * E;
    for (int64_t e = 0; e < E; ++e) qbuf[n * E + e] = src[e] * scale;
    qs[n] = qbuf + n * E;
    outs[n] = glob + n * E;
  }
  for (int64_t t = 0; t < nk; ++t) {
    keys[t] = full(pb.k_full, t);
    values[t] = full(pb.v_full, t);
  }
  Attend(qs, nq, keys, values, nk, E, logits, outs.data());
  for (int64_t g = 0; g < G; ++g) {  // row 0: plain causal attention
    std::memcpy(pb.y + ((b * R) * H + kh * G + g) * E, glob + g * E, sizeof(float) * E);
  }
  if (R == 1) return;

  // Ring slot s holds position p - ((p - s) mod W): with p < W only slots 0..p are filled, after
  // that all W are (and all lie in the window), so the local keys are slots [0, min(p + 1, W)).
  const int64_t nl = std::min(p + 1, W);
  thread_local std::vector<float> local;  // local outputs [G, E]
  local.resize(G * E);
  for (int64_t g = 0; g < G; ++g) outs[g] = local.data() + g * E;
  for (int64_t r = 1; r < R; ++r) {
    for (int64_t i = 0; i < nl; ++i) {
      keys[i] = ring(pb.k_ring, r, i);
      values[i] = ring(pb.v_ring, r, i);
    }
    Attend(qs + r * G, G, keys, values, nl, E, logits, outs.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kh * G + g;
      const float gt = pb.gate[(b * (R - 1) + (r - 1)) * H + h];
      const float* yg = glob + (r * G + g) * E;
      const float* yl = outs[g];
      float* dst = pb.y + ((b * R + r) * H + h) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = gt * yg[e] + (1.0f - gt) * yl[e];
    }
  }
}

ffi::Error Run(Problem& pb) {
  for (int64_t b = 0; b < pb.batch; ++b) {
    if (pb.pos[b] < 0) {
      return ffi::Error::InvalidArgument("plt_decode_attention: a negative position");
    }
  }
  const int64_t tasks = pb.batch * pb.kv_heads;
  plt_cpu::ParallelFor(tasks, [&pb](int64_t i) {
    RunTask(pb, i / pb.kv_heads, i % pb.kv_heads);
  });
  return ffi::Error::Success();
}

}  // namespace

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Fills the shapes shared by both entry points. full: [B, T, K, E], or [S, B, T, K, E] of which
// slab `slab` is used (a reshape to add S = 1 would cost a copy: XLA does not alias through it).
ffi::Error Shapes(Problem& pb, const F32& q, const F32& k_new, const ffi::Buffer<ffi::S32>& pos,
                  const F32& k_full, int64_t slab) {
  const auto qd = q.dimensions();
  const auto nd = k_new.dimensions();
  const auto fd = k_full.dimensions();
  if (qd.size() != 4 || nd.size() != 4 || (fd.size() != 4 && fd.size() != 5)) {
    return ffi::Error::InvalidArgument(
        "plt_decode_attention: expects q [B,R,H,E], k_new [B,R,K,E], caches [[S,]B,T,K,E]");
  }
  const int64_t o = fd.size() - 4;  // offset of the batch axis
  const int64_t num_slabs = o ? fd[0] : 1;
  pb.batch = qd[0];
  pb.rows = qd[1];
  pb.heads = qd[2];
  pb.dim = qd[3];
  pb.kv_heads = nd[2];
  pb.slots = fd[o + 1];
  if (nd[0] != pb.batch || nd[1] != pb.rows || nd[3] != pb.dim || fd[o] != pb.batch ||
      fd[o + 2] != pb.kv_heads || fd[o + 3] != pb.dim || pb.heads % pb.kv_heads != 0 ||
      pos.element_count() != static_cast<size_t>(pb.batch) || slab < 0 || slab >= num_slabs) {
    return ffi::Error::InvalidArgument("plt_decode_attention: inconsistent shapes");
  }
  pb.q = q.typed_data();
  pb.pos = pos.typed_data();
  pb.window = 1;
  return ffi::Error::Success();
}

// Plain causal decode attention (PLT R = 1, vanilla loops): rows are independent queries at pos.
ffi::Error CausalImpl(F32 q, F32 k_new, F32 v_new, ffi::Buffer<ffi::S32> pos,
                      F32 k_full_in, F32 v_full_in, F32Out y, F32Out k_full, F32Out v_full,
                      int64_t slab) {
  (void)v_full_in;  // aliased: the outputs hold the same values and are written in place
  Problem pb{};
  if (auto err = Shapes(pb, q, k_new, pos, k_full_in, slab); err.failure()) return err;
  if (pb.rows != 1) {
    return ffi::Error::InvalidArgument("plt_decode_attention_causal: one row per sequence");
  }
  const int64_t slab_size = pb.batch * pb.slots * pb.kv_heads * pb.dim;
  pb.k_new = k_new.typed_data();
  pb.v_new = v_new.typed_data();
  pb.k_full = k_full->typed_data() + slab * slab_size;
  pb.v_full = v_full->typed_data() + slab * slab_size;
  pb.y = y->typed_data();
  return Run(pb);
}

// PLT: row 0 is loop 1 (causal), rows r >= 1 are loops r+1 (gated global + ring).
ffi::Error GatedImpl(F32 q, F32 k_new, F32 v_new, ffi::Buffer<ffi::S32> pos,
                     F32 k_full_in, F32 v_full_in, F32 gate, F32 k_ring_in, F32 v_ring_in, F32Out y,
                     F32Out k_full, F32Out v_full, F32Out k_ring, F32Out v_ring) {
  (void)v_full_in;  // aliased: the outputs hold the same values and are written in place
  (void)k_ring_in;
  (void)v_ring_in;
  Problem pb{};
  if (auto err = Shapes(pb, q, k_new, pos, k_full_in, 0); err.failure()) return err;
  const auto rd = k_ring->dimensions();
  const auto gd = gate.dimensions();
  if (pb.rows < 2 || k_full_in.dimensions().size() != 4 || rd.size() != 5 || rd[0] != pb.batch ||
      rd[1] != pb.rows - 1 || rd[3] != pb.kv_heads || rd[4] != pb.dim || gd.size() != 3 ||
      gd[0] != pb.batch || gd[1] != pb.rows - 1 || gd[2] != pb.heads) {
    return ffi::Error::InvalidArgument(
        "plt_decode_attention: expects R >= 2 rows, caches [B,T,K,E], rings [B,R-1,W,K,E] and "
        "gate [B,R-1,H]");
  }
  pb.window = rd[2];
  pb.k_new = k_new.typed_data();
  pb.v_new = v_new.typed_data();
  pb.gate = gate.typed_data();
  pb.k_full = k_full->typed_data();
  pb.v_full = v_full->typed_data();
  pb.k_ring = k_ring->typed_data();
  pb.v_ring = v_ring->typed_data();
  pb.y = y->typed_data();
  return Run(pb);
}

// The operands both entry points start with: q, k_new, v_new, pos, then the full caches
// (aliased to outputs 1 and 2).
auto BindStepOperands() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Arg<F32>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<F32>()
      .Arg<F32>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PltDecodeAttentionCausal, CausalImpl,
                              BindStepOperands()
                                  .Ret<F32>()                   // y
                                  .Ret<F32>()                   // k_full
                                  .Ret<F32>()                   // v_full
                                  .Attr<int64_t>("slab"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PltDecodeAttention, GatedImpl,
                              BindStepOperands()
                                  .Arg<F32>()                   // gate
                                  .Arg<F32>()                   // k_ring (aliased)
                                  .Arg<F32>()                   // v_ring (aliased)
                                  .Ret<F32>()                   // y
                                  .Ret<F32>()                   // k_full
                                  .Ret<F32>()                   // v_full
                                  .Ret<F32>()                   // k_ring
                                  .Ret<F32>());                 // v_ring
