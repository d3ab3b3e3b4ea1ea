"""The installed distribution: only the plt_jax package, usable without the checkout.

A wheel is built from a copy of the working tree and inspected; installed into a plain directory it
must import (presets, kernels) from a process that cannot see the repository. A bare checkout on
PYTHONPATH maps kernels/ to plt_jax.kernels under that one name, and the top-level name `kernels`
stays an empty module for transformers' probe.
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import CHECKOUT_ONLY, REPO, package_source_files

PKG = os.path.join(REPO, 'plt_jax')
HF_MODELING = ('plt_jax/hf/torch_src/modeling_plt.py', 'plt_jax/hf/torch_src/configuration_plt.py')


def _version() -> str:
  with open(os.path.join(PKG, '__init__.py')) as f:
    return re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)


def _pip_env() -> dict:
  # Offline: the build needs setuptools from this environment only.
  return dict(os.environ, PIP_NO_INDEX='1', PIP_DISABLE_PIP_VERSION_CHECK='1',
              PIP_NO_INPUT='1')


def _copy_tree(dst: str) -> str:
  """Copies the working tree without run outputs, build dirs and dot folders (.git, .venv)."""
  def ignore(directory, names):
    skip = {n for n in names if n in ('__pycache__', 'build', 'dist')
            or n.endswith(('.pyc', '.egg-info'))}
    if os.path.samefile(directory, REPO):
      skip |= {n for n in names if n.startswith('.') or n in ('runs', 'workdirs')}
    return skip
  # Symlinks stay links, as in a git clone.
  shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)
  return dst


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """A wheel of the working tree. It is built from a copy: setuptools' build/ keeps files of
  earlier builds (which would end up in the wheel) and would be shared by concurrent runs."""
  root = tmp_path_factory.mktemp('wheel')
  src = _copy_tree(str(root / 'src'))
  out = root / 'dist'
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps', '--no-build-isolation',
       '-w', str(out), '-q'],
      cwd=src, env=_pip_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  wheels = sorted(out.glob('*.whl'))
  assert len(wheels) == 1, wheels
  return str(wheels[0])


def test_wheel_holds_only_plt_jax(wheel):
  dist_info = f'plt_jax-{_version()}.dist-info'
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    top_level = zf.read(f'{dist_info}/top_level.txt').decode().split()
  tops = collections.Counter(n.split('/')[0] + ('/' if '/' in n else '') for n in names)
  assert set(tops) == {'plt_jax/', f'{dist_info}/'}, tops
  assert top_level == ['plt_jax'], top_level
  required = ['plt_jax/kernels/__init__.py', 'plt_jax/kernels/ops.py', 'plt_jax/kernels/masks.py',
              'plt_jax/kernels/cpu/rows_matmul.cc', 'plt_jax/kernels/cpu/decode_attention.cc',
              'plt_jax/kernels/cpu/parallel.h', 'plt_jax/kernels/cpu/simd.h',
              'plt_jax/presets.py', *HF_MODELING]
  missing = [n for n in required if n not in names]
  assert not missing, f'missing from the wheel: {missing}'
  # Every source file the package reads: all modules, and the CPU kernels' C++ sources.
  sources = [f for f in package_source_files() if f.endswith(('.py', '.cc', '.h'))]
  missing = [f for f in sources if f not in names]
  assert not missing, f'in the package sources but not in the wheel: {missing}'
  # The kernels exactly once, at their package path (no top-level kernels/, no stale files).
  kernels = sorted(n for n in names if n.startswith('plt_jax/kernels/'))
  assert kernels == sorted(f for f in sources if f.startswith('plt_jax/kernels/')), kernels
  # Benchmarks are not library code: their flags would become a library API.
  benchmarks = [n for n in names if re.search(r'bench|profiling|timing', n.rsplit('/', 1)[-1])]
  assert not benchmarks, f'benchmark modules in the wheel: {benchmarks}'


# Runs with -S: no site-packages .pth files, so the checkout's editable finder is not installed.
_INSTALLED_CHECK = r'''
import importlib, json, os, sys, traceback
target, repo, deps = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {'meta_path': [type(f).__name__ for f in sys.meta_path]}

def attempt(key, fn):
  try:
    out[key] = fn()
  except Exception:
    out[key] = 'ERROR ' + traceback.format_exc()

def preset():
  import plt_jax
  from plt_jax import presets
  from plt_jax.config import ModelConfig
  out['plt_jax_file'] = plt_jax.__file__
  cfg = presets.get_config('default', num_loops=2)
  model = ModelConfig.from_dict(cfg.model)
  return {'num_loops': model.num_loops, 'preset': cfg.preset,
          'sweep_variants': presets.sweep_config().sweep.variants}

def kernels():
  import plt_jax.kernels
  import plt_jax.kernels.masks
  import plt_jax.kernels.ops
  cpu = os.path.join(os.path.dirname(plt_jax.kernels.__file__), 'cpu')
  return {'ops_file': plt_jax.kernels.ops.__file__, 'cpu_sources': sorted(os.listdir(cpu))}

def checkout_only(name):
  try:
    module = importlib.import_module(name)
  except ImportError:
    return 'ImportError'
  return 'imported from ' + str(getattr(module, '__file__', None) or list(module.__path__))

def in_dir(path, directory):
  return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)

attempt('preset', preset)
attempt('kernels', kernels)
out['checkout_only'] = {name: checkout_only(name) for name in ('configs', 'kernels', 'experiments')}
# The dependencies' site-packages may lie inside the checkout (a .venv there): not the checkout.
out['from_repo'] = sorted(
    name for name, m in list(sys.modules.items())
    if getattr(m, '__file__', None) and in_dir(m.__file__, repo)
    and not any(in_dir(m.__file__, d) for d in deps))
print('RESULT ' + json.dumps(out))
'''


def test_installed_wheel_works_without_the_checkout(wheel, tmp_path):
  target = tmp_path / 'site'
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-compile', '-q',
       '--target', str(target), wheel],
      env=_pip_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # Dependencies come from this environment's site-packages, plt_jax only from the target.
  deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib')))
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
  env.update(PYTHONPATH=os.pathsep.join([str(target)] + deps), JAX_PLATFORMS='cpu',
             PYTHONDONTWRITEBYTECODE='1')
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  proc = subprocess.run([sys.executable, '-S', '-c', _INSTALLED_CHECK, str(target), REPO, *deps],
                        cwd=outside, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
  r = json.loads(lines[-1][len('RESULT '):])

  assert not any('Editable' in f or 'editable' in f for f in r['meta_path']), r['meta_path']
  assert r['from_repo'] == [], f'modules loaded from the checkout: {r["from_repo"]}'
  assert not str(r['preset']).startswith('ERROR'), r['preset']
  assert os.path.realpath(r['plt_jax_file']).startswith(os.path.realpath(target) + os.sep), r
  assert r['preset'] == {'num_loops': 2, 'preset': 'default',
                         'sweep_variants': 'r1,r2,r3,r4,vanilla2'}, r['preset']
  assert r['checkout_only'] == {name: 'ImportError' for name in CHECKOUT_ONLY}, r['checkout_only']
  assert not str(r['kernels']).startswith('ERROR'), r['kernels']
  assert os.path.realpath(r['kernels']['ops_file']).startswith(os.path.realpath(target)), r
  assert 'rows_matmul.cc' in r['kernels']['cpu_sources'], r['kernels']


# Runs with -S as above: only the copied checkout on the path, no editable finder.
_CHECKOUT_CHECK = r"""
import json, os, sys, traceback
out = {}
import plt_jax.kernels
from plt_jax.kernels import masks, ops
from plt_jax import attention
out['files'] = [plt_jax.__file__, plt_jax.kernels.__file__, ops.__file__, attention.masks.__file__]
out['same_module'] = attention.masks is masks is sys.modules['plt_jax.kernels.masks']
import kernels
try:
  import kernels.ops
  out['top_level'] = 'kernels.ops loaded'
