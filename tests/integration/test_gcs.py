"""gs:// work dirs against a real Cloud Storage server (fake-gcs-server, the `gcs_bucket` fixture).

Nothing of the project's own I/O is mocked: gcsfs and tensorstore talk HTTP to the emulator.
Covers a training run killed with SIGKILL and resumed in the bucket (bitwise equal to an
uninterrupted local run), a two-process run whose only shared storage is the bucket, and
generate / evaluate / diagnose reading the run from the bucket. fileio and the metrics writer
alone are tested in tests/test_fileio_gcs.py.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from plt_jax.train import checkpoint as ckpt_lib
from plt_jax import fileio
from plt_jax import train
from helpers import REPO, TINY_RUN, max_abs_diff, restore_raw, tiny_run_config, train_losses

STEPS = TINY_RUN['train.steps']


@pytest.fixture(scope='module')
def gcs_env(gcs_bucket, tmp_path_factory):
  """Subprocess environment: the emulator's variables (set by gcs_bucket) and a shared XLA
  compilation cache."""
  cache = str(tmp_path_factory.mktemp('xla_cache_gcs'))
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_MATMUL_PRECISION='highest',
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def pretrain_cmd(workdir, *args, **extra):
  flags = [f'--config.{k}={v}' for k, v in {**TINY_RUN, **extra}.items()]
  return [sys.executable, '-m', 'experiments.pretrain', f'--config={REPO}/configs/r2.py',
          f'--workdir={workdir}', *flags, *args]


# ----------------------------------------------------------------------- train in the bucket

@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The local reference: all STEPS steps in one go."""
  workdir = str(tmp_path_factory.mktemp('straight_gcs'))
  assert train.train_and_evaluate(tiny_run_config(), workdir)['step'] == STEPS
  return workdir


