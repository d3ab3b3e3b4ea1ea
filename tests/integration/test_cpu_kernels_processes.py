"""The CPU kernels (kernels/cpu_rows.py, kernels/cpu_decode.py) in fresh processes: a first call
registers the kernel, the thread pool follows the affinity mask, idle helper threads sleep."""
import os
import shutil
import subprocess
import sys

import jax
import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or shutil.which('g++') is None and shutil.which('c++') is None,
    reason='the kernels are built with the system C++ compiler for the CPU backend')


def test_rows_matmul_first_use_registers_the_kernel():
  """A fresh process whose first call is rows_matmul (pytest-xdist workers, users) works."""
  code = ('import jax, numpy as np; from plt_jax.kernels import cpu_rows; '
          'x = np.arange(6, dtype=np.float32).reshape(2, 3); w = np.ones((3, 5), np.float32); '
          'print(float(np.asarray(jax.jit(cpu_rows.rows_matmul)(x, w)).sum()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=REPO)
  assert out.stdout.strip().splitlines()[-1] == '75.0'  # (0+1+2 + 3+4+5) * 5 columns


def test_decode_attention_first_use_registers_the_kernel():
  """A fresh process whose first kernel call is decode attention (xdist workers, users) works."""
  code = ('import jax, numpy as np; from plt_jax.kernels import cpu_decode; '
          'o = np.ones((1, 1, 2, 4), np.float32); c = np.zeros((1, 3, 1, 4), np.float32); '
          'y, k, v = jax.jit(cpu_decode.decode_attention)(o, o[:, :, :1], 2 * o[:, :, :1], '
          'np.array([0], np.int32), c, c); print(float(np.asarray(y).sum()), float(k.sum()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=REPO)
  assert out.stdout.strip().splitlines()[-1] == '16.0 4.0'  # one key: y = v = 2 in 2 heads x 4


def test_rows_matmul_threads_follow_the_affinity_mask():
  """Pinned to one core, the kernels size their pool to it and still compute the same product."""
  if not hasattr(os, 'sched_setaffinity'):
    pytest.skip('no affinity masks on this platform')
  code = ('import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); '
          'import jax, numpy as np; from plt_jax.kernels import cpu_ffi, cpu_rows; '
          'rng = np.random.default_rng(3); x = rng.standard_normal((3, 700)).astype(np.float32); '
          'w = rng.standard_normal((700, 130)).astype(np.float32); '
          'got = np.asarray(jax.jit(cpu_rows.rows_matmul)(x, w)); '
          'print(cpu_ffi.usable_cores(), float(np.abs(got - x.astype(np.float64) @ w).max()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=REPO)
  cores, err = out.stdout.strip().splitlines()[-1].split()
  assert int(cores) == 1
  assert float(err) < 1e-3


def test_rows_matmul_idle_helpers_sleep():
  """The kernels' helper threads spin for a bounded moment after a call, then sleep: an idle
  decoder costs no core. Measured as this fresh process's CPU time while it sleeps."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip('one core: the kernels start no helper threads')
  code = ('import time, resource, jax, numpy as np; from plt_jax.kernels import cpu_rows; '
          'x = np.ones((4, 512), np.float32); w = np.ones((512, 4096), np.float32); '
          'f = jax.jit(cpu_rows.rows_matmul); [f(x, w).block_until_ready() for _ in range(20)]; '
          'cpu = lambda: resource.getrusage(resource.RUSAGE_SELF); time.sleep(0.05); '
          'a = cpu(); time.sleep(0.5); b = cpu(); '
          'print(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=REPO)
  idle_cpu_s = float(out.stdout.strip().splitlines()[-1])
  assert idle_cpu_s < 0.05, f'{idle_cpu_s:.3f} s of CPU in 0.5 s of idling'
