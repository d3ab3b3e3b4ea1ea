"""The cuDNN baseline: `jax.nn.dot_product_attention(implementation='cudnn')` for each branch
(causal over loop 1's keys, causal + window over the loop's own keys) plus the gated mix in XLA.

The window maps to `local_window_size=(W - 1, 0)` with `is_causal=True` (a non-causal window would
leak the future). Packed documents go in as a boolean [B, 1, T, T] mask (O(T^2) memory: fine for a
baseline, not for long contexts). Off GPU the same call runs with implementation='xla', so the
mapping (window, GQA, mask, gating) is tested on CPU too.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

def _implementation() -> str:
  return 'cudnn' if jax.default_backend() == 'gpu' else 'xla'

def causal(q, k, v, segment_ids=None, *, window: Optional[int] = None):
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=_implementation())

def gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window: int):
  y_glob = causal(q, k_glob, v_glob, segment_ids).astype(jnp.float32)
  y_loc = causal(q, k_loc, v_loc, segment_ids, window=window).astype(jnp.float32)
  g = gate[..., None].astype(jnp.float32)
  return (g * y_glob + (1.0 - g) * y_loc).astype(q.dtype)
