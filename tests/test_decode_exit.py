"""Adaptive loop exit in PLT decoding (`decode.plt_exit_decode_step`, `Generator(exit_rule=)`).

Checked on tiny random PLTs (R = 2 and 3, window 3 so that the rings wrap), teacher-forced on fixed
tokens so that a tiny float difference cannot change the path:
  * a rule that never exits is the plain step, bit for bit, caches included;
  * a rule every token meets at loop 1 runs one row and reads what the one-loop model reads;
  * the state past a sequence's exit loop is that loop's state (the documented policy);
  * a sequence gets the same exits and log-probabilities alone and in a batch, although the batch
    changes which rows run;
  * generation with a never-exiting rule gives the plain tokens; vanilla models are refused.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import DECODE_COMPILER_OPTIONS as FAST
from helpers import DECODE_MAX_LEN as MAX_LEN
from helpers import DECODE_MODEL
from helpers import cached_decoder as decoder
from helpers import decode_model as make
from helpers import decode_sequences as sequences
from plt_jax import loop_exit
from plt_jax.infer.decode import Decoder
from plt_jax.infer.generate import Generator
from plt_jax.model import with_num_loops

W = DECODE_MODEL['window_size']
PROMPT_LENS = (1, 2, 5, 9)      # below, at and past the window
STEPS = 8


def _leaves(cache):
  return [np.asarray(x) for x in jax.tree.leaves(cache)]


def _teacher_forced(dec, rule, rows_B, lens, steps=STEPS):
  """Prefill each row's first `lens` tokens, then feed its next true tokens with the exit step.
  Returns (log-probs [B, steps, V], exits [B, steps], rows run [steps], the last cache)."""
  _, cache = dec.prefill([r[:n] for r, n in zip(rows_B, lens)], width=MAX_LEN,
                         extra=steps)
  pos = np.array(lens)
  b = np.arange(len(lens))
  logps, exits, rows = [], [], []
  for _ in range(steps):
    logp, ex, k, cache = dec.exit_step(cache, rows_B[b, pos], rule)
    logps.append(np.asarray(logp))
    exits.append(np.asarray(ex))
    rows.append(int(k))
    pos += 1
  return np.stack(logps, 1), np.stack(exits, 1), rows, cache


def _rows():
  return sequences(batch=len(PROMPT_LENS), seed=7)


@pytest.mark.parametrize('num_loops', [2, 3])
def test_a_rule_that_never_exits_is_the_plain_step(num_loops):
  dec = decoder(num_loops, 'plt', 'hidden', True)
  rows = _rows()
  _, cache_a = dec.prefill([r[:n] for r, n in zip(rows, PROMPT_LENS)], width=MAX_LEN, extra=4)
  _, cache_b = dec.prefill([r[:n] for r, n in zip(rows, PROMPT_LENS)], width=MAX_LEN, extra=4)
  pos = np.array(PROMPT_LENS)
  for _ in range(4):
    tok = rows[np.arange(len(pos)), pos]
    logits, cache_a = dec.step(cache_a, tok)
    logp, ex, k, cache_b = dec.exit_step(cache_b, tok, loop_exit.ExitRule('confidence', 1.0))
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(jax.nn.log_softmax(logits)))
    assert np.asarray(ex).tolist() == [num_loops - 1] * len(pos) and int(k) == num_loops
    for a, b in zip(_leaves(cache_a), _leaves(cache_b)):
      np.testing.assert_array_equal(a, b)
    pos += 1


def test_a_rule_met_at_loop_one_runs_one_row_and_reads_the_one_loop_model():
  """confidence:1e-9 is met by every readout: each step runs row 1 only, and since loop 1 never
  reads the later loops, its readouts are the one-loop model's, step after step."""
  model = make(3, 'plt', 'hidden', True)
  dec = decoder(3, 'plt', 'hidden', True)
  one = Decoder(with_num_loops(model, 1), MAX_LEN, compiler_options=FAST)
  rows = _rows()
  logp, exits, run, cache = _teacher_forced(dec, loop_exit.ExitRule.parse('confidence:1e-9'),
                                            rows, PROMPT_LENS)
  assert (exits == 0).all() and run == [1] * STEPS
  _, c1 = one.prefill([r[:n] for r, n in zip(rows, PROMPT_LENS)], width=MAX_LEN, extra=STEPS)
  pos = np.array(PROMPT_LENS)
  want = []
  for _ in range(STEPS):
    logits, c1 = one.step(c1, rows[np.arange(len(pos)), pos])
    want.append(np.asarray(jax.nn.log_softmax(logits)))
    pos += 1
  np.testing.assert_allclose(logp, np.stack(want, 1), atol=2e-5, rtol=0)
  # The policy: loops 2 and 3 took loop 1's state at every slot written.
  for j in range(model.cfg.num_layers):
    ring = np.asarray(cache.k_loc[j])                          # [B, 2, W, K, E]
    k1 = np.asarray(cache.k1[j])                               # [B, T, K, E]
    for b, n in enumerate(PROMPT_LENS):
      for p in range(n + STEPS - min(W, STEPS), n + STEPS):   # the last W positions written
        np.testing.assert_array_equal(ring[b, 0, p % W], k1[b, p])
        np.testing.assert_array_equal(ring[b, 1, p % W], k1[b, p])
  hidden = np.asarray(cache.hidden)
  np.testing.assert_array_equal(hidden[0], hidden[1])


