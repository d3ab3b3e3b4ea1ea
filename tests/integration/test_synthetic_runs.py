"""Training on data.source='synthetic': bitwise resume, the task's vocabulary, and the synthetic
suite and loop-count evaluation on a trained run."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_run_config, train_losses
from plt_jax import data
from plt_jax.data import tasks
from plt_jax import train
from plt_jax.evaluation import runner
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import metrics as metrics_lib

STEPS = 6
TASK_PARAMS = {'hops': 2, 'length': 16, 'alphabet': 4}
_DATA_DEFAULTS = data.default_data_config()
SYNTHETIC_RUN = {
    'model.window_size': 8, 'train.steps': STEPS, 'train.seq_len': 64,
    'data.source': 'synthetic', 'data.task': 'phop', 'data.task_params': TASK_PARAMS,
    'data.task_heldout': 16, 'data.val_batches': 0, 'data.tokenizer': _DATA_DEFAULTS.tokenizer,
    'data.max_chars': _DATA_DEFAULTS.max_chars, 'checkpoint.every': 3, 'eval.every': 3,
}


def make_config(**extra):
  return tiny_run_config(**{**SYNTHETIC_RUN, **extra})


def _params(workdir, step):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))['params']
  finally:
    ckpt.close()


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('synthetic_straight'))
  summary = train.train_and_evaluate(make_config(), workdir)
  assert summary['step'] == STEPS
  return workdir


def test_trains_and_resumes_bitwise(straight, tmp_path):
  workdir = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(make_config(**{'train.stop_at_step': 3}), workdir)
  assert first['step'] == 3
  second = train.train_and_evaluate(make_config(), workdir)
  assert second['start_step'] == 3 and second['step'] == STEPS
  want, got = train_losses(straight), train_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert all(np.isfinite(want[s]) for s in want)
  assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
  a, b = _params(straight, STEPS), _params(workdir, STEPS)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert la and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
  read = lambda w: json.load(open(os.path.join(w, 'checkpoints', str(STEPS), 'data',
                                               'process_0-of-1.json')))
  assert read(straight) == read(workdir) == {'batches': STEPS}
  # The vocabulary is the task's, rounded up as for a tokenizer; no bits per byte.
  saved = ckpt_lib.load_config(straight)
  mult = max(1, saved.train.vocab_multiple)
  assert saved.model.vocab_size == -(-len(tasks.PHopSpec(**TASK_PARAMS).vocab) // mult) * mult
  val = [r for r in metrics_lib.read_jsonl(os.path.join(straight, metrics_lib.JSONL))
         if r['split'] == 'val']
  assert val and all(np.isfinite(r['loss']) and 'bits_per_byte' not in r for r in val)


def test_synthetic_suite_on_a_trained_run(straight, tmp_path):
  out = runner.run('synthetic', workdir=straight, out_dir=str(tmp_path), eval_batch_size=8)
  assert out['suite'] == 'synthetic' and out['task'] == 'phop'
  assert out['total'] == 16 and 0 <= out['correct'] <= 16
  assert out['accuracy'] == out['correct'] / 16
  with open(out['out_path']) as f:
    assert json.load(f)['correct'] == out['correct']
  assert 'exact match' in runner.format_summary(out)


def test_loop_counts_and_exit_rules_on_a_trained_run(straight, tmp_path):
  """`evaluate --loops`: R'=2 (the trained count) scores what the greedy synthetic suite scores;
  every R' and rule gives a row; the outputs are written; a never-exiting rule is loop R."""
  from plt_jax.evaluation import loops as loops_lib  # pylint: disable=g-import-not-at-top
  greedy = runner.run('synthetic', workdir=straight, out_dir=str(tmp_path / 'g'),
                      eval_batch_size=8)
  t = loops_lib.evaluate_workdir('synthetic', '3,1,2', workdir=straight,
                                 rules=['confidence:0.9', 'confidence:1', 'kl:0.01'],
                                 out_dir=str(tmp_path / 'loops'), batch_size=8)
  assert [r['loops'] for r in t['fixed']] == [1, 2, 3] and t['trained_loops'] == 2
  assert t['groups'] == 16
  assert t['fixed'][1]['exact_match'] == greedy['accuracy']
  never = next(r for r in t['adaptive'] if r['rule'] == 'confidence:1')
  assert never['mean_loops'] == 2.0 and never['exact_match'] == greedy['accuracy']
  assert all(1.0 <= r['mean_loops'] <= 2.0 for r in t['adaptive'])
  for name in ('loops.json', 'loops.md', 'pareto.png'):
    assert (tmp_path / 'loops' / name).stat().st_size > 0
  assert json.load(open(tmp_path / 'loops' / 'loops.json'))['fixed'][1]['loops'] == 2
  assert "| R'=3 |" in t['table_md']
  with pytest.raises(ValueError, match='loop counts are integers >= 1'):
    loops_lib.evaluate_workdir('synthetic', '0,2', workdir=straight)