except ImportError as e:
  out['top_level'] = f'{kernels.__path__} {e}'
out['modules'] = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))
print('RESULT ' + json.dumps(out))
"""


def test_bare_checkout_maps_kernels_once(tmp_path):
  """A checkout on PYTHONPATH, not installed: kernels/ is plt_jax.kernels, and only that."""
  src = tmp_path / 'checkout'
  src.mkdir()
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for name in ('plt_jax', 'kernels'):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  shutil.copy(os.path.join(REPO, 'setup.py'), src / 'setup.py')
  deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib')))
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
  # The checkout first and the working directory too, so that `import kernels` could find it.
  env.update(PYTHONPATH=os.pathsep.join([str(src)] + deps), JAX_PLATFORMS='cpu',
             PYTHONDONTWRITEBYTECODE='1')
  proc = subprocess.run([sys.executable, '-S', '-c', _CHECKOUT_CHECK], cwd=src, env=env,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
  r = json.loads(lines[-1][len('RESULT '):])
  want = [src / 'plt_jax' / '__init__.py', src / 'kernels' / '__init__.py',
          src / 'kernels' / 'ops.py', src / 'kernels' / 'masks.py']
  assert [os.path.realpath(f) for f in r['files']] == [os.path.realpath(w) for w in want], r
  assert r['same_module'] is True, r
  # `kernels` itself is an empty module (see the next test); nothing loads under it.
  assert r['top_level'] == "[] No module named 'kernels.ops'", r
  assert r['modules'] == ['kernels'], r


def test_top_level_kernels_name_hands_over_or_is_empty():
  """Run from the root, the checkout's kernels/ is also the top-level name `kernels`, an unrelated
  PyPI package that transformers probes for (and, from 5.25, depends on). Where that package is
  installed the name must give it; elsewhere an empty module with no version. Either way no
  submodule of ours loads under that name, and transformers imports."""
  code = ('import importlib.metadata as md, os, sys, kernels\n'
          'try:\n  md.version("kernels"); installed = True\n'
          'except md.PackageNotFoundError:\n  installed = False\n'
          'ours = kernels.__dict__.get("__path__") == []\n'
          'assert ours != installed, (installed, kernels)\n'
          'if installed:\n'
          '  assert not os.path.realpath(kernels.__file__).startswith(os.getcwd())\n'
          'else:\n'
          '  assert not hasattr(kernels, "__version__")\n'
          '  try:\n    import kernels.ops\n  except ImportError:\n    pass\n'
          '  else:\n    sys.exit("kernels.ops loaded under the wrong name")\n'
          'from transformers import PreTrainedModel\n'
          'from transformers.utils import import_utils\n'
          'assert import_utils.is_kernels_available() is False or installed\n'
          'import plt_jax.kernels.masks\nassert "kernels.masks" not in sys.modules\n'
          'print("ok", installed)\n')
  pytest.importorskip('transformers', reason='the probe under test is transformers\' own')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.startswith('ok'), out.stderr[-2000:]
