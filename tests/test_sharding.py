"""Sharded training equals single-device training; an 8-device checkpoint restores onto 1 device.

The 8 devices are conftest's simulated CPU devices. Every weight of the tiny model is split for
real: 'embed' (32) over fsdp=2, heads / kv_heads / mlp / vocab over tensor=2.
"""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_model_config
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import optimizer as opt_lib
from plt_jax import sharding as sharding_lib
from plt_jax import train

MODEL = tiny_model_config(vocab_size=64)
STEPS = 10
B, S = 8, 16


def opt_config():
  c = opt_lib.default_optimizer_config()
  c.peak_lr = 1e-2
  return c


@functools.lru_cache(maxsize=None)
def program(devices: int) -> train.Program:
  mesh = (sharding_lib.make_mesh(2, 2, 2) if devices == 8 else
          sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  return train.Program.get(MODEL, opt_config(), STEPS, mesh, grad_accum=2)


def batches(n):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    cut = rng.integers(3, S - 3, B)
    col = np.arange(S)[None]
    out.append(dict(
        inputs=rng.integers(0, 64, (B, S)).astype(np.int32),
        targets=rng.integers(0, 64, (B, S)).astype(np.int32),
        positions=np.where(col < cut[:, None], col, col - cut[:, None]).astype(np.int32),
        segment_ids=np.where(col < cut[:, None], 1, 2).astype(np.int32),
        loss_mask=(rng.random((B, S)) > 0.2).astype(np.float32)))
  return out


def run(devices, state, data):
  prog = program(devices)
  bsh = sharding_lib.batch_sharding(prog.mesh)
  losses = []
  for b in data:
    state, m = prog.train_step(state, train.device_batch(b, bsh))
    losses.append(float(m['loss']))
  return state, losses


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope='module')
def two_steps():
  data = batches(3)
  s8, l8 = run(8, program(8).init(0), data[:2])
  s1, l1 = run(1, program(1).init(0), data[:2])
  return data, (s8, l8), (s1, l1)


def test_params_and_adam_moments_are_really_sharded():
  state = program(8).init(0)
  model = state['model']
  spec = lambda x: x.sharding.spec
  kernel = model['layers'][0]['mlp']['gate_proj']['kernel']
  assert spec(kernel) == P('fsdp', 'tensor')
  assert spec(model['embed_tokens']['embedding']) == P('tensor', 'fsdp')
  assert spec(model['layers'][0]['self_attn']['o_proj']['kernel']) == P('tensor', 'fsdp')
  assert spec(model['layers'][0]['input_layernorm']['weight']) == P(None)
  adam = state['optimizer']['opt_state'][1][0]      # (clip, (scale_by_adam, ...))
  assert spec(adam['mu']['layers'][0]['mlp']['gate_proj']['kernel']) == P('fsdp', 'tensor')
  assert spec(adam['nu']['lm_head']['kernel']) == P('fsdp', 'tensor')
  assert kernel.addressable_shards[0].data.shape == (16, 24)       # [32, 48] / (2, 2)
  # Sharded initialisation draws the same numbers as the single-device one.
  one = program(1).init(0)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(one)))


