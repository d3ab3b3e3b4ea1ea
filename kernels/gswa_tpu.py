"""Pallas-Mosaic (TPU) kernels, splash-attention style: fused G-SWA and causal flash attention.

Layout [B, H, T, D] (the wrapper transposes). Instead of a dense (query block x key block) grid,
each kernel walks a flat, static table of only the block pairs that hold a visible (query, key)
pair, handed to the index maps through scalar prefetch (SMEM):

  forward / dQ   grid (B, Hq, steps), query-major: for each query block, branch 0's key blocks, then
                 branch 1's (`kv_block_bounds`; the window branch starts at max(0, q0-W+1)//bk, so
                 the local work is O(T*W)). The query and output blocks keep one index over
                 consecutive steps, so they stay resident in VMEM; the accumulators live in scratch
                 and are finalised (and the gated mix written) on a query block's last step.
                 A branch's key index map, while the other branch runs, points at the block it will
                 use next / used last, so no DMA is wasted.
  dK / dV        grid (B, Hkv, steps), key-major: for each key block, each branch, each of the G
                 query heads of its group, the query blocks that can see it (`q_block_bounds`).

Steps whose block pair is fully visible skip the mask (unless segment ids are given). The last grid
axis is 'arbitrary' (sequential accumulation), the others 'parallel'. Row statistics (LSE, delta)
are kept lane-replicated ([.., T, 128]) as TPU vregs want, like the reference TPU flash kernel.
Blocks: the defaults are 512 (the TPU rule: the last two block dims divisible by (8, 128)); tests
use smaller blocks in interpret mode only.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import BIG_LSE, NEG_INF, KernelConfig, kv_block_bounds, q_block_bounds
from .masks import visible

f32 = jnp.float32
LANES = 128
MIN_BLOCK = 128
DEFAULT_CONFIG = KernelConfig(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)
FIRST, LAST, MASKED = 1, 2, 4
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@functools.lru_cache(maxsize=None)
def step_table(tp: int, bq: int, bk: int, windows: tuple, has_seg: bool):
  """Query-major steps: int32 arrays (qblk, branch, flags, kblk_0[, kblk_1]) of equal length."""
  nq = tp // bq
  rows = []
  for qb in range(nq):
    steps = []
    for br, w in enumerate(windows):
      a, b, c, d = kv_block_bounds(qb * bq, bq, bk, w)
      steps += [(br, kb, has_seg or not b <= kb < c) for kb in range(a, d)]
    for i, (br, kb, masked) in enumerate(steps):
      flags = (FIRST if i == 0 else 0) | (LAST if i == len(steps) - 1 else 0) | (
          MASKED if masked else 0)
      # Each branch's key index for this step: its own block, else the block it will use next in
      # this query block (later branch) or used last (earlier branch).
      kblk = []
      for other in range(len(windows)):
        mine = [k for b_, k, _ in steps if b_ == other]
        kblk.append(kb if other == br else (mine[0] if other > br else mine[-1]))
      rows.append((qb, br, flags, *kblk))
  return tuple(np.asarray(col, np.int32) for col in zip(*rows))


@functools.lru_cache(maxsize=None)
def dkv_step_table(tp: int, bq: int, bk: int, windows: tuple, grp: int, has_seg: bool):
  """Key-major steps: int32 arrays (kblk, branch, head-in-group, qblk, flags)."""
  nq, nk = tp // bq, tp // bk
  rows = []
  for kb in range(nk):
    steps = []
    for br, w in enumerate(windows):
      a, b, c, d = q_block_bounds(kb * bk, bq, bk, w, nq)
      steps += [(br, g, qb, has_seg or not b <= qb < c) for g in range(grp) for qb in range(a, d)]
    for i, (br, g, qb, masked) in enumerate(steps):
      flags = (FIRST if i == 0 else 0) | (LAST if i == len(steps) - 1 else 0) | (
          MASKED if masked else 0)
      rows.append((kb, br, g, qb, flags))
  return tuple(np.asarray(col, np.int32) for col in zip(*rows))


def _params():
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary'))


def _when_step(flags, branch_now, br: int, has_seg: bool, step):
  """Runs step(masked) for branch `br`, with the mask only where the table asks for it."""
  mine = branch_now == br
  if has_seg:
    pl.when(mine)(lambda: step(True))
    return
  masked = (flags & MASKED) != 0
  pl.when(jnp.logical_and(mine, masked))(lambda: step(True))
  pl.when(jnp.logical_and(mine, jnp.logical_not(masked)))(lambda: step(False))


def _block_mask(q0, k0, bq, bk, window, qseg_ref, kseg_ref):
  q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  if qseg_ref is None:
    return visible(q_pos, k_pos, window)
  return visible(q_pos, k_pos, window, qseg_ref[...], kseg_ref[...])


# ------------------------------------------------------------------------------------------------
def _fwd_kernel(qtab, brtab, ftab, *refs, windows, bq, bk, scale, has_seg, save):
  nb = len(windows)
  refs = list(refs)
  ktabs = [refs.pop(0) for _ in range(nb)]
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref = refs.pop(0) if has_seg else None
  kseg_refs = [refs.pop(0) for _ in range(nb)] if has_seg else [None] * nb
  o_ref = refs.pop(0)
  ob_refs = [refs.pop(0) for _ in range(nb)] if (save and nb == 2) else []
  lse_refs = [refs.pop(0) for _ in range(nb)] if save else []
  m_scr = [refs.pop(0) for _ in range(nb)]
  l_scr = [refs.pop(0) for _ in range(nb)]
  acc_scr = [refs.pop(0) for _ in range(nb)]

  s = pl.program_id(2)
  flags = ftab[s]
  q0 = qtab[s] * bq

  @pl.when((flags & FIRST) != 0)
  def _init():
    for br in range(nb):
      m_scr[br][...] = jnp.full(m_scr[br].shape, NEG_INF, f32)
      l_scr[br][...] = jnp.zeros(l_scr[br].shape, f32)
      acc_scr[br][...] = jnp.zeros(acc_scr[br].shape, f32)

  for br, window in enumerate(windows):
    def step(masked, br=br, window=window):
      k_ref, v_ref = kv_refs[br]
      v = v_ref[...]
      logits = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=f32)
      logits = logits * scale
      if masked:
        mask = _block_mask(q0, ktabs[br][s] * bk, bq, bk, window, qseg_ref, kseg_refs[br])
        logits = jnp.where(mask, logits, NEG_INF)
      m_prev = m_scr[br][...][:, :1]
      m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
      alpha = jnp.exp(m_prev - m_new)
      p = jnp.exp(logits - m_new)
      if masked:
        p = jnp.where(mask, p, 0.0)
      l_new = alpha * l_scr[br][...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
      acc_scr[br][...] = alpha * acc_scr[br][...] + jnp.dot(
          p.astype(v.dtype), v, preferred_element_type=f32)
      m_scr[br][...] = jnp.broadcast_to(m_new, m_scr[br].shape)
      l_scr[br][...] = jnp.broadcast_to(l_new, l_scr[br].shape)

    _when_step(flags, brtab[s], br, has_seg, step)

  @pl.when((flags & LAST) != 0)
  def _finish():
    outs = []
    for br in range(nb):
      l = l_scr[br][...][:, :1]
      empty = l == 0.0
      l_safe = jnp.where(empty, 1.0, l)
      o_b = (acc_scr[br][...] / l_safe).astype(o_ref.dtype)
      outs.append(o_b)
      if save:
        lse = jnp.where(empty, BIG_LSE, m_scr[br][...][:, :1] + jnp.log(l_safe))
        lse_refs[br][...] = jnp.broadcast_to(lse, lse_refs[br].shape)
        if nb == 2:
          ob_refs[br][...] = o_b
    if nb == 1:
      o_ref[...] = outs[0]
    else:
      g = gate_ref[...].astype(f32)  # [bq, 1]
      o_ref[...] = (g * outs[0].astype(f32) + (1.0 - g) * outs[1].astype(f32)).astype(o_ref.dtype)


def _to_bhtd(x):
  return jnp.transpose(x, (0, 2, 1, 3))


def _row_inputs(seg, gate):
  """gate [B, T, Hq] -> [B, Hq, T, 1]; segment ids -> q [B, T, 1] and kv [B, 1, T]."""
  gate_t = None if gate is None else jnp.transpose(gate.astype(f32), (0, 2, 1))[..., None]
  if seg is None:
    return gate_t, None, None
  return gate_t, seg[:, :, None], seg[:, None, :]


def _qmap(bi, h, s, qt, *_):
  """Query-major grids: the step's query block of query head h."""
  return bi, h, qt[s], 0


