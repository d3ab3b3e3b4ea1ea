"""Tiny sweeps end to end: the loop-count sweep on a file corpus (outputs, table, resume without
retraining), two seeds at equal FLOPs with the deep baseline, and a synthetic-task sweep's exact
match and gain/cost points."""
import json
import os

import numpy as np
import pytest

from configs import sweep as sweep_config
from helpers import TINY_MODEL, tiny_model_config
from plt_jax.evaluation import synthetic
from plt_jax.study import sweep
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops


def sweep_model(**kw) -> dict:
  """helpers.TINY_MODEL for a sweep's model section: two layers, room for 128 positions; the
  vocabulary and the loop count are the sweep's."""
  model = {k: v for k, v in TINY_MODEL.items() if k not in ('vocab_size', 'num_loops')}
  return {**model, 'num_layers': 2, 'max_seq_len': 128, **kw}


def files_sweep_config(tmp_path):
  """configs/sweep.py on a tiny Python corpus under tmp_path: 12 steps of 4 x 32 bytes."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(12):
    (corpus / f'f{i}.py').write_text(
        ''.join(f'def f{i}_{j}(x):\n    return x * {j} + {i}\n\n' for j in range(20)))
  cfg = sweep_config.get_config()
  cfg.model.update(sweep_model())
  cfg.train.update(steps=12, batch_size=4, seq_len=32, progress=False)
  cfg.data.update(source='files', paths=(str(corpus / '*.py'),), tokenizer='byte',
                  val_fraction=0.2, val_batches=2)
  cfg.mesh.num_devices = 1
  cfg.checkpoint.every = 6
  cfg.eval.every = 6
  return cfg


@pytest.mark.slow
def test_tiny_sweep_runs_and_resumes(tmp_path):
  cfg = files_sweep_config(tmp_path)
  cfg.sweep.update(variants='r1,r2,vanilla2', diagnose_batches=1, decode_prompt_len=8,
                   decode_steps=4)
  root = tmp_path / 'sweep'
  out = sweep.run_sweep(cfg, str(root))
  results = out['results']
  assert [r['name'] for r in results] == ['r1', 'r2', 'vanilla2']
  for r in results:
    assert r['final_val_loss'] < r['first_val_loss']           # every variant learned
    assert r['train_tokens'] == 12 * 4 * 32                    # identical token budget
    assert r['steps'] == 12 and r['seed'] == cfg.seed          # default budget and seed
    assert (root / r['name'] / sweep.RESULT_FILE).exists()     # one seed: today's layout
    assert r['decode']['latency_s'] > 0 and r['decode']['kv_bytes'] > 0
    assert len(r['diagnostics']['step_size']) == r['num_loops']
  # Same shared layers: R=2 adds only the gates to R=1; vanilla adds nothing.
  p = {r['name']: r['params'] for r in results}
  assert p['vanilla2'] == p['r1'] and p['r2'] - p['r1'] == 2 * (4 * 32 + 4 + 32)
  # Train FLOPs grow with the loop count.
  f = {r['name']: r['train_flops'] for r in results}
  assert f['r1'] < f['r2'] and 1.6 < f['r2'] / f['r1'] < 2.1
  # Vanilla keeps two full caches; PLT's second loop only a window.
  kv = {r['name']: r['decode']['kv_bytes'] for r in results}
  assert kv['r1'] < kv['r2'] < kv['vanilla2']
  md = (root / 'sweep.md').read_text()
  assert md.count('\n| ') == 4 and '| r2 |' in md
  for png in ('val_loss_vs_loops.png', 'loss_curves.png'):
    assert (root / png).stat().st_size > 5000
  saved = json.loads((root / 'sweep.json').read_text())
  assert len(saved) == 3

  # Resume: nothing is retrained (result files untouched), the table is rebuilt.
  stamps = {n: os.path.getmtime(root / n / sweep.RESULT_FILE) for n in p}
  out2 = sweep.run_sweep(cfg, str(root))
  assert {n: os.path.getmtime(root / n / sweep.RESULT_FILE) for n in p} == stamps
  assert [r['final_val_loss'] for r in out2['results']] == [r['final_val_loss'] for r in results]


@pytest.mark.slow
def test_tiny_sweep_two_seeds_equal_flops_resumes(tmp_path):
  cfg = files_sweep_config(tmp_path)
  cfg.sweep.update(variants='deep2,r1', budget='flops', seeds=(0, 1), diagnose_batches=1,
                   decode_prompt_len=8, decode_steps=4)
  root = tmp_path / 'sweep'
  logs = []
  out = sweep.run_sweep(cfg, str(root), log=logs.append)
  res = {(r['name'], r['seed']): r for r in out['results']}
  assert sorted(res) == [('deep2', 0), ('deep2', 1), ('r1', 0), ('r1', 1)]
  for (name, seed), r in res.items():
    wd = root / f'{name}-seed{seed}'
    assert (wd / sweep.RESULT_FILE).exists()
    assert ckpt_lib.load_config(str(wd)).seed == seed      # data order follows the seed only
  r1, deep2 = res['r1', 0], res['deep2', 0]
  # deep2: one loop over twice the layers (2 x the layer parameters: attention, MLP, norms).
  assert (deep2['num_loops'], deep2['num_layers'], deep2['R']) == (1, 4, 2)
  assert deep2['params'] - r1['params'] == 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 48 + 2 * 32)
  # Equal FLOPs: r1 (the reference) trains 12 steps. At T=32 a layer costs 15360 + 128 * 16.5
  # = 17472 and the head 2 * 32 * 384 (byte vocabulary rounded up to 128), so deep2 trains
  # round(12 * (2 * 17472 + 24576) / (4 * 17472 + 24576)) = round(7.56) = 8 steps.
  v = r1['vocab_size']
  want = flops.steps_for_budget(tiny_model_config(num_loops=1, num_layers=4, vocab_size=v),
                                tiny_model_config(num_loops=1, num_layers=2, vocab_size=v), 32, 12)
  assert v == 384 and r1['steps'] == 12 and deep2['steps'] == want == 8
  assert deep2['train_tokens'] == want * 4 * 32 and r1['train_tokens'] == 12 * 4 * 32
  per_step = deep2['train_flops'] / deep2['steps']
  assert abs(deep2['train_flops'] - r1['train_flops']) <= per_step / 2
  # Mean ± std (ddof=1) over the two seeds, which differ.
  summ = {s['name']: s for s in out['summary']}
  for name in ('r1', 'deep2'):
    losses = [res[name, s]['final_val_loss'] for s in (0, 1)]
    st = summ[name]['final_val_loss']
    assert st['n'] == 2 and st['mean'] == pytest.approx(np.mean(losses))
    assert st['std'] == pytest.approx(np.std(losses, ddof=1)) and st['std'] > 0
    assert summ[name]['steps'] == res[name, 0]['steps']
  md = (root / 'sweep.md').read_text()
  assert md.count('\n| ') == 3 and md.count(' ± ') >= 4 and 'Equal training FLOPs' in md
  assert f"{summ['r1']['final_val_loss']['mean']:.4f} ± " in md
  saved = json.loads((root / 'sweep_summary.json').read_text())
  assert saved['reference'] == 'r1' and saved['seeds'] == [0, 1]
  for png in ('val_loss_vs_loops.png', 'loss_curves.png'):
    assert (root / png).stat().st_size > 5000

  # Resume: no run trains again; nothing in the run dirs (checkpoints, results) is rewritten.
  def stamps():
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) if d != str(root) and 'data_cache' not in d
            for f in files}
  before = stamps()
  logs2 = []
  out2 = sweep.run_sweep(cfg, str(root), log=logs2.append)
  assert stamps() == before
  assert sum('finished earlier, skipping' in m for m in logs2) == 4
  assert not any('training' in m for m in logs2)
  assert out2['table'] == out['table']




@pytest.mark.slow
def test_tiny_synthetic_sweep_reports_exact_match_and_gain_cost(tmp_path):
  cfg = sweep_config.get_config()
  cfg.model.update(sweep_model(num_layers=1, rope_theta=cfg.model.rope_theta))
  cfg.train.update(steps=6, batch_size=4, seq_len=32, progress=False)
  cfg.data.update(source='synthetic', task='phop', task_heldout=24, val_batches=2)
  cfg.data.task_params.update(hops=1, length=9, alphabet=4)
  cfg.mesh.num_devices = 1
  cfg.checkpoint.every = 6
  cfg.eval.every = 3
  cfg.sweep.update(variants='r1,r2', seeds=(0, 1), diagnose_batches=1, decode_prompt_len=8,
                   decode_steps=2)
  root = tmp_path / 'sweep'
  out = sweep.run_sweep(cfg, str(root), log=lambda *_: None)
  res = {(r['name'], r['seed']): r for r in out['results']}
  # Each run's exact match is the synthetic suite's accuracy on its held-out set.
  model, saved, _ = ckpt_lib.load_for_inference(str(root / 'r2-seed1'))
  again = synthetic.evaluate_run(model, saved.data)
  assert again['total'] == 24 and res['r2', 1]['exact_match'] == again['accuracy']
  summ = {s['name']: s for s in out['summary']}
  for name in ('r1', 'r2'):
    accs = [res[name, s]['exact_match'] for s in (0, 1)]
    assert all(0.0 <= a <= 1.0 and a * 24 == round(a * 24) for a in accs)
    assert summ[name]['exact_match']['mean'] == pytest.approx(np.mean(accs))
  assert 'exact match' in out['table']
  saved_summary = json.loads((root / 'sweep_summary.json').read_text())
  (pt,) = saved_summary['gain_cost']
  assert (pt['name'], pt['loop']) == ('r2', 2)
  assert pt['offset_cost'] == pytest.approx(
      np.mean([res['r2', s]['diagnostics']['offset_cost'][1] for s in (0, 1)]))
  for png in ('accuracy_vs_loops.png', 'val_loss_vs_loops.png', 'loss_curves.png',
              'gain_cost.png'):
    assert (root / png).stat().st_size > 5000
