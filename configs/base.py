"""Shared experiment config. `configs/r{1,2,3,4}.py` differ only in `model.num_loops`.

`get_config(arg)` takes a preset name: 'default' (trains on a 2-core CPU in minutes), '125m', '1b', '7b'
(the LoopCoder-V2 release shape). Any field can be overridden on the command line, e.g.
`--config=configs/r2.py:125m --config.model.num_loops=4 --config.train.steps=1000`.
"""
from __future__ import annotations

import ml_collections

from plt_jax.config import ModelConfig, PRESETS


def model_config(preset: str, num_loops: int) -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {sorted(PRESETS)}')
  fields = ModelConfig().to_dict()
  fields.update(PRESETS[preset])
  fields['num_loops'] = num_loops
  if preset != 'default':
    fields.update(dtype='bfloat16', remat='dots_no_batch', attention_impl='auto')
  ModelConfig.from_dict(fields)  # validate early
  return ml_collections.ConfigDict(fields)


def get_config(arg: str | None = None, *, num_loops: int) -> ml_collections.ConfigDict:
  preset = arg or 'default'
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  cfg.seed = 0
  cfg.model = model_config(preset, num_loops)
  return cfg
