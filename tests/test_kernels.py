"""Pallas attention kernels vs the float32 pure-JAX reference, in Pallas interpret mode on CPU.

The Triton-style (GPU) kernel is tested on the full grid: W in {1, bk-1, bk, bk+1, 3bk, >= T},
GQA groups 1/2/4, T not a block multiple, packed segments, gates near 0 and 1, f32 and bf16,
forward and all six gradients. The TPU-style (Mosaic) kernel runs a subset through the generic
interpret mode. Small blocks (8) keep interpret mode fast; compiled functions are shared (lru_cache)
and the gate variants reuse one compilation.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_params, tiny_model_config
from plt_jax import attention as attn
from plt_jax.model import PLT
from plt_jax.runtime import Runtime
from plt_jax.kernels import cudnn, gswa_tpu, gswa_triton, ops
from plt_jax.kernels.common import KernelConfig, kv_block_bounds, q_block_bounds

BK = 8
CFG = KernelConfig(BK, BK, BK, BK)
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2)}  # (forward, gradients)
GATES = ('random', 'near0', 'near1')
# Interpret-mode kernels are big HLO programs; XLA's backend optimisations only cost compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_segments(rng, b, t):
  """Packed documents 1, 2, 3, ... of random lengths, and trailing padding (segment 0)."""
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    pos, doc = 0, 1
    end = t - rng.integers(0, 4)
    while pos < end:
      n = int(rng.integers(3, max(4, t // 2)))
      seg[i, pos:min(end, pos + n)] = doc
      pos, doc = pos + n, doc + 1
  return jnp.asarray(seg)


def make_inputs(seed, b, t, hq, hkv, d, dtype, with_seg, gate_kind='random'):
  """Fresh normal q, k, v (numpy: no per-shape JAX compiles), gates and a cotangent."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d), np.float32)
  kv = [rng.standard_normal((b, t, hkv, d), np.float32) for _ in range(4)]
  shift = {'random': 0.0, 'near0': -9.0, 'near1': 9.0}[gate_kind]
  gate = 1.0 / (1.0 + np.exp(-(rng.standard_normal((b, t, hq), np.float32) + shift)))
  cot = jnp.asarray(rng.standard_normal((b, t, hq, d), np.float32))
  seg = make_segments(rng, b, t) if with_seg else None
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), *map(cast, kv), jnp.asarray(gate, jnp.float32)), seg, cot


@functools.lru_cache(maxsize=None)
def gswa_fns(backend, window, with_seg, dtype):
  """Jitted (out, grads) of the kernel and of the float32 reference, for one static config."""
  def kernel_loss(args, seg, cot):
    out = ops.gswa(*args, seg, window=window, backend=backend, config=CFG, interpret=True)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  def ref_loss(args, seg, cot):
    args = [a.astype(jnp.float32) for a in args]
    out = attn.reference_gswa(*args, seg, window=window)
    return jnp.sum(out * cot), out

  grad = lambda f: jit(jax.grad(f, has_aux=True))
  return grad(kernel_loss), grad(ref_loss)


@functools.lru_cache(maxsize=None)
def causal_fns(backend, window, with_seg, dtype):
  def kernel_loss(args, seg, cot):
    out = ops.causal(*args, seg, window=window, backend=backend, config=CFG, interpret=True)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  def ref_loss(args, seg, cot):
    args = [a.astype(jnp.float32) for a in args]
    out = attn.reference_causal(*args, seg, window=window)
    return jnp.sum(out * cot), out

  grad = lambda f: jit(jax.grad(f, has_aux=True))
  return grad(kernel_loss), grad(ref_loss)


def assert_close(got, want, tol, what):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  err = np.max(np.abs(got - want) / (1.0 + np.abs(want)))
  assert np.all(np.isfinite(got)), what
  assert err <= tol, f'{what}: max relative error {err:.3g} > {tol}'
  return err


