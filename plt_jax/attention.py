"""The one attention interface of the model, for training, prefill and cached decoding.

Four operations, each defined by its pure-JAX reference below (the single source of truth) and
provided by every backend (`get_backend`: XLA reference, Pallas, cuDNN, CPU kernels):

* `causal(q, k, v, segment_ids)`: plain causal attention (loop 1, vanilla loops, R = 1).
* `gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window)`: PLT's shared-KV gated
  sliding-window attention for loops r >= 2:
      out = g * Attn_causal(q, K1, V1) + (1 - g) * Attn_window(q, K_r, V_r)
  where the window holds W keys INCLUDING the query's own position (keys i-W+1 .. i).
* `cached_causal(q, k, v, cache, pos)`: one decode step of causal attention: writes the new
  token's key/value at slot pos of a [B, T, K, E] cache, then attends over slots 0..pos.
* `cached_gswa(q, k, v, gate, cache, pos, window)`: one PLT decode step of a layer, all R loops
  of the newest token as R rows: row 0 (loop 1) is `cached_causal` over loop 1's cache; rows
  r >= 1 write their key/value into loop r+1's ring of W slots (position p in slot p % W) and mix
  the global branch over loop 1's cache (slots 0..pos) with the local branch over their ring.
  Both return (y, new cache); the cache passed in is consumed (donated buffers are updated in
  place).

Shapes: q [B, S, Hq, D]; k, v [B, T, Hkv, D] with Hq % Hkv == 0 (GQA); gate [B, S, Hq];
segment_ids [B, S] int (0 marks padding; a token only attends within its own segment).
In training S == T and query i sits at key index i. Decoding: S is 1 (causal) or R (G-SWA) and
every row sits at position pos [B]. Softmax is always computed in float32. Which key is visible
to which query is `plt_jax.kernels.masks.visible`, shared with the kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from plt_jax.kernels import cpu_decode, cudnn, masks, ops

Array = jax.Array


def make_mask(q_index: Array, kv_index: Array, q_segment: Optional[Array] = None,
              kv_segment: Optional[Array] = None, window: Optional[int] = None,
              kv_valid: Optional[Array] = None) -> Array:
  """Boolean mask [B, 1, 1, S, T] (broadcasts over kv-heads and groups).

  q_index [B, S] / kv_index [B, T]: absolute positions in one index space (row index in
  training, cache slot position in decoding). Key j is visible to query i when
  j <= i, i - j < window (if given), segments match (if given) and kv_valid[j] (if given).
  """
  seg = {} if q_segment is None else dict(q_seg=q_segment[:, :, None],
                                           k_seg=kv_segment[:, None, :])
  mask = masks.visible(q_index[:, :, None], kv_index[:, None, :], window, **seg)
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


# ------------------------------------------------------------------------------------------------
# Blockwise training attention: the CPU backend's form of `reference_causal` / `reference_gswa`.
# Query rows are cut into blocks; a block computes logits only against the keys it can see (all
# keys up to its last row; with a window, from W - 1 before its first row), so the logits past
# the diagonal, and before the window, are never computed. Every row's keys lie in its block's
# tile, so the softmax is exact (no online rescaling). In float32 it is normalised after the PV
# product (a [rows, E] division instead of [rows, keys]). Its max is a constant under autodiff
# (the softmax does not depend on it). The query heads sharing a kv head are folded into the
# rows: one matmul per (batch, kv head) and tile.

# Finite: a masked logit becomes exp(-1e30 - max) == 0; in training a row always sees its own key.
_MASKED = -1e30


def block_size(seq_len: int) -> int:
  """Query rows per block: about a quarter of the sequence, a power of two in [32, 128]
  (smaller tiles skip more masked keys, larger ones run faster matmuls)."""
  return max(32, min(128, 1 << max(0, (max(seq_len // 4, 1) - 1).bit_length())))


def _attend_block(q, k, v, q0: int, k0: int, window, q_seg, k_seg, scale: float):
  """One query block. q [B, K, m, G, E]; k, v [B, K, t, E] -> float32 [B, K, m, G, E].
  Rows sit at positions q0.., keys at k0.."""
  b, kh, m, g, e = q.shape
  t = k.shape[2]
  s = jnp.einsum('bkrd,bktd->bkrt', q.reshape(b, kh, m * g, e), k,
                 preferred_element_type=jnp.float32).reshape(b, kh, m, g, t)
  qi = q0 + jnp.arange(m, dtype=jnp.int32)[:, None]
  kj = k0 + jnp.arange(t, dtype=jnp.int32)[None, :]
  seg = {} if q_seg is None else dict(q_seg=q_seg[:, :, None], k_seg=k_seg[:, None, :])
  visible = masks.visible(qi[None], kj[None], window, **seg)[:, None, :, None, :]  # [B|1,1,m,1,t]
  s = jnp.where(visible, s, _MASKED)
  row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  # The 1/sqrt(E) scale in float32 inside the exponent: XLA fuses it with the exp.
  p = jnp.exp((s - row_max) * scale)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if v.dtype != jnp.float32:
    # Low precision: round the normalised probabilities, as the reference does.
    p = p / denom
  out = jnp.einsum('bkrt,bktd->bkrd', p.reshape(b, kh, m * g, t).astype(v.dtype), v,
                   preferred_element_type=jnp.float32).reshape(b, kh, m, g, e)
  return out / denom if v.dtype == jnp.float32 else out


def blockwise_causal(q, k, v, segment_ids=None, *, window=None, block: Optional[int] = None):
  """`reference_causal` (same semantics) computed by query blocks; needs S == T (training)."""
  b, s, hq, e = q.shape
  if k.shape[1] != s:
    raise ValueError(f'blockwise attention needs S == T (training layout); got S={s}, '
                     f'T={k.shape[1]}')
  hkv = k.shape[2]
  block = block or block_size(s)
  scale = 1.0 / float(e) ** 0.5
  qt = q.reshape(b, s, hkv, hq // hkv, e).transpose(0, 2, 1, 3, 4)      # [B, K, S, G, E]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)             # [B, K, T, E]
  outs = []
  for q0 in range(0, s, block):
    q1 = min(q0 + block, s)
    k0 = 0 if window is None else max(0, q0 - window + 1)
    seg_q = seg_k = None
    if segment_ids is not None:
      seg_q, seg_k = segment_ids[:, q0:q1], segment_ids[:, k0:q1]
    outs.append(_attend_block(qt[:, :, q0:q1], kt[:, :, k0:q1], vt[:, :, k0:q1], q0, k0,
                              window, seg_q, seg_k, scale))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, s, hq, e).astype(q.dtype)


def blockwise_gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
                   block: Optional[int] = None):
  """`reference_gswa` (same semantics) computed by query blocks; needs S == T (training)."""
  y_glob = blockwise_causal(q, k_glob, v_glob, segment_ids, block=block)
  y_loc = blockwise_causal(q, k_loc, v_loc, segment_ids, window=window, block=block)
  return mix(gate, y_glob, y_loc)


# ------------------------------------------------------------------------------------------------
# Cached decoding: one layer, one step.
class KVCache(NamedTuple):
  """One layer's full-length keys / values [B, T, K, E]; slot i holds position i."""
  k: Array
  v: Array