def _kmap(br: int, grp: int):
  """Query-major grids: branch br's key block of the step (its own column of the step table)."""
  def f(bi, h, s, qt, bt, ft, *kts):
    return bi, jax.lax.div(h, grp), kts[br][s], 0
  return f


def _query_major_inputs(q_t, kvs_t, do_t, gate_t, qseg, kseg, *, bq: int, bk: int, grp: int):
  """Block specs and operands of the query-major kernels (forward, dQ), in their refs' order:
  q, each branch's (k, v), dO (dQ only), the gate (two branches), the segment ids (the queries',
  then each branch's keys'). Returns (q_spec, in_specs, args)."""
  nb = len(kvs_t)
  d = q_t.shape[-1]
  q_spec = pl.BlockSpec((None, None, bq, d), _qmap)
  in_specs, args = [q_spec], [q_t]
  for br, (k, v) in enumerate(kvs_t):
    spec = pl.BlockSpec((None, None, bk, d), _kmap(br, grp))
    in_specs += [spec, spec]
    args += [k, v]
  if do_t is not None:
    in_specs.append(q_spec)
    args.append(do_t)
  if nb == 2:
    in_specs.append(pl.BlockSpec((None, None, bq, 1), _qmap))
    args.append(gate_t)
  if qseg is not None:
    in_specs.append(pl.BlockSpec((None, bq, 1), lambda bi, h, s, qt, *_: (bi, qt[s], 0)))
    args.append(qseg)
    for br in range(nb):
      in_specs.append(pl.BlockSpec(
          (None, 1, bk), lambda bi, h, s, qt, bt, ft, *kts, br=br: (bi, 0, kts[br][s])))
      args.append(kseg)
  return q_spec, in_specs, args


