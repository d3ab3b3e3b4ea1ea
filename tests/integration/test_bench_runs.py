"""The benchmarks' smoke runs: experiments.bench_train end to end at the tiny shape (plt_jax and
PyTorch train the same model from the same weights and tokens, and the JSON and the printed table
report every side), its profiler, and bench_decode with its breakdown on a tiny model."""
import json
import math
import os

import pytest

from experiments import bench_decode, bench_decode_breakdown, bench_train
from experiments.bench import train as train_bench


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


def test_profile_case_groups_a_train_step_by_named_scope(tmp_path):
  cfg = train_bench.model_config('tiny', 2, 'auto')
  spec = train_bench.SHAPES['tiny']
  batch = train_bench.random_batch(cfg.vocab_size, spec['batch'], spec['seq_len'], 0)
  side = train_bench.JaxSide(cfg, train_bench.optimizer_config(), batch, 0)
  prof = train_bench.profile_case(side, str(tmp_path / 'trace'), steps=2, top=5)
  assert prof['steps'] == 2 and len(prof['ops']) == 5
  assert all(r['ms_per_step'] > 0 for r in prof['ops'])
  assert prof['wall_ms_per_step'] > 0 and prof['op_ms_per_step'] > 0
  scopes = {r['scope']: r for r in prof['scopes']}
  assert {'mlp fwd', 'mlp bwd', 'attention fwd', 'attention bwd', 'qkv fwd', 'head bwd',
          'loss fwd', 'optimizer'} <= set(scopes), sorted(scopes)
  assert 'unmatched' not in scopes
  assert scopes['mlp fwd']['gflop'] > 0 and scopes['optimizer']['gflop'] == 0
  # The parsed matmul FLOPs are part of XLA's own count (which adds elementwise work).
  matmul = sum(r['gflop'] for r in prof['scopes'])
  assert 0.5 * prof['xla_gflop_per_step'] < matmul <= prof['xla_gflop_per_step'] * 1.001


def test_bench_decode_and_breakdown_small(tmp_path):
  out = tmp_path / 'bench.json'
  assert bench_decode.main(['--small', '--loops', '1,2', '--modes', 'plt,vanilla',
                            '--out', str(out)]) == 0
  res = json.load(open(out))
  assert {(r['mode'], r['R']) for r in res['results']} == {
      ('plt', 1), ('plt', 2), ('vanilla', 1), ('vanilla', 2)}
  for r in res['results']:
    assert r['kv_bytes'] == r['kv_bytes_formula'] and r['step_ms'] > 0
  by = {(r['mode'], r['R']): r for r in res['results']}
  assert by[('vanilla', 2)]['kv_bytes'] == 2 * by[('vanilla', 1)]['kv_bytes']
  assert 'plt_R2/plt_R1' in res['ratios']['batch1']
  out2 = tmp_path / 'breakdown.json'
  assert bench_decode_breakdown.main(['--small', '--loops', '1,2', '--out', str(out2)]) == 0
  rows = json.load(open(out2))['results']
  assert [r['R'] for r in rows] == [1, 2] and rows[0]['step_over_r1'] == 1.0
  assert all(r['step_ms'] > 0 and r['projections_ms'] > 0 for r in rows)
