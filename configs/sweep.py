"""The loop-count sweep: python -m experiments.sweep --config=configs/sweep.py[:PRESET].

The sweep config and its presets are documented in plt_jax/presets.py (`sweep_config`).
"""
from plt_jax import presets
from plt_jax.presets import SWEEP_TRAIN  # noqa: F401  (re-exported)


def get_config(arg=None):
  return presets.sweep_config(arg)
