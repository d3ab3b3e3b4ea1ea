"""Incremental decoding with KV caches: PLT's one-pass parallel step and the vanilla R-pass step.

PLT (shared/design/plt.md, "Decoding"): token t's loop r needs only E[t], the saved
hn_{r-1}[t-1] = Norm_f(h_{r-1}[t-1]) from the previous step, loop 1's cache (including token t's
own loop-1 K/V) and the last W keys/values of loop r. So one forward pass carries all R loops of
the newest token as R rows of one [B, R, D] block: every projection is one matmul over the R rows
(`row_matmul`: how those few-row products run, see `resolve_row_matmul`).
Per layer, row 1 writes its K/V to the loop-1 cache and row r >= 2 to loop r's ring of W slots;
then every row attends over loop 1 (row 1: plain causal; rows >= 2: the global G-SWA branch) and
rows >= 2 also over their own ring (the local branch), mixed by the layer's gate (`attention`:
these XLA ops, or one in-place CPU kernel call per layer, see `resolve_attention`).

Cache layout (choices documented here and in the benchmark):
  * Prompts are RIGHT-padded; `lengths[b]` counts sequence b's tokens in the cache, which is also
    the RoPE position of its next token. Loop-1 slot i holds position i; slots >= lengths[b] are
    masked out (causality) and overwritten as decoding proceeds.
  * Each ring holds W slots (the window INCLUDING the token itself): position p lives in slot p % W,
    written before attending, so the local branch reads exactly keys p-W+1 .. p from the ring.
    (W-1 slots plus the fresh key would also do; W keeps the step a plain masked attention.)
  * KV bytes = loop 1: 2*L*K*E*bytes per token of max_len, each extra loop: W tokens' worth,
    plus (R-1)*D saved hidden values, all per sequence (plt.md). `lengths` (4 bytes/sequence) is
    bookkeeping, reported apart. Vanilla keeps R full loop caches and no hidden states.
All functions here are pure: call them inside `jax.jit` on a merged model (see `Decoder`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plt_jax.attention import make_mask, masked_attention, mix
from plt_jax.config import ModelConfig
from plt_jax.model import projection_matmul

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
  """Vanilla looped decode state: k, v are L x [R, B, T, K, E] (R full caches); lengths [B]."""
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
    z = lambda: tuple(jnp.zeros((R, *kv), dt) for _ in range(L))
    return VanillaCache(z(), z(), lengths)
  ring = (batch, R - 1, cfg.window_size, cfg.num_kv_heads, cfg.head_dim)
  z1 = lambda: tuple(jnp.zeros(kv, dt) for _ in range(L))
  zr = lambda: tuple(jnp.zeros(ring, dt) for _ in range(L)) if R > 1 else ()
  return PLTCache(z1(), z1(), zr(), zr(), jnp.zeros((R - 1, batch, cfg.d_model), dt), lengths)


def cache_max_len(cache) -> int:
  return (cache.k1[0] if isinstance(cache, PLTCache) else cache.k[0]).shape[-3]


# ------------------------------------------------------------------------------------------------
# KV bytes: the plt.md formula, and what the arrays actually hold
def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, int]:
  """Analytic cache size (plt.md, "KV cache"), in bytes, for `batch` sequences of max_len slots.

  kv_full: full-length caches (loop 1; all R loops for vanilla); kv_window: the W-token windows
  of loops 2..R; hidden: the (R-1)*D saved values; kv_total: their sum (what plt.md counts);
  index: the per-sequence int32 lengths (bookkeeping, not part of plt.md's count).
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
# Shared pieces
ROW_MATMULS = ('auto', 'stacked', 'per_row', 'kernel')
# Up to this many rows per projection (chunks of 8, each streaming the matrix once) the CPU kernel
# beat XLA:CPU's GEMM in bench_decode (2-core EPYC, 100M model, batch 8: 16 rows 114 vs 144 ms
# per step; 32 rows 203 vs 199 ms).
KERNEL_MAX_ROWS = 16


def resolve_row_matmul(row_matmul: str, rows: int, dtype: str = 'float32') -> str:
  """How a decode step multiplies its `rows` (= batch * rows per sequence) by each weight.

  'stacked': one [rows, D] product per matrix (XLA's dot). On accelerators this is what makes R
    rows cost about one row.
  'per_row': one product per row, back to back (XLA:CPU sends 2..8 rows to a GEMM that costs
    about as much per row as separate matrix-vector products).
  'kernel': `kernels/cpu_rows.py`, which streams each matrix once for all rows (CPU, float32).
  'auto': 'kernel' on CPU for 1..KERNEL_MAX_ROWS float32 rows when it builds, else 'stacked'.
    One row too: the kernel streams a matrix as fast as XLA:CPU's matrix-vector product, and
    mixing the two would set the kernels' spinning helper threads against XLA's own pool.
  """
  if row_matmul not in ROW_MATMULS:
    raise ValueError(f'row_matmul={row_matmul!r}: must be one of {ROW_MATMULS}')
  on_cpu = jax.default_backend() == 'cpu'
  if row_matmul == 'auto':
    if on_cpu and rows <= KERNEL_MAX_ROWS and dtype == 'float32':
      from kernels import cpu_rows  # pylint: disable=import-outside-toplevel
      if cpu_rows.available():
        return 'kernel'
    return 'stacked'
  if row_matmul == 'kernel':
    from kernels import cpu_rows  # pylint: disable=import-outside-toplevel
    if not on_cpu or dtype != 'float32' or not cpu_rows.available():
      raise ValueError(f"row_matmul='kernel' needs the CPU backend, float32 and a C++ compiler "
                       f'(backend {jax.default_backend()}, dtype {dtype}; see kernels/cpu_rows.py)')
  return row_matmul


def _matmul_context(mode: str):
  if mode != 'kernel':
    return contextlib.nullcontext()
  from kernels import cpu_rows  # pylint: disable=import-outside-toplevel
  return projection_matmul(cpu_rows.rows_matmul)


ATTENTIONS = ('auto', 'xla', 'kernel')


def resolve_attention(attention: str, dtype: str = 'float32') -> str:
  """How a decode step runs each layer's cached attention (cache writes, both branches, mix).

  'xla': the reference below (scatter, masked attention, window mask, gate mix) as XLA ops.
  'kernel': `kernels/cpu_decode.py`, one in-place call per layer (CPU, float32); the same math.
  'auto': 'kernel' on CPU for float32 when it builds, else 'xla'.
  """
  if attention not in ATTENTIONS:
    raise ValueError(f'attention={attention!r}: must be one of {ATTENTIONS}')
  if attention == 'xla':
    return attention
  from kernels import cpu_decode  # pylint: disable=import-outside-toplevel
  if cpu_decode.supported(dtype):
    return 'kernel'
  if attention == 'kernel':
    raise ValueError(f"attention='kernel' needs the CPU backend, float32 and a C++ compiler "
                     f'(backend {jax.default_backend()}, dtype {dtype}; see kernels/cpu_ffi.py)')
  return 'xla'


def _cpu_decode_attention(*args, **kwargs):
  from kernels import cpu_decode  # pylint: disable=import-outside-toplevel
  return cpu_decode.decode_attention(*args, **kwargs)


def _rowwise(fn: Callable, per_row: bool, *xs: Array):
  """fn over the row axis (1) at once, or one row at a time with the results concatenated."""
  if not per_row or xs[0].shape[1] == 1:
    return fn(*xs)
  outs = [fn(*(x[:, r:r + 1] for x in xs)) for r in range(xs[0].shape[1])]
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *outs)


