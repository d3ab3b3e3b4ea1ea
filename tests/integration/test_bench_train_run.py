"""experiments.bench_train end to end at the tiny shape: plt_jax and PyTorch train the same model
from the same weights and tokens, and the JSON and the printed table report every side."""
import json
import math
import os

import pytest

from experiments import bench_train


def _rel(a, b):
  return abs(a - b) / abs(b)


def test_end_to_end_same_model_both_sides(tmp_path, capsys):
  """Both sides start from the same weights and tokens: their losses agree at the first step
  and, after one identical AdamW update, at the second; the JSON has one record per (shape, R)
  with every side's times and each attention_impl's ratio to torch."""
  out = str(tmp_path / 'bench.json')
  result = bench_train.main(['--shapes', 'tiny', '--loops', '1,2', '--attention_impl',
                             'auto,xla', '--steps', '2', '--warmup', '1', '--out', out])
  saved = json.load(open(out))
  assert saved['records'] == json.loads(json.dumps(result['records']))
  assert saved['env']['threads'] == len(os.sched_getaffinity(0))
  assert saved['steps'] == 2 and saved['warmup'] == 1
  recs = saved['records']
  assert [(r['shape'], r['R']) for r in recs] == [('tiny', 1), ('tiny', 2)]
  assert [r['torch_model'] for r in recs] == ['LlamaForCausalLM', 'PLTForCausalLM']
  sides = ['plt_jax:auto', 'plt_jax:xla', 'torch']
  for r in recs:
    assert r['attention_impls'] == ['auto', 'xla']
    assert r['attention_backend'] == {'auto': 'cpu', 'xla': 'xla'}  # 'auto' on the CPU
    assert sorted(r['sides']) == sorted(sides) and sorted(r['first_loss']) == sorted(sides)
    torch_first, torch_second = r['first_loss']['torch'], r['second_loss']['torch']
    assert abs(torch_first - math.log(128)) < 0.1          # random init: about log(vocab)
    assert torch_second < torch_first - 0.01                 # the update learned
    for side in sides[:2]:
      assert _rel(r['first_loss'][side], torch_first) < 1e-4, r['first_loss']
      # After one AdamW update at the same learning rate (a 10% different one moves this loss by
      # about 3e-3 relative).
      assert _rel(r['second_loss'][side], torch_second) < 1e-4, r['second_loss']
    for side in sides:
      st = r['sides'][side]
      assert st['n'] == 2 and 0 < st['min_ms'] <= st['median_ms']
      assert st['tokens_per_s'] == pytest.approx(2 * 24 / (st['median_ms'] / 1e3))
    for impl in ('auto', 'xla'):
      assert r['ratio'][impl] == pytest.approx(
          r['sides'][f'plt_jax:{impl}']['median_ms'] / r['sides']['torch']['median_ms'])
      assert r['ratio_min'][impl] == pytest.approx(
          r['sides'][f'plt_jax:{impl}']['min_ms'] / r['sides']['torch']['min_ms'])
  printed = capsys.readouterr().out
  table = printed[printed.index('shape '):].splitlines()
  assert 'auto/torch' in table[0] and 'xla/torch' in table[0] and 'torch ms' in table[0]
  assert len(table[2].split()) == 3 + 2 * 3 + 2          # shape R params, 3 sides, 2 ratios
  assert float(table[3].split()[-1]) == pytest.approx(recs[1]['ratio']['xla'], abs=0.006)
