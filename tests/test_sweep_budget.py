"""The sweep's deep baseline, equal-FLOP budget and seeds (mean ± std), its tables and its presets.
Tiny sweeps end to end are tested in tests/integration/test_sweep_runs.py."""
import numpy as np
import pytest

from configs import sweep as sweep_config
from helpers import tiny_model_config
from plt_jax.train import flops
from plt_jax.study import sweep

# d=32, H=4 (head_dim 8), K=2, F=48, L=2, V=64; counted by hand below at T=16, W=5.
SMALL = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
             window_size=5, max_seq_len=64)
T = 16
# Per layer: q, k+v, o, MLP = 2*32*32 + 4*32*16 + 2*32*32 + 6*32*48 = 15360; attention
# 4*H*E = 128 FLOPs per query-key pair over (16 + 1) / 2 = 8.5 causal keys = 1088; head 2*32*64.
R1_FORWARD = 2 * (15360 + 1088) + 4096                                        # 36992
DEEP2_FORWARD = 4 * (15360 + 1088) + 4096                                     # 69888
# Loop 2 adds the window branch (128 * mean_i min(i + 1, 5) = 128 * 70 / 16) and the hidden gate
# (2 * d * H = 256) per layer.
R2_FORWARD = 2 * 2 * (15360 + 1088) + 2 * 128 * 70 / 16 + 2 * 256 + 4096     # 71520


def small(**kw):
  return tiny_model_config(**{**SMALL, **kw})


def test_parse_deep_variants():
  assert sweep.parse_variants('r2,deep2,vanilla3') == [
      ('r2', 2, 'plt'), ('deep2', 2, 'deep'), ('vanilla3', 3, 'vanilla')]
  for bad in ('deep0', 'deep', 'deepx2'):
    with pytest.raises(ValueError, match='sweep.variants'):
      sweep.parse_variants(bad)


def test_flops_by_hand():
  r1, r2 = small(num_loops=1), small(num_loops=2)
  deep2 = small(num_loops=1, num_layers=4)
  assert flops.flops_per_token(r1, T)['forward'] == R1_FORWARD
  assert flops.flops_per_token(r2, T)['forward'] == R2_FORWARD
  assert flops.flops_per_token(deep2, T)['forward'] == DEEP2_FORWARD
  # deep2 = 2 x r1 except the head, which both count once: the gap is exactly 2 * d * V.
  gap = 2 * flops.flops_per_token(r1, T)['forward'] - flops.flops_per_token(deep2, T)['forward']
  assert gap == 2 * 32 * 64


def test_steps_for_budget_by_hand():
  r1, r2 = small(num_loops=1), small(num_loops=2)
  deep2 = small(num_loops=1, num_layers=4)
  vanilla2 = small(num_loops=2, loop_mode='vanilla')
  assert flops.steps_for_budget(r1, r1, T, 100) == 100
  assert flops.steps_for_budget(r2, r1, T, 100) == 52        # 100 * 36992 / 71520 = 51.72
  assert flops.steps_for_budget(deep2, r1, T, 100) == 53     # 100 * 36992 / 69888 = 52.93
  assert flops.steps_for_budget(vanilla2, r1, T, 100) == 53  # vanilla2 costs what deep2 does
  assert flops.steps_for_budget(r1, r2, T, 100) == 193       # 100 * 71520 / 36992 = 193.34
  assert flops.steps_for_budget(r2, r1, T, 1) == 1           # never below one step


def test_budget_steps_reference_and_default():
  cfg = sweep_config.get_config()
  cfg.model.update(SMALL)
  cfg.train.update(steps=100, seq_len=T)
  variants = sweep.parse_variants('r2,deep2,r1,vanilla2')
  # 'steps' (the default) keeps every variant at train.steps.
  assert cfg.sweep.budget == 'steps' and tuple(cfg.sweep.seeds) == ()
  assert sweep.budget_steps(cfg, variants) == dict(r2=100, deep2=100, r1=100, vanilla2=100)
  cfg.sweep.budget = 'flops'  # r1 is the reference wherever it is listed
  assert sweep.budget_steps(cfg, variants) == dict(r2=52, deep2=53, r1=100, vanilla2=53)
  # Without r1, the first variant is the reference.
  assert sweep.budget_steps(cfg, sweep.parse_variants('r2,deep2')) == dict(
      r2=100, deep2=round(100 * R2_FORWARD / DEEP2_FORWARD))
  cfg.sweep.budget = 'tokens'
  with pytest.raises(ValueError, match='sweep.budget'):
    sweep.budget_steps(cfg, variants)


def test_mean_std():
  assert sweep.mean_std([1.0, 2.0, 4.0]) == dict(mean=7 / 3, std=pytest.approx(np.std(
      [1.0, 2.0, 4.0], ddof=1)), n=3)
  assert sweep.mean_std([3.0, None]) == dict(mean=3.0, std=None, n=1)
  assert sweep.mean_std([None]) == dict(mean=None, std=None, n=0)