def check_gswa(backend, window, groups, t, with_seg, dtype, hkv=2, b=2, d=16, seed=0,
               gates=GATES):
  kern, ref = gswa_fns(backend, window, with_seg, dtype)
  tol_f, tol_g = TOL[dtype]
  names = ('dq', 'dk_glob', 'dv_glob', 'dk_loc', 'dv_loc', 'dgate')
  for gate_kind in gates:
    args, seg, cot = make_inputs(seed, b, t, groups * hkv, hkv, d, dtype, with_seg, gate_kind)
    g_k, out_k = kern(args, seg, cot)
    g_r, out_r = ref(args, seg, cot)
    assert out_k.dtype == dtype and out_k.shape == out_r.shape
    assert_close(out_k, out_r, tol_f, f'{gate_kind} forward')
    for name, a, r in zip(names, g_k, g_r):
      assert a.shape == r.shape and a.dtype == args[names.index(name)].dtype
      assert_close(a, r, tol_g, f'{gate_kind} {name}')


# W in {1, bk-1, bk, bk+1, 3bk, >= T}; groups 1/2/4; T mostly not a multiple of bk; packed or not.
F32_GRID = [
    # window, groups, T, segments
    (1, 1, 37, True),
    (BK - 1, 2, 45, False),
    (BK, 4, 43, True),
    (BK + 1, 2, 40, False),
    (3 * BK, 1, 61, True),
    (70, 4, 53, False),
]


@pytest.mark.parametrize('window,groups,t,with_seg', F32_GRID)
def test_gswa_triton_f32(window, groups, t, with_seg):
  check_gswa('triton', window, groups, t, with_seg, jnp.float32)


def test_gswa_triton_bf16():
  check_gswa('triton', BK + 1, 2, 45, True, jnp.bfloat16, gates=('random', 'near1'))


@pytest.mark.parametrize('window,groups,t,with_seg', [(BK + 1, 2, 45, True), (1, 4, 30, False)])
def test_gswa_tpu_style_f32(window, groups, t, with_seg):
  check_gswa('tpu', window, groups, t, with_seg, jnp.float32, gates=('random', 'near0'))


@pytest.mark.parametrize('backend,window,groups,t,with_seg,dtype', [
    ('triton', None, 2, 45, True, jnp.float32),
    ('triton', 3 * BK, 4, 41, False, jnp.float32),
    ('tpu', None, 2, 38, True, jnp.float32),
])
def test_causal(backend, window, groups, t, with_seg, dtype):
  """The loop-1 path: plain (and windowed) causal flash attention, forward and dq/dk/dv."""
  kern, ref = causal_fns(backend, window, with_seg, dtype)
  tol_f, tol_g = TOL[dtype]
  hkv = 2
  args, seg, cot = make_inputs(3, 2, t, groups * hkv, hkv, 16, dtype, with_seg)
  args = (args[0], args[1], args[2])
  g_k, out_k = kern(args, seg, cot)
  g_r, out_r = ref(args, seg, cot)
  assert_close(out_k, out_r, tol_f, 'forward')
  for name, a, r in zip(('dq', 'dk', 'dv'), g_k, g_r):
    assert_close(a, r, tol_g, name)


