"""The preset table: typed sections that set config keys of the same names, and nothing else."""
import dataclasses

import pytest

from configs import r1, r2, r3, r4, sweep as sweep_file
from plt_jax import presets
from plt_jax.config import ModelConfig
from plt_jax.data import default_data_config
from plt_jax.presets import PRESETS

SECTIONS = ('train', 'optimizer', 'data', 'mesh', 'eval', 'checkpoint')


@pytest.mark.parametrize('name', sorted(PRESETS))
@pytest.mark.parametrize('loops', [1, 3])
def test_config_is_the_preset(name, loops):
  preset = PRESETS[name]
  cfg = presets.get_config(name, num_loops=loops)
  assert cfg.preset == name
  # The model section is the preset's model, the loop count apart: no dtype or remat switched.
  assert ModelConfig.from_dict(cfg.model) == preset.model.replace(num_loops=loops)
  for section in SECTIONS:
    for field, value in dataclasses.asdict(getattr(preset, section)).items():
      if value is None:  # the library default stays
        want = default_data_config()[field]
        assert cfg[section][field] == want, (name, section, field)
      elif isinstance(value, dict):
        assert {k: cfg[section][field][k] for k in value} == value, (name, section, field)
      else:
        assert cfg[section][field] == value, (name, section, field)


def test_accelerator_presets_state_their_numerics():
  assert PRESETS['default'].model.dtype == 'float32' and PRESETS['default'].model.remat == 'none'
  for name in ('125m', '1b', '7b'):
    assert (PRESETS[name].model.dtype, PRESETS[name].model.remat) == ('bfloat16', 'dots_no_batch')
    assert presets.get_config(name).model.dtype == 'bfloat16'
  assert presets.get_config('default').model.dtype == 'float32'


def test_config_files_choose_only_the_loop_count():
  for loops, module in enumerate((r1, r2, r3, r4), start=1):
    for name in (None, 'default', '7b', 'phop2'):
      got = module.get_config(name).to_dict()
      want = presets.get_config(name, num_loops=loops).to_dict()
      assert got == want
      assert got['model']['num_loops'] == loops
  assert r2.get_config().preset == 'default'


def test_sweep_presets():
  cfg = sweep_file.get_config()
  assert cfg.preset == 'sweep' and (cfg.train.steps, cfg.train.seq_len) == (120, 256)
  assert cfg.sweep.variants == 'r1,r2,r3,r4,vanilla2' and tuple(cfg.sweep.seeds) == ()
  # A preset without a sweep section sweeps with the section's defaults.
  assert sweep_file.get_config('125m').sweep.to_dict() == dataclasses.asdict(
      presets.SweepSection())
  study = sweep_file.get_config('phop2')
  assert (study.data.task, study.data.task_params.hops, study.data.task_params.length,
          study.data.task_params.alphabet) == ('phop', 2, 10, 4)
  assert study.model.num_layers == 1 and study.train.steps == 1000
  assert study.sweep.variants == 'r1,r2,r3,r4,r4+ll,vanilla4'
  assert tuple(study.sweep.seeds) == (0, 1, 2) and study.optimizer.peak_lr == 1e-3
  # The other task params keep the 'unset' marker.
  assert study.data.task_params.to_dict() == {
      **default_data_config().task_params.to_dict(), 'hops': 2, 'length': 10, 'alphabet': 4}


def test_unknown_preset_is_one_line():
  with pytest.raises(ValueError, match=r"unknown preset '3b'; choose one of \['125m'"):
    presets.get_config('3b')
  with pytest.raises(ValueError, match='unknown preset'):
    sweep_file.get_config('phpo')