def fwd(q, ks: Sequence, vs: Sequence, gate, seg, *, windows: tuple, cfg: KernelConfig,
        save: bool, interpret: bool):
  """Padded [B, Tp, H, D] inputs; same contract as gswa_triton.fwd.

  residual: per-branch LSE [B, Hq, Tp, 128] (lane-replicated).
  """
  b, tp, hq, d = q.shape
  grp = hq // ks[0].shape[2]
  nb = len(windows)
  bq, bk = cfg.block_q, cfg.block_k
  has_seg = seg is not None
  tables = step_table(tp, bq, bk, windows, has_seg)
  q_t = _to_bhtd(q)
  kvs_t = [(_to_bhtd(k), _to_bhtd(v)) for k, v in zip(ks, vs)]
  gate_t, qseg, kseg = _row_inputs(seg, gate)
  q_spec, in_specs, args = _query_major_inputs(q_t, kvs_t, None, gate_t, qseg, kseg, bq=bq, bk=bk,
                                               grp=grp)
  qshape = (b, hq, tp, d)
  out_shape = [jax.ShapeDtypeStruct(qshape, q.dtype)]
  out_specs = [q_spec]
  if save and nb == 2:
    out_shape += [jax.ShapeDtypeStruct(qshape, q.dtype)] * nb
    out_specs += [q_spec] * nb
  if save:
    out_shape += [jax.ShapeDtypeStruct((b, hq, tp, LANES), f32)] * nb
    out_specs += [pl.BlockSpec((None, None, bq, LANES), _qmap)] * nb
  scratch = ([pltpu.VMEM((bq, LANES), f32)] * (2 * nb) + [pltpu.VMEM((bq, d), f32)] * nb)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables), grid=(b, hq, len(tables[0])), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch)
  kernel = functools.partial(_fwd_kernel, windows=windows, bq=bq, bk=bk, scale=d ** -0.5,
                             has_seg=has_seg, save=save)
  res = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=_params(),
      interpret=interpret, name='gswa_fwd_tpu' if nb == 2 else 'causal_fwd_tpu')(
          *[jnp.asarray(t) for t in tables], *args)
  res = list(res)
  out = _to_bhtd(res.pop(0))
  obs = [_to_bhtd(res.pop(0)) for _ in range(nb)] if (save and nb == 2) else None
  lses = [res.pop(0) for _ in range(nb)] if save else None
  return out, obs, lses