def _mixed_rule(dec, rows):
  """A confidence threshold at the median loop-1 top probability of these tokens: about half
  exit at loop 1, so batches mix exits (and the later rows run)."""
  logp, _, _, _ = _teacher_forced(dec, loop_exit.ExitRule('confidence', 1.0), rows, PROMPT_LENS)
  del logp
  model = make(3, 'plt', 'hidden', True)
  toks = jnp.asarray(rows[:, :max(PROMPT_LENS) + STEPS])
  loops = model(toks, return_loops=True)[1]
  top = np.asarray(loop_exit.readout_stats(loop_exit.loop_log_probs(model, loops))[0])[0]
  return loop_exit.ExitRule('confidence', float(np.exp(np.median(top))))


def test_state_past_the_exit_loop_is_the_exit_loops_state():
  dec = decoder(3, 'plt', 'hidden', True)
  rows = _rows()
  rule = _mixed_rule(dec, rows)
  _, cache = dec.prefill([r[:n] for r, n in zip(rows, PROMPT_LENS)], width=MAX_LEN, extra=1)
  pos = np.array(PROMPT_LENS)
  _, ex, k, cache = dec.exit_step(cache, rows[np.arange(len(pos)), pos], rule)
  ex = np.asarray(ex)
  assert len(set(ex.tolist())) > 1, ex   # the rule splits this batch
  hidden = np.asarray(cache.hidden)     # [R-1, B, D]; hidden[i] feeds loop i+2
  for b, e in enumerate(ex):
    for i in range(2):
      if i > e:
        np.testing.assert_array_equal(hidden[i, b], hidden[e, b])
    for j in range(2):
      ring, k1 = np.asarray(cache.k_loc[j]), np.asarray(cache.k1[j])
      exit_kv = k1[b, pos[b]] if e == 0 else ring[b, e - 1, pos[b] % W]
      for loop in range(e + 1, 3):       # 0-based loops past the exit; ring index loop - 1
        np.testing.assert_array_equal(ring[b, loop - 1, pos[b] % W], exit_kv)


@pytest.mark.parametrize('spec', ['confidence', 'kl'])
def test_alone_and_in_a_batch_a_sequence_exits_and_reads_the_same(spec):
  dec = decoder(3, 'plt', 'hidden', True)
  rows = _rows()
  rule = _mixed_rule(dec, rows)
  if spec == 'kl':
    # The median KL(p2 || p1) of these tokens: mixed exits at loops 2 and 3.
    model = make(3, 'plt', 'hidden', True)
    loops = model(jnp.asarray(rows[:, :max(PROMPT_LENS) + STEPS]), return_loops=True)[1]
    kl = np.asarray(loop_exit.readout_stats(loop_exit.loop_log_probs(model, loops))[1])[1]
    rule = loop_exit.ExitRule('kl', float(np.median(kl)))
  logp, exits, run, _ = _teacher_forced(dec, rule, rows, PROMPT_LENS)
  assert 0 < (exits < 2).mean() < 1, exits
  assert max(run) == 3                           # some step needed every row
  for b, n in enumerate(PROMPT_LENS):
    lp, ex, run_b, _ = _teacher_forced(dec, rule, rows[b:b + 1], (n,))
    np.testing.assert_array_equal(ex[0], exits[b])
    np.testing.assert_allclose(lp[0], logp[b], atol=2e-5, rtol=0)
  if spec == 'confidence':
    # Alone, a sequence skips rows the batch had to run.
    assert min(run_b) < 3 or min(run) == 3


def test_generation_with_a_never_exiting_rule_equals_plain_generation():
  model = make(2, 'plt', 'hidden', True)
  prompts = [list(r[:n]) for r, n in zip(_rows(), PROMPT_LENS)]
  plain = Generator(model, max_len=MAX_LEN, compiler_options=FAST).generate(
      prompts, max_new_tokens=6)
  ruled = Generator(model, max_len=MAX_LEN, compiler_options=FAST,
                    exit_rule='confidence:1').generate(prompts, max_new_tokens=6)
  assert ruled.tokens == plain.tokens
  assert ruled.mean_loops == 2.0 and ruled.mean_rows == 2.0 and plain.mean_loops is None
  low = Generator(model, max_len=MAX_LEN, compiler_options=FAST,
                  exit_rule='confidence:1e-9').generate(prompts, max_new_tokens=6)
  assert low.mean_loops == 1.0 and low.mean_rows == 1.0


def test_vanilla_models_and_bad_rules_are_refused():
  with pytest.raises(ValueError, match='adaptive loop exit is for PLT decoding'):
    Generator(make(2, 'vanilla', 'hidden', True), exit_rule='confidence:0.9')
  with pytest.raises(ValueError, match='expected KIND:THRESHOLD'):
    Generator(make(2, 'plt', 'hidden', True), exit_rule='0.9')
