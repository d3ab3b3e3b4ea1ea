"""plt_jax: Parallel Loop Transformers in JAX/Flax NNX."""
from plt_jax.config import ModelConfig, PRESETS
from plt_jax.model import PLT

__all__ = ['ModelConfig', 'PRESETS', 'PLT']
__version__ = '0.1.0'
