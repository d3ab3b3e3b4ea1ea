"""R=4 loops on a preset of plt_jax.presets.PRESETS (default: 'default', the CPU run).

e.g. --config=configs/r4.py:125m; the presets are documented in plt_jax/presets.py.
"""
from plt_jax import presets


def get_config(preset=None):
  return presets.get_config(preset, num_loops=4)
