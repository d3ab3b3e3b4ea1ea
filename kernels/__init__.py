"""Pallas kernels behind plt_jax.attention (registered on import)."""