# ------------------------------------------------------------------------------------------------
# Backward (same algebra as gswa_triton: c_0 = g, c_1 = 1 - g, dS = c P (dO V^T - delta)).
def _dq_kernel(qtab, brtab, ftab, *refs, windows, bq, bk, scale, has_seg):
  nb = len(windows)
  refs = list(refs)
  ktabs = [refs.pop(0) for _ in range(nb)]
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  do_ref = refs.pop(0)
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref = refs.pop(0) if has_seg else None
  kseg_refs = [refs.pop(0) for _ in range(nb)] if has_seg else [None] * nb
  lse_ref = refs.pop(0)    # [bq, LANES] of the current step's branch
  delta_ref = refs.pop(0)
  dq_ref = refs.pop(0)
  (acc_ref,) = refs

  s = pl.program_id(2)
  flags = ftab[s]
  q0 = qtab[s] * bq

  @pl.when((flags & FIRST) != 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  for br, window in enumerate(windows):
    def step(masked, br=br, window=window):
      k_ref, v_ref = kv_refs[br]
      k = k_ref[...]
      logits = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=f32) * scale
      p = jnp.exp(logits - lse_ref[...][:, :1])
      if masked:
        mask = _block_mask(q0, ktabs[br][s] * bk, bq, bk, window, qseg_ref, kseg_refs[br])
        p = jnp.where(mask, p, 0.0)
      dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=f32)
      ds = p * (dp - delta_ref[...][:, :1])
      if nb == 2:
        g = gate_ref[...].astype(f32)
        ds = ds * (g if br == 0 else 1.0 - g)
      acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

    _when_step(flags, brtab[s], br, has_seg, step)

  @pl.when((flags & LAST) != 0)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(ktab, brtab, gtab, qtab, ftab, *refs, windows, bq, bk, scale, has_seg):
  nb = len(windows)
  refs = list(refs)
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  do_ref = refs.pop(0)
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
  lse_ref = refs.pop(0)
  delta_ref = refs.pop(0)
  dkv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  dk_scr = [refs.pop(0) for _ in range(nb)]
  dv_scr = [refs.pop(0) for _ in range(nb)]

  s = pl.program_id(2)
  flags = ftab[s]
  k0 = ktab[s] * bk

  @pl.when((flags & FIRST) != 0)
  def _init():
    for br in range(nb):
      dk_scr[br][...] = jnp.zeros(dk_scr[br].shape, f32)
      dv_scr[br][...] = jnp.zeros(dv_scr[br].shape, f32)

  for br, window in enumerate(windows):
    def step(masked, br=br, window=window):
      k_ref, v_ref = kv_refs[br]
      q = q_ref[...]
      do = do_ref[...]
      logits = jax.lax.dot_general(q, k_ref[...], _NT, preferred_element_type=f32) * scale
      p = jnp.exp(logits - lse_ref[...][:, :1])
      if masked:
        mask = _block_mask(qtab[s] * bq, k0, bq, bk, window, qseg_ref, kseg_ref)
        p = jnp.where(mask, p, 0.0)
      if nb == 2:
        g = gate_ref[...].astype(f32)
        p = p * (g if br == 0 else 1.0 - g)
      dv_scr[br][...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                             preferred_element_type=f32)
      dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=f32)
      ds = p * (dp - delta_ref[...][:, :1])
      dk_scr[br][...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                             preferred_element_type=f32)

    _when_step(flags, brtab[s], br, has_seg, step)

  @pl.when((flags & LAST) != 0)
  def _finish():
    for br in range(nb):
      dk_ref, dv_ref = dkv_refs[br]
      dk_ref[...] = (dk_scr[br][...] * scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_scr[br][...].astype(dv_ref.dtype)


class _BwdInputs(NamedTuple):
  """The backward kernels' operands, in the [B, H, Tp, ...] layout."""
  q: jax.Array                # [B, Hq, Tp, D]
  kvs: list                   # per branch (k, v), [B, Hkv, Tp, D]
  do: jax.Array               # [B, Hq, Tp, D]
  gate: Optional[jax.Array]   # [B, Hq, Tp, 1] (two branches)
  qseg: Optional[jax.Array]   # [B, Tp, 1]
  kseg: Optional[jax.Array]   # [B, 1, Tp]
  lse: jax.Array              # [nb, B, Hq, Tp, LANES]
  delta: jax.Array            # [nb, B, Hq, Tp, LANES]


def bwd(q, ks, vs, gate, seg, lses, deltas, do, *, windows: tuple, cfg: KernelConfig,
        interpret: bool):
  """Same contract as gswa_triton.bwd; lses are this module's lane-replicated residuals."""
  grp = q.shape[2] // ks[0].shape[2]
  q_t, do_t = _to_bhtd(q), _to_bhtd(do)
  ks_t, vs_t = [_to_bhtd(k) for k in ks], [_to_bhtd(v) for v in vs]
  gate_t, qseg, kseg = _row_inputs(seg, gate)
  lse_st = jnp.stack(lses)  # [nb, B, Hq, Tp, LANES]
  delta_st = jnp.broadcast_to(
      jnp.stack([jnp.transpose(x, (0, 2, 1)) for x in deltas])[..., None], lse_st.shape)
  x = _BwdInputs(q_t, list(zip(ks_t, vs_t)), do_t, gate_t, qseg, kseg, lse_st, delta_st)
  common = dict(windows=windows, grp=grp, scale=q.shape[-1] ** -0.5, interpret=interpret)
  dq = _dq(x, bq=cfg.block_q, bk=cfg.block_k, **common)
  dks, dvs = _dkv(x, bq=cfg.block_q_bwd, bk=cfg.block_k_bwd, **common)
  return _to_bhtd(dq), dks, dvs


def _dq(x: _BwdInputs, *, windows: tuple, bq: int, bk: int, grp: int, scale: float,
        interpret: bool):
  """dQ [B, Hq, Tp, D] over the forward's query-major table; each step reads the log-sum-exp and
  delta rows of its own branch."""
  b, hq, tp, d = x.q.shape
  has_seg = x.qseg is not None
  tables = step_table(tp, bq, bk, windows, has_seg)

  def rowmap(bi, h, s, qt, bt, *_):
    return bt[s], bi, h, qt[s], 0

  q_spec, in_specs, args = _query_major_inputs(x.q, x.kvs, x.do, x.gate, x.qseg, x.kseg, bq=bq,
                                               bk=bk, grp=grp)
  row_spec = pl.BlockSpec((None, None, None, bq, LANES), rowmap)
  in_specs += [row_spec, row_spec]
  args += [x.lse, x.delta]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables), grid=(b, hq, len(tables[0])), in_specs=in_specs,
      out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, d), f32)])
  return pl.pallas_call(
      functools.partial(_dq_kernel, windows=windows, bq=bq, bk=bk, scale=scale, has_seg=has_seg),
      grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, hq, tp, d), x.q.dtype),
      compiler_params=_params(), interpret=interpret, name='attn_bwd_dq_tpu')(
          *[jnp.asarray(t) for t in tables], *args)


