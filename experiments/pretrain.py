"""Pretrain a PLT: `python -m experiments.pretrain --config=configs/r2.py [--workdir=DIR]`.

Only parses flags and calls `plt_jax.train.train_and_evaluate(config, workdir)`. Running again
with the same --workdir resumes from its latest complete checkpoint. Multi-host: run the same
command on every host; `jax.distributed.initialize()` is called when the environment (SLURM,
Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS) or the flags below describe several processes.
"""
import os

from absl import app
from absl import flags
from experiments.common import define_config_file, fail, quiet_library_logs, run

define_config_file('pretrain', 'config', None, 'Experiment config, e.g. configs/r2.py[:preset].',
                   lock_config=True)
flags.DEFINE_string('workdir', None, 'Output/resume directory (default: runs/r<R>-<preset>).')
flags.DEFINE_enum('multihost', 'auto', ['auto', 'on', 'off'],
                  'Call jax.distributed.initialize(): auto = when several processes are detected.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of config/data errors.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def default_workdir(config) -> str:
  return os.path.join('runs', f'r{config.model.num_loops}-{config.preset}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  # Imported here so that --help stays fast and distributed init precedes all JAX work.
  from plt_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.initialize_distributed(FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    train.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    if FLAGS.traceback:
      raise
    # Bad configs and bad data are user errors: one clear line, no traceback.
    fail('pretrain', f'{e}\n(--traceback shows where it was raised)')


if __name__ == '__main__':
  run(main, 'pretrain')
