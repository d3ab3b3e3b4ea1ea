"""The per-loop training signal (train.loop_loss_weights): the weighted loss over every loop's
readout, its gradients, its FLOPs, and the sweep's rN+ll variants. A training run that uses it is
tested in tests/integration/test_loop_loss_runs.py."""
import ml_collections
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from helpers import decode_model as make
from helpers import tiny_run_config
from plt_jax.study import sweep
from plt_jax.train import flops as flops_lib
from plt_jax.train import step as step_lib

B, S = 3, 13


def _batch(seed=0, vocab=97):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, S + 1))
  mask = (rng.random((B, S)) < 0.8).astype(np.float32)
  seg = np.ones((B, S), np.int32)
  seg[1, 7:] = 2                                # a second packed document in row 1
  pos = np.tile(np.arange(S), (B, 1))
  pos[1, 7:] -= 7
  return dict(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
              loss_mask=jnp.asarray(mask), segment_ids=jnp.asarray(seg),
              positions=jnp.asarray(pos.astype(np.int32)))


def _ce64(logits, targets, mask):
  """Masked cross-entropy sum in float64 numpy."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return float((nll * np.asarray(mask)).sum())


def test_weights_are_normalised_and_checked():
  assert step_lib.normalized_loop_weights((), 3) is None
  assert step_lib.normalized_loop_weights((1, 1, 2), 3) == (0.25, 0.25, 0.5)
  for bad in [(1, 1), (1, -1, 1), (0, 0, 0), (1, float('nan'), 1)]:
    with pytest.raises(ValueError, match='train.loop_loss_weights'):
      step_lib.normalized_loop_weights(bad, 3)


@pytest.mark.parametrize('num_loops', [2, 3])
def test_weighted_loss_is_the_weighted_sum_of_readout_losses(num_loops):
  model = make(num_loops, 'plt', 'hidden', True)
  batch = _batch(num_loops)
  plain, count = step_lib.loss_sums(model, batch)
  last_only = step_lib.normalized_loop_weights((0,) * (num_loops - 1) + (3,), num_loops)
  np.testing.assert_array_equal(step_lib.loss_sums(model, batch, loop_weights=last_only)[0],
                                plain)
  weights = step_lib.normalized_loop_weights(tuple(range(1, num_loops + 1)), num_loops)
  got, n = step_lib.loss_sums(model, batch, loop_weights=weights)
  _, loops = model(batch['inputs'], batch['positions'], batch['segment_ids'], return_loops=True)
  want = sum(w * _ce64(model.head(lo.hidden), batch['targets'], batch['loss_mask'])
             for w, lo in zip(weights, loops))
  assert float(n) == float(count) == float(np.asarray(batch['loss_mask']).sum())
  np.testing.assert_allclose(float(got), want, rtol=2e-6)
  # The earlier loops' readouts are worse than the last one's on a random model, and differ.
  assert abs(float(got) - float(plain)) > 1e-3


def test_a_weight_on_loop_one_sends_gradient_through_its_readout_only_where_it_should():
  model = make(2, 'plt', 'hidden', True)
  batch = _batch(5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grads(weights):
    f = lambda p: step_lib.loss_sums(nnx.merge(graphdef, p, rest), batch, loop_weights=weights)[0]
    return jax.jit(jax.grad(f))(params)

  plain = grads(None)
  same = grads((0.0, 1.0))
  mixed = grads((0.25, 0.75))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(mixed)))
  assert diff > 1e-4

  # The weighted gradient is the weighted sum of each readout's own gradient, built by hand.
  def readout_loss(p, r):
    m = nnx.merge(graphdef, p, rest)
    _, loops = m(batch['inputs'], batch['positions'], batch['segment_ids'], return_loops=True)
    logp = jax.nn.log_softmax(m.head(loops[r].hidden), axis=-1)
    nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch['loss_mask'])

  g1, g2 = (jax.jit(jax.grad(readout_loss), static_argnums=1)(params, r) for r in (0, 1))
  for got, a, b in zip(*(jax.tree.leaves(t) for t in (mixed, g1, g2))):
    np.testing.assert_allclose(got, 0.25 * a + 0.75 * b, rtol=1e-4, atol=1e-6)


def test_flops_count_one_head_per_weighted_readout():
  cfg = make(3, 'plt', 'hidden', True).cfg
  base = flops_lib.flops_per_token(cfg, 64)
  head = 2 * cfg.d_model * cfg.vocab_size
  assert base['head'] == head
  assert flops_lib.flops_per_token(cfg, 64, (0.0, 0.0, 1.0))['head'] == head
  two = flops_lib.flops_per_token(cfg, 64, (0.2, 0.0, 0.8))
  three = flops_lib.flops_per_token(cfg, 64, (0.2, 0.3, 0.5))
  assert two['head'] == 2 * head and three['head'] == 3 * head
  assert three['train'] - base['train'] == pytest.approx(3 * 2 * head)


def test_the_sweep_names_it_and_sets_equal_weights(tmp_path):
  """The sweep's rN+ll variants train with equal per-loop weights. A run that trains with them is
  tested in tests/integration/test_loop_loss_runs.py."""
  assert sweep.parse_variants('r1,r3+ll,vanilla2+ll') == [
      ('r1', 1, 'plt'), ('r3+ll', 3, 'plt'), ('vanilla2+ll', 2, 'vanilla')]
  with pytest.raises(ValueError, match=r'rN\+ll'):
    sweep.parse_variants('deep2+ll')
  cfg = sweep.variant_config(_with_sweep(tiny_run_config()), 3, 'plt', str(tmp_path),
                             loop_loss=True)
  assert tuple(cfg.train.loop_loss_weights) == (1.0, 1.0, 1.0)


def _with_sweep(cfg):
  cfg.sweep = ml_collections.ConfigDict(dict(variants='r3+ll'))
  return cfg
