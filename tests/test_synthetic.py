"""data.source='synthetic': task rows and vocabulary, bitwise resume, held-out exact match."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax import data
from plt_jax.train import metrics as metrics_lib
from plt_jax.data import tasks
from plt_jax import train
from plt_jax.evaluation import runner
from plt_jax.evaluation import synthetic

STEPS = 6
TASK_PARAMS = {'hops': 2, 'length': 16, 'alphabet': 4}
OVERRIDES = {
    'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 4, 'model.num_kv_heads': 2,
    'model.ffn_dim': 48, 'model.window_size': 8, 'model.max_seq_len': 64,
    'model.rope_theta': 10000.0,
    'train.steps': STEPS, 'train.batch_size': 4, 'train.seq_len': 64, 'train.progress': False,
    'data.source': 'synthetic', 'data.task': 'phop', 'data.task_params': TASK_PARAMS,
    'data.task_heldout': 16, 'data.val_batches': 0,
    'optimizer.peak_lr': 3e-3, 'mesh.num_devices': 1,
    'checkpoint.every': 3, 'checkpoint.max_to_keep': 3, 'eval.every': 3,
}


def make_config(**extra):
  cfg = base.get_config('default', num_loops=2)
  for key, value in {**OVERRIDES, **extra}.items():
    section, field = key.split('.')
    cfg[section][field] = value
  return cfg


def data_cfg(**kw):
  cfg = data.default_data_config()
  cfg.source, cfg.task, cfg.task_params, cfg.task_heldout = 'synthetic', 'phop', TASK_PARAMS, 16
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- data


def test_rows_come_from_the_task_with_its_vocab(tmp_path):
  cfg = data_cfg()
  bundle = data.build_data(cfg, seq_len=64, batch_size=4, seed=7, workdir=str(tmp_path))
  spec = tasks.PHopSpec(**TASK_PARAMS)
  held = tasks.heldout(spec, 16, seed=0)
  want = tasks.train_batches(spec, batch_size=4, seq_len=64, seed=7, exclude=held)
  for _ in range(3):
    assert _same(next(bundle.train_iter), next(want))
  tok = bundle.tokenizer
  assert tok.vocab_size == len(spec.vocab) == bundle.stats['vocab_size']
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (tasks.PAD_ID, tasks.BOS_ID, tasks.EOS_ID)
  ids = np.arange(len(spec.vocab))
  assert tok.decode(ids, skip_special_tokens=False) == spec.vocab.text(ids)
  assert tok.encode(spec.vocab.text(ids[5:])) == ids[5:].tolist()
  # Validation: the packed held-out set; no bytes, so no bits per byte.
  val = list(tasks.pack_rows(held, rows=4, seq_len=64))
  assert len(bundle.val_batches) == len(val)
  assert all(_same(a, b) for a, b in zip(bundle.val_batches, val))
  assert bundle.stats['val_eval_tokens'] == sum(int(b['loss_mask'].sum()) for b in val)
  assert 'val_eval_bytes' not in bundle.stats and not tok.token_bytes.any()
  # The tokenizer in the workdir is the same vocabulary, and a rebuild reuses it.
  from plt_jax import tokenizer as tokenizer_lib
  saved = tokenizer_lib.Tokenizer.from_pretrained(str(tmp_path / 'tokenizer'))
  assert saved.sha256 == tok.sha256 and saved.eos_id == tasks.EOS_ID
  data.build_data(cfg, seq_len=64, batch_size=4, seed=7, workdir=str(tmp_path))
  with pytest.raises(ValueError, match='different tokenizer'):
    data.build_data(data_cfg(task='addition', task_params={'digits': 3}), seq_len=64,
                    batch_size=4, seed=7, workdir=str(tmp_path))


def test_heldout_never_in_training_rows(tmp_path):
  # A tiny task, so the two streams draw the same instances often unless excluded.
  cfg = data_cfg(task='binding', task_params={'chain': 1, 'distractors': 0, 'num_vars': 2},
                 task_heldout=10)
  bundle = data.build_data(cfg, seq_len=16, batch_size=4, seed=0, workdir='')
  held = {tuple(np.concatenate([p, a]).tolist()) for p, a in data.heldout_set(cfg)}
  seen = set()
  for _ in range(20):
    b = next(bundle.train_iter)
    for r in range(4):
      for s in range(1, b['segment_ids'][r].max() + 1):
        toks = b['inputs'][r][b['segment_ids'][r] == s]
        seen.add(tuple(toks[:-1].tolist()))    # without the closing EOS
  assert seen and not seen & held


def test_iterator_state_and_process_slices():
  cfg = data_cfg()
  it = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='').train_iter
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state == {'batches': 3}
  want = [next(it) for _ in range(2)]
  again = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='').train_iter
  again.set_state(state)
  assert all(_same(next(again), w) for w in want)
  halves = [data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='', process_index=p,
                            process_count=2) for p in (0, 1)]
  full = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='')
  a, b, f = next(halves[0].train_iter), next(halves[1].train_iter), next(full.train_iter)
  assert all(np.array_equal(np.concatenate([a[k], b[k]]), f[k]) for k in f)
  va, vb = halves[0].val_batches[0], halves[1].val_batches[0]
  assert all(np.array_equal(np.concatenate([va[k], vb[k]]), full.val_batches[0][k]) for k in va)


@pytest.mark.parametrize('field, value, match', [
    ('task', 'nope', r"data\.task='nope': unknown task"),
    ('task_params', {'hopz': 2}, r'data\.task_params\.hopz: not a parameter of task'),
    ('task_params', {'hops': 2.5}, r'data\.task_params\.hops=2\.5: must be an integer'),
    ('task_params', {'hops': 0}, r'data\.task_params: need hops >= 1'),
    ('task_heldout', 0, r'data\.task_heldout=0'),
])
def test_bad_task_config_is_a_one_line_error(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    data.build_data(data_cfg(**{field: value}), seq_len=64, batch_size=4, seed=0, workdir='')
  assert '\n' not in str(e.value)


def test_seq_len_too_short_names_the_field():
  with pytest.raises(ValueError, match=r'train\.seq_len=16: shorter than the longest phop'):
    data.build_data(data_cfg(), seq_len=16, batch_size=4, seed=0, workdir='')


# ---------------------------------------------------------------------------------- training


def _train_losses(workdir):
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, metrics_lib.JSONL)) if r['split'] == 'train'}


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
  want, got = _train_losses(straight), _train_losses(workdir)
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


# ------------------------------------------------------------------------------- exact match


class _Oracle:
  """Stands in for `generate.Generator`: answers from a table, then EOS (dropped, as it does)."""

  def __init__(self, instances, wrong=(), no_eos=()):
    self.table = {tuple(p.tolist()): a.tolist() for p, a in instances}
    self.wrong, self.no_eos, self.calls = set(wrong), set(no_eos), []

  def generate(self, prompts, *, max_new_tokens, sampling, stop_tokens):
    assert sampling.greedy and list(stop_tokens) == [tasks.EOS_ID]
    self.calls.append((len(prompts), max_new_tokens))
    out = []
    for p in prompts:
      key = tuple(np.asarray(p).tolist())
      ans = list(self.table[key])
      if key in self.wrong:
        ans[0] = tasks.QUERY_ID
      if key in self.no_eos:   # ran to the token limit without stopping
        ans = (ans + [ans[-1]] * max_new_tokens)[:max_new_tokens]
      out.append(ans)
    return type('R', (), {'tokens': out})()


def test_accuracy_with_an_oracle():
  held = tasks.heldout(tasks.AdditionSpec(digits=3), 10, seed=0)
  oracle = _Oracle(held)
  res = synthetic.accuracy(None, held, batch_size=4, generator=oracle)
  assert (res['accuracy'], res['correct'], res['total']) == (1.0, 10, 10)
  assert oracle.calls == [(4, 5), (4, 5), (2, 5)]        # answer width 4 + the EOS
  key = lambda i: tuple(held[i][0].tolist())
  res = synthetic.accuracy(None, held, generator=_Oracle(held, wrong=[key(3)]))
  assert res['accuracy'] == pytest.approx(9 / 10) and res['correct'] == 9
  assert res['correct_mask'] == [i != 3 for i in range(10)]
  res = synthetic.accuracy(None, held, generator=_Oracle(held, no_eos=[key(0)]))
  assert res['correct'] == 9 and not res['correct_mask'][0]


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
