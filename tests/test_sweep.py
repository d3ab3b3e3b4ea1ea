"""The loop-count sweep end to end on a tiny corpus: outputs, table, and resume without retraining."""
import json
import os

import pytest

from configs import sweep as sweep_config
from plt_jax.study import sweep

TINY_MODEL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                  window_size=5, max_seq_len=128, rope_theta=10_000.0)


def test_parse_variants():
  assert sweep.parse_variants('r1, r4,vanilla2,deep3') == [
      ('r1', 1, 'plt'), ('r4', 4, 'plt'), ('vanilla2', 2, 'vanilla'), ('deep3', 3, 'deep')]
  for bad in ('r0', 'x2', '', 'r1,r1', 'deep0'):
    with pytest.raises(ValueError, match='sweep.variants'):
      sweep.parse_variants(bad)


@pytest.mark.slow
def test_tiny_sweep_runs_and_resumes(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(12):
    (corpus / f'f{i}.py').write_text(
        ''.join(f'def f{i}_{j}(x):\n    return x * {j} + {i}\n\n' for j in range(20)))
  cfg = sweep_config.get_config()
  cfg.model.update(TINY_MODEL)
  cfg.train.update(steps=12, batch_size=4, seq_len=32, progress=False)
  cfg.data.update(source='files', paths=(str(corpus / '*.py'),), tokenizer='byte',
                  val_fraction=0.2, val_batches=2)
  cfg.mesh.num_devices = 1
  cfg.checkpoint.every = 6
  cfg.eval.every = 6
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
