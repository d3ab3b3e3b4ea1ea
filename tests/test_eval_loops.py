"""Offline loop-count evaluation: fixed R' and adaptive exit, checked against direct forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_model_config
from plt_jax.evaluation import loops as loops_lib
from plt_jax.loop_exit import ExitRule
from plt_jax.model import PLT, with_num_loops

# Over helpers.TINY_MODEL: 3 heads of width 8 over 1 kv head, vocab 23.
CFG = dict(vocab_size=23, d_model=24, num_heads=3, num_kv_heads=1, ffn_dim=40, window_size=4,
           attention_impl='xla')


def random_model(num_loops, seed=0):
  model = PLT(tiny_model_config(**CFG, num_loops=num_loops), nnx.Rngs(seed))
  # Gates away from their zero init, so every loop reads both branches differently.
  for layer in model.layers:
    g = layer.self_attn.plt_gate
    if g is not None:
      g.bias[...] = jax.random.normal(jax.random.key(seed + 7), g.bias[...].shape)
  return model


WIDTH = 16


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def greedy(model, seq, n):
  """Greedy continuation by full forwards. The model is causal, so a row right-padded to a fixed
  width gives the same logits at the prompt's positions and compiles once."""
  seq = list(seq)
  for _ in range(n):
    row = jnp.asarray([seq + [0] * (WIDTH - len(seq))])
    seq.append(int(jnp.argmax(_logits(model, row)[0, len(seq) - 1])))
  return seq


@pytest.fixture(scope='module')
def setup():
  model = random_model(2)
  rng = np.random.default_rng(5)
  rows, expect = [], []
  for i in range(6):
    prompt = list(rng.integers(5, 23, size=int(rng.integers(3, 9))))
    k = int(rng.integers(1, 4))
    cont = greedy(model, prompt, k + 1)[len(prompt):]
    answer, eos = cont[:k], cont[k]
    if i % 2:  # break one answer token: the instance must not count
      answer = list(answer)
      answer[-1] = (answer[-1] + 1) % 23
    rows += loops_lib.task_rows([(prompt, answer)], seq_len=16, eos_id=eos)
    expect.append(i % 2 == 0)
  return model, rows, np.array(expect)


def test_fixed_loop_counts_equal_direct_forwards(setup):
  model, rows, expect = setup
  batches = loops_lib.batches_of(rows, batch_size=4)    # 6 rows: the last batch is padded
  stats = loops_lib.collect(loops_lib.make_stats_fn(model, 4), batches)
  table = loops_lib.loop_table(stats, trained_loops=2, loops=[1, 2, 3, 4], task=True)
  for row in table['fixed']:
    m = with_num_loops(model, row['loops'])
    nll, correct = [], []
    for r in rows:
      logp = jax.nn.log_softmax(m(jnp.asarray(r['inputs'][None]), jnp.asarray(r['positions'][None]),
                                  jnp.asarray(r['segment_ids'][None]))[0], -1)
      keep = r['loss_mask'] > 0
      tgt = r['targets'][keep]
      nll.append(-np.asarray(logp)[keep][np.arange(tgt.size), tgt])
      correct.append(bool((np.asarray(logp)[keep].argmax(-1) == tgt).all()))
    np.testing.assert_allclose(row['nats_per_token'], np.concatenate(nll).mean(), rtol=1e-5)
    assert row['exact_match'] == pytest.approx(np.mean(correct))
    if row['loops'] == 2:   # the trained count: greedy answers count, broken ones do not
      np.testing.assert_array_equal(correct, expect)
      assert row['exact_match'] == 0.5
  assert table['groups'] == 6 and table['tokens'] == sum(int(r['loss_mask'].sum()) for r in rows)


def test_adaptive_exit_points(setup):
  model, rows, _ = setup
  stats = loops_lib.collect(loops_lib.make_stats_fn(model, 2), loops_lib.batches_of(rows, 8))
  rules = [ExitRule('confidence', 1.0), ExitRule('kl', 0.0), ExitRule('confidence', 0.01)]
  t = loops_lib.loop_table(stats, trained_loops=2, loops=[1, 2], rules=rules, task=True)
  fixed = {r['loops']: r for r in t['fixed']}
  never_c, never_k, always = t['adaptive']
  for never in (never_c, never_k):     # never exiting early is the trained model
    assert never['mean_loops'] == 2.0 and never['exited_early'] == 0.0
    assert never['nats_per_token'] == fixed[2]['nats_per_token']
    assert never['exact_match'] == fixed[2]['exact_match']
  # A threshold every readout passes exits at loop 1 everywhere: fixed R' = 1.
  assert always['mean_loops'] == 1.0 and always['exited_early'] == 1.0
  assert always['nats_per_token'] == fixed[1]['nats_per_token']
  md = loops_lib.format_table(t)
  assert "R'=1" in md and 'confidence:0.01' in md and 'exact match' in md


def test_pareto_plot_is_written(setup, tmp_path):
  model, rows, _ = setup
  stats = loops_lib.collect(loops_lib.make_stats_fn(model, 3), loops_lib.batches_of(rows, 8))
  t = loops_lib.loop_table(stats, trained_loops=2, loops=[1, 2, 3],
                           rules=loops_lib.default_rules(), task=True)
  png = loops_lib.plot_pareto(t, tmp_path / 'pareto.png')
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='outside the 3 loops'):
    loops_lib.loop_table(stats, trained_loops=2, loops=[4])
