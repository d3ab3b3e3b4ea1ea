"""Kernels behind `plt_jax.attention`: the package `plt_jax.kernels`.

The checkout's top-level kernels/ directory, mapped to `plt_jax.kernels` by an install (setup.py's
package_dir) or, on a bare checkout, by `plt_jax` itself; it is imported under that name only.

A leaf of the library: these modules import JAX, NumPy and each other, never the rest of
plt_jax, and importing this package loads nothing. `plt_jax.attention` chooses among them.

  ops.py         fused G-SWA + causal flash attention in Pallas: Triton on GPU, Mosaic on TPU,
                 interpret mode elsewhere (tests only)
  cudnn.py       jax.nn.dot_product_attention per branch (the cuDNN baseline on GPU)
  cpu_decode.py  one layer's cached decode attention on CPU (C++ via the XLA FFI)
  cpu_rows.py    few-row matrix products on CPU (the decode step's projections)
  masks.py       the visibility rule they all share
"""

if __name__ != 'plt_jax.kernels':
  # Run from the checkout's root, this directory is also importable as a top-level `kernels`, the
  # name of an unrelated PyPI package that other libraries probe for (transformers imports it to
  # read a version). That probe must see a harmless empty module, so the import succeeds here but
  # no submodule can load under the wrong name: one file stays one module.
  __path__ = []