class GSWACache(NamedTuple):
  """One PLT layer's decode state: loop 1's full-length k / v [B, T, K, E] and the rings of
  loops 2..R, k_ring / v_ring [B, R-1, W, K, E] (position p in slot p % W)."""
  k: Array
  v: Array
  k_ring: Array
  v_ring: Array


def ring_positions(pos_B: Array, window: int) -> Array:
  """[B, W]: the position each ring slot holds once position pos has been written (< 0: empty)."""
  slots = jnp.arange(window, dtype=jnp.int32)
  return pos_B[:, None] - jnp.mod(pos_B[:, None] - slots[None], window)


def _cache_mask(pos_B: Array, cache_len: int) -> Array:
  """Slots 0..pos of a full-length cache, as a [B, 1, 1, 1, T] mask for every row at pos."""
  b = pos_B.shape[0]
  slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32)[None], (b, cache_len))
  return make_mask(pos_B[:, None], slots)


def _write(buf_BT: Array, x_B: Array, pos_B: Array) -> Array:
  # At pos >= T the write is dropped (scatter's out-of-bounds rule) and all T slots stay visible.
  return buf_BT.at[jnp.arange(buf_BT.shape[0]), pos_B].set(x_B.astype(buf_BT.dtype))


def reference_cached_causal(q, k, v, cache: KVCache, pos):
  """q [B, 1, H, E], k / v [B, 1, K, E] at position pos [B]: (y [B, 1, H, E], new cache)."""
  kc, vc = _write(cache.k, k[:, 0], pos), _write(cache.v, v[:, 0], pos)
  y = masked_attention(q, kc, vc, _cache_mask(pos, kc.shape[1]))
  return y, KVCache(kc, vc)


