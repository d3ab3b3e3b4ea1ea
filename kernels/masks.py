"""The visibility rule of every attention in the model, in one place.

Key j is visible to query i when j <= i (causal), i - j < window when the branch is windowed (the
window counts the query itself), and both sit in the same segment (packed documents) when segment
ids are given. The pure-JAX reference (`plt_jax.attention`), the Pallas kernels and the cached
decode steps all build their masks from `visible`.
"""
from __future__ import annotations

from typing import Optional


def visible(q_pos, k_pos, window: Optional[int] = None, q_seg=None, k_seg=None):
  """Boolean mask from broadcastable query / key positions (and segment ids)."""
  mask = k_pos <= q_pos
  if window is not None:
    mask = mask & (q_pos - k_pos < window)
  if q_seg is not None:
    mask = mask & (q_seg == k_seg)
  return mask
