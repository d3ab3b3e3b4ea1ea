"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), loaded from the
source distribution of the installed transformers release.

transformers' wheel holds no tests. Its PyPI sdist holds `tests/test_modeling_common.py` and
`tests/test_configuration_common.py`, but not the `tests/generation/` and `tests/exporters/`
packages the first one imports. `load()` fetches the sdist of exactly the installed version (pip,
once per machine, into a cache folder), unpacks those two files into a private package and gives
the two missing imports empty stand-ins. Nothing from transformers is kept in this repository.

The generation half (`GenerationTesterMixin`) lives in the missing package; its checks are written
out in tests/integration/test_hf_mixins.py.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = 'hf_upstream_tests'
_FILES = ('test_modeling_common.py', 'test_configuration_common.py')
_STANDINS = {  # the imports test_modeling_common needs from the packages the sdist leaves out
    'exporters/test_export.py': 'class ExportTesterMixin:\n  """Not in the sdist."""\n',
    'generation/test_utils.py': 'class GenerationTesterMixin:\n  """Not in the sdist."""\n',
    # ConfigTester checks that common keyword arguments reach the config; these values are ours.
    'utils/test_configuration_utils.py': (
        'config_common_kwargs = dict(return_dict=False, output_hidden_states=True,\n'
        '                            output_attentions=True, use_cache=False,\n'
        '                            tie_word_embeddings=False, dtype="float16")\n'),
}


def cache_dir() -> str:
  return os.environ.get('PLT_HF_TESTS_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'plt_jax', 'hf-tests')


def _sdist(version: str) -> str:
  """The path of transformers-<version>.tar.gz, downloaded once (atomically: xdist workers race)."""
  folder = os.path.join(cache_dir(), version)
  path = os.path.join(folder, f'transformers-{version}.tar.gz')
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary=:all:',
         '--no-build-isolation', f'transformers=={version}', '-d', tmp],
        capture_output=True, text=True, timeout=300, check=False)
    got = os.path.join(tmp, os.path.basename(path))
    if proc.returncode or not os.path.exists(got):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no file']
      raise RuntimeError(f'pip could not fetch the transformers {version} sdist: {tail[0]}')
    os.replace(got, path)
  return path


def load(version: str):
  """(ModelTesterMixin, ConfigTester) of transformers `version`."""
  root = os.path.join(cache_dir(), version, 'unpacked')
  pkg = os.path.join(root, PACKAGE)
  if not os.path.exists(os.path.join(pkg, '__init__.py')):
    sdist = _sdist(version)
    tmp_root = tempfile.mkdtemp(dir=os.path.dirname(sdist))
    files = {rel: text.encode() for rel, text in _STANDINS.items()}
    files.update({os.path.join(os.path.dirname(rel), '__init__.py'): b'' for rel in files})
    files['__init__.py'] = b''
    with tarfile.open(sdist) as tar:
      for name in _FILES:
        files[name] = tar.extractfile(f'transformers-{version}/tests/{name}').read()
    for rel, data in files.items():
      target = os.path.join(tmp_root, PACKAGE, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, 'wb') as f:
        f.write(data)
    try:
      os.rename(tmp_root, root)
    except OSError:  # another worker unpacked it first
      shutil.rmtree(tmp_root, ignore_errors=True)
  if root not in sys.path:
    sys.path.insert(0, root)
  modeling = importlib.import_module(f'{PACKAGE}.test_modeling_common')
  configuration = importlib.import_module(f'{PACKAGE}.test_configuration_common')
  return modeling.ModelTesterMixin, configuration.ConfigTester