def reference_cached_gswa(q, k, v, gate, cache: GSWACache, pos, *, window: int):
  """q [B, R, H, E], k / v [B, R, K, E], gate [B, R-1, H]: (y [B, R, H, E], new cache)."""
  b, r, h, e = q.shape
  kc, vc = _write(cache.k, k[:, 0], pos), _write(cache.v, v[:, 0], pos)
  # Every row reads loop 1's slots 0..pos: row 0 as plain causal attention, rows >= 1 as the
  # global branch.
  y = masked_attention(q, kc, vc, _cache_mask(pos, kc.shape[1]))           # [B, R, H, E]
  bidx, slot = jnp.arange(b), jnp.mod(pos, window)
  k_ring = cache.k_ring.at[bidx, :, slot].set(k[:, 1:].astype(cache.k_ring.dtype))
  v_ring = cache.v_ring.at[bidx, :, slot].set(v[:, 1:].astype(cache.v_ring.dtype))
  slot_pos = ring_positions(pos, window)                                    # [B, W]
  loc_q = jnp.broadcast_to(pos[:, None, None], (b, r - 1, 1)).reshape(b * (r - 1), 1)
  loc_kv = jnp.broadcast_to(slot_pos[:, None], (b, r - 1, window)).reshape(b * (r - 1), window)
  loc_mask = make_mask(loc_q, loc_kv, window=window, kv_valid=loc_kv >= 0)
  ring_shape = (b * (r - 1), window) + k.shape[2:]
  y_loc = masked_attention(q[:, 1:].reshape(b * (r - 1), 1, h, e), k_ring.reshape(ring_shape),
                           v_ring.reshape(ring_shape), loc_mask)
  y_mix = mix(gate, y[:, 1:], y_loc.reshape(b, r - 1, h, e))
  return jnp.concatenate([y[:, :1], y_mix], axis=1), GSWACache(kc, vc, k_ring, v_ring)


# ------------------------------------------------------------------------------------------------
# Backends: each provides the four operations with the reference's signatures and semantics.
# `sharding` (a plt_jax.sharding.ShardingConfig or None) lets a kernel run per shard on a mesh.
@dataclasses.dataclass(frozen=True)
class XLA:
  """The pure-JAX reference as XLA ops (the only backend that can return probabilities)."""
  name = 'xla'
  supports_probs = True

  def causal(self, q, k, v, segment_ids=None, *, window=None, sharding=None,
             return_probs=False):
    del sharding  # XLA partitions these ops itself
    return reference_causal(q, k, v, segment_ids, window=window, return_probs=return_probs)

  def gswa(self, q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
           sharding=None, return_probs=False):
    del sharding
    return reference_gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window=window,
                          return_probs=return_probs)

  def cached_causal(self, q, k, v, cache: KVCache, pos):
    return reference_cached_causal(q, k, v, cache, pos)

  def cached_gswa(self, q, k, v, gate, cache: GSWACache, pos, *, window: int):
    return reference_cached_gswa(q, k, v, gate, cache, pos, window=window)


def _shard_axes(sharding, q, k):
  """(mesh, batch axes, head axes) for a kernel's shard_map, or None (nothing is split).

  Heads are split only when query and kv heads split alike, which keeps every query head with
  its kv head.
  """
  if sharding is None:
    return None
  b_ax = sharding.spec(('batch',), q.shape[:1])[0]
  hq_ax = sharding.spec(('act_heads',), q.shape[2:3])[0]
  hk_ax = sharding.spec(('act_kv_heads',), k.shape[2:3])[0]
  h_ax = hq_ax if hq_ax == hk_ax else None
  if b_ax is None and h_ax is None:
    return None
  return sharding.mesh, b_ax, h_ax


@dataclasses.dataclass(frozen=True)
class Pallas(XLA):
  """Fused flash / G-SWA kernels (`plt_jax.kernels.ops`) for training and prefill, run per shard
  on a mesh; cached decode steps use the reference (on accelerators its stacked rows are the fast
  path). platform: 'triton' or 'tpu' (None: by device); interpret: None = off GPU/TPU only;
  config: a `plt_jax.kernels.common.KernelConfig` (None: the kernel's default blocks)."""
  name = 'pallas'
  supports_probs = False
  config: object = None
  platform: Optional[str] = None
  interpret: Optional[bool] = None

  def _kw(self, sharding, q, k):
    return dict(backend=self.platform, config=self.config, interpret=self.interpret,
                shard=_shard_axes(sharding, q, k))

  def causal(self, q, k, v, segment_ids=None, *, window=None, sharding=None):
    return ops.causal(q, k, v, segment_ids, window=window, **self._kw(sharding, q, k))

  def gswa(self, q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
           sharding=None):
    return ops.gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window=window,
                    **self._kw(sharding, q, k_glob))