# ------------------------------------------------------------------------------------------------
# O(T*W): the kernel visits exactly the key blocks that hold a visible (query, key) pair.
def analytic_pairs(t_pad, bq, bk, window):
  """Brute force over positions: per query block, the key blocks with any visible pair."""
  i = np.arange(t_pad)[:, None]
  j = np.arange(t_pad)[None, :]
  vis = (j <= i) & ((i - j < window) if window is not None else True)
  per_block = vis.reshape(t_pad // bq, bq, t_pad // bk, bk).any(axis=(1, 3))
  return per_block.sum(axis=1)  # [nq]


@pytest.mark.parametrize('bq,bk,windows', [(8, 8, (1, 7, 8, 9, 24, 70)), (16, 8, (1, 9, 24))])
def test_visited_key_blocks_triton(bq, bk, windows):
  """The Triton kernels' key-block loops (`_loop_ranges` over `kv_block_bounds`, with the traced
  int32 query offset the kernels use) against brute force over positions."""
  cfg = KernelConfig(bq, bk, bq, bk)
  t_pad = cfg.padded_len(61)
  nq = t_pad // bq
  q0s = np.arange(nq) * bq
  for window in windows:
    counts = np.zeros((nq, 2), np.int64)  # [query block, branch]
    for br, w in enumerate((None, window)):
      traced = jax.vmap(lambda q0, w=w: jnp.stack(kv_block_bounds(q0, bq, bk, w)))(
          jnp.asarray(q0s, jnp.int32))
      for qb, q0 in enumerate(q0s):
        bounds = kv_block_bounds(int(q0), bq, bk, w)
        np.testing.assert_array_equal(np.asarray(traced[qb]), bounds)
        for has_seg in (False, True):
          pieces = gswa_triton._loop_ranges(bounds, has_seg)
          assert all(p[1] == n[0] for p, n in zip(pieces, pieces[1:])), pieces
          steps = sum(max(0, stop - start) for start, stop, _ in pieces)
          assert steps == bounds[3] - bounds[0]
        counts[qb, br] = bounds[3] - bounds[0]
    np.testing.assert_array_equal(counts[:, 0], analytic_pairs(t_pad, bq, bk, None))
    np.testing.assert_array_equal(counts[:, 1], analytic_pairs(t_pad, bq, bk, window))
    # The local branch is O(T*W): at most ceil((W + bq - 1) / bk) + 1 blocks per query block.
    assert counts[:, 1].max() <= -(-(window + bq - 1) // bk) + 1
    if window == 1:  # the diagonal only: nq / (bq / bk) blocks... against ~nq^2/2 for the global
      assert counts[:, 1].sum() == t_pad // bk and counts[:, 0].sum() > 2 * t_pad // bk


def test_visited_tables_tpu_and_bounds():
  """The TPU kernel's grid is its step table; both tables and the bound helpers match brute force."""
  for bq, bk in [(8, 8), (16, 8), (8, 16), (128, 64)]:
    t_pad = 4 * max(bq, bk) * 3
    nq, nk = t_pad // bq, t_pad // bk
    for window in (1, 7, 8, 9, 24, 65, 10**6):
      qtab, brtab, flags = gswa_tpu.step_table(t_pad, bq, bk, (None, window), False)[:3]
      for br, w in enumerate((None, window)):
        cnt = np.bincount(qtab[brtab == br], minlength=nq)
        np.testing.assert_array_equal(cnt, analytic_pairs(t_pad, bq, bk, w))
      # Key-major (dK/dV) table, 2 heads per group: the transpose of the same pair set, per head.
      ktab, kbr, gtab, _, _ = gswa_tpu.dkv_step_table(t_pad, bq, bk, (None, window), 2, False)
      for br, w in enumerate((None, window)):
        i = np.arange(t_pad)[:, None]
        j = np.arange(t_pad)[None, :]
        vis = (j <= i) & ((i - j < w) if w is not None else True)
        want = vis.reshape(nq, bq, nk, bk).any(axis=(1, 3)).sum(axis=0) * 2
        np.testing.assert_array_equal(np.bincount(ktab[kbr == br], minlength=nk), want)
      # The unmasked interior is exactly the fully visible block pairs.
      for s in range(len(qtab)):
        w = (None, window)[brtab[s]]
        q0 = qtab[s] * bq
        a, b, c, d = kv_block_bounds(q0, bq, bk, w)
        i = np.arange(q0, q0 + bq)[:, None]
        kb = gswa_tpu.step_table(t_pad, bq, bk, (None, window), False)[3 + brtab[s]][s]
        j = np.arange(kb * bk, kb * bk + bk)[None, :]
        full = np.all((j <= i) & ((i - j < w) if w is not None else True))
        assert bool(flags[s] & gswa_tpu.MASKED) == (not full)
      for k0 in range(0, t_pad, bk):
        a, b, c, d = q_block_bounds(k0, bq, bk, window, nq)
        assert a <= b <= c <= d <= nq


# ------------------------------------------------------------------------------------------------
def test_backends_and_cudnn_baseline():
  assert attn.get_backend('pallas').name == 'pallas'
  assert attn.get_backend('cudnn').name == 'cudnn'
  assert attn.get_backend('auto') == attn.CPU(strict=False)  # CPU: the reference + decode kernel
  with pytest.raises(ValueError, match='unknown'):
    attn.get_backend('flash')
  # The cuDNN baseline's window / GQA / packing mapping (its XLA implementation on CPU).
  args, seg, _ = make_inputs(7, 2, 29, 4, 2, 16, jnp.float32, True)

  @jit
  def both(args, seg):
    outs = []
    for window in (1, 5, 40):
      outs.append((cudnn.gswa(*args, seg, window=window),
                   attn.reference_gswa(*args, seg, window=window)))
      outs.append((cudnn.causal(*args[:3], None, window=window),
                   attn.reference_causal(*args[:3], None, window=window)))
    return outs

  for i, (got, want) in enumerate(both(args, seg)):
    assert_close(got, want, 1e-5, f'cudnn case {i}')


# ------------------------------------------------------------------------------------------------
def test_model_drop_in():
  """attention_impl='pallas' (interpret mode): the whole model's loss and gradients equal XLA's."""
  cfg = tiny_model_config(attention_impl='xla')
  b, s = 2, 29
  tok = jax.random.randint(jax.random.key(1), (b, s), 0, cfg.vocab_size)
  seg = make_segments(np.random.default_rng(2), b, s)
  starts = np.concatenate([np.ones((b, 1), bool), np.asarray(seg[:, 1:] != seg[:, :-1])], 1)
  pos = np.zeros((b, s), np.int32)
  for i in range(b):
    for t in range(1, s):
      pos[i, t] = 0 if starts[i, t] else pos[i, t - 1] + 1
  pos = jnp.asarray(pos)

  # The graphdef from an abstract build (no eager init); random parameters from numpy, norms
  # around 1, everything else (gate included) far from its init.
  abstract = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  params = random_params(abstract, seed=3)

  def loss_and_grads(rt):
    def f(params):
      logits = nnx.merge(graphdef, params)(tok, pos, seg, runtime=rt)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], -1))

    return jit(jax.value_and_grad(f))(params)

  loss_x, grads_x = loss_and_grads(Runtime.for_model(cfg))
  loss_p, grads_p = loss_and_grads(Runtime(attn.Pallas(CFG, 'triton', True)))
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
  flat_x = jax.tree.leaves(grads_x)
  flat_p = jax.tree.leaves(grads_p)
  assert len(flat_x) == len(flat_p) > 10
  for a, r in zip(flat_p, flat_x):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
  gate_grad = grads_p['layers'][0]['self_attn']['plt_gate']['bias']
  assert float(jnp.max(jnp.abs(gate_grad[...]))) > 1e-4  # the gate path is really exercised


def test_sharded_mesh_runs_per_shard():
  """With the model's sharding (data x fsdp x tensor = 2x2x2 fake CPU devices) the Pallas
  backend runs per shard through shard_map (no gathers) and still matches the reference."""
  from plt_jax import sharding as sh  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  shd = sh.ShardingConfig(sh.make_mesh(2, 2, 2))
  args, seg, cot = make_inputs(11, 4, 29, 4, 2, 16, jnp.float32, True)
  backend = attn.Pallas(CFG, 'triton', True)

  def loss(args, seg, cot):
    out = backend.gswa(*args, seg, window=5, sharding=shd)
    return jnp.sum(out * cot), out

  f = jit(jax.grad(loss, has_aux=True))
  text = f.trace(args, seg, cot).lower().as_text()
  assert ('manual_computation' in text or 'shard_map' in text) and 'all_gather' not in text
  _, ref = gswa_fns('triton', 5, True, jnp.float32)
  (g_k, out_k), (g_r, out_r) = f(args, seg, cot), ref(args, seg, cot)
  assert_close(out_k, out_r, 1e-5, 'sharded forward')
  for a, r in zip(g_k, g_r):
    assert_close(a, r, 1e-4, 'sharded grads')
