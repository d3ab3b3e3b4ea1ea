"""Loop diagnostics: primitives on constructed inputs, then a tiny trained model end to end."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plt_jax.study import diagnostics as dg
from helpers import tiny_model_config
from plt_jax.model import PLT


@pytest.mark.parametrize('k', [1, 3, 7])
def test_effective_rank_of_orthogonal_equal_norm_rows(k):
  q, _ = np.linalg.qr(np.random.default_rng(k).normal(size=(12, 12)))
  x = 2.5 * q[:k]                       # k orthonormal directions, equal norms
  x = np.concatenate([x, np.zeros((3, 12))])  # padding rows change nothing
  assert float(dg.effective_rank(jnp.asarray(x))) == pytest.approx(k, rel=1e-5)
  # Unequal norms give less than k.
  if k > 1:
    y = x.copy()
    y[0] *= 10
    assert float(dg.effective_rank(jnp.asarray(y))) < k - 0.5


def test_effective_rank_mask_drops_rows():
  x = np.random.default_rng(0).normal(size=(6, 5))
  full = float(dg.effective_rank(jnp.asarray(x[:3])))
  masked = float(dg.effective_rank(jnp.asarray(x), jnp.asarray([1., 1., 1., 0., 0., 0.])))
  assert masked == pytest.approx(full, rel=1e-5)


def test_kl_and_entropy():
  p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 9)))
  np.testing.assert_allclose(np.asarray(dg.kl_divergence(p, p)), 0.0, atol=1e-6)
  q = jnp.full((9,), 1 / 9)
  # KL(p || uniform) = log 9 - H(p).
  np.testing.assert_allclose(np.asarray(dg.kl_divergence(p, q)),
                             math.log(9) - np.asarray(dg.entropy(p)), atol=1e-5)
  assert float(dg.entropy(jnp.asarray([0.5, 0.5, 0.0]))) == pytest.approx(math.log(2))
  assert float(dg.kl_divergence(jnp.asarray([1.0, 0.0]), jnp.asarray([0.5, 0.5]))) == \
      pytest.approx(math.log(2))


def test_step_size_and_alignment_on_hand_made_states():
  # h0=(0,0) -> h1=(3,4) -> h2=(0,0) -> h3=(0,1): steps 5, 5, 1;
  # cos(h2-h1, h1-h0) = -1 (pure oscillation); cos(h3-h2, h2-h1) = (0*-3 + 1*-4)/(1*5) = -0.8.
  pts = [(0., 0.), (3., 4.), (0., 0.), (0., 1.)]
  states = [jnp.asarray([[p]]) for p in pts]  # [B=1, S=1, D=2]
  np.testing.assert_allclose([float(s[0, 0]) for s in dg.step_sizes(states)], [5, 5, 1])
  np.testing.assert_allclose([float(c[0, 0]) for c in dg.alignments(states)], [-1.0, -0.8],
                             atol=1e-6)


def test_offset_cost_respects_document_starts():
  h = jnp.asarray([[[0., 0.], [3., 4.], [3., 5.], [9., 9.]]])
  pos = jnp.asarray([[0, 1, 2, 0]])
  d, m = dg.offset_cost(h, pos)
  np.testing.assert_allclose(np.asarray(d[0, 1:3]), [5.0, 1.0])
  np.testing.assert_array_equal(np.asarray(m[0]), [False, True, True, False])


def test_true_token_rank():
  logits = jnp.asarray([[[0.1, 2.0, 0.5, 3.0]]])
  assert dg.true_token_rank(logits, jnp.asarray([[3]]))[0, 0] == 0
  assert dg.true_token_rank(logits, jnp.asarray([[2]]))[0, 0] == 2


CFG = dict(vocab_size=61, num_layers=2, window_size=3)  # over helpers.TINY_MODEL


def _batches(n=2, b=2, s=17, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    toks = rng.integers(0, CFG['vocab_size'], size=(b, s + 1))
    pos = np.tile(np.r_[np.arange(7), np.arange(s - 7)], (b, 1))
    seg = np.tile(np.r_[np.ones(7), 2 * np.ones(s - 9), np.zeros(2)], (b, 1)).astype(np.int32)
    out.append({'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'positions': pos,
                'segment_ids': seg, 'loss_mask': (seg > 0).astype(np.float32)})
  return out


def test_fresh_model_gate_is_half():
  model = PLT(tiny_model_config(**CFG, num_loops=3), nnx.Rngs(0))
  res = dg.diagnose(model, _batches(n=1))
  gates = np.asarray(res['gate'])
  assert np.isnan(gates[0]).all()
  np.testing.assert_allclose(gates[1:], 0.5, atol=1e-7)


def test_last_loop_lens_nll_is_the_training_loss():
  """The logit lens of loop R reads the model's own logits: its NLL is the training loss."""
  from plt_jax import train
  model = PLT(tiny_model_config(**CFG, num_loops=2), nnx.Rngs(3))
  batches = _batches(n=2, seed=4)
  sums = dg.accumulate(model, batches)
  nats = sum(float(train.loss_sums(model, {k: jnp.asarray(v) for k, v in b.items()})[0])
             for b in batches)
  tokens = sum(float(b['loss_mask'].sum()) for b in batches)
  assert float(sums['count_lens']) == tokens == 2 * 2 * 15
  assert float(sums['lens_nll'][-1]) == pytest.approx(nats, rel=1e-5)
  assert float(sums['lens_nll'][0]) != pytest.approx(nats, rel=1e-3)  # loop 1 is another lens
  res = dg.finalize(sums)
  assert res['lens_perplexity'][-1] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
