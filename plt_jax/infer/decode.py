"""Incremental decoding with KV caches: PLT's one-pass parallel step and the vanilla R-pass step.

PLT (docs/model.md, "Decoding"): token t's loop r needs only E[t], the saved
hn_{r-1}[t-1] = Norm_f(h_{r-1}[t-1]) from the previous step, loop 1's cache (including token t's
own loop-1 K/V) and the last W keys/values of loop r. So one forward pass carries all R loops of
the newest token as R rows of one [B, R, D] block: every projection is one matmul over the R rows.
Per layer a step reads: project (norm, q/k/v, RoPE, the gate) -> the attention's cached G-SWA
operation (`plt_jax.attention.cached_gswa`: row 1 writes loop 1's cache and attends causally,
rows >= 2 write their rings and mix both branches) -> finish (output projection, MLP).
How the rows meet the weights and which backend attends is the `Runtime` the step is given
(`plt_jax.runtime`); `Decoder` builds it once per batch size.

Cache layout (choices documented here and in the benchmark):
  * Prompts are RIGHT-padded; `lengths[b]` counts sequence b's tokens in the cache, which is also
    the RoPE position of its next token. Loop-1 slot i holds position i; slots >= lengths[b] are
    masked out (causality) and overwritten as decoding proceeds.
  * Each ring holds W slots (the window INCLUDING the token itself): position p lives in slot p % W,
    written before attending, so the local branch reads exactly keys p-W+1 .. p from the ring.
    (W-1 slots plus the fresh key would also do; W keeps the step a plain masked attention.)
  * KV bytes = loop 1: 2*L*K*E*bytes per token of max_len, each extra loop: W tokens' worth,
    plus (R-1)*D saved hidden values, all per sequence (docs/model.md). `lengths` (4 bytes/sequence) is
    bookkeeping, reported apart. Vanilla keeps R full loop caches and no hidden states.
All functions here are pure: call them inside `jax.jit` on a merged model (see `Decoder`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plt_jax import attention as attn
from plt_jax import loop_exit
from plt_jax.config import ModelConfig
from plt_jax.runtime import Runtime, decode_matmul
from plt_jax.sharding import ShardingConfig

Array = jax.Array

_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2}


# ------------------------------------------------------------------------------------------------
# Caches
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['k1', 'v1', 'k_loc', 'v_loc', 'hidden', 'lengths'], meta_fields=[])
@dataclasses.dataclass
class PLTCache:
  """PLT decode state. L = layers, T = max_len, W = window, R = loops.

  k1, v1:        L x [B, T, K, E]     loop-1 keys/values (post-RoPE keys), slot i = position i
  k_loc, v_loc:  L x [B, R-1, W, K, E] ring of loops 2..R, position p in slot p % W (empty if R=1)
  hidden:        [R-1, B, D]          between_loops(h_r) of the last cached token, r = 1..R-1
  lengths:       [B] int32            tokens cached per sequence = position of the next token
  """
  k1: tuple
  v1: tuple
  k_loc: tuple
  v_loc: tuple
  hidden: Array
  lengths: Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['k', 'v', 'lengths'], meta_fields=[])
@dataclasses.dataclass
class VanillaCache:
  """Vanilla looped decode state: k, v are L x R x [B, T, K, E] (R full caches per layer, one
  array each so every write is in place); lengths [B]."""
  k: tuple
  v: tuple
  lengths: Array


def _dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
  """An empty cache (all sequences of length 0) for `cfg.loop_mode`."""
  dt, L, R = _dtype(cfg), cfg.num_layers, cfg.num_loops
  kv = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  lengths = jnp.zeros((batch,), jnp.int32)
  if cfg.loop_mode == 'vanilla':
    z = lambda: tuple(tuple(jnp.zeros(kv, dt) for _ in range(R)) for _ in range(L))
    return VanillaCache(z(), z(), lengths)
  ring = (batch, R - 1, cfg.window_size, cfg.num_kv_heads, cfg.head_dim)
  z1 = lambda: tuple(jnp.zeros(kv, dt) for _ in range(L))
  zr = lambda: tuple(jnp.zeros(ring, dt) for _ in range(L)) if R > 1 else ()
  return PLTCache(z1(), z1(), zr(), zr(), jnp.zeros((R - 1, batch, cfg.d_model), dt), lengths)


# ------------------------------------------------------------------------------------------------
# KV bytes: the formula of docs/model.md, and what the arrays actually hold
def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, int]:
  """Analytic cache size (docs/model.md, the KV cache section), in bytes, for `batch` sequences of max_len slots.

  kv_full: full-length caches (loop 1; all R loops for vanilla); kv_window: the W-token windows
  of loops 2..R; hidden: the (R-1)*D saved values; kv_total: their sum (what docs/model.md counts);
  index: the per-sequence int32 lengths (bookkeeping, not part of that count).
  """
  nbytes = _DTYPE_BYTES[cfg.dtype]
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * nbytes
  r = cfg.num_loops
  if cfg.loop_mode == 'vanilla':
    full, window, hidden = r * per_token * max_len, 0, 0
  else:
    full = per_token * max_len
    window = (r - 1) * per_token * cfg.window_size
    hidden = (r - 1) * cfg.d_model * nbytes
  out = {'kv_full': full * batch, 'kv_window': window * batch, 'hidden': hidden * batch}
  out['kv_total'] = out['kv_full'] + out['kv_window'] + out['hidden']
  out['index'] = 4 * batch
  return out


def _device_bytes(x: Array) -> int:
  try:
    return int(x.on_device_size_in_bytes())
  except (AttributeError, NotImplementedError):  # e.g. tracers or older runtimes
    return int(x.size * x.dtype.itemsize)


def cache_nbytes(cache) -> dict[str, int]:
  """Bytes the cache's arrays occupy on device, in the categories of `kv_cache_bytes`.

  Every leaf of the cache is counted in exactly one category, so nothing can hide.
  """
  if isinstance(cache, PLTCache):
    groups = {'kv_full': (cache.k1, cache.v1), 'kv_window': (cache.k_loc, cache.v_loc),
              'hidden': cache.hidden, 'index': cache.lengths}
  elif isinstance(cache, VanillaCache):
    groups = {'kv_full': (cache.k, cache.v), 'kv_window': (), 'hidden': (),
              'index': cache.lengths}
  else:
    raise TypeError(f'not a decode cache: {type(cache).__name__}')
  out = {k: sum(_device_bytes(x) for x in jax.tree.leaves(v)) for k, v in groups.items()}
  assert sum(out.values()) == sum(_device_bytes(x) for x in jax.tree.leaves(cache))
  out['kv_total'] = out['kv_full'] + out['kv_window'] + out['hidden']
  return out


# ------------------------------------------------------------------------------------------------
def _gather_rows(x_BS_: Array, idx_B: Array) -> Array:
  """x[b, idx[b]] for every b: [B, S, ...] -> [B, 1, ...]."""
  idx = idx_B.reshape((-1, 1) + (1,) * (x_BS_.ndim - 2))
  return jnp.take_along_axis(x_BS_, idx, axis=1)


ring_positions = attn.ring_positions


# ------------------------------------------------------------------------------------------------
# Prefill
def prefill(model, tokens_BS: Array, lengths_B: Array, max_len: int, *,
            rt: Optional[Runtime] = None, return_all_logits: bool = False):
  """Runs the prompts (right-padded to S) through the full forward (~R passes) and fills a cache.

  Returns (logits of each sequence's last prompt token [B, V] float32, cache), plus the full
  [B, S, V] logits with return_all_logits. Validate lengths before calling (see `Decoder`).
  """
  cfg = model.cfg
  b, s = tokens_BS.shape
  if s > max_len:
    raise ValueError(f'prompt width {s} exceeds the cache (max_len={max_len})')
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
  # Right padding: pad tokens come after every real token, so causality keeps them out of the
  # real tokens' computation, and positions are the true positions.
  rt = model.runtime(rt)
  logits, loops = model(tokens_BS, positions, runtime=rt, return_loops=True)
  last = (lengths_B - 1).astype(jnp.int32)
  last_logits = model.head(_gather_rows(loops[-1].hidden, last), rt)[:, 0]

  cache = init_cache(cfg, b, max_len)
  write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, axis=-3)
  if cfg.loop_mode == 'vanilla':
    k = tuple(tuple(write(buf, lp.layers[j].k) for buf, lp in zip(bufs, loops))
              for j, bufs in enumerate(cache.k))
    v = tuple(tuple(write(buf, lp.layers[j].v) for buf, lp in zip(bufs, loops))
              for j, bufs in enumerate(cache.v))
    cache = VanillaCache(k, v, lengths_B.astype(jnp.int32))
  else:
    k1 = tuple(write(buf, loops[0].layers[j].k) for j, buf in enumerate(cache.k1))
    v1 = tuple(write(buf, loops[0].layers[j].v) for j, buf in enumerate(cache.v1))
    k_loc = v_loc = ()
    hidden = cache.hidden
    if cfg.num_loops > 1:
      slot_pos = ring_positions(last, cfg.window_size)                       # [B, W]
      valid = (slot_pos >= 0)[:, :, None, None]
      idx = jnp.clip(slot_pos, 0)[:, :, None, None]

      def ring(x_BSKE):
        return jnp.where(valid, jnp.take_along_axis(x_BSKE, idx, axis=1), 0)

      k_loc = tuple(jnp.stack([ring(lp.layers[j].k) for lp in loops[1:]], axis=1)
                    for j in range(cfg.num_layers))
      v_loc = tuple(jnp.stack([ring(lp.layers[j].v) for lp in loops[1:]], axis=1)
                    for j in range(cfg.num_layers))
      hidden = jnp.stack([model.between_loops(_gather_rows(lp.hidden, last))[:, 0]
                          for lp in loops[:-1]]).astype(cache.hidden.dtype)
    cache = PLTCache(k1, v1, k_loc, v_loc, hidden, lengths_B.astype(jnp.int32))
  if return_all_logits:
    return last_logits, cache, logits
  return last_logits, cache


# ------------------------------------------------------------------------------------------------
# Decode steps
def _plt_rows(model, cache: PLTCache, tokens_B: Array, rt: Runtime, rows: int):
  """Loops 1..rows of the newest token as `rows` rows of one pass.

  Returns (x [B, rows, D] after the stack, k1, v1, k_loc, v_loc) with loop 1's cache and the rings
  of loops 2..rows written at the token's slot; the rings of loops past `rows` are unchanged.
  """
  cfg = model.cfg
  b = tokens_B.shape[0]
  pos = cache.lengths                                                       # [B]
  e = model.embed(tokens_B[:, None], rt)                                    # [B, 1, D]
  # Row r is loop r+1 of token t; its CLP input reads loop r's output at t-1 (saved last step).
  prev = [jnp.where((pos > 0)[:, None, None], cache.hidden[r - 1][:, None], 0)
          for r in range(1, rows)]
  x = jnp.concatenate([e] + [model.clp(e, p) for p in prev], axis=1)       # [B, rows, D]
  positions = jnp.broadcast_to(pos[:, None], (b, rows))
  new = []
  for j, layer in enumerate(model.layers):
    q, k, v = layer.project(x, positions, rt)
    if rows == 1:
      y, kv = rt.attention.cached_causal(q, k, v, attn.KVCache(cache.k1[j], cache.v1[j]), pos)
      new.append((kv.k, kv.v) + ((cache.k_loc[j], cache.v_loc[j]) if cfg.num_loops > 1 else ()))
    else:
      gate = layer.self_attn.plt_gate(x[:, 1:], q[:, 1:])                  # [B, rows-1, H]
      k_ring, v_ring = cache.k_loc[j], cache.v_loc[j]
      layer_cache = attn.GSWACache(cache.k1[j], cache.v1[j], k_ring[:, :rows - 1],
                                   v_ring[:, :rows - 1])
      y, layer_cache = rt.attention.cached_gswa(q, k, v, gate, layer_cache, pos,
                                                window=cfg.window_size)
      k1, v1, k_new, v_new = layer_cache
      if rows < cfg.num_loops:
        k_new = jnp.concatenate([k_new, k_ring[:, rows - 1:]], axis=1)
        v_new = jnp.concatenate([v_new, v_ring[:, rows - 1:]], axis=1)
      new.append((k1, v1, k_new, v_new))
    x = layer.finish(x, y, rt)
  k1, v1, *rings = zip(*new)
  k_loc, v_loc = rings if rings else ((), ())
  return x, tuple(k1), tuple(v1), tuple(k_loc), tuple(v_loc)


def plt_decode_step(model, cache: PLTCache, tokens_B: Array, rt: Runtime):
  """One PLT decode step: all R loops of the newest token in ONE pass of R rows.

  Returns (logits [B, V] float32 for the token after `tokens`, updated cache).
  """
  R = model.cfg.num_loops
  x, k1, v1, k_loc, v_loc = _plt_rows(model, cache, tokens_B, rt, R)
  hidden = cache.hidden
  if R > 1:
    hidden = jnp.swapaxes(model.between_loops(x[:, :R - 1]), 0, 1).astype(hidden.dtype)
  logits = model.head(x[:, R - 1:], rt)[:, 0]
  return logits, PLTCache(k1, v1, k_loc, v_loc, hidden, cache.lengths + 1)


def _copy_exit_state(model, cache: PLTCache, x, k1, v1, k_loc, v_loc, exit_B) -> PLTCache:
  """The state of loops past each sequence's exit loop e: their ring slot of this token holds
  loop e's keys/values, and their saved shifted input is loop e's (`between_loops(h_e)`)."""
  R = model.cfg.num_loops
  pos = cache.lengths
  b = exit_B.shape[0]
  slot = pos % model.cfg.window_size
  rows_B = jnp.arange(b)
  later = jnp.arange(2, R + 1)[None, :] > (exit_B[:, None] + 1)            # [B, R-1]: loop > e
  at_slot = jax.nn.one_hot(slot, model.cfg.window_size, dtype=bool)        # [B, W]
  fill = (later[:, :, None] & at_slot[:, None, :])[..., None, None]        # [B, R-1, W, 1, 1]

  def copied(c1, ring):
    loop1 = c1[rows_B, pos]                                                # [B, K, E]
    ring_e = ring[rows_B, jnp.maximum(exit_B - 1, 0), slot]                # [B, K, E]
    src = jnp.where((exit_B == 0)[:, None, None], loop1, ring_e)
    return jnp.where(fill, src[:, None, None], ring)

  k_loc = tuple(copied(c, r) for c, r in zip(k1, k_loc))
  v_loc = tuple(copied(c, r) for c, r in zip(v1, v_loc))
  rows = x.shape[1]
  saved = model.between_loops(x[:, :min(rows, R - 1)])                     # [B, n, D]
  hidden = list(cache.hidden)
  for i in range(R - 1):                     # hidden[i] feeds loop i+2; from loop min(i, e)+1
    src = jnp.take_along_axis(saved, jnp.minimum(exit_B, i)[:, None, None], axis=1)[:, 0]
    hidden[i] = src.astype(cache.hidden.dtype)
  return PLTCache(k1, v1, k_loc, v_loc, jnp.stack(hidden), pos + 1)


def plt_exit_decode_step(model, cache: PLTCache, tokens_B: Array, rt: Runtime, rule):
  """A PLT decode step with adaptive loop exit (`plt_jax.loop_exit.ExitRule`).

  Each sequence exits at the first loop whose readout (Norm_f + head of that row) meets the rule,
  else at loop R, and its next-token distribution is that loop's readout. The rows are run in
  growing prefixes, rows 1..k for k = 1 (2 for the kl rule), ..., R, each prefix one pass over the
  original cache, and the step stops at the first prefix in which every sequence of the batch has
  exited: the later rows are skipped. Since a prefix recomputes the rows before it, a step that
  runs to k rows costs k passes, which pays off only when most steps stop early.

  State policy (so that a sequence's tokens do not depend on its batch): the loops past a
  sequence's exit loop e take loop e's state for this token, whether or not their rows ran: their
  ring slot holds loop e's keys/values and their saved shifted input is `between_loops(h_e)`.
  A rule that never exits (confidence >= 1, kl <= 0) is the plain step, bit for bit.

  Returns (log-probabilities [B, V] float32 at the exit loops, exit loops [B] int32 (0-based),
  rows run (int32 scalar), updated cache).
  """
  R = model.cfg.num_loops
  b = tokens_B.shape[0]
  if rule.never_exits or R == 1:
    logits, new = plt_decode_step(model, cache, tokens_B, rt)
    return (jax.nn.log_softmax(logits, axis=-1), jnp.full((b,), R - 1, jnp.int32),
            jnp.int32(R), new)

  def finish(k, x, parts, exit_B):
    logp = jax.nn.log_softmax(model.head(x, rt).astype(jnp.float32), axis=-1)   # [B, k, V]
    out = jnp.take_along_axis(logp, exit_B[:, None, None], axis=1)[:, 0]
    return out, exit_B, jnp.int32(k), _copy_exit_state(model, cache, x, *parts, exit_B)

  def run(k):
    x, *parts = _plt_rows(model, cache, tokens_B, rt, k)
    logp = jax.nn.log_softmax(model.head(x, rt).astype(jnp.float32), axis=-1)   # [B, k, V]
    top, kl = loop_exit.readout_stats(jnp.moveaxis(logp, 1, 0))
    met = loop_exit.exit_met(top, kl, rule)                                     # [k, B]
    if k == R:
      return finish(k, x, parts, loop_exit.exit_from_stats(top, kl, rule))
    exit_B = jnp.argmax(met, axis=0).astype(jnp.int32)
    return jax.lax.cond(jnp.all(jnp.any(met, axis=0)),
                        lambda: finish(k, x, parts, exit_B), lambda: run(k + 1))

  return run(1 if rule.kind == 'confidence' else 2)


def vanilla_decode_step(model, cache: VanillaCache, tokens_B: Array, rt: Runtime):
  """The baseline: R sequential passes of one row, each over its own full caches."""
  cfg = model.cfg
  pos = cache.lengths
  positions = pos[:, None]
  e = model.embed(tokens_B[:, None], rt)
  h = e
  k = [list(ks) for ks in cache.k]
  v = [list(vs) for vs in cache.v]
  for r in range(cfg.num_loops):
    x = h if r == 0 else model.loop_input(e, h, positions)
    for j, layer in enumerate(model.layers):
      q, kn, vn = layer.project(x, positions, rt)
      y, kv = rt.attention.cached_causal(q, kn, vn, attn.KVCache(k[j][r], v[j][r]), pos)
      k[j][r], v[j][r] = kv
      x = layer.finish(x, y, rt)
    h = x
  logits = model.head(h, rt)[:, 0]
  return logits, VanillaCache(tuple(map(tuple, k)), tuple(map(tuple, v)), pos + 1)


def decode_step(model, cache, tokens_B: Array, rt: Optional[Runtime] = None):
  """Dispatches on the model's loop mode. Returns (logits [B, V], new cache)."""
  step = vanilla_decode_step if model.cfg.loop_mode == 'vanilla' else plt_decode_step
  return step(model, cache, tokens_B, model.runtime(rt))


# ------------------------------------------------------------------------------------------------
# Jitted driver
def validate_prompts(prompts, vocab_size: int, max_len: int, extra: int = 0) -> np.ndarray:
  """Checks a batch of token-id lists; returns their lengths. `extra`: slots needed after them."""
  if len(prompts) == 0:
    raise ValueError('no prompts given (the batch is empty)')
  lengths = []
  for i, p in enumerate(prompts):
    p = np.asarray(p)
    if p.ndim != 1:
      raise ValueError(f'prompt {i}: expected a flat list of token ids, got shape {p.shape}')
    if p.size == 0:
      raise ValueError(f'prompt {i} is empty: decoding needs at least one token (e.g. BOS)')
    if not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f'prompt {i}: token ids must be integers, got dtype {p.dtype}')
    if p.min() < 0 or p.max() >= vocab_size:
      raise ValueError(f'prompt {i}: token ids must lie in [0, {vocab_size}), '
                       f'got min {p.min()} max {p.max()}')
    if p.size + extra > max_len:
      raise ValueError(f'prompt {i} has {p.size} tokens and needs {p.size + extra} cache slots '
                       f'(prompt + new tokens - 1), more than the cache holds (max_len={max_len})')
    lengths.append(p.size)
  return np.asarray(lengths, np.int32)


def pad_prompts(prompts, width: int, pad_id: int = 0) -> np.ndarray:
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = np.asarray(p)
  return out


def _merge(graphdef, treedef, leaves):
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# Compiled entry points are shared by the Decoders of one model structure and runtime (a sweep
# or a notebook builds many Decoders of a few models); the bound keeps a long-lived process from
# holding every executable it ever compiled.
_COMPILED_ENTRY_POINTS = 16


@functools.lru_cache(maxsize=_COMPILED_ENTRY_POINTS)
def _jitted_prefill(graphdef, treedef, rt: Runtime, compiler_options: tuple = ()):
  def _prefill(leaves, tokens, lengths, max_len, all_logits):
    return prefill(_merge(graphdef, treedef, leaves), tokens, lengths, max_len, rt=rt,
                   return_all_logits=all_logits)

  opts = {'compiler_options': dict(compiler_options)} if compiler_options else {}
  return jax.jit(_prefill, static_argnums=(3, 4), **opts)


@functools.lru_cache(maxsize=_COMPILED_ENTRY_POINTS)
def _jitted_step(graphdef, treedef, rt: Runtime, compiler_options: tuple = ()):
  def _step(leaves, cache, tokens):
    return decode_step(_merge(graphdef, treedef, leaves), cache, tokens, rt)

  opts = {'compiler_options': dict(compiler_options)} if compiler_options else {}
  return jax.jit(_step, donate_argnums=(1,), **opts)


@functools.lru_cache(maxsize=_COMPILED_ENTRY_POINTS)
def _jitted_exit_step(graphdef, treedef, rt: Runtime, rule, compiler_options: tuple = ()):
  def _step(leaves, cache, tokens):
    return plt_exit_decode_step(_merge(graphdef, treedef, leaves), cache, tokens, rt, rule)

  opts = {'compiler_options': dict(compiler_options)} if compiler_options else {}
  return jax.jit(_step, donate_argnums=(1,), **opts)


class Decoder:
  """Holds a model's weights (a flat list of arrays, `state`) and the jitted prefill / decode step.

  decoder = Decoder(model, max_len=256)
  logits, cache = decoder.prefill(list_of_token_lists)     # validated, right-padded
  logits, cache = decoder.step(cache, next_tokens_B)       # `cache` passed in is consumed
  """

  def __init__(self, model, max_len: Optional[int] = None, *,
               compiler_options: Optional[dict] = None, row_matmul: str = 'auto',
               attention: Optional[str] = None, sharding: Optional[ShardingConfig] = None):
    """compiler_options: passed to jax.jit (tests use {'xla_backend_optimization_level': 0}).
    row_matmul: how a step multiplies its rows by each weight (`plt_jax.runtime.decode_matmul`,
    resolved once per batch size). attention: the backend (`plt_jax.attention.BACKENDS`) of the
    prefill and the steps; None: the model config's. sharding: a mesh and its rules."""
    self.cfg: ModelConfig = model.cfg
    decode_matmul(row_matmul, 1, self.cfg.dtype)  # validates (and checks 'kernel' builds)
    self.row_matmul = row_matmul
    backend = attn.get_backend(attention or self.cfg.attention_impl)
    if isinstance(backend, attn.CPU) and backend.strict:
      backend.require(self.cfg.dtype)
    self.runtime = Runtime(backend, 'stacked', sharding)
    self.max_len = int(max_len or self.cfg.max_seq_len)
    if not 1 <= self.max_len <= self.cfg.max_seq_len:
      raise ValueError(f'max_len={self.max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]')
    self.graphdef, state = nnx.split(model)
    # The weights travel as a flat list of arrays: flattening nnx Variables on every call is a
    # visible share of a small model's decode step.
    self.state = jax.tree.leaves(state)
    self._treedef = jax.tree.structure(state)
    self._opts = tuple(sorted((compiler_options or {}).items()))
    self._prefill = _jitted_prefill(self.graphdef, self._treedef, self.runtime, self._opts)

  def step_runtime(self, batch: int) -> Runtime:
    """The runtime of a step over `batch` sequences (its matmul depends on the row count)."""
    rows = batch * (1 if self.cfg.loop_mode == 'vanilla' else self.cfg.num_loops)
    return self.runtime.replace(matmul=decode_matmul(self.row_matmul, rows, self.cfg.dtype))

  def _step_fn(self, batch: int):
    return _jitted_step(self.graphdef, self._treedef, self.step_runtime(batch), self._opts)

  def prefill(self, prompts, *, width: Optional[int] = None, extra: int = 0,
              return_all_logits: bool = False):
    """prompts: list of token-id lists (different lengths allowed). width: padded prompt width
    (a static shape; defaults to the longest prompt). extra: slots to reserve after the prompts."""
    lengths = validate_prompts(prompts, self.cfg.vocab_size, self.max_len, extra)
    width = int(width or lengths.max())
    if width < lengths.max() or width > self.max_len:
      raise ValueError(f'width={width} must lie in [{lengths.max()}, max_len={self.max_len}]')
    tokens = pad_prompts(prompts, width)
    return self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(lengths), self.max_len,
                         bool(return_all_logits))

  def step(self, cache, tokens_B):
    tokens_B = jnp.asarray(tokens_B, jnp.int32)
    return self._step_fn(tokens_B.shape[0])(self.state, cache, tokens_B)

  def exit_step(self, cache, tokens_B, rule: loop_exit.ExitRule):
    """A PLT step with adaptive loop exit (`plt_exit_decode_step`): (log-probabilities [B, V] at
    each sequence's exit loop, exit loops [B] (0-based), rows run, cache)."""
    if self.cfg.loop_mode == 'vanilla':
      raise ValueError('adaptive loop exit is for PLT decoding; a vanilla looped model runs its '
                       'loops one after another (use it with R\' loops instead)')
    tokens_B = jnp.asarray(tokens_B, jnp.int32)
    fn = _jitted_exit_step(self.graphdef, self._treedef, self.step_runtime(tokens_B.shape[0]),
                           rule, self._opts)
    return fn(self.state, cache, tokens_B)

  def compile_step(self, cache, tokens_B):
    """The step compiled ahead of time for these shapes: call it as f(decoder.state, cache,
    tokens) (the cache is still donated); `.memory_analysis()` shows XLA's buffer use."""
    tokens_B = jnp.asarray(tokens_B, jnp.int32)
    return self._step_fn(tokens_B.shape[0]).lower(self.state, cache, tokens_B).compile()
