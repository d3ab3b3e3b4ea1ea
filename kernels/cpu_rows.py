"""A CPU kernel for products of a few rows by a weight matrix: PLT's decode step on CPU.

At batch 1 the PLT step multiplies R rows (one per loop) by every weight matrix. On CPU that is
memory-bound, so R rows should cost about what one row costs. XLA:CPU sends one row to a
matrix-vector kernel streaming the weights at full bandwidth, but 2..8 rows to a general GEMM
that runs ~3x slower (and OpenBLAS behaves alike), so R rows cost ~R rows.
`kernels/cpu/rows_matmul.cc` streams the matrix once for all rows (an XLA FFI custom call, so it
runs inside the jitted step). It is compiled on first use with the system C++ compiler against
jaxlib's FFI headers, and cached; without a compiler `available()` is False and callers keep
XLA's dot.

  PLT_CPU_KERNELS=0       never build or use it
  PLT_KERNEL_CACHE=DIR    where the compiled library goes (default ~/.cache/plt_jax/kernels)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).parent / 'cpu' / 'rows_matmul.cc'
TARGET = 'plt_rows_matmul'
MAX_ROWS = 8          # rows per kernel call (its accumulators are templated up to this)
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


def _cpu_model() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith(('model name', 'flags')):
        return line  # '-march=native' code is only valid on the CPU it was built for
  except OSError:
    pass
  return platform.processor()


def library_path(cache_dir: Optional[str] = None) -> Path:
  """Where the compiled kernel for this source, jaxlib, compiler flags and CPU lives."""
  key = hashlib.sha256('\n'.join([SOURCE.read_text(), jaxlib.__version__, ' '.join(FLAGS),
                                  platform.machine(), _cpu_model()]).encode()).hexdigest()[:16]
  root = Path(cache_dir or os.environ.get('PLT_KERNEL_CACHE')
              or Path.home() / '.cache' / 'plt_jax' / 'kernels')
  return root / f'rows_matmul-{key}.so'


def build(cache_dir: Optional[str] = None) -> Path:
  """Compiles the kernel unless cached. Raises RuntimeError with the compiler's message."""
  out = library_path(cache_dir)
  if out.exists():
    return out
  cxx = shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('c++')
  if cxx is None:
    raise RuntimeError('no C++ compiler found (set CXX)')
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build to a temporary name and rename: parallel processes (pytest-xdist) may race here.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, *FLAGS, '-I', jax.ffi.include_dir(), str(SOURCE), '-o', tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f'compiling {SOURCE.name} failed:\n{" ".join(cmd)}\n{proc.stderr[-2000:]}')
  os.replace(tmp, out)
  return out


@functools.cache
def available() -> bool:
  """Builds (once per process) and registers the kernel; False where it cannot be used."""
  if os.environ.get('PLT_CPU_KERNELS', '1') == '0':
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PltRowsMatmul), platform='cpu')
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('CPU rows-matmul kernel unavailable, using XLA dot: %s', e)
    return False
  return True


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., D] @ w [D, F] in float32 with the kernel (call only where `available()`).

  More than MAX_ROWS rows go through in chunks of MAX_ROWS, each streaming w once; a single row
  goes to XLA's dot.
  """
  if not available():  # builds and registers on first use in this process
    raise RuntimeError('the CPU rows-matmul kernel is unavailable here (see the logged reason)')
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.ndim != 2:
    raise ValueError(f'rows_matmul: float32 x [..., D] and w [D, F]; got {x.dtype}{x.shape}, '
                     f'{w.dtype}{w.shape}')
  lead, (d, f) = x.shape[:-1], w.shape
  x2 = x.reshape(-1, d)
  if x2.shape[0] == 1:  # XLA's matrix-vector kernel already streams w once, as fast
    return jnp.dot(x, w)
  call = lambda rows: jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct((rows.shape[0], f), jnp.float32))(rows, w)
  outs = [call(x2[i:i + MAX_ROWS]) for i in range(0, x2.shape[0], MAX_ROWS)]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return out.reshape(*lead, f)