def test_eight_devices_give_the_same_losses_as_one(two_steps):
  data, (s8, l8), (s1, l1) = two_steps
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=0)
  init = leaves(program(1).init(0)['model'])
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s1['model']), init))
  assert moved > 1e-3                                   # two real updates happened
  for a, b in zip(leaves(s8['model']), leaves(s1['model'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_restore_an_eight_device_checkpoint_onto_one_device(two_steps, tmp_path):
  data, (s8, _), _ = two_steps
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  ckpt.save(2, s8['model'], s8['optimizer'], None, {'note': 'mesh 2x2x2'})
  ckpt.wait()
  assert ckpt.all_steps() == [2]
  p1 = program(1)
  restored = ckpt.restore(
      2, params_target=ckpt_lib.abstract_tree(p1.abstract['model'], p1.shardings['model']),
      opt_target=ckpt_lib.abstract_tree(p1.abstract['optimizer'], p1.shardings['optimizer']))
  state1 = ckpt_lib.tree_into_state(
      p1.abstract, {'model': restored['params'], 'optimizer': restored['opt_state']})
  assert all(np.array_equal(a, b) for a, b in zip(leaves(state1), leaves(s8)))
  one_device = {jax.devices()[0]}
  assert all(x.sharding.device_set == one_device for x in jax.tree.leaves(state1))
  # A different 8-device layout restores too (no compile needed to place it).
  mesh = sharding_lib.make_mesh(1, 4, 2)
  sh = sharding_lib.param_shardings(p1.abstract, mesh)
  other = ckpt.restore(2, params_target=ckpt_lib.abstract_tree(p1.abstract['model'], sh['model']))
  emb = other['params']['embed_tokens']['embedding']
  assert emb.sharding.spec == P('tensor', 'fsdp') and len(emb.sharding.device_set) == 8
  assert np.array_equal(np.asarray(emb), np.asarray(s8['model']['embed_tokens']['embedding']))
  ckpt.close()
  # Training goes on from the restored state on 1 device exactly as on 8.
  _, l1 = run(1, state1, data[2:])
  _, l8 = run(8, s8, data[2:])
  np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# The Pallas kernels run per shard wherever the model runs on a mesh: prefill and evaluation too.
def _pallas_calls(jaxpr, inside_shard_map=False, out=None):
  """(inside a shard_map?, batch size of the first operand) of every pallas_call, nested jaxprs
  (jit, custom_vjp, shard_map bodies) included."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      out.append((inside_shard_map, eqn.invars[0].aval.shape[0]))
    inner = inside_shard_map or eqn.primitive.name == 'shard_map'
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          _pallas_calls(sub, inner, out)
  return out


def _mesh2():
  return sharding_lib.ShardingConfig(sharding_lib.make_mesh(2, 1, 1, devices=jax.devices()[:2]))


def _model(attention_impl='pallas'):
  """The same weights whatever the backend (the seed decides them)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from plt_jax.model import PLT  # pylint: disable=import-outside-toplevel
  return PLT(MODEL.replace(num_loops=2, attention_impl=attention_impl), nnx.Rngs(3))


def test_prefill_on_a_mesh_runs_the_pallas_kernel_per_shard():
  from plt_jax.infer import decode  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 2:
    pytest.skip('needs 2 (fake) devices')
  model = _model()
  shd = _mesh2()
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(0, 64, n)) for n in (9, 14)]
  dec = decode.Decoder(model, 24, sharding=shd)
  assert dec.runtime.attention.name == 'pallas' and dec.runtime.sharding == shd
  tokens = jax.numpy.asarray(decode.pad_prompts(prompts, 14))
  lengths = jax.numpy.asarray([9, 14], dtype=np.int32)
  jaxpr = jax.make_jaxpr(lambda t, n: decode.prefill(model, t, n, 24, rt=dec.runtime))(
      tokens, lengths).jaxpr
  calls = _pallas_calls(jaxpr)
  # Forward only: loop 1's causal call and loop 2's G-SWA call, one per layer.
  assert len(calls) == 2 * MODEL.num_layers, calls
  assert all(inside and batch == 1 for inside, batch in calls), calls  # 2 rows over 2 devices
  logits, _ = dec.prefill(prompts)
  ref, _ = decode.Decoder(model, 24, attention='xla').prefill(prompts)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_perplexity_on_a_mesh_runs_the_pallas_kernel_per_shard():
  from plt_jax.evaluation import perplexity  # pylint: disable=import-outside-toplevel
  from plt_jax.runtime import Runtime  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 2:
    pytest.skip('needs 2 (fake) devices')
  model = _model()
  shd = _mesh2()
  batch = {k: v[:2] for k, v in batches(1)[0].items()}  # packed rows: two documents each
  rt = Runtime.for_model(model.cfg, sharding=shd)
  jaxpr = jax.make_jaxpr(lambda *a: model(*a, runtime=rt))(
      batch['inputs'], batch['positions'], batch['segment_ids']).jaxpr
  calls = _pallas_calls(jaxpr)
  assert len(calls) == 2 * MODEL.num_layers, calls
  assert all(inside and b == 1 for inside, b in calls), calls
  got = perplexity.make_nll_fn(model, sharding=shd)(batch)
  want = perplexity.make_nll_fn(_model('xla'))(batch)
  assert got.shape == (2, S) and np.isfinite(got).all() and got.mean() > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