def _layer(layer, x_BSD: Array, positions_BS: Array, attend: Callable,
           per_row: bool = False) -> Array:
  """The model's DecoderLayer with its attention replaced by `attend(q, k, v, x) -> y` (cached).

  per_row: run the projections and the MLP row by row (same math, R matmuls of one row each).
  """
  q, k, v = _rowwise(layer.project, per_row, x_BSD, positions_BS)
  return _rowwise(layer.finish, per_row, x_BSD, attend(q, k, v, x_BSD))


def _gather_rows(x_BS_: Array, idx_B: Array) -> Array:
  """x[b, idx[b]] for every b: [B, S, ...] -> [B, 1, ...]."""
  idx = idx_B.reshape((-1, 1) + (1,) * (x_BS_.ndim - 2))
  return jnp.take_along_axis(x_BS_, idx, axis=1)


def ring_positions(pos_B: Array, window: int) -> Array:
  """[B, W]: the position each ring slot holds once position pos has been written (< 0: empty)."""
  slots = jnp.arange(window, dtype=jnp.int32)
  return pos_B[:, None] - jnp.mod(pos_B[:, None] - slots[None], window)


def _full_slots(cache_len: int, batch: int) -> Array:
  return jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32)[None], (batch, cache_len))


# ------------------------------------------------------------------------------------------------
# Prefill
def prefill(model, tokens_BS: Array, lengths_B: Array, max_len: int, *,
            return_all_logits: bool = False):
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
  logits, loops = model(tokens_BS, positions, return_loops=True)
  last = (lengths_B - 1).astype(jnp.int32)
  last_logits = model.head(_gather_rows(loops[-1].hidden, last))[:, 0]

  cache = init_cache(cfg, b, max_len)
  write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, axis=-3)
  if cfg.loop_mode == 'vanilla':
    k = tuple(write(buf, jnp.stack([lp.layers[j].k for lp in loops]))
              for j, buf in enumerate(cache.k))
    v = tuple(write(buf, jnp.stack([lp.layers[j].v for lp in loops]))
              for j, buf in enumerate(cache.v))
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
def plt_decode_step(model, cache: PLTCache, tokens_B: Array, *, row_matmul: str = 'stacked',
                    attention: str = 'xla'):
  """One PLT decode step: all R loops of the newest token in ONE pass of R rows.

  Returns (logits [B, V] float32 for the token after `tokens`, updated cache).
  row_matmul: how the B*R rows meet each weight matrix (`resolve_row_matmul`); attention: how
  each layer's cached attention runs (`resolve_attention`). The same math in one layer-major
  pass whichever are chosen.
  """
  cfg = model.cfg
  R, W = cfg.num_loops, cfg.window_size
  b = tokens_B.shape[0]
  t_max = cache_max_len(cache)
  pos = cache.lengths                                                       # [B]
  bidx = jnp.arange(b)

  e = model.embed(tokens_B[:, None])                                        # [B, 1, D]
  rows = [e]
  for r in range(1, R):
    # Row r is loop r+1 of token t; its CLP input reads loop r's output at t-1 (saved last step).
    prev = jnp.where((pos > 0)[:, None, None], cache.hidden[r - 1][:, None], 0)
    rows.append(model.clp(e, prev))
  x = jnp.concatenate(rows, axis=1)                                        # [B, R, D]
  positions = jnp.broadcast_to(pos[:, None], (b, R))
  mode = resolve_row_matmul(row_matmul, b * R, cfg.dtype)
  fused = resolve_attention(attention, cfg.dtype) == 'kernel'
  if not fused:  # the XLA path's masks (the kernel derives the same visibility itself)
    # Every row sees loop-1 slots 0..pos (the global branch of rows >= 2 is the same causal read).
    glob_mask = make_mask(positions, _full_slots(t_max, b))
    if R > 1:
      slot_pos = ring_positions(pos, W)                                     # [B, W]
      loc_q = jnp.broadcast_to(pos[:, None, None], (b, R - 1, 1)).reshape(b * (R - 1), 1)
      loc_kv = jnp.broadcast_to(slot_pos[:, None], (b, R - 1, W)).reshape(b * (R - 1), W)
      loc_mask = make_mask(loc_q, loc_kv, window=W, kv_valid=loc_kv >= 0)
      slot = jnp.mod(pos, W)
  k1, v1, k_loc, v_loc = list(cache.k1), list(cache.v1), list(cache.k_loc), list(cache.v_loc)
  for j, layer in enumerate(model.layers):

    def attend(q, k, v, x_in, j=j, layer=layer):
      if fused and R == 1:
        y, k1[j], v1[j] = _cpu_decode_attention(q, k, v, pos, k1[j], v1[j])
        return y
      if fused:
        gate = layer.self_attn.plt_gate(x_in[:, 1:], q[:, 1:])
        y, k1[j], v1[j], k_loc[j], v_loc[j] = _cpu_decode_attention(
            q, k, v, pos, k1[j], v1[j], gate=gate, k_ring=k_loc[j], v_ring=v_loc[j])
        return y
      k1[j] = k1[j].at[bidx, pos].set(k[:, 0])
      v1[j] = v1[j].at[bidx, pos].set(v[:, 0])
      y = masked_attention(q, k1[j], v1[j], glob_mask)                     # [B, R, H, E]
      if R == 1:
        return y
      k_loc[j] = k_loc[j].at[bidx, :, slot].set(k[:, 1:])
      v_loc[j] = v_loc[j].at[bidx, :, slot].set(v[:, 1:])
      h, e_dim = q.shape[2:]
      kv_shape = (b * (R - 1), W) + k.shape[2:]
      y_loc = masked_attention(q[:, 1:].reshape(b * (R - 1), 1, h, e_dim),
                               k_loc[j].reshape(kv_shape), v_loc[j].reshape(kv_shape), loc_mask)
      gate = layer.self_attn.plt_gate(x_in[:, 1:], q[:, 1:])                # [B, R-1, H]
      y_mix = mix(gate, y[:, 1:], y_loc.reshape(b, R - 1, h, e_dim))
      return jnp.concatenate([y[:, :1], y_mix], axis=1)

    with _matmul_context(mode):
      x = _layer(layer, x, positions, attend, per_row=mode == 'per_row')

  hidden = cache.hidden
  if R > 1:
    hidden = jnp.swapaxes(model.between_loops(x[:, :R - 1]), 0, 1).astype(hidden.dtype)
  with _matmul_context(mode):
    logits = model.head(x[:, R - 1:])[:, 0]
  return logits, PLTCache(tuple(k1), tuple(v1), tuple(k_loc), tuple(v_loc), hidden, pos + 1)


