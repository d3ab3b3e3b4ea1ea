"""Shared experiment config; the presets live in plt_jax/presets.py (documented there).

`configs/r{1,2,3,4}.py` differ only in `model.num_loops`.
"""
from plt_jax import presets
from plt_jax.presets import TRAIN_PRESETS, model_config  # noqa: F401  (re-exported)


def get_config(arg=None, *, num_loops):
  return presets.get_config(arg, num_loops=num_loops)
