"""R=3 loops. Presets: default (CPU), 125m, 1b, 7b; e.g. --config=configs/r3.py:125m."""
from configs import base


def get_config(arg=None):
  return base.get_config(arg, num_loops=3)