def _fake_variant(name, kind, R, diags, exact=None):
  stat = sweep.mean_std
  return dict(name=name, kind=kind, R=R, seeds=list(range(len(diags))),
              exact_match=stat([exact] if exact is not None else []),
              final_val_loss=stat([1.0]), runs=[dict(seed=i, diagnostics=d)
                                                for i, d in enumerate(diags)])


def test_gain_cost_points_average_over_seeds():
  nan = float('nan')
  d = [dict(offset_cost=[nan, 2.0, 4.0], step_size=[9.0, 1.0, 0.5], lens_kl=[nan, 0.3, 0.1]),
       dict(offset_cost=[nan, 3.0, 5.0], step_size=[8.0, 2.0, 1.5], lens_kl=[nan, 0.5, None])]
  summary = [_fake_variant('r1', 'plt', 1, [dict(offset_cost=[nan], step_size=[1.0],
                                                 lens_kl=[nan])]),
             _fake_variant('deep2', 'deep', 2, d[:1]),
             _fake_variant('r3', 'plt', 3, d)]
  pts = sweep.gain_cost_points(summary)
  # Only looped variants with R >= 2, one point per loop r = 2..R; r1 and deep2 have none.
  assert [(p['name'], p['loop']) for p in pts] == [('r3', 2), ('r3', 3)]
  p2, p3 = pts
  assert p2['offset_cost'] == 2.5 and p2['offset_cost_std'] == pytest.approx(np.std([2, 3], ddof=1))
  assert p2['step_size'] == 1.5 and p2['lens_kl'] == pytest.approx(0.4)
  assert p3['step_size'] == 1.0 and p3['step_size_std'] == pytest.approx(np.std([0.5, 1.5], ddof=1))
  assert np.isnan(p3['lens_kl'])        # a missing seed value is not averaged away silently


def test_table_has_exact_match_only_for_tasks():
  def row(name, exact):
    v = _fake_variant(name, 'plt', 1, [dict(offset_cost=[0.0], step_size=[1.0], lens_kl=[0.0])],
                      exact)
    v.update(params=1e6, steps=10, train_tokens=100, train_flops=1e9, kv_bytes=10,
             final_val_ppl=sweep.mean_std([2.7]), decode_ms=sweep.mean_std([1.0]),
             mean_gate=sweep.mean_std([]))
    for k in sweep._LAST:  # pylint: disable=protected-access
      v[k] = sweep.mean_std([1.0])
    return v
  text = sweep.markdown_table([row('r1', None)])
  assert 'exact match' not in text
  text = sweep.markdown_table([row('r1', 0.25), row('r2', 0.875)])
  assert 'exact match' in text and '| 0.250 |' in text and '| 0.875 |' in text


def test_depth_check_in_seed_stds():
  def v(name, kind, accs):
    return dict(name=name, kind=kind, exact_match=sweep.mean_std(accs))
  text = sweep.depth_check([v('r1', 'plt', [0.30, 0.34, 0.32]), v('deep2', 'deep', [1.0, 0.98, 0.96])])
  # gap 0.66; the larger std is 0.02 (both are), so 33 x.
  assert 'deep2 - r1 exact match = +0.660, 33.0 x the larger seed std (0.02)' in text
  assert sweep.depth_check([v('r1', 'plt', [0.3]), v('deep2', 'deep', [0.5])]).endswith(
      '(one seed, no std).')
  # Against the held-out sampling error: p = 0.32 and 0.98 on 100 instances give
  # sqrt((0.32 * 0.68 + 0.98 * 0.02) / 100) = 0.0487, so the gap 0.66 is 13.55 x that.
  text = sweep.depth_check([v('r1', 'plt', [0.30, 0.34, 0.32]),
                            v('deep2', 'deep', [1.0, 0.98, 0.96])], heldout=100)
  assert text.endswith('; 13.6 x the sampling error of the gap on 100 held-out instances '
                       '(0.0487).')
  assert sweep.depth_check([v('r2', 'plt', [0.3]), v('deep2', 'deep', [0.5])]) == ''
  assert sweep.depth_check([v('r1', 'plt', [])]) == ''


def test_phop_preset_is_the_calibrated_study():
  from plt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  cfg = sweep_config.get_config('phop')
  assert cfg.preset == 'phop' and cfg.data.source == 'synthetic' and cfg.data.task == 'phop'
  spec = data_lib.task_spec(cfg.data)
  assert (spec.hops, spec.length, spec.alphabet) == (1, 8, 4)
  assert cfg.model.num_layers == 1 and cfg.sweep.budget == 'steps'
  assert [n for n, _, _ in sweep.parse_variants(cfg.sweep.variants)] == [
      'r1', 'deep2', 'vanilla2', 'r2', 'r3', 'r4']
  assert tuple(cfg.sweep.seeds) == (0, 1, 2)
  assert spec.max_len <= cfg.train.seq_len
  # The text presets are untouched by it.
  assert sweep_config.get_config().data.source == 'stdlib'
  with pytest.raises(ValueError, match="unknown preset 'phpo'"):
    sweep_config.get_config('phpo')