def vanilla_decode_step(model, cache: VanillaCache, tokens_B: Array, *,
                        row_matmul: str = 'stacked', attention: str = 'xla'):
  """The baseline: R sequential passes of one row, each over its own full cache.
  row_matmul, attention: as in `plt_decode_step`, for its B rows."""
  cfg = model.cfg
  b = tokens_B.shape[0]
  mode = resolve_row_matmul(row_matmul, b, cfg.dtype)
  fused = resolve_attention(attention, cfg.dtype) == 'kernel'
  t_max = cache_max_len(cache)
  pos = cache.lengths
  bidx = jnp.arange(b)
  positions = pos[:, None]
  mask = None if fused else make_mask(positions, _full_slots(t_max, b))
  k, v = list(cache.k), list(cache.v)
  e = model.embed(tokens_B[:, None])
  h = e
  for r in range(cfg.num_loops):
    x = h if r == 0 else model.loop_input(e, h, positions)

    for j, layer in enumerate(model.layers):
      def attend(q, kn, vn, x_in, j=j, r=r):
        del x_in
        if fused:
          y, k[j], v[j] = _cpu_decode_attention(q, kn, vn, pos, k[j], v[j], slab=r)
          return y
        k[j] = k[j].at[r, bidx, pos].set(kn[:, 0])
        v[j] = v[j].at[r, bidx, pos].set(vn[:, 0])
        return masked_attention(q, k[j][r], v[j][r], mask)

      with _matmul_context(mode):
        x = _layer(layer, x, positions, attend, per_row=mode == 'per_row')
    h = x
  with _matmul_context(mode):
    logits = model.head(h)[:, 0]
  return logits, VanillaCache(tuple(k), tuple(v), pos + 1)


