"""Builds and registers the C++ CPU kernels in `kernels/cpu/` (XLA FFI custom calls).

They serve cached decoding on CPU, where a batch-1 step is memory-bound and small-op bound:
  plt_rows_matmul                     few rows x a weight matrix, streamed once (`cpu_rows.py`)
  plt_decode_attention[_causal]       one layer's cached attention, in place (`cpu_decode.py`)
All sources are compiled on first use into one library with the system C++ compiler against
jaxlib's FFI headers, and cached; without a compiler `available()` is False and callers keep XLA.

  PLT_CPU_KERNELS=0       never build or use them
  PLT_KERNEL_CACHE=DIR    where the compiled library goes (default ~/.cache/plt_jax/kernels)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jaxlib

SOURCE_DIR = Path(__file__).parent / 'cpu'
SOURCES = ('rows_matmul.cc', 'decode_attention.cc')
HEADERS = ('parallel.h', 'simd.h')
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    'plt_rows_matmul': 'PltRowsMatmul',
    'plt_decode_attention': 'PltDecodeAttention',
    'plt_decode_attention_causal': 'PltDecodeAttentionCausal',
}
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


def _cpu_model() -> str:
  """The CPU's model name and instruction-set flags: '-march=native' code is only valid where
  both match (a home directory shared across a cluster's CPUs must not load another's build)."""
  found = {}
  try:
    for line in open('/proc/cpuinfo'):
      key = line.split(':', 1)[0].strip()
      if key in ('model name', 'flags', 'Features', 'CPU part') and key not in found:
        found[key] = line.strip()
  except OSError:
    pass
  return '\n'.join(found[k] for k in sorted(found)) or platform.processor()


def usable_cores() -> int:
  """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
  try:
    n = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    n = os.cpu_count() or 1
  quota = None
  try:  # cgroup v2: "max 100000" or "<quota> <period>"
    q, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()[:2]
    if q != 'max':
      quota = int(q) / int(period)
  except (OSError, ValueError):
    try:  # cgroup v1
      q = int(Path('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read_text())
      period = int(Path('/sys/fs/cgroup/cpu/cpu.cfs_period_us').read_text())
      if q > 0:
        quota = q / period
    except (OSError, ValueError):
      pass
  if quota is not None:
    n = min(n, max(1, math.ceil(quota)))
  return max(1, n)


def library_path(cache_dir: Optional[str] = None) -> Path:
  """Where the library for these sources, jaxlib, compiler flags and CPU lives."""
  texts = [(SOURCE_DIR / f).read_text() for f in SOURCES + HEADERS]
  key = hashlib.sha256('\n'.join([*texts, jaxlib.__version__, ' '.join(FLAGS),
                                  platform.machine(), _cpu_model()]).encode()).hexdigest()[:16]
  root = Path(cache_dir or os.environ.get('PLT_KERNEL_CACHE')
              or Path.home() / '.cache' / 'plt_jax' / 'kernels')
  return root / f'plt_cpu_kernels-{key}.so'


def build(cache_dir: Optional[str] = None) -> Path:
  """Compiles the library unless cached. Raises RuntimeError with the compiler's message."""
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
  cmd = [cxx, *FLAGS, '-I', jax.ffi.include_dir(), '-I', str(SOURCE_DIR),
         *(str(SOURCE_DIR / f) for f in SOURCES), '-o', tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f'compiling the CPU kernels failed:\n{" ".join(cmd)}\n'
                       f'{proc.stderr[-2000:]}')
  os.replace(tmp, out)
  return out


@functools.cache
def available() -> bool:
  """Builds (once per process) and registers every target; False where they cannot be used."""
  if os.environ.get('PLT_CPU_KERNELS', '1') == '0':
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    lib.PltSetNumThreads(ctypes.c_int(usable_cores()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('CPU kernels unavailable, using XLA: %s', e)
    return False
  return True


def require(what: str) -> None:
  if not available():  # builds and registers on first use in this process
    raise RuntimeError(f'the CPU kernel for {what} is unavailable here (see the logged reason)')
