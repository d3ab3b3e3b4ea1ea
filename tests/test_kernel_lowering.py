"""The Pallas kernels lowered for the accelerators from a CPU: Mosaic (TPU) and Triton (CUDA).

No accelerator runs these tests, but `jax.export` lowers a function for another platform from a
CPU. Each case exports either the forward (the output alone) or the gradient (the forward with its
residuals, then dQ and dK/dV) at head dim 128 in bfloat16, T = 2048, and checks the lowered module:
one custom call per kernel with the kernel's name, the launch grid that the block sizes give
(Triton) or the step table that the visible block pairs give (Mosaic), and the exported shapes.
Nothing is compiled or run.

The Triton custom call comes with no export compatibility guarantee, so the CUDA export disables
that one check (`DisabledSafetyCheck.custom_call`); the Mosaic call is a guaranteed target. Triton
lowers for a compute capability, which jax takes from the GPU it sees: the CUDA export runs under
an abstract mesh whose device is an H100 (jax 0.11 and later refuse to lower without one).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from plt_jax.kernels import gswa_tpu, gswa_triton, ops

TRITON_TARGET = '__gpu$xla.gpu.triton'
MOSAIC_TARGET = 'tpu_custom_call'
BACKEND = {'tpu': 'tpu', 'cuda': 'triton'}
# Triton lowers for the compute capability of the GPU it sees; with none (newer jax asks for one)
# an abstract device names it: an H100.
GPU_MESH = jax.sharding.AbstractMesh(
    (1,), ('x',), (jax.sharding.AxisType.Explicit,),
    abstract_device=jax.sharding.AbstractDevice(
        device_kind='NVIDIA H100 80GB HBM3', num_cores=132, platform='gpu'))
D = 128

# kind, window (None: plain causal), packed segments
CASES = [
    ('gswa', 65, True),
    ('gswa', 512, True),
    ('gswa', 512, False),
    ('causal', None, True),
    ('causal', 65, True),
    ('causal', 512, False),
]


def _structs(b, t, hq, hkv, kind, with_seg):
  bf16 = jnp.bfloat16
  q = jax.ShapeDtypeStruct((b, t, hq, D), bf16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, D), bf16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if with_seg else None
  if kind == 'gswa':
    return (q, kv, kv, kv, kv, jax.ShapeDtypeStruct((b, t, hq), jnp.float32)), seg
  return (q, kv, kv), seg


def _export(platform, kind, window, mode, args, seg):
  op = ops.gswa if kind == 'gswa' else ops.causal
  n = len(args)

  def attention(*xs):  # the float inputs, then the segment ids when there are any
    return op(*xs[:n], xs[n] if len(xs) > n else None, window=window, backend=BACKEND[platform],
              interpret=False)

  fn = attention
  if mode == 'gradient':
    fn = jax.grad(lambda *xs: jnp.sum(attention(*xs).astype(jnp.float32)), argnums=tuple(range(n)))
  inputs = args + ((seg,) if seg is not None else ())
  if platform == 'tpu':
    return export.export(jax.jit(fn), platforms=('tpu',))(*inputs)
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_TARGET)]
  with jax.sharding.use_abstract_mesh(GPU_MESH):
    return export.export(jax.jit(fn), platforms=('cuda',), disabled_checks=checks)(*inputs)


def _custom_calls(text):
  """[(target, line)] of every custom call in the module, in order."""
  return [(m.group(1), line) for line in text.splitlines()
          for m in [re.search(r'stablehlo\.custom_call @([\w$.]+)\(', line)] if m]


def _visible_block_pairs(t_pad, bq, bk, window):
  """Brute force over positions: the (query block, key block) pairs holding a visible pair."""
  i = np.arange(t_pad)[:, None]
  j = np.arange(t_pad)[None, :]
  vis = (j <= i) & ((i - j < window) if window is not None else True)
  return int(vis.reshape(t_pad // bq, bq, t_pad // bk, bk).any(axis=(1, 3)).sum())


def _expected_names(platform, kind, mode):
  suffix = '_tpu' if platform == 'tpu' else ''
  names = [f'{kind}_fwd{suffix}']
  if mode == 'gradient':
    names += [f'attn_bwd_dq{suffix}', f'attn_bwd_dkv{suffix}']
  return names


def _check_triton(calls, names, b, t, hq, hkv):
  cfg = gswa_triton.DEFAULT_CONFIG.fit(t, gswa_triton.MIN_BLOCK)
  tp = cfg.padded_len(t)
  grids = {'gswa_fwd': (tp // cfg.block_q, b, hq), 'causal_fwd': (tp // cfg.block_q, b, hq),
           'attn_bwd_dq': (tp // cfg.block_q, b, hq),
           'attn_bwd_dkv': (tp // cfg.block_k_bwd, b, hkv)}
  got = []
  for target, line in calls:
    assert target == TRITON_TARGET, target
    name = re.search(r'\bname = "(\w+)"', line).group(1)
    grid = tuple(int(re.search(rf'\bgrid_{a} = (\d+) : i32', line).group(1)) for a in 'xyz')
    assert grid == grids[name], (name, grid, grids[name])
    assert re.search(r'\bnum_warps = 8 : i32', line), name  # head dim 128: 8 warps
    got.append(name)
  assert sorted(got) == sorted(names), got


def _check_mosaic(calls, names, t, hq, hkv, windows):
  cfg = gswa_tpu.DEFAULT_CONFIG.fit(t, gswa_tpu.MIN_BLOCK)
  tp = cfg.padded_len(t)
  # Query-major steps (forward, dQ): the visible block pairs of every branch; key-major steps
  # (dK/dV): the same pairs at the backward's blocks, once per query head of a kv head.
  fwd_steps = sum(_visible_block_pairs(tp, cfg.block_q, cfg.block_k, w) for w in windows)
  dkv_steps = (hq // hkv) * sum(
      _visible_block_pairs(tp, cfg.block_q_bwd, cfg.block_k_bwd, w) for w in windows)
  tables = {'dkv': (5, dkv_steps), 'other': (3 + len(windows), fwd_steps)}
  got = []
  for target, line in calls:
    assert target == MOSAIC_TARGET, target
    name = re.search(r'\bkernel_name = "(\w+)"', line).group(1)
    operand_types = re.search(r'\} : \(([^)]*)\) ->', line).group(1)
    lengths = [int(n) for n in re.findall(r'tensor<(\d+)xi32>', operand_types)]
    n_tables, steps = tables['dkv' if name == 'attn_bwd_dkv_tpu' else 'other']
    assert lengths[:n_tables] == [steps] * n_tables, (name, lengths, steps)
    got.append(name)
  assert sorted(got) == sorted(names), got


def _check(platform, kind, window, mode, b, t, hq, hkv, with_seg):
  args, seg = _structs(b, t, hq, hkv, kind, with_seg)
  exp = _export(platform, kind, window, mode, args, seg)
  assert exp.platforms == (platform,)
  want = [args[0]] if mode == 'forward' else list(args)
  assert [(a.shape, a.dtype) for a in exp.out_avals] == [(a.shape, a.dtype) for a in want]
  text = exp.mlir_module()
  calls = _custom_calls(text)
  names = _expected_names(platform, kind, mode)
  windows = (None, window) if kind == 'gswa' else (window,)
  if platform == 'cuda':
    _check_triton(calls, names, b, t, hq, hkv)
  else:
    _check_mosaic(calls, names, t, hq, hkv, windows)


@pytest.mark.parametrize('mode', ['forward', 'gradient'])
@pytest.mark.parametrize('kind,window,with_seg', CASES)
@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_lowers(platform, kind, window, with_seg, mode):
  """T = 2048, batch 2, GQA group 2 (4 query heads, 2 kv heads)."""
  _check(platform, kind, window, mode, b=2, t=2048, hq=4, hkv=2, with_seg=with_seg)


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_lowers_padded_length_and_group_5(platform):
  """T = 1000 (padded to the blocks inside the op), GQA group 5, packed segments, gradient."""
  _check(platform, 'gswa', 65, 'gradient', b=1, t=1000, hq=10, hkv=2, with_seg=True)


def test_visible_block_pairs():
  """The brute-force count behind the Mosaic checks, on cases counted by hand: 4 query blocks of
  512 see 1 + 2 + 3 + 4 key blocks causally, but only their own and the one before with W = 65."""
  tp, bq = 2048, 512
  assert _visible_block_pairs(tp, bq, bq, None) == 10  # 4 query blocks: 1 + 2 + 3 + 4
  assert _visible_block_pairs(tp, bq, bq, 65) == 7     # the diagonal, and one block back
  assert _visible_block_pairs(tp, bq, bq, 1) == 4
