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
  # name of an unrelated PyPI package (a dependency of recent transformers, which imports names
  # from it; older ones only probe for its version). Where that package is installed, this import
  # hands over to it; elsewhere this stays an empty module, so a probe reads no version. No
  # submodule of ours ever loads under the wrong name: one file stays one module.
  import importlib.machinery as _machinery
  import importlib.util as _util
  import os as _os
  import sys as _sys
  _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
  _spec = _machinery.PathFinder.find_spec(
      __name__, [p for p in _sys.path if _os.path.realpath(p or '.') != _root])
  __path__ = []
  if _spec is not None and _spec.loader is not None:
    _real = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _real   # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_real)
