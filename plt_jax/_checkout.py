"""`plt_jax.kernels` in a checkout that is not installed (the project on PYTHONPATH).

The kernels live in the checkout's top-level `kernels/` directory. An install maps that directory
to `plt_jax.kernels` (setup.py's `package_dir`: a wheel copies it to plt_jax/kernels/, an editable
install's finder points at it); a bare checkout has no such mapping, so `plt_jax/__init__.py`
calls `register_kernels()` first, which loads `kernels/` under that name. Either way the directory
is one package, `plt_jax.kernels` (its `__init__` refuses any other name).
"""
from __future__ import annotations

import importlib.util
import os
import sys

NAME = 'plt_jax.kernels'


def register_kernels() -> None:
  """Registers the checkout's kernels/ as plt_jax.kernels, unless plt_jax/kernels/ exists (a
  wheel) or this plt_jax/ does not sit in a checkout beside kernels/ and setup.py."""
  package = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(package)
  directory = os.path.join(root, 'kernels')
  init = os.path.join(directory, '__init__.py')
  if (NAME in sys.modules or os.path.isdir(os.path.join(package, 'kernels'))
      or not (os.path.isfile(init) and os.path.isfile(os.path.join(root, 'setup.py')))):
    return
  spec = importlib.util.spec_from_file_location(NAME, init, submodule_search_locations=[directory])
  module = importlib.util.module_from_spec(spec)
  sys.modules[NAME] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[NAME]
    raise
  setattr(sys.modules['plt_jax'], 'kernels', module)
