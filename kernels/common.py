"""Block geometry and masking shared by the Triton-style and TPU-style kernels.

Conventions (both kernels): query row i sits at key index i; visibility is `masks.visible`.
Sequences are padded at the end to a multiple of every block size; padded keys sit after every real
query, so causality alone keeps them invisible to real rows, and every row (padded or not) always
sees itself, so no row is ever empty.

Each branch of an attention call is described by its window: None = plain causal (loop 1's keys in
G-SWA, or the loop-1 pass itself), an int W = causal sliding window of W keys including the query.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


# A finite "minus infinity": masked logits never produce inf - inf = NaN.
NEG_INF = -1e30
# The log-sum-exp stored for a row with no visible key (cannot happen in practice; see above):
# exp(s - BIG_LSE) == 0, so such a row contributes nothing to any gradient.
BIG_LSE = 1e30


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Block sizes and launch parameters. Blocks shrink automatically for short sequences.

  block_q/block_k: forward and dQ pass; block_q_bwd/block_k_bwd: the dK/dV pass.
  num_warps/num_stages: Triton launch parameters (None: 4 warps for head_dim <= 64, else 8).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: Optional[int] = None
  num_stages: int = 2

  def fit(self, seq_len: int, min_block: int) -> 'KernelConfig':
    """Caps every block at the next power of two >= seq_len (but >= min_block)."""
    cap = max(min_block, 1 << max(0, (seq_len - 1).bit_length()))
    return dataclasses.replace(
        self, block_q=min(self.block_q, cap), block_k=min(self.block_k, cap),
        block_q_bwd=min(self.block_q_bwd, cap), block_k_bwd=min(self.block_k_bwd, cap))

  def padded_len(self, seq_len: int) -> int:
    m = math.lcm(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)
    return -(-seq_len // m) * m


def _div(x, y: int):
  """Floor division of a non-negative int or int32 scalar (lax.div truncates; equal for x >= 0)."""
  return x // y if isinstance(x, (int, np.integer)) else jax.lax.div(x, jnp.int32(y))


def _mn(a, b):
  if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
    return min(a, b)
  return jnp.minimum(a, b)


def _mx(a, b):
  if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
    return max(a, b)
  return jnp.maximum(a, b)


def kv_block_bounds(q0, bq: int, bk: int, window: Optional[int]):
  """Key blocks for the query rows [q0, q0 + bq): returns (a, b, c, d), a <= b <= c <= d.

  Blocks [a, d) are visited, i.e. exactly those holding a visible (query, key) pair when
  segments are ignored; blocks [b, c) are visible in full and need no mask.
  Works on Python ints (tables, tests) and on traced int32 scalars (inside kernels).
  """
  qend = q0 + (bq - 1)
  d = _div(qend, bk) + 1
  if window is None:
    a = full_lo = 0
  else:
    a = _div(_mx(q0 - (window - 1), 0), bk)
    full_lo = _div(_mx(qend - (window - 1), 0) + (bk - 1), bk)
  full_hi = _div(q0 + 1, bk)
  b = _mn(_mx(full_lo, a), d)
  c = _mn(_mx(full_hi, b), d)
  return a, b, c, d


def q_block_bounds(k0, bq: int, bk: int, window: Optional[int], nq: int):
  """Query blocks for the key rows [k0, k0 + bk): (a, b, c, d) as in `kv_block_bounds`."""
  kend = k0 + (bk - 1)
  a = _div(k0, bq)
  if window is None:
    d = nq
    full_hi = nq
  else:
    d = _mn(_div(kend + (window - 1), bq) + 1, nq)
    full_hi = _div(k0 + window, bq)
  full_lo = _div(kend + (bq - 1), bq)
  b = _mn(_mx(full_lo, a), d)
  c = _mn(_mx(full_hi, b), d)
  return a, b, c, d




def pad_seq(x, length: int, value=0):
  """Pads axis 1 (the sequence axis) at the end to `length`."""
  if x is None or x.shape[1] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int,
                    window: Optional[int] = None, gswa: bool = True) -> float:
  """Matmul FLOPs of one forward pass (causal counted as half the square; backward is ~2.5x).

  G-SWA: 4*B*H*D*(T^2/2 + T*W); plain causal: 4*B*H*D*T^2/2 (windowed: 4*B*H*D*T*W).
  """
  if gswa:
    return 4.0 * batch * heads * head_dim * (seq_len * seq_len / 2 + seq_len * min(window, seq_len))
  if window is None:
    return 4.0 * batch * heads * head_dim * seq_len * seq_len / 2
  return 4.0 * batch * heads * head_dim * seq_len * min(window, seq_len)
