"""Pretrain a PLT: `python -m experiments.pretrain --config=configs/r2.py [--workdir=DIR]`.

Only parses flags and calls `plt_jax.train.train_and_evaluate(config, workdir)`. Running again
with the same --workdir resumes from its latest complete checkpoint. Multi-host: run the same
command on every host; `jax.distributed.initialize()` is called when the environment (SLURM,
Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS) or the flags below describe several processes.
--workdir may be a gs:// URL (docs/pod.md). When one process dies, the others end within
--peer_timeout seconds (plus one heartbeat) with `pretrain: error: process I of N stopped
responding; ...` and the command that resumes.
"""
import os
import shlex
import sys

from absl import app
from absl import flags
from experiments.common import (define_config_file, fail, quiet_library_logs, relay_stderr,
                                run)

define_config_file('pretrain', 'config', None, 'Experiment config, e.g. configs/r2.py[:preset].',
                   lock_config=True)
flags.DEFINE_string('workdir', None, 'Output/resume directory (default: runs/r<R>-<preset>).')
flags.DEFINE_enum('multihost', 'auto', ['auto', 'on', 'off'],
                  'Call jax.distributed.initialize(): auto = when several processes are detected.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.DEFINE_float('peer_timeout', 30.0,
                   'Multi-host: seconds without a heartbeat from another process after which this '
                   'one reports it lost and exits (0 = off).')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of config/data errors.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def default_workdir(config) -> str:
  return os.path.join('runs', f'r{config.model.num_loops}-{config.preset}')


def resume_command() -> str:
  """This command line, as a process runs it again to resume."""
  return shlex.join([os.path.basename(sys.executable), '-m', 'experiments.pretrain',
                     *sys.argv[1:]])


def _on_peer_lost(process: int, reason: str) -> None:
  """The watchdog's verdict: one error line, and this process ends at once (the collective it
  may be blocked in would never finish, and JAX's shutdown would wait for the lost process)."""
  del process
  print(f'pretrain: error: {reason}. This process stops too; every complete checkpoint is kept. '
        f'To resume, run the same command on every process again: {resume_command()}',
        file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  # Imported here so that --help stays fast and distributed init precedes all JAX work.
  from plt_jax import train  # pylint: disable=g-import-not-at-top
  if FLAGS.multihost == 'on' or (FLAGS.multihost == 'auto' and train.multihost_requested(
      FLAGS.num_processes, FLAGS.coordinator_address)):
    relay_stderr('pretrain', FLAGS.num_processes or 0, resume_command())
  try:
    train.initialize_distributed(FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                 peer_timeout_s=FLAGS.peer_timeout, on_peer_lost=_on_peer_lost)
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    train.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    if FLAGS.traceback:
      raise
    # Bad configs and bad data are user errors: one clear line, no traceback.
    fail('pretrain', f'{e}\n(--traceback shows where it was raised)')
  except Exception:  # pylint: disable=broad-except
    # With several processes an error here (a collective reset by a peer) is most often a peer
    # that died: give the watchdog its timeout to say which; it then ends this process.
    watchdog = train.PeerWatchdog.current()
    if watchdog is not None:
      watchdog.wait_for_loss()
    raise
  watchdog = train.PeerWatchdog.current()
  if watchdog is not None:
    watchdog.finish()


if __name__ == '__main__':
  run(main, 'pretrain')
