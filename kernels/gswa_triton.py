"""Pallas-Triton (GPU) kernels: fused G-SWA and plain causal flash attention, forward and backward.

Layout: the model's own [B, T, H, D], no transposes. One kernel handles one or two "branches"
(`windows`, see common.py): a single branch is (windowed) causal attention; two branches are G-SWA,
branch 0 = causal over loop 1's keys, branch 1 = the sliding window over the loop's own keys,
mixed per head as g * O_0 + (1 - g) * O_1.

  forward  grid (nq, B, Hq): per query block, one fori_loop over each branch's key blocks
           [a, d) from `kv_block_bounds` (for the window branch a = max(0, q0-W+1)//bk, so key
           blocks wholly outside the window are never visited: O(T*W)); blocks that are fully
           visible skip the mask. Online softmax in float32.
  dQ       grid (nq, B, Hq): the same loops, recomputing P from the saved log-sum-exp; a single
           dQ accumulator for both branches.
  dK/dV    grid (nk, B, Hkv): per key block, loops over the G query heads of its group and the
           query blocks that can see it (`q_block_bounds`); one (dK, dV) pair per branch.

Inputs must be padded to a multiple of every block size (ops.py does it).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from .common import BIG_LSE, NEG_INF, KernelConfig, kv_block_bounds, q_block_bounds
from .masks import visible

f32 = jnp.float32
MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16.
DEFAULT_CONFIG = KernelConfig()


def _params(cfg: KernelConfig, head_dim: int):
  warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
  return pltr.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _loop_ranges(bounds, has_seg: bool):
  """(start, stop, masked) pieces: masked edges and an unmasked interior."""
  a, b, c, d = bounds
  if has_seg:  # segment boundaries can fall anywhere: mask every block
    return [(a, d, True)]
  return [(a, b, True), (b, c, False), (c, d, True)]


def _fwd_kernel(*refs, windows, bq, bk, scale, has_seg, save):
  nb = len(windows)
  refs = list(refs)
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
  o_ref = refs.pop(0)
  ob_refs = [refs.pop(0) for _ in range(nb)] if (save and nb == 2) else []
  lse_refs = [refs.pop(0) for _ in range(nb)] if save else []

  q0 = pl.program_id(0) * bq
  q = q_ref[...]
  d = q.shape[-1]
  q_pos = (q0 + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_seg = qseg_ref[...][:, None] if has_seg else None

  outs = []
  for br, window in enumerate(windows):
    k_ref, v_ref = kv_refs[br]

    def body(kb, carry, masked, k_ref=k_ref, v_ref=v_ref, window=window):
      m, l, acc = carry
      k0 = kb * bk
      k = k_ref[pl.ds(k0, bk), :]
      v = v_ref[pl.ds(k0, bk), :]
      s = jnp.dot(q, k.T, preferred_element_type=f32) * scale
      if masked:
        k_pos = (k0 + jnp.arange(bk, dtype=jnp.int32))[None, :]
        k_seg = kseg_ref[pl.ds(k0, bk)][None, :] if has_seg else None
        mask = visible(q_pos, k_pos, window, q_seg, k_seg)
        s = jnp.where(mask, s, NEG_INF)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[:, None])
      if masked:
        p = jnp.where(mask, p, 0.0)
      l = alpha * l + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
      return m_new, l, acc

    carry = (jnp.full((bq,), NEG_INF, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, d), f32))
    for start, stop, masked in _loop_ranges(kv_block_bounds(q0, bq, bk, window), has_seg):
      carry = jax.lax.fori_loop(start, stop, functools.partial(body, masked=masked), carry)
    m, l, acc = carry
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_b = (acc / l_safe[:, None]).astype(o_ref.dtype)
    outs.append(o_b)
    if save:
      lse_refs[br][...] = jnp.where(empty, BIG_LSE, m + jnp.log(l_safe))
      if nb == 2:
        ob_refs[br][...] = o_b

  if nb == 1:
    o_ref[...] = outs[0]
  else:
    g = gate_ref[...].astype(f32)[:, None]
    o_ref[...] = (g * outs[0].astype(f32) + (1.0 - g) * outs[1].astype(f32)).astype(o_ref.dtype)


def fwd(q, ks: Sequence, vs: Sequence, gate, seg, *, windows: tuple, cfg: KernelConfig,
        save: bool, interpret: bool):
  """Padded [B, Tp, H, D] inputs. Returns (out, branch_outs, residual).

  branch_outs: the per-branch outputs (two-branch calls with save) else None; residual: the
  per-branch log-sum-exp [B, Hq, Tp] (save) else None.
  """
  b, tp, hq, d = q.shape
  hkv = ks[0].shape[2]
  grp = hq // hkv
  nb = len(windows)
  bq, bk = cfg.block_q, cfg.block_k
  nq = tp // bq
  has_seg = seg is not None

  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0))
  kv_spec = pl.BlockSpec((None, tp, None, d), lambda i, bi, h: (bi, 0, jax.lax.div(h, grp), 0))
  in_specs, args = [q_spec], [q]
  for k, v in zip(ks, vs):
    in_specs += [kv_spec, kv_spec]
    args += [k, v]
  if nb == 2:
    in_specs.append(pl.BlockSpec((None, bq, None), lambda i, bi, h: (bi, i, h)))
    args.append(gate)
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                 pl.BlockSpec((None, tp), lambda i, bi, h: (bi, 0))]
    args += [seg, seg]

  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [q_spec]
  if save and nb == 2:
    out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype)] * nb
    out_specs += [q_spec] * nb
  if save:
    out_shape += [jax.ShapeDtypeStruct((b, hq, tp), f32)] * nb
    out_specs += [pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))] * nb

  kernel = functools.partial(_fwd_kernel, windows=windows, bq=bq, bk=bk, scale=d ** -0.5,
                             has_seg=has_seg, save=save)
  res = pl.pallas_call(
      kernel, grid=(nq, b, hq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(cfg, d), interpret=interpret, name='gswa_fwd' if nb == 2
      else 'causal_fwd')(*args)
  res = list(res)
  out = res.pop(0)
  obs = [res.pop(0) for _ in range(nb)] if (save and nb == 2) else None
  lses = [res.pop(0) for _ in range(nb)] if save else None
  return out, obs, lses


# ------------------------------------------------------------------------------------------------
# Backward.  With c_0 = g, c_1 = 1 - g (c = 1 for one branch) and delta_b = rowsum(dO * O_b):
#   dP_b = c_b * dO V_b^T,  dS_b = P_b * (dP_b - c_b * delta_b) = c_b * P_b * (dO V_b^T - delta_b)
#   dQ = scale * sum_b dS_b K_b,  dK_b = scale * dS_b^T Q,  dV_b = (c_b P_b)^T dO.


def _dq_kernel(*refs, windows, bq, bk, scale, has_seg):
  nb = len(windows)
  refs = list(refs)
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  do_ref = refs.pop(0)
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
  lse_refs = [refs.pop(0) for _ in range(nb)]
  delta_refs = [refs.pop(0) for _ in range(nb)]
  (dq_ref,) = refs

  q0 = pl.program_id(0) * bq
  q = q_ref[...]
  do = do_ref[...]
  d = q.shape[-1]
  q_pos = (q0 + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_seg = qseg_ref[...][:, None] if has_seg else None
  dq = jnp.zeros((bq, d), f32)
  for br, window in enumerate(windows):
    k_ref, v_ref = kv_refs[br]
    lse = lse_refs[br][...][:, None]
    delta = delta_refs[br][...][:, None]

    def body(kb, acc, masked, k_ref=k_ref, v_ref=v_ref, window=window, lse=lse, delta=delta):
      k0 = kb * bk
      k = k_ref[pl.ds(k0, bk), :]
      v = v_ref[pl.ds(k0, bk), :]
      s = jnp.dot(q, k.T, preferred_element_type=f32) * scale
      p = jnp.exp(s - lse)
      if masked:
        k_pos = (k0 + jnp.arange(bk, dtype=jnp.int32))[None, :]
        k_seg = kseg_ref[pl.ds(k0, bk)][None, :] if has_seg else None
        p = jnp.where(visible(q_pos, k_pos, window, q_seg, k_seg), p, 0.0)
      dp = jnp.dot(do, v.T, preferred_element_type=f32)
      ds = p * (dp - delta)
      return acc + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

    acc = jnp.zeros((bq, d), f32)
    for start, stop, masked in _loop_ranges(kv_block_bounds(q0, bq, bk, window), has_seg):
      acc = jax.lax.fori_loop(start, stop, functools.partial(body, masked=masked), acc)
    if nb == 2:
      g = gate_ref[...].astype(f32)[:, None]
      acc = acc * (g if br == 0 else 1.0 - g)
    dq = dq + acc
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, windows, bq, bk, nq, grp, scale, has_seg):
  nb = len(windows)
  refs = list(refs)
  q_ref = refs.pop(0)
  kv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]
  do_ref = refs.pop(0)
  gate_ref = refs.pop(0) if nb == 2 else None
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
  lse_refs = [refs.pop(0) for _ in range(nb)]
  delta_refs = [refs.pop(0) for _ in range(nb)]
  dkv_refs = [(refs.pop(0), refs.pop(0)) for _ in range(nb)]

  k0 = pl.program_id(0) * bk
  k_pos = (k0 + jnp.arange(bk, dtype=jnp.int32))[None, :]
  k_seg = kseg_ref[...][None, :] if has_seg else None
  for br, window in enumerate(windows):
    k_ref, v_ref = kv_refs[br]
    k = k_ref[...]
    v = v_ref[...]
    d = k.shape[-1]
    lse_ref, delta_ref = lse_refs[br], delta_refs[br]

    def body(qb, carry, h, masked, window=window, lse_ref=lse_ref, delta_ref=delta_ref, br=br,
             k=k, v=v):
      dk, dv = carry
      q0 = qb * bq
      q = q_ref[pl.ds(q0, bq), h, :]
      do = do_ref[pl.ds(q0, bq), h, :]
      lse = lse_ref[h, pl.ds(q0, bq)][:, None]
      delta = delta_ref[h, pl.ds(q0, bq)][:, None]
      s = jnp.dot(q, k.T, preferred_element_type=f32) * scale
      p = jnp.exp(s - lse)
      if masked:
        q_pos = (q0 + jnp.arange(bq, dtype=jnp.int32))[:, None]
        q_seg = qseg_ref[pl.ds(q0, bq)][:, None] if has_seg else None
        p = jnp.where(visible(q_pos, k_pos, window, q_seg, k_seg), p, 0.0)
      if nb == 2:
        g = gate_ref[pl.ds(q0, bq), h].astype(f32)[:, None]
        p = p * (g if br == 0 else 1.0 - g)
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=f32)
      dp = jnp.dot(do, v.T, preferred_element_type=f32)
      ds = p * (dp - delta)
      dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=f32)
      return dk, dv

    ranges = _loop_ranges(q_block_bounds(k0, bq, bk, window, nq), has_seg)

    def head_body(h, carry, ranges=ranges, body=body):
      for start, stop, masked in ranges:
        carry = jax.lax.fori_loop(start, stop,
                                  functools.partial(body, h=h, masked=masked), carry)
      return carry

    zeros = jnp.zeros((bk, d), f32)
    dk, dv = jax.lax.fori_loop(0, grp, head_body, (zeros, zeros))
    dk_ref, dv_ref = dkv_refs[br]
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def bwd(q, ks, vs, gate, seg, lses, deltas, do, *, windows: tuple, cfg: KernelConfig,
        interpret: bool):
  """Padded inputs; lses from `fwd`; deltas: per-branch rowsum(dO * O_b) [B, Tp, Hq] float32.

  Returns dq, dks (per branch), dvs (per branch).
  """
  b, tp, hq, d = q.shape
  hkv = ks[0].shape[2]
  grp = hq // hkv
  nb = len(windows)
  has_seg = seg is not None
  scale = d ** -0.5
  deltas = [jnp.transpose(x, (0, 2, 1)) for x in deltas]  # [B, Hq, Tp], like the lse

  # dQ: one program per (query block, batch, query head).
  bq, bk = cfg.block_q, cfg.block_k
  nq = tp // bq
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0))
  kv_spec = pl.BlockSpec((None, tp, None, d), lambda i, bi, h: (bi, 0, jax.lax.div(h, grp), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))
  in_specs, args = [q_spec], [q]
  for k, v in zip(ks, vs):
    in_specs += [kv_spec, kv_spec]
    args += [k, v]
  in_specs.append(q_spec)
  args.append(do)
  if nb == 2:
    in_specs.append(pl.BlockSpec((None, bq, None), lambda i, bi, h: (bi, i, h)))
    args.append(gate)
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                 pl.BlockSpec((None, tp), lambda i, bi, h: (bi, 0))]
    args += [seg, seg]
  in_specs += [row_spec] * (2 * nb)
  args += list(lses) + list(deltas)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, windows=windows, bq=bq, bk=bk, scale=scale, has_seg=has_seg),
      grid=(nq, b, hq), in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_params(cfg, d),
      interpret=interpret, name='attn_bwd_dq')(*args)

  # dK, dV: one program per (key block, batch, kv head), looping over the group's query heads.
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk = tp // bq, tp // bk
  qg_spec = pl.BlockSpec((None, tp, grp, d), lambda j, bi, h: (bi, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0))
  rowg_spec = pl.BlockSpec((None, grp, tp), lambda j, bi, h: (bi, h, 0))
  in_specs, args = [qg_spec], [q]
  for k, v in zip(ks, vs):
    in_specs += [kv_spec, kv_spec]
    args += [k, v]
  in_specs.append(qg_spec)
  args.append(do)
  if nb == 2:
    in_specs.append(pl.BlockSpec((None, tp, grp), lambda j, bi, h: (bi, 0, h)))
    args.append(gate)
  if has_seg:
    in_specs += [pl.BlockSpec((None, tp), lambda j, bi, h: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j))]
    args += [seg, seg]
  in_specs += [rowg_spec] * (2 * nb)
  args += list(lses) + list(deltas)
  out_shape, out_specs = [], []
  for k, v in zip(ks, vs):
    out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs += [kv_spec, kv_spec]
  res = pl.pallas_call(
      functools.partial(_dkv_kernel, windows=windows, bq=bq, bk=bk, nq=nq, grp=grp, scale=scale,
                        has_seg=has_seg),
      grid=(nk, b, hkv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(cfg, d), interpret=interpret, name='attn_bwd_dkv')(*args)
  dks = list(res[0::2])
  dvs = list(res[1::2])
  return dq, dks, dvs
