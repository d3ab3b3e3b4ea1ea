"""One layer's cached decode attention on CPU, in one call: `kernels/cpu/decode_attention.cc`.

The reference is the XLA path in `plt_jax/infer/decode.py` (cache scatter, masked attention over the
full cache, the ring's windowed attention, the gate mix); this computes the same thing for all
rows of a step with the cache writes done in place (the cache outputs alias the cache inputs, so
a donated cache is never copied). float32, CPU only; built by `kernels/cpu_ffi.py`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_ffi

Array = jax.Array


def supported(dtype) -> bool:
  """Whether the kernel can run here for caches of `dtype` (builds it on first call)."""
  return (jax.default_backend() == 'cpu' and jnp.dtype(dtype) == jnp.float32
          and cpu_ffi.available())


def decode_attention(q: Array, k_new: Array, v_new: Array, pos: Array, k_full: Array,
                     v_full: Array, *, gate: Optional[Array] = None,
                     k_ring: Optional[Array] = None, v_ring: Optional[Array] = None,
                     slab: int = 0):
  """Writes this step's keys/values into the caches and attends, for one layer.

  q [B, R, H, E] (post-RoPE), k_new / v_new [B, R, K, E], pos [B] int32 >= 0 (the position
  being decoded; at pos >= T the full-cache write is dropped and all T slots are visible, as in
  the XLA path, so a finished sequence in a batch may keep stepping).
  k_full / v_full: [B, T, K, E], or [S, B, T, K, E] of which slab `slab` is used (the vanilla
  cache stacks its loops).
  Without rings (R = 1, or vanilla): returns (y [B, 1, H, E], k_full, v_full).
  With gate [B, R-1, H] and rings k_ring / v_ring [B, R-1, W, K, E] (PLT, R >= 2): row 0 attends
  causally over the full cache, rows r >= 1 mix gate * that + (1 - gate) * attention over their
  ring; returns (y [B, R, H, E], k_full, v_full, k_ring, v_ring).
  """
  cpu_ffi.require('decode attention')
  for name, x in dict(q=q, k_new=k_new, v_new=v_new, k_full=k_full, v_full=v_full, gate=gate,
                      k_ring=k_ring, v_ring=v_ring).items():
    if x is not None and x.dtype != jnp.float32:
      raise ValueError(f'decode_attention: {name} must be float32, got {x.dtype}')
  # The caches go in as they are: XLA aliases an operand to an output in place only when nothing
  # (not even a reshape) sits between them and the donated buffers; else it copies them.
  y_type = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  cache_types = (jax.ShapeDtypeStruct(k_full.shape, k_full.dtype),) * 2
  pos = pos.astype(jnp.int32)
  if gate is None:
    return tuple(jax.ffi.ffi_call(
        'plt_decode_attention_causal', (y_type, *cache_types),
        input_output_aliases={4: 1, 5: 2})(q, k_new, v_new, pos, k_full, v_full,
                                           slab=np.int64(slab)))
  if k_full.ndim != 4 or slab:
    raise ValueError('decode_attention: the gated (ring) call takes one [B, T, K, E] cache')
  ring_types = (jax.ShapeDtypeStruct(k_ring.shape, k_ring.dtype),) * 2
  return tuple(jax.ffi.ffi_call(
      'plt_decode_attention', (y_type, *cache_types, *ring_types),
      input_output_aliases={4: 1, 5: 2, 7: 3, 8: 4})(
          q, k_new, v_new, pos, k_full, v_full, gate.astype(jnp.float32), k_ring, v_ring))
