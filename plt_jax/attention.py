"""The one attention interface of the model, and the pure-JAX reference that defines it.

Two operations exist, and every implementation (XLA reference, Pallas kernels, cuDNN) provides both:

* `causal(q, k, v, segment_ids)`: plain causal attention (loop 1, vanilla loops, R = 1).
* `gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window)`: PLT's shared-KV gated
  sliding-window attention for loops r >= 2:
      out = g * Attn_causal(q, K1, V1) + (1 - g) * Attn_window(q, K_r, V_r)
  where the window holds W keys INCLUDING the query's own position (keys i-W+1 .. i).

Shapes: q [B, S, Hq, D]; k, v [B, T, Hkv, D] with Hq % Hkv == 0 (GQA); gate [B, S, Hq];
segment_ids [B, S] int (0 marks padding; a token only attends within its own segment).
In training S == T and query i sits at key index i. Softmax is always computed in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def make_mask(q_index: Array, kv_index: Array, q_segment: Optional[Array] = None,
              kv_segment: Optional[Array] = None, window: Optional[int] = None,
              kv_valid: Optional[Array] = None) -> Array:
  """Boolean mask [B, 1, 1, S, T] (broadcasts over kv-heads and groups).

  q_index [B, S] / kv_index [B, T]: absolute positions in one index space (row index in
  training, cache slot position in decoding). Key j is visible to query i when
  j <= i, i - j < window (if given), segments match (if given) and kv_valid[j] (if given).
  """
  qi = q_index[:, :, None]
  kj = kv_index[:, None, :]
  mask = kj <= qi
  if window is not None:
    mask &= (qi - kj) < window
  if q_segment is not None:
    mask &= q_segment[:, :, None] == kv_segment[:, None, :]
  if kv_valid is not None:
    mask &= kv_valid[:, None, :]
  return mask[:, None, None, :, :]


def masked_attention(q: Array, k: Array, v: Array, mask: Array, *,
                     return_probs: bool = False):
  """Softmax(q k^T / sqrt(D)) v under a boolean mask, GQA-aware, float32 softmax.

  Returns out [B, S, Hq, D] in q's dtype, and optionally probs [B, Hq, S, T] (float32).
  Rows with no visible key produce zeros (never NaN).
  """
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, s, hkv, g, d)
  logits = jnp.einsum('bskgd,btkd->bkgst', qg, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum('bkgst,btkd->bskgd', p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, s, hq, d).astype(q.dtype)
  if return_probs:
    return out, p.reshape(b, hq, s, -1)
  return out


def _row_index(x: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])


def reference_causal(q, k, v, segment_ids=None, *, window=None, return_probs=False):
  """Causal (optionally windowed) attention where query i sits at key index i."""
  idx = _row_index(q)
  mask = make_mask(idx, idx, segment_ids, segment_ids, window)
  return masked_attention(q, k, v, mask, return_probs=return_probs)


def mix(gate: Array, y_glob: Array, y_loc: Array) -> Array:
  """g * y_glob + (1 - g) * y_loc, with the per-head gate broadcast over head_dim."""
  g = gate[..., None].astype(jnp.float32)
  out = g * y_glob.astype(jnp.float32) + (1.0 - g) * y_loc.astype(jnp.float32)
  return out.astype(y_glob.dtype)


def reference_gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
                   return_probs=False):
  """Reference G-SWA. With return_probs, also returns (probs_glob, probs_loc) [B,Hq,S,T]."""
  y_glob = reference_causal(q, k_glob, v_glob, segment_ids, return_probs=return_probs)
  y_loc = reference_causal(q, k_loc, v_loc, segment_ids, window=window,
                           return_probs=return_probs)
  if return_probs:
    (y_glob, p_glob), (y_loc, p_loc) = y_glob, y_loc
    return mix(gate, y_glob, y_loc), (p_glob, p_loc)
  return mix(gate, y_glob, y_loc)


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """A backend for the two attention operations. `supports_probs` is True only for the reference."""
  name: str
  causal: Callable[..., Array]
  gswa: Callable[..., Array]
  supports_probs: bool = False


_REGISTRY: dict[str, Callable[[], AttentionImpl]] = {}


def register(name: str, factory: Callable[[], AttentionImpl]) -> None:
  """Kernels register lazily (a factory), so importing the model never imports Pallas."""
  _REGISTRY[name] = factory


def _xla_impl() -> AttentionImpl:
  return AttentionImpl('xla', reference_causal, reference_gswa, supports_probs=True)


register('xla', _xla_impl)


def _auto_name() -> str:
  backend = jax.default_backend()
  if backend in ('gpu', 'tpu') and 'pallas' in _available():
    return 'pallas'
  return 'xla'


def _available() -> list[str]:
  _load_kernels()
  return sorted(_REGISTRY)


def _load_kernels() -> None:
  # The kernels package registers 'pallas' and 'cudnn' when imported; it is optional.
  if 'pallas' in _REGISTRY:
    return
  try:
    import kernels  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError:
    pass


def get_impl(name: str) -> AttentionImpl:
  if name == 'auto':
    name = _auto_name()
  if name not in _REGISTRY:
    _load_kernels()
  if name not in _REGISTRY:
    raise ValueError(f'attention_impl={name!r} is not available; registered: {sorted(_REGISTRY)}')
  return _REGISTRY[name]()