def decode_step(model, cache, tokens_B: Array, *, row_matmul: str = 'auto',
                attention: str = 'auto'):
  """Dispatches on the model's loop mode. Returns (logits [B, V], new cache)."""
  step = vanilla_decode_step if model.cfg.loop_mode == 'vanilla' else plt_decode_step
  return step(model, cache, tokens_B, row_matmul=row_matmul, attention=attention)


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


# How many times each entry point was traced (a retrace per token would be a bug; tests read it).
TRACE_COUNTS: collections.Counter = collections.Counter()


def _merge(graphdef, treedef, leaves):
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@functools.lru_cache(maxsize=None)
def _jitted_prefill(graphdef, treedef, compiler_options: tuple = ()):
  def _prefill(leaves, tokens, lengths, max_len, all_logits):
    TRACE_COUNTS['prefill'] += 1
    return prefill(_merge(graphdef, treedef, leaves), tokens, lengths, max_len,
                   return_all_logits=all_logits)

  opts = {'compiler_options': dict(compiler_options)} if compiler_options else {}
  return jax.jit(_prefill, static_argnums=(3, 4), **opts)


@functools.lru_cache(maxsize=None)
def _jitted_step(graphdef, treedef, compiler_options: tuple = (), row_matmul: str = 'auto',
                 attention: str = 'auto'):
  def _step(leaves, cache, tokens):
    TRACE_COUNTS['step'] += 1
    return decode_step(_merge(graphdef, treedef, leaves), cache, tokens, row_matmul=row_matmul,
                       attention=attention)

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
               attention: str = 'auto'):
    """compiler_options: passed to jax.jit (tests use {'xla_backend_optimization_level': 0}).
    row_matmul: how a step multiplies its rows by each weight (`resolve_row_matmul`).
    attention: how a step runs each layer's cached attention (`resolve_attention`)."""
    resolve_row_matmul(row_matmul, 1, model.cfg.dtype)  # validates (and checks 'kernel' builds)
    resolve_attention(attention, model.cfg.dtype)
    self.cfg: ModelConfig = model.cfg
    self.max_len = int(max_len or self.cfg.max_seq_len)
    if not 1 <= self.max_len <= self.cfg.max_seq_len:
      raise ValueError(f'max_len={self.max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]')
    self.graphdef, state = nnx.split(model)
    # The weights travel as a flat list of arrays: flattening nnx Variables on every call cost
    # ~0.5 ms per decode step (a few % of a 100M model's step on CPU).
    self.state = jax.tree.leaves(state)
    self._treedef = jax.tree.structure(state)
    opts = tuple(sorted((compiler_options or {}).items()))
    # Compiled entry points are shared by every Decoder of one model structure.
    self._fns = {'prefill': _jitted_prefill(self.graphdef, self._treedef, opts),
                 'step': _jitted_step(self.graphdef, self._treedef, opts, row_matmul, attention)}

  def prefill(self, prompts, *, width: Optional[int] = None, extra: int = 0,
              return_all_logits: bool = False):
    """prompts: list of token-id lists (different lengths allowed). width: padded prompt width
    (a static shape; defaults to the longest prompt). extra: slots to reserve after the prompts."""
    lengths = validate_prompts(prompts, self.cfg.vocab_size, self.max_len, extra)
    width = int(width or lengths.max())
    if width < lengths.max() or width > self.max_len:
      raise ValueError(f'width={width} must lie in [{lengths.max()}, max_len={self.max_len}]')
    tokens = pad_prompts(prompts, width)
    return self._fns['prefill'](self.state, jnp.asarray(tokens), jnp.asarray(lengths),
                                self.max_len, bool(return_all_logits))

  def step(self, cache, tokens_B):
    return self._fns['step'](self.state, cache, jnp.asarray(tokens_B, jnp.int32))

  def compile_step(self, cache, tokens_B):
    """The step compiled ahead of time for these shapes: call it as f(decoder.state, cache,
    tokens) (the cache is still donated); `.memory_analysis()` shows XLA's buffer use."""
    return self._fns['step'].lower(self.state, cache, jnp.asarray(tokens_B, jnp.int32)).compile()
