"""Adaptive loop exit: the rules against a float64 NumPy reference on fresh random readouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plt_jax.loop_exit import ExitRule, exit_from_stats, exit_loops, readout_stats, take_exit


def random_log_probs(seed, shape=(4, 3, 5, 7), sharpness=3.0):
  """[R, B, S, V] log-softmax of logits whose spread differs per loop and token."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal(shape) * rng.uniform(0.2, sharpness, shape[:-1] + (1,))
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def reference_exit(logp, kind, threshold):
  logp = logp.astype(np.float64)
  num_loops = logp.shape[0]
  out = np.full(logp.shape[1:-1], num_loops - 1)
  for idx in np.ndindex(*logp.shape[1:-1]):
    for r in range(num_loops - 1):
      lp = logp[(r,) + idx]
      if kind == 'confidence':
        hit = threshold < 1 and np.exp(lp).max() >= threshold
      else:
        prev = logp[(r - 1,) + idx] if r >= 1 else None
        hit = r >= 1 and threshold > 0 and (np.exp(lp) * (lp - prev)).sum() < threshold
      if hit:
        out[idx] = r
        break
  return out


@pytest.mark.parametrize('spec', ['confidence:0.3', 'confidence:0.6', 'confidence:0.9',
                                  'kl:0.05', 'kl:0.5', 'kl:3'])
@pytest.mark.parametrize('seed', [0, 1])
def test_exit_loop_matches_reference(spec, seed):
  logp = random_log_probs(seed)
  rule = ExitRule.parse(spec)
  got = np.asarray(exit_loops(jnp.asarray(logp), rule))
  want = reference_exit(logp, rule.kind, rule.threshold)
  np.testing.assert_array_equal(got, want)
  # The thresholds above make the rule bite somewhere, and not everywhere.
  assert 0 < (got < logp.shape[0] - 1).sum() or spec in ('kl:0.05',)
  # The host-side form (numpy statistics, as the offline evaluation uses) agrees.
  top, kl = (np.asarray(x) for x in readout_stats(jnp.asarray(logp)))
  np.testing.assert_array_equal(exit_from_stats(top, kl, rule), want)
  picked = np.asarray(take_exit(jnp.asarray(logp), jnp.asarray(got)))
  for idx in np.ndindex(*got.shape):
    np.testing.assert_array_equal(picked[idx], logp[(got[idx],) + idx])


def test_never_exiting_rules_are_the_plain_model_bit_for_bit():
  logp = random_log_probs(3).copy()
  logp[0, 0, 0] = np.where(np.eye(7)[2] > 0, 0.0, -1e30)   # saturated: top probability exactly 1
  for spec in ('confidence:1', 'confidence:1.5', 'kl:0', 'kl:-1'):
    rule = ExitRule.parse(spec)
    assert rule.never_exits
    e = exit_loops(jnp.asarray(logp), rule)
    assert (np.asarray(e) == logp.shape[0] - 1).all()
    np.testing.assert_array_equal(np.asarray(take_exit(jnp.asarray(logp), e)), logp[-1])
  # Just below 1 the saturated token does exit at loop 1.
  assert int(exit_loops(jnp.asarray(logp), ExitRule.parse('confidence:0.999'))[0, 0]) == 0


def test_confidence_exits_at_the_first_confident_loop():
  probs = np.array([[0.5, 0.3, 0.2], [0.95, 0.04, 0.01], [0.99, 0.005, 0.005]])
  logp = jnp.log(jnp.asarray(probs, jnp.float32))[:, None, :]     # [R=3, 1, V=3]
  assert int(exit_loops(logp, ExitRule('confidence', 0.9))[0]) == 1
  assert int(exit_loops(logp, ExitRule('confidence', 0.97))[0]) == 2
  assert int(exit_loops(logp, ExitRule('confidence', 0.5))[0]) == 0
  assert int(exit_loops(logp, ExitRule('kl', 1e-3))[0]) == 2     # KL(p3||p2) is ~0.03: no exit
  assert int(exit_loops(logp, ExitRule('kl', 0.05))[0]) == 2
  assert int(exit_loops(logp, ExitRule('kl', 1.0))[0]) == 1      # KL(p2||p1) is ~0.54


@pytest.mark.parametrize('spec,msg', [('confidence', 'KIND:THRESHOLD'), ('entropy:1', 'expected one of'),
                                      ('kl:abc', 'not a number'), ('confidence:0', 'probability'),
                                      ('kl:nan', 'NaN')])
def test_bad_rules_say_what_is_wrong(spec, msg):
  with pytest.raises(ValueError, match=msg):
    ExitRule.parse(spec)
