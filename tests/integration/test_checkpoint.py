"""Checkpoint tests: bitwise resume in a new process, SIGKILL crash safety, SIGTERM save.

One tiny config throughout, so the in-process runs share one compiled program; the two
subprocesses share a persistent compilation cache. Bitwise equality holds because XLA on CPU is
deterministic for a fixed program and device count, the data iterator state is restored
exactly and every step's inputs (params, AdamW state, step counter, batch) are restored bit for
bit; any drift would show as a non-zero difference.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flax import nnx

from helpers import REPO, TINY_RUN, max_abs_diff, restore_raw, tiny_run_config, train_losses
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax import train

STEPS = TINY_RUN['train.steps']


@pytest.fixture(scope='module')
def subprocess_env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('xla_cache'))
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_MATMUL_PRECISION='highest',
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def launch(workdir, env, **extra):
  flags = [f'--config.{k}={v}' for k, v in {**TINY_RUN, **extra}.items()]
  cmd = [sys.executable, '-m', 'experiments.pretrain', '--config=configs/r2.py',
         f'--workdir={workdir}', *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The reference: all STEPS steps in one go."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  summary = train.train_and_evaluate(tiny_run_config(), workdir)
  assert summary['step'] == STEPS
  return workdir


def test_resume_in_a_new_process_is_bitwise_exact(straight, tmp_path, subprocess_env):
  k = STEPS // 2
  workdir = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(tiny_run_config(**{'train.stop_at_step': k}), workdir)
  assert first['step'] == k and first['checkpoint_steps'][-1] == k
  proc = launch(workdir, subprocess_env)                 # a new process: steps k+1 .. 2k
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert f'resumed from {workdir}/checkpoints/{k}' in out
  want, got = train_losses(straight), train_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
  a, b = restore_raw(straight, STEPS), restore_raw(workdir, STEPS)
  assert max_abs_diff(a['params'], b['params']) == 0.0
  assert max_abs_diff(a['opt_state'], b['opt_state']) == 0.0
  assert int(np.asarray(b['opt_state']['step'])) == STEPS
  # The data iterator position was saved and restored too.
  read = lambda w: open(os.path.join(w, 'checkpoints', str(STEPS), 'data',
                                     'process_0-of-1.json')).read()
  assert json.loads(read(straight)) == json.loads(read(workdir))


def test_sigkill_mid_run_resumes_from_the_newest_complete_checkpoint(straight, tmp_path,
                                                                     subprocess_env):
  workdir = str(tmp_path / 'killed')
  ckdir = os.path.join(workdir, 'checkpoints')
  proc = launch(workdir, subprocess_env)
  deadline = time.time() + 600
  seen_tmp = False
  while time.time() < deadline and proc.poll() is None:
    # A save waits for the previous one, so once step 9 is logged step 4 is complete. From then
    # on, kill while a save is being written if we catch one, else at step 11.
    done = max(train_losses(workdir) or [0])
    seen_tmp = done >= 9 and any('tmp' in d for d in os.listdir(ckdir))
    if seen_tmp or done >= 11:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.002)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
  killed = train_losses(workdir)
  reader = ckpt_lib.Checkpointer(ckdir, read_only=True)
  complete = reader.all_steps()
  reader.close()
  newest = complete[-1]
  # Async saves may trail the logged steps; those after `newest` are the ones lost.
  assert 4 <= newest < STEPS and max(killed) >= newest, (complete, max(killed))
  # A torn save newer than every complete one must never be picked: fake one.
  torn = os.path.join(ckdir, f'{STEPS + 100}.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(ckdir, str(newest)), torn)
  shutil.rmtree(os.path.join(torn, 'params'))

  summary = train.train_and_evaluate(tiny_run_config(), workdir)
  assert summary['start_step'] == newest and summary['step'] == STEPS
  assert not any('tmp' in d for d in os.listdir(ckdir)), os.listdir(ckdir)
  # Lost: only the steps after `newest`; they are recomputed identically.
  resumed = train_losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert all(resumed[s] == killed[s] for s in killed)
  assert max_abs_diff(restore_raw(straight, STEPS)['params'],
                      restore_raw(workdir, STEPS)['params']) == 0.0
  print(f'killed after step {max(killed)}, newest complete checkpoint {newest}, '
        f'save in flight at kill: {seen_tmp}')


def test_sigterm_saves_and_exits_cleanly_then_resumes(straight, tmp_path):
  workdir = str(tmp_path / 'term')

  def send_when_running():
    t_end = time.time() + 600
    while time.time() < t_end and max(train_losses(workdir) or [0]) < 5:
      time.sleep(0.002)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_when_running, daemon=True).start()
  cfg = tiny_run_config(**{'checkpoint.every': 100})          # no periodic checkpoint at all
  summary = train.train_and_evaluate(cfg, workdir)
  assert summary['stopped_by'] == 'SIGTERM'
  stopped = summary['step']
  assert 5 <= stopped < STEPS and summary['checkpoint_steps'] == [stopped], summary
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored
  summary = train.train_and_evaluate(cfg, workdir)
  assert summary['start_step'] == stopped and summary['step'] == STEPS
  assert max_abs_diff(restore_raw(straight, STEPS)['params'],
                      restore_raw(workdir, STEPS)['params']) == 0.0


def test_load_for_inference_restores_params_only(straight):
  model, cfg, tok = ckpt_lib.load_for_inference(straight)
  raw = restore_raw(straight, STEPS)['params']
  assert max_abs_diff(nnx.to_pure_dict(nnx.state(model)), raw) == 0.0
  assert cfg.model.num_layers == 1 and cfg.model.vocab_size == 384 and tok.vocab_size == 259
  older = ckpt_lib.Checkpointer(os.path.join(straight, 'checkpoints'),
                                read_only=True).all_steps()[0]
  model_old, _, _ = ckpt_lib.load_for_inference(straight, step=older)
  assert max_abs_diff(nnx.to_pure_dict(nnx.state(model_old)), raw) > 0
  with pytest.raises(ValueError, match='step 7 not found'):
    ckpt_lib.load_for_inference(straight, step=7)
  with pytest.raises(FileNotFoundError, match='not a training work dir'):
    ckpt_lib.load_for_inference(os.path.dirname(straight))


# ---------------------------------------------------------------------- a host that dies

PEER_TIMEOUT = 10  # pretrain's --peer_timeout here; the default is train.PEER_TIMEOUT_S
# The documented bound on how long survivors take to exit at the defaults (docs/pod.md).
PEER_TIMEOUT_DEFAULT_BOUND = train.PEER_TIMEOUT_S + train.PEER_HEARTBEAT_S + 3


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_killed_process_ends_the_others_with_one_line_then_resume_on_one_process(
    tmp_path, subprocess_env):
  """Two processes (jax.distributed on localhost, one CPU device each); process 1 is SIGKILLed.
  Process 0 exits within --peer_timeout plus one heartbeat, its last stderr line the error that
  names process 1 and the command that resumes. The run then resumes on ONE process with two
  devices, and ends bitwise equal to an uninterrupted run on that mesh."""
  ref = str(tmp_path / 'ref')
  two_devices = {'mesh.num_devices': 2}
  train.train_and_evaluate(tiny_run_config(**two_devices), ref)

  workdir = str(tmp_path / 'two')
  port = _free_port()
  env = dict(subprocess_env, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = []
  for i in range(2):
    flags = [f'--config.{k}={v}' for k, v in {**TINY_RUN, 'mesh.num_devices': -1}.items()]
    cmd = [sys.executable, '-m', 'experiments.pretrain', '--config=configs/r2.py',
           f'--workdir={workdir}', *flags, f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}', f'--peer_timeout={PEER_TIMEOUT}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  deadline = time.time() + 600
  while time.time() < deadline and max(train_losses(workdir) or [0]) < 9:
    assert procs[0].poll() is None and procs[1].poll() is None
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGKILL)
  t_kill = time.time()
  _, err = procs[0].communicate(timeout=120)
  elapsed = time.time() - t_kill
  procs[1].wait(timeout=60)
  last = err.strip().splitlines()[-1]
  assert procs[0].returncode == 1, err[-3000:]
  # Heartbeats every timeout / 4 s at most: the loss is declared within timeout + one beat;
  # the rest is slack for a loaded machine.
  assert elapsed < PEER_TIMEOUT + PEER_TIMEOUT / 4 + 10, elapsed
  assert last.startswith('pretrain: error: process 1 of 2 stopped responding; no heartbeat for '), last
  assert ('To resume, run the same command on every process again: python -m '
          f'experiments.pretrain --config=configs/r2.py --workdir={workdir} ') in last, last
  assert last.endswith(f'--num_processes=2 --process_id=0 --peer_timeout={PEER_TIMEOUT}'), last

  reader = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  newest = reader.all_steps()[-1]
  reader.close()
  assert 4 <= newest < STEPS
  summary = train.train_and_evaluate(tiny_run_config(**two_devices), workdir)
  assert summary['start_step'] == newest and summary['step'] == STEPS
  want, got = train_losses(ref), train_losses(workdir)
  assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
  a, b = restore_raw(ref, STEPS), restore_raw(workdir, STEPS)
  assert max_abs_diff(a['params'], b['params']) == 0.0
  assert max_abs_diff(a['opt_state'], b['opt_state']) == 0.0
  print(f'survivor exited {elapsed:.1f} s after the kill; resumed from step {newest} on one '
        'process')


@pytest.mark.slow
def test_a_killed_process_0_ends_the_others_with_one_line(tmp_path, subprocess_env):
  """Process 0 runs JAX's coordination service: when it dies JAX aborts the others at once, in
  C++; what they print still ends with the one line naming process 0."""
  workdir = str(tmp_path / 'two')
  port = _free_port()
  env = dict(subprocess_env, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  flags = [f'--config.{k}={v}' for k, v in {**TINY_RUN, 'mesh.num_devices': -1,
                                            'train.steps': 1000}.items()]
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'experiments.pretrain', '--config=configs/r2.py',
       f'--workdir={workdir}', *flags, f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  deadline = time.time() + 600
  while time.time() < deadline and max(train_losses(workdir) or [0]) < 3:
    assert procs[0].poll() is None and procs[1].poll() is None
    time.sleep(0.01)
  procs[0].send_signal(signal.SIGKILL)
  t_kill = time.time()
  _, err = procs[1].communicate(timeout=120)
  elapsed = time.time() - t_kill
  procs[0].wait(timeout=60)
  assert procs[1].returncode != 0 and elapsed < PEER_TIMEOUT_DEFAULT_BOUND, (elapsed, err[-3000:])
  last = err.strip().splitlines()[-1]
  assert last.startswith("pretrain: error: process 0 of 2 stopped responding; JAX's coordination "
                         'service ended this process ('), last
  assert last.endswith('--num_processes=2 --process_id=1'), last
  assert 'Fatal Python error' not in err and 'Check failure stack trace' not in err
  print(f'process 1 exited {elapsed:.1f} s after process 0 was killed')