@dataclasses.dataclass(frozen=True)
class CuDNN(XLA):
  """jax.nn.dot_product_attention per branch (`plt_jax.kernels.cudnn`; its XLA form off GPU)
  for training and prefill; cached decode steps use the reference."""
  name = 'cudnn'
  supports_probs = False

  def causal(self, q, k, v, segment_ids=None, *, window=None, sharding=None):
    del sharding
    return cudnn.causal(q, k, v, segment_ids, window=window)

  def gswa(self, q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
           sharding=None):
    del sharding
    return cudnn.gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window=window)


@dataclasses.dataclass(frozen=True)
class CPU(XLA):
  """Training and prefill by query blocks (`blockwise_causal` / `blockwise_gswa`: the reference's
  math without the logits causality or the window hide); cached decode steps in one in-place C++
  call per layer (`plt_jax.kernels.cpu_decode`: float32 caches on the CPU backend). strict=False
  (the 'auto' choice) falls back to the reference decode ops, with one log line, where the kernel
  cannot build or run; strict=True raises instead."""
  name = 'cpu'
  supports_probs = False
  strict: bool = True

  def causal(self, q, k, v, segment_ids=None, *, window=None, sharding=None):
    del sharding  # XLA partitions these ops itself
    return blockwise_causal(q, k, v, segment_ids, window=window)

  def gswa(self, q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window,
           sharding=None):
    del sharding
    return blockwise_gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids, window=window)

  def require(self, dtype: str) -> None:
    """Raises where the decode kernel cannot run for caches of `dtype` (strict use)."""
    self._kernel(jnp.zeros((), dtype))

  def _kernel(self, *arrays):
    dtypes = {x.dtype for x in arrays}
    if dtypes == {jnp.dtype(jnp.float32)} and cpu_decode.supported(jnp.float32):
      return cpu_decode
    why = (f'caches of dtype {sorted(map(str, dtypes))} (float32 only)' if len(dtypes) > 1
           or jnp.float32 not in dtypes else
           f'backend {jax.default_backend()} or no C++ compiler (see plt_jax.kernels.cpu_ffi)')
    if self.strict:
      raise ValueError(f"attention backend 'cpu' cannot run its decode kernel here: {why}")
    _log_once(f"attention 'auto': cached decode steps use the XLA reference ({why})")
    return None

  def cached_causal(self, q, k, v, cache: KVCache, pos):
    kernel = self._kernel(q, cache.k)
    if kernel is None:
      return reference_cached_causal(q, k, v, cache, pos)
    y, kc, vc = kernel.decode_attention(q, k, v, pos, cache.k, cache.v)
    return y, KVCache(kc, vc)

  def cached_gswa(self, q, k, v, gate, cache: GSWACache, pos, *, window: int):
    kernel = self._kernel(q, cache.k)
    if kernel is None:
      return reference_cached_gswa(q, k, v, gate, cache, pos, window=window)
    y, *new = kernel.decode_attention(q, k, v, pos, cache.k, cache.v, gate=gate,
                                      k_ring=cache.k_ring, v_ring=cache.v_ring)
    return y, GSWACache(*new)


BACKENDS = ('auto', 'xla', 'pallas', 'cudnn', 'cpu')


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  logging.getLogger(__name__).info(message)


def get_backend(name: str):
  """The backend for a name of `BACKENDS`. 'auto': 'pallas' on GPU / TPU, else 'cpu' (the
  reference, with the decode kernel where it builds). Import errors of a kernel surface as they
  are: nothing is registered or swallowed at import time."""
  if name not in BACKENDS:
    raise ValueError(f'attention backend {name!r} is unknown; choose one of {BACKENDS}')
  if name == 'auto':
    platform = jax.default_backend()
    chosen = Pallas() if platform in ('gpu', 'tpu') else CPU(strict=False)
    _log_once(f"attention 'auto' on {platform}: backend '{chosen.name}'")
    return chosen
  return {'xla': XLA, 'pallas': Pallas, 'cudnn': CuDNN, 'cpu': CPU}[name]()