def _dkv(x: _BwdInputs, *, windows: tuple, bq: int, bk: int, grp: int, scale: float,
         interpret: bool):
  """Per branch dK and dV [B, Tp, Hkv, D] over a key-major table of (key block, branch, head in
  group, query block)."""
  b, hq, tp, d = x.q.shape
  nb = len(windows)
  has_seg = x.qseg is not None
  tables = dkv_step_table(tp, bq, bk, windows, grp, has_seg)

  def qgmap(bi, h, s, kt, bt, gt, qt, ft):
    return bi, h * grp + gt[s], qt[s], 0

  def kvmap(bi, h, s, kt, *_):
    return bi, h, kt[s], 0

  def rowgmap(bi, h, s, kt, bt, gt, qt, ft):
    return bt[s], bi, h * grp + gt[s], qt[s], 0

  qg_spec = pl.BlockSpec((None, None, bq, d), qgmap)
  kv_spec = pl.BlockSpec((None, None, bk, d), kvmap)
  in_specs, args = [qg_spec], [x.q]
  for k, v in x.kvs:
    in_specs += [kv_spec, kv_spec]
    args += [k, v]
  in_specs.append(qg_spec)
  args.append(x.do)
  if nb == 2:
    in_specs.append(pl.BlockSpec((None, None, bq, 1), qgmap))
    args.append(x.gate)
  if has_seg:
    in_specs += [
        pl.BlockSpec((None, bq, 1), lambda bi, h, s, kt, bt, gt, qt, ft: (bi, qt[s], 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, h, s, kt, *_: (bi, 0, kt[s]))]
    args += [x.qseg, x.kseg]
  row_spec = pl.BlockSpec((None, None, None, bq, LANES), rowgmap)
  in_specs += [row_spec, row_spec]
  args += [x.lse, x.delta]
  out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for kv in x.kvs for a in kv]
  out_specs = [kv_spec] * (2 * nb)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables), grid=(b, x.kvs[0][0].shape[1], len(tables[0])),
      in_specs=in_specs, out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bk, d), f32)] * (2 * nb))
  res = pl.pallas_call(
      functools.partial(_dkv_kernel, windows=windows, bq=bq, bk=bk, scale=scale,
                        has_seg=has_seg),
      grid_spec=grid_spec, out_shape=out_shape, compiler_params=_params(), interpret=interpret,
      name='attn_bwd_dkv_tpu')(*[jnp.asarray(t) for t in tables], *args)
  dks = [_to_bhtd(r) for r in res[0::2]]
  dvs = [_to_bhtd(r) for r in res[1::2]]
  return dks, dvs
