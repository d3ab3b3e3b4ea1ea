"""plt_jax: Parallel Loop Transformers in JAX/Flax NNX.

`plt_jax.presets` (the experiment configs) is imported on first use: it pulls in the data
pipeline, which a model-only user does not need.
"""
import importlib

from plt_jax import _checkout

_checkout.register_kernels()  # a bare checkout's kernels/ as plt_jax.kernels, before any use of it

from plt_jax.config import ModelConfig  # noqa: E402
from plt_jax.model import PLT  # noqa: E402

__all__ = ['ModelConfig', 'PLT']
__version__ = '0.1.0'


def __getattr__(name):
  if name == 'presets':
    return importlib.import_module('plt_jax.presets')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
