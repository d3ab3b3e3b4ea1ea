"""Training tests: optimizer math, loss, gradient accumulation, FLOPs, the loop's hooks. Tiny
models on one device. The training runs are in tests/integration/test_train_runs.py.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import tiny_model_config, tiny_run_config
from plt_jax.train import flops as flops_lib
from plt_jax.train import optimizer as opt_lib
from plt_jax import sharding as sharding_lib
from plt_jax import train
from plt_jax.train import loop as train_loop
from plt_jax.config import ModelConfig
from plt_jax.model import PLT

# ------------------------------------------------------------------------------ optimizer

def test_schedule_warmup_then_cosine():
  c = opt_lib.default_optimizer_config()
  c.peak_lr, c.final_lr_fraction = 1e-3, 0.1
  total = 100                                        # 5% warmup = 5 steps
  lr = opt_lib.learning_rate_schedule(c, total)
  got = np.asarray(jax.jit(jax.vmap(lr))(jnp.arange(total)))
  np.testing.assert_allclose(got[:5], 1e-3 * np.arange(1, 6) / 5, rtol=1e-6)
  decay = np.arange(95) / 95                         # cosine from peak to 0.1 * peak
  want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * decay)))
  np.testing.assert_allclose(got[5:], want, rtol=1e-5)
  assert got[-1] > 1e-4 and np.all(np.diff(got[5:]) < 0)
  c.warmup_steps = 0
  assert float(opt_lib.learning_rate_schedule(c, total)(0)) == pytest.approx(1e-3)


def test_adamw_matches_the_paper_formula():
  """Two updates against a hand-written AdamW: clip 1.0, b=(0.9,0.95), eps, decoupled wd on
  matrices only."""
  c = opt_lib.default_optimizer_config()
  c.warmup_steps, c.schedule, c.peak_lr, c.eps = 0, 'constant', 0.01, 1e-3  # eps visible
  tx = opt_lib.make_optimizer(c, 10)
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 5)).astype(np.float32),
            'norm': rng.normal(size=(5,)).astype(np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  cur = params
  for t in (1, 2):
    grads = {k: (3.0 * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
    gnorm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert gnorm > 1.0                                 # clipping is active
    upd, state = update(grads, state, cur)
    cur = optax.apply_updates(cur, upd)
    for k in p:
      g = grads[k] / gnorm
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.95 * v[k] + 0.05 * g * g
      step = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-3)
      wd = 0.1 * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - 0.01 * (step + wd)
    for k in p:
      np.testing.assert_allclose(cur[k], p[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_on_the_model():
  cfg = tiny_model_config(vocab_size=64)
  state = nnx.state(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))), nnx.Param)
  flat = {'/'.join(map(str, k)): bool(v) for k, v in nnx.traversals.flatten_mapping(
      opt_lib.decay_mask(nnx.to_pure_dict(state))).items()}
  decayed = sorted(k for k, v in flat.items() if v)
  kept = sorted(k for k, v in flat.items() if not v)
  assert all(k.endswith(('kernel', 'embedding', 'plt_gate/weight')) for k in decayed)
  assert all(k.endswith(('norm/weight', 'layernorm/weight', 'plt_gate/bias')) for k in kept)
  # per layer: 7 kernels + gate weight decayed; 2 norms + gate_norm + gate bias kept
  assert len(decayed) == 8 + 2 and len(kept) == 4 + 1


# ----------------------------------------------------------------------- loss / accumulation

STEPS = 60
VOCAB = 384  # the byte tokenizer's 259 ids rounded up to a multiple of 128


def run_config() -> ml_collections.ConfigDict:
  return tiny_run_config(**{'optimizer.peak_lr': 1e-2})


@functools.lru_cache(maxsize=None)
def program(grad_accum: int):
  """The same compiled program as the in-process runs below (same model, optimizer, mesh)."""
  cfg = run_config()
  mcfg = ModelConfig.from_dict({**cfg.model.to_dict(), 'vocab_size': VOCAB})
  mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return train.Program.get(mcfg, cfg.optimizer, STEPS, mesh, grad_accum=grad_accum)


def random_batch(b=4, s=24, vocab=VOCAB, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, s)).astype(np.int32)
  targets = rng.integers(0, vocab, (b, s)).astype(np.int32)
  # two packed documents per row at a random cut, some tokens masked out
  cut = rng.integers(2, s - 2, b)
  col = np.arange(s)[None]
  positions = np.where(col < cut[:, None], col, col - cut[:, None]).astype(np.int32)
  segment_ids = np.where(col < cut[:, None], 1, 2).astype(np.int32)
  loss_mask = (rng.random((b, s)) > 0.3).astype(np.float32)
  return dict(inputs=inputs, targets=targets, positions=positions, segment_ids=segment_ids,
              loss_mask=loss_mask)


def test_loss_is_masked_next_token_cross_entropy():
  batch = random_batch()
  logits = 4.0 * np.random.default_rng(2).normal(size=(*batch['inputs'].shape, VOCAB))

  def model(inputs, positions, segment_ids, runtime=None):  # stands in for the PLT
    assert runtime is None  # loss_sums passes its runtime through
    assert inputs is batch['inputs'] and positions is batch['positions']
    assert segment_ids is batch['segment_ids']
    return jnp.asarray(logits, jnp.float32)
  loss_sum, count = train.loss_sums(model, batch)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  want = float((nll * batch['loss_mask']).sum())
  assert float(count) == batch['loss_mask'].sum()
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)


def test_grad_accumulation_is_the_same_math_as_one_batch():
  """4 rows as 2 microbatches of 2 rows (strided) == one batch of 4."""
  batch = random_batch(seed=1)
  init = jax.device_get(program(1).init(5)['model'])
  out = {}
  for n in (1, 2):
    state, metrics = program(n).train_step(program(1).init(5), batch)
    out[n] = (jax.device_get(state['model']), jax.device_get(metrics))
  (p1, m1), (p3, m3) = out[1], out[2]
  for k in ('loss', 'grad_norm', 'loss_tokens', 'lr'):
    np.testing.assert_allclose(m3[k], m1[k], rtol=2e-6, err_msg=k)
  assert float(m1['loss_tokens']) == batch['loss_mask'].sum()
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                            jax.tree.leaves(init)))
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                           jax.tree.leaves(p3)))
  assert moved > 1e-4 and diff < 1e-6 * max(1.0, moved * 100), (moved, diff)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  base_prog = program(1)
  mcfg = ModelConfig.from_dict({**run_config().model.to_dict(), 'vocab_size': VOCAB,
                                'dtype': 'bfloat16'})
  bf16 = train.Program.get(mcfg, run_config().optimizer, STEPS, base_prog.mesh)
  state = base_prog.init(5)
  assert {x.dtype for x in jax.tree.leaves(state['model'])} == {jnp.dtype('float32')}
  batch = random_batch(seed=3)
  l32, n32 = base_prog.eval_step(state, batch)
  l16, n16 = bf16.eval_step(state, batch)
  rel = abs(float(l16) / float(l32) - 1)
  assert float(n16) == float(n32) and 0 < rel < 2e-2, rel


# ------------------------------------------------------------------------------------ FLOPs

def test_flops_per_token_counts_every_loop_and_the_window():
  assert flops_lib.mean_window_keys(10, 3) == pytest.approx((1 + 2 + 3 * 8) / 10)
  assert flops_lib.mean_window_keys(10, 50) == pytest.approx(5.5)
  cfg = tiny_model_config(vocab_size=61)
  T = 24
  f = flops_lib.flops_per_token(cfg, T)
  # Dense part from the real parameter shapes: 2 FLOPs per kernel weight, every layer, R loops.
  state = nnx.state(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))), nnx.Param)
  per_layer = sum(v.size for k, v in nnx.to_flat_state(state)
                  if k[0] == 'layers' and k[1] == 0 and k[-1] == 'kernel')
  assert f['dense'] == 2 * per_layer * cfg.num_layers * 2
  hd = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
  assert f['attention_global'] == pytest.approx(hd * (T + 1) / 2 * 2)    # loop 1 + K1 branch
  assert f['attention_window'] == pytest.approx(hd * flops_lib.mean_window_keys(T, 5))
  assert f['gate'] == 2 * cfg.d_model * cfg.num_heads * cfg.num_layers
  assert f['head'] == 2 * cfg.d_model * 61
  assert f['train'] == pytest.approx(3 * f['forward'])
  r4 = flops_lib.flops_per_token(cfg.replace(num_loops=4), T)
  assert r4['attention_window'] == pytest.approx(3 * f['attention_window'])
  assert r4['dense'] == 2 * f['dense']
  van = flops_lib.flops_per_token(cfg.replace(loop_mode='vanilla'), T)
  assert van['attention_window'] == 0 and van['gate'] == 0
  assert van['attention_global'] == f['attention_global']
  one = flops_lib.flops_per_token(cfg.replace(num_loops=1), T)
  assert one['dense'] * 2 == f['dense'] and one['attention_window'] == 0
  thr = flops_lib.throughput(1000.0, f['train'], 2, 1e12)
  assert thr['mfu'] == pytest.approx(1000.0 * f['train'] / 2 / 1e12)


def test_hooks_run_in_order_at_their_cadence_and_a_reason_stops_the_loop():
  calls = []

  def steps(n):
    for s in range(1, n + 1):
      calls.append(('step', s))   # a step draws its batch only when it runs
      yield train_loop.StepInfo(s, None, {})

  def record(name):
    return lambda info: calls.append((name, info.step))

  hooks = [train_loop.Hook(record('every')),
           train_loop.Hook(record('third'), every=3, last=7),
           train_loop.Hook(record('off'), every=0, last=7)]
  last, reason = train_loop.run_hooks(steps(7), hooks)
  assert (last.step, reason) == (7, None)
  assert [c for c in calls if c[0] == 'third'] == [('third', 3), ('third', 6), ('third', 7)]
  assert [c for c in calls if c[0] == 'every'] == [('every', s) for s in range(1, 8)]
  assert not [c for c in calls if c[0] == 'off']
  assert calls[calls.index(('step', 6)):calls.index(('step', 7))] == [
      ('step', 6), ('every', 6), ('third', 6)]

  calls.clear()
  stop = train_loop.Hook(lambda info: 'enough' if info.step == 4 else None, every=2)
  last, reason = train_loop.run_hooks(
      steps(9), [train_loop.Hook(record('before')), stop, train_loop.Hook(record('after'))])
  assert (last.step, reason) == (4, 'enough')
  # The hooks after the one that stopped do not run, and no further step draws a batch.
  assert calls[-2:] == [('step', 4), ('before', 4)]
  assert ('after', 3) in calls and ('step', 5) not in calls
  assert train_loop.run_hooks(iter(()), hooks) == (None, None)
