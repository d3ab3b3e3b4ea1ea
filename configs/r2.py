"""R=2 loops. Presets: default (CPU), 125m, 1b, 7b; e.g. --config=configs/r2.py:125m.

The presets are documented in plt_jax/presets.py.
"""
from plt_jax import presets


def get_config(arg=None):
  return presets.r2(arg)