@pytest.fixture(scope='module')
def gcs_run(gcs_bucket, gcs_env, straight):
  """A run in the bucket, SIGKILLed mid-run by the test below's launcher and resumed."""
  workdir = f'{gcs_bucket}/killed-{time.time_ns()}'
  proc = subprocess.Popen(pretrain_cmd(workdir), cwd=REPO, env=gcs_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckdir = f'{workdir}/checkpoints'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    # Metrics reach the bucket at every checkpoint save: kill once step 8's save has begun.
    if max(train_losses(workdir) or [0]) >= 8:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  killed = train_losses(workdir)
  reader = ckpt_lib.Checkpointer(ckdir, read_only=True)
  complete = reader.all_steps()
  reader.close()
  summary = train.train_and_evaluate(tiny_run_config(), workdir)    # resume, in this process
  return dict(workdir=workdir, killed=killed, complete=complete, summary=summary)


def test_sigkill_in_the_bucket_then_resume_is_bitwise_equal_to_a_local_run(gcs_run, straight):
  workdir, summary, complete = gcs_run['workdir'], gcs_run['summary'], gcs_run['complete']
  assert complete and 4 <= complete[-1] < STEPS, complete
  assert summary['start_step'] == complete[-1] and summary['step'] == STEPS
  assert summary['checkpoints'] == f'{workdir}/checkpoints' and summary['workdir'] == workdir
  want, got = train_losses(straight), train_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
  assert all(got[s] == gcs_run['killed'][s] for s in gcs_run['killed'])
  a, b = restore_raw(straight, STEPS), restore_raw(workdir, STEPS)
  assert max_abs_diff(a['params'], b['params']) == 0.0
  assert max_abs_diff(a['opt_state'], b['opt_state']) == 0.0
  data = lambda w: fileio.read_json(f'{w}/checkpoints/{STEPS}/data/process_0-of-1.json')
  assert data(straight) == data(workdir)
  # The run's other outputs are in the bucket too.
  names = fileio.listdir(workdir)
  for name in ('config.json', 'metrics.jsonl', 'loss_curve.png', 'tensorboard', 'tokenizer'):
    assert name in names, names
  assert fileio.read_bytes(f'{workdir}/loss_curve.png')[:8] == b'\x89PNG\r\n\x1a\n'
  from plt_jax.infer import loading
  assert loading.complete_steps(workdir) == ckpt_lib.Checkpointer(
      f'{workdir}/checkpoints', read_only=True).all_steps() == [16, 20, 24]


def test_resume_refuses_another_model_in_the_bucket(gcs_run):
  with pytest.raises(ValueError, match='holds a run with a different model.*model.d_model: '
                                       'saved 32, now 48'):
    train.train_and_evaluate(tiny_run_config(**{'model.d_model': 48}), gcs_run['workdir'])


def test_generate_evaluate_and_diagnose_read_the_bucket(gcs_run, straight, capsys):
  from experiments import generate as generate_cli
  from plt_jax.study import diagnostics
  from plt_jax.infer import loading
  from plt_jax.evaluation import runner
  workdir = gcs_run['workdir']
  loaded = loading.load_model(workdir)
  assert loaded.info['source'] == 'workdir' and loaded.info['step'] == STEPS
  assert loaded.info['path'] == workdir
  local = loading.load_model(straight)
  assert max_abs_diff(nnx_state(loaded.model), nnx_state(local.model)) == 0.0

  assert generate_cli.main(['--workdir', workdir, '--prompt', 'The ', '--max_new_tokens', '6']) == 0
  text_gcs = capsys.readouterr().out
  generate_cli.main(['--workdir', straight, '--prompt', 'The ', '--max_new_tokens', '6'])
  assert text_gcs.split('\n')[0] == capsys.readouterr().out.split('\n')[0]  # same text

  res = runner.run('perplexity', workdir=workdir, progress=False)
  ref = runner.run('perplexity', workdir=straight, progress=False)
  assert res['out_path'] == f'{workdir}/eval/perplexity-step{STEPS}-val.json'
  saved = fileio.read_json(res['out_path'])
  assert saved['bits_per_byte'] == ref['bits_per_byte'] and saved['tokens'] == ref['tokens'] > 0

  results, paths = diagnostics.diagnose_workdir(workdir, max_batches=1, batch_size=2)
  assert paths[0] == f'{workdir}/diagnostics/diagnostics.json'
  assert fileio.read_json(paths[0])['num_loops'] == 2 == results['num_loops']
  assert all(fileio.read_bytes(p)[:4] == b'\x89PNG' for p in paths[1:])


def nnx_state(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


# ------------------------------------------------------------------------- two processes

def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_only_the_bucket_and_match_one_process(gcs_bucket, gcs_env,
                                                                   tmp_path):
  """jax.distributed on localhost, two processes, each with its own cwd, compilation cache and
  no shared local directory; the same global batches as a one-process run on two devices."""
  steps = 8
  extra = {'train.steps': steps, 'mesh.num_devices': -1}
  workdir = f'{gcs_bucket}/two-{time.time_ns()}'
  port = free_port()
  procs = []
  for i in range(2):
    cwd = tmp_path / f'host{i}'
    cwd.mkdir()
    env = dict(gcs_env, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(cwd / 'xla'),
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    procs.append(subprocess.Popen(
        pretrain_cmd(workdir, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                     f'--process_id={i}', **extra),
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one = str(tmp_path / 'one')
  env = dict(gcs_env, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  r = subprocess.run(pretrain_cmd(one, **extra), cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  # Bit for bit: the same program on a two-device mesh, whose all-reduce over the two
  # processes adds the same two numbers as the one over two local devices.
  two_losses, one_losses = train_losses(workdir), train_losses(one)
  assert sorted(two_losses) == list(range(1, steps + 1))
  assert two_losses == one_losses
  from plt_jax.infer import loading  # restored onto this process's first device, from either mesh
  a, b = (nnx_state(loading.load_model(w).model) for w in (one, workdir))
  assert max_abs_diff(a, b) == 0.0
  for i in range(2):  # each process saved its own data iterator position in the bucket
    assert fileio.isfile(f'{workdir}/checkpoints/{steps}/data/process_{i}-of-2.json')


# ------------------------------------------------------------------------------ bad input

def run_pretrain(workdir, env, *pre):
  """pretrain in a fresh process; `pre` is Python run before it (e.g. to hide a package)."""
  code = '; '.join([*pre, 'import runpy, sys', "sys.argv[0] = 'pretrain'",
                    "runpy.run_module('experiments.pretrain', run_name='__main__')"])
  flags = [f'--config.{k}={v}' for k, v in TINY_RUN.items()]
  return subprocess.run([sys.executable, '-c', code, '--config=configs/r2.py',
                         f'--workdir={workdir}', *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_pretrain_without_gcsfs_is_a_one_line_error(gcs_env, prefix):
  r = run_pretrain(prefix, gcs_env, "import sys; sys.modules['gcsfs'] = None")
  assert r.returncode == 1, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()
  assert last[-2].startswith(f'pretrain: error: workdir={prefix}: gs:// paths need the gcsfs '
                             'package (pip install gcsfs), which is not installed'), last[-2:]
  assert not fileio.exists(prefix)          # nothing written


def test_pretrain_without_credentials_says_how_to_get_them(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(
      ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS', 'FSSPEC_GCS', 'GOOGLE_', 'CLOUDSDK_'))}
  env.update(JAX_PLATFORMS='cpu', HOME=str(tmp_path), NO_GCE_CHECK='true',
             GCE_METADATA_HOST='127.0.0.1:9', GCE_METADATA_IP='127.0.0.1:9')
  probe = subprocess.run([sys.executable, '-c', 'import google.auth; google.auth.default()'],
                         env=env, capture_output=True, timeout=60)
  if probe.returncode == 0:
    pytest.skip('this machine has Google Cloud credentials')
  r = run_pretrain('gs://some-bucket/run', env)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-2] == (
      'pretrain: error: workdir=gs://some-bucket/run: no Google Cloud credentials found. Run '
      '`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a '
      "service-account key file (on a Cloud TPU VM the VM's service account is found by "
      'itself)')


def test_pretrain_into_a_missing_bucket_is_a_one_line_error(gcs_env):
  r = run_pretrain('gs://no-such-bucket-plt/run', gcs_env)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-2] == (
      'pretrain: error: workdir=gs://no-such-bucket-plt/run: bucket gs://no-such-bucket-plt does '
      'not exist (create it: gcloud storage buckets create gs://no-such-bucket-plt)')


def test_export_from_the_bucket_to_the_bucket_then_generate_and_evaluate_from_it(
    gcs_run, straight, tmp_path, capsys):
  """Export a gs:// run into gs://; the export equals a local export of the same checkpoint file
  for file; generate and perplexity read the exported gs:// directory."""
  from experiments import generate as generate_cli
  from plt_jax import hf
  from plt_jax.evaluation import runner
  out = f'{gcs_run["workdir"]}-export'
  assert hf.export_workdir(gcs_run['workdir'], out, dtype='float32') == out
  local = str(tmp_path / 'local')
  hf.export_workdir(straight, local, dtype='float32')
  names = sorted(fileio.listdir(out))
  assert names == sorted(os.listdir(local)) and 'model.safetensors' in names
  for name in names:
    assert fileio.read_bytes(f'{out}/{name}') == open(os.path.join(local, name), 'rb').read(), name
  with pytest.raises(FileExistsError, match='is not empty'):
    hf.export_workdir(gcs_run['workdir'], out)
  assert generate_cli.main(['--hf_dir', out, '--prompt', 'The ', '--max_new_tokens', '6']) == 0
  from_bucket = capsys.readouterr().out.split('\n')[0]
  generate_cli.main(['--hf_dir', local, '--prompt', 'The ', '--max_new_tokens', '6'])
  assert from_bucket == capsys.readouterr().out.split('\n')[0]
  got = runner.run('perplexity', hf_dir=out, workdir=gcs_run['workdir'], progress=False,
                   out_dir=str(tmp_path / 'eval'))
  ref = runner.run('perplexity', workdir=straight, progress=False, out_dir=str(tmp_path / 'ref'))
  assert abs(got['bits_per_byte'] - ref['bits_per_byte']) < 1e-5 and got['tokens'] == ref['tokens']
