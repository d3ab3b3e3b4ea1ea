"""A CPU kernel for products of a few rows by a weight matrix: PLT's decode step on CPU.

At batch 1 the PLT step multiplies R rows (one per loop) by every weight matrix. On CPU that is
memory-bound, so R rows should cost about what one row costs. XLA:CPU sends one row to a
matrix-vector kernel streaming the weights at full bandwidth, but 2..8 rows to a general GEMM
that streams them far slower (and OpenBLAS behaves alike), so R rows cost about R single rows
(docs/kernels.md has the measurement).
`kernels/cpu/rows_matmul.cc` streams the matrix once for all rows (an XLA FFI custom call, so it
runs inside the jitted step). It is compiled on first use with the system C++ compiler against
jaxlib's FFI headers, and cached (`kernels/cpu_ffi.py`); without a compiler `available()` is
False and callers keep XLA's dot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import cpu_ffi
from .cpu_ffi import available, build, library_path  # noqa: F401  (re-exported)

TARGET = 'plt_rows_matmul'
MAX_ROWS = 8          # rows per kernel call (its accumulators are templated up to this)


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., D] @ w [D, F] in float32 with the kernel (call only where `available()`).

  More than MAX_ROWS rows go through in chunks of MAX_ROWS, each streaming w once.
  """
  cpu_ffi.require('rows_matmul')
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.ndim != 2:
    raise ValueError(f'rows_matmul: float32 x [..., D] and w [D, F]; got {x.dtype}{x.shape}, '
                     f'{w.dtype}{w.shape}')
  lead, (d, f) = x.shape[:-1], w.shape
  x2 = x.reshape(-1, d)
  call = lambda rows: jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct((rows.shape[0], f), jnp.float32))(rows, w)
  outs = [call(x2[i:i + MAX_ROWS]) for i in range(0, x2.shape[0], MAX_ROWS)]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return out.reshape(*lead, f)
