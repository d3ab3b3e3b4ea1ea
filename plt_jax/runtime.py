"""How the model's math runs, as explicit data: never what it computes.

A `Runtime` is built once, where a jitted step (training, evaluation, prefill, a decode step) is
built, and passed into the model call. It is hashable and static, so it is part of jit's cache
key; nothing the model computes depends on context variables or registries.

  attention: a backend of `plt_jax.attention` (XLA reference, Pallas, cuDNN, CPU kernels)
  matmul:    how every projection multiplies its rows by the weight matrix (`MATMULS`)
  sharding:  a `plt_jax.sharding.ShardingConfig` (mesh + logical rules) for activation
             constraints and per-shard kernels, or None on one device
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from plt_jax import attention as attention_lib
from plt_jax.config import ModelConfig
from plt_jax.kernels import cpu_rows
from plt_jax.sharding import ShardingConfig

# 'stacked': one product per matrix over all rows (XLA's dot).
# 'per_row': one product per row of axis -2, back to back (XLA:CPU sends 2..8 rows to a GEMM that
#   costs about as much per row as separate matrix-vector products).
# 'kernel': `plt_jax.kernels.cpu_rows`, which streams each matrix once for all rows (CPU, float32).
MATMULS = ('stacked', 'per_row', 'kernel')


@dataclasses.dataclass(frozen=True)
class Runtime:
  attention: Any = attention_lib.XLA()
  matmul: str = 'stacked'
  sharding: Optional[ShardingConfig] = None

  def __post_init__(self):
    if self.matmul not in MATMULS:
      raise ValueError(f'Runtime.matmul={self.matmul!r}: must be one of {MATMULS}')

  @classmethod
  def for_model(cls, cfg: ModelConfig, *, sharding: Optional[ShardingConfig] = None,
                attention: Optional[str] = None, matmul: str = 'stacked') -> 'Runtime':
    """The config's attention backend (or `attention`, a name of attention.BACKENDS)."""
    return cls(attention_lib.get_backend(attention or cfg.attention_impl), matmul, sharding)

  def replace(self, **kw) -> 'Runtime':
    return dataclasses.replace(self, **kw)

  def dot(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, F]."""
    if self.matmul == 'kernel':
      return cpu_rows.rows_matmul(x, w)
    if self.matmul == 'per_row' and x.ndim >= 3 and x.shape[-2] > 1:
      return jnp.concatenate([jnp.dot(x[..., r:r + 1, :], w) for r in range(x.shape[-2])],
                             axis=-2)
    if x.ndim > 2 and jax.default_backend() == 'cpu':
      # As a 2-D product: for [B, S, D] activations XLA:CPU would otherwise copy the output
      # gradient transposed to contract it over (B, S) into the weight gradient.
      y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
      return y.reshape(*x.shape[:-1], y.shape[-1])
    return jnp.dot(x, w)


# ------------------------------------------------------------------------------------------------
# The decode step's matmul policy. Up to this many rows per projection (chunks of 8, each
# streaming the matrix once) the CPU kernel beats XLA:CPU's GEMM in bench_decode; past it the
# two are even (docs/results/decoding.md).
KERNEL_MAX_ROWS = 16
ROW_MATMULS = ('auto',) + MATMULS


def decode_matmul(row_matmul: str, rows: int, dtype: str = 'float32') -> str:
  """The matmul for a decode step of `rows` (= batch x rows per sequence) rows.

  'auto': 'kernel' on CPU for 1..KERNEL_MAX_ROWS float32 rows when it builds, else 'stacked'
  (on accelerators, stacking is what makes R rows cost about one). One row too: the kernel
  streams a matrix as fast as XLA:CPU's matrix-vector product, and mixing the two would set the
  kernels' helper threads against XLA's own pool.
  """
  if row_matmul not in ROW_MATMULS:
    raise ValueError(f'row_matmul={row_matmul!r}: must be one of {ROW_MATMULS}')
  on_cpu = jax.default_backend() == 'cpu'
  if row_matmul == 'auto':
    if on_cpu and rows <= KERNEL_MAX_ROWS and dtype == 'float32' and cpu_rows.available():
      return 'kernel'
    return 'stacked'
  if row_matmul == 'kernel':
    if not on_cpu or dtype != 'float32' or not cpu_rows.available():
      raise ValueError(f"row_matmul='kernel' needs the CPU backend, float32 and a C++ compiler "
                       f'(backend {jax.default_backend()}, dtype {dtype}; see '
                       'plt_jax.kernels.cpu_rows)')
  return row_matmul
