"""kernels/cpu_rows.py: the CPU few-row matmul (XLA FFI) against float64 numpy."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plt_jax.kernels import cpu_rows

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or shutil.which('g++') is None and shutil.which('c++') is None,
    reason='the kernel is built with the system C++ compiler for the CPU backend')


def test_builds_and_registers():
  # Where a compiler exists the kernel must build: a silent fallback would hide a broken build.
  assert cpu_rows.available()
  assert cpu_rows.library_path().exists()


# Odd widths: D not a multiple of the kernel's 4-row unroll, F not a multiple of its 256-column
# block (and smaller than one), rows 1..8 plus 11 and 16 (chunks of 8).
@pytest.mark.parametrize('m,d,f', [(1, 67, 300), (2, 67, 300), (3, 130, 257), (4, 5, 1),
                                   (5, 3, 513), (7, 768, 255), (8, 129, 1030), (11, 65, 700),
                                   (16, 33, 256)])
def test_matches_float64(m, d, f):
  rng = np.random.default_rng(m * 1000 + d)
  x = rng.standard_normal((m, d)).astype(np.float32)
  w = rng.standard_normal((d, f)).astype(np.float32)
  got = np.asarray(jax.jit(cpu_rows.rows_matmul)(x, w))
  ref = x.astype(np.float64) @ w.astype(np.float64)
  assert got.shape == (m, f)
  # float32 accumulation over d terms: relative error well under 1e-6 * sqrt(d).
  assert np.abs(got - ref).max() <= 2e-6 * np.sqrt(d) * np.abs(ref).max()


def test_leading_dims_and_rows_are_independent():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 3, 40)).astype(np.float32)
  w = rng.standard_normal((40, 300)).astype(np.float32)
  f = jax.jit(cpu_rows.rows_matmul)
  got = np.asarray(f(x, w))
  assert got.shape == (2, 3, 300)
  # Changing one row changes only that row's output.
  x2 = x.copy()
  x2[1, 2] = rng.standard_normal(40)
  got2 = np.asarray(f(x2, w))
  np.testing.assert_array_equal(np.delete(got.reshape(6, -1), 5, 0),
                                np.delete(got2.reshape(6, -1), 5, 0))
  assert np.abs(got2[1, 2] - got[1, 2]).max() > 1.0


def test_rejects_other_dtypes():
  with pytest.raises(ValueError, match='float32'):
    cpu_rows.rows_matmul(jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))


def test_library_is_keyed_on_the_instruction_set(monkeypatch):
  """'-march=native' builds differ per ISA: a CPU with other flags must not load this build."""
  from plt_jax.kernels import cpu_ffi  # pylint: disable=import-outside-toplevel
  model = cpu_ffi._cpu_model()  # pylint: disable=protected-access
  if os.path.exists('/proc/cpuinfo') and 'flags' in open('/proc/cpuinfo').read():
    assert 'flags' in model
  here = cpu_ffi.library_path('/tmp/k')
  monkeypatch.setattr(cpu_ffi, '_cpu_model', lambda: model.replace(' avx2', ''))
  assert (cpu_ffi.library_path('/tmp/k') != here) == (' avx2' in model)
  monkeypatch.setattr(cpu_ffi, '_cpu_model', lambda: model + ' some_new_extension')
  assert cpu_ffi.library_path('/tmp/k') != here
