"""The differentiable entry points: padding, jax.custom_vjp, and backend dispatch.

`causal(q, k, v, segment_ids=None, *, window=None)` and
`gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window)` have the signatures and
semantics of `plt_jax.attention.reference_causal` / `reference_gswa` (S == T: query i sits at key i).

Backends: 'triton' (Pallas-Triton, GPU) and 'tpu' (Pallas-Mosaic, TPU, splash style). `backend=None`
picks by `jax.default_backend()` ('triton' on CPU). Off GPU/TPU the kernels run in Pallas interpret
mode: correct but slow, for tests only.

The gate gradient. The interface receives g after the sigmoid, so this op returns
d g = rowsum(dO * (O_glob - O_loc)) per (token, head); the model differentiates through the sigmoid.
Both branch outputs are kept as residuals (in the input dtype), with each branch's log-sum-exp.

`shard=(mesh, batch_axes, head_axes)`: run per shard through shard_map, split over batch and heads
(a head split must keep each query head with its kv head), so operands are never gathered. The
caller (`plt_jax.attention`) derives it from the model's sharding rules.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .common import KernelConfig, pad_seq


def _backend_module(name: str):
  # Each backend loads its own Pallas lowering (Triton or Mosaic): only the one in use is imported.
  if name == 'triton':
    from . import gswa_triton  # pylint: disable=import-outside-toplevel
    return gswa_triton
  if name == 'tpu':
    from . import gswa_tpu  # pylint: disable=import-outside-toplevel
    return gswa_tpu
  raise ValueError(f'unknown Pallas backend {name!r}; expected "triton" or "tpu"')


def default_backend() -> str:
  """'tpu' on TPU, else 'triton' (GPU; interpret mode on CPU)."""
  return 'tpu' if jax.default_backend() == 'tpu' else 'triton'


def default_interpret() -> bool:
  return jax.default_backend() not in ('gpu', 'tpu')


@dataclasses.dataclass(frozen=True)
class _Static:
  backend: str
  windows: tuple
  cfg: KernelConfig
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, ks, vs, gate, seg):
  mod = _backend_module(st.backend)
  out, _, _ = mod.fwd(q, ks, vs, gate, seg, windows=st.windows, cfg=st.cfg, save=False,
                      interpret=st.interpret)
  return out


def _attention_fwd(st: _Static, q, ks, vs, gate, seg):
  mod = _backend_module(st.backend)
  out, obs, lses = mod.fwd(q, ks, vs, gate, seg, windows=st.windows, cfg=st.cfg, save=True,
                           interpret=st.interpret)
  return out, (q, ks, vs, gate, seg, obs if obs is not None else [out], lses)


def _attention_bwd(st: _Static, res, do):
  q, ks, vs, gate, seg, obs, lses = res
  mod = _backend_module(st.backend)
  do32 = do.astype(jnp.float32)
  deltas = [jnp.sum(do32 * o.astype(jnp.float32), axis=-1) for o in obs]  # [B, Tp, Hq]
  dq, dks, dvs = mod.bwd(q, ks, vs, gate, seg, lses, deltas, do, windows=st.windows, cfg=st.cfg,
                         interpret=st.interpret)
  dgate = None
  if gate is not None:
    dgate = (deltas[0] - deltas[1]).astype(gate.dtype)
  return dq, tuple(dks), tuple(dvs), dgate, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _run(q, ks, vs, gate, segment_ids, windows, backend, config, interpret, shard=None):
  b, s, hq, d = q.shape
  t = ks[0].shape[1]
  if s != t:
    raise ValueError(f'Pallas attention needs S == T (training layout); got S={s}, T={t}')
  if hq % ks[0].shape[2]:
    raise ValueError(f'num heads {hq} must be a multiple of kv heads {ks[0].shape[2]}')
  backend = backend or default_backend()
  interpret = default_interpret() if interpret is None else interpret
  mod = _backend_module(backend)
  cfg = (config or mod.DEFAULT_CONFIG).fit(t, mod.MIN_BLOCK)
  tp = cfg.padded_len(t)
  st = _Static(backend, tuple(windows), cfg, bool(interpret))
  gate = None if gate is None else gate.astype(jnp.float32)
  segment_ids = None if segment_ids is None else segment_ids.astype(jnp.int32)

  def local(q, ks, vs, gate, seg):
    qp = pad_seq(q, tp)
    ksp = tuple(pad_seq(k, tp) for k in ks)
    vsp = tuple(pad_seq(v, tp) for v in vs)
    gp = pad_seq(gate, tp, 0.5)
    segp = pad_seq(seg, tp)
    return _attention(st, qp, ksp, vsp, gp, segp)[:, :s]

  if shard is None:
    return local(q, ks, vs, gate, segment_ids)
  mesh, b_ax, h_ax = shard
  heads = P(b_ax, None, h_ax, None)
  specs = (heads, tuple(heads for _ in ks), tuple(heads for _ in vs),
           None if gate is None else P(b_ax, None, h_ax),
           None if segment_ids is None else P(b_ax, None))
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(
      q, tuple(ks), tuple(vs), gate, segment_ids)


def causal(q, k, v, segment_ids=None, *, window: Optional[int] = None, backend=None, config=None,
           interpret=None, shard=None):
  """Causal (optionally sliding-window) flash attention; drop-in for `reference_causal`."""
  return _run(q, (k,), (v,), None, segment_ids, (window,), backend, config, interpret, shard)


def gswa(q, k_glob, v_glob, k_loc, v_loc, gate, segment_ids=None, *, window: int, backend=None,
         config=None, interpret=None, shard=None):
  """Fused gated shared-KV sliding-window attention; drop-in for `reference_gswa`."""
  if window is None or window < 1:
    raise ValueError(f'gswa needs a window >= 1, got {window!r}')
  return _run(q, (k_glob, k_loc), (v_glob, v_loc), gate, segment_ids, (None, window), backend,
              config, interpret, shard)
