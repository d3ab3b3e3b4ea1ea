"""The loop-count sweep of a preset (default: 'sweep', the CPU text sweep).

python -m experiments.sweep --config=configs/sweep.py[:PRESET], e.g. configs/sweep.py:phop2; the
presets and the sweep section are documented in plt_jax/presets.py.
"""
from plt_jax import presets


def get_config(preset=None):
  return presets.sweep_config(preset)
