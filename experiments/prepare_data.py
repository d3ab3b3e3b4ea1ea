"""Prepare a corpus into ArrayRecord shards: `python -m experiments.prepare_data
--config=configs/r2.py --out=DIR_OR_URL [--workers=N] [--shard=i --num_shards=N] [--finalize]`.

Reads the config's data section (source, paths, tokenizer, split; override with
--config.data.FIELD=...), trains the BPE once on a seeded sample when the tokenizer is bpe, then
tokenizes the source's units in --workers grain worker processes into shards under --out. A
training run reads the result with --config.data.prepared=DIR_OR_URL.

Several hosts: run the same command on each with --shard=i --num_shards=N, or under a
jax.distributed environment (--multihost, as experiments.pretrain); host i prepares units
i, i+N, ... and the host that finishes last writes manifest.json. --finalize writes it from the
finished units alone. Running again after a kill skips the units already done.
"""
import os

from absl import app
from absl import flags
from experiments.common import define_config_file, fail, quiet_library_logs, run

define_config_file('prepare_data', 'config', None,
                   'Experiment config whose data section is prepared, e.g. configs/r2.py.',
                   lock_config=True)
flags.DEFINE_string('out', None, 'Output directory or URL (gs://...).')
flags.DEFINE_integer('workers', os.cpu_count() or 1, 'grain worker processes on this host.')
flags.DEFINE_integer('shard', None, 'This host\'s index (default: jax.process_index()).')
flags.DEFINE_integer('num_shards', None, 'Number of hosts (default: jax.process_count()).')
flags.DEFINE_bool('finalize', False, 'Only write the manifest from the finished units.')
flags.DEFINE_enum('multihost', 'auto', ['auto', 'on', 'off'],
                  'Call jax.distributed.initialize() to learn --shard/--num_shards: auto = when '
                  'several processes are detected.')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of config/data errors.')
flags.mark_flags_as_required(['config', 'out'])
FLAGS = flags.FLAGS


def _host() -> tuple[int, int]:
  if FLAGS.shard is not None or FLAGS.num_shards is not None:
    return int(FLAGS.shard or 0), int(FLAGS.num_shards or 1)
  from plt_jax import train  # pylint: disable=g-import-not-at-top
  if train.initialize_distributed(FLAGS.multihost):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return 0, 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  from plt_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  say = lambda s: print(s, flush=True)
  try:
    if FLAGS.finalize:
      prepare_lib.finalize(FLAGS.out, say=say)
      return
    shard, num_shards = _host()
    manifest = prepare_lib.prepare(FLAGS.config.data, FLAGS.out, workers=FLAGS.workers,
                                   shard=shard, num_shards=num_shards, say=say)
    if manifest is not None:
      t, v = manifest['splits']['train'], manifest['splits']['val']
      say(f'done: {FLAGS.out}: train {t["docs"]:,} docs / {t["tokens"]:,} tokens, val '
          f'{v["docs"]:,} docs / {v["tokens"]:,} tokens; train with '
          f'--config.data.prepared={FLAGS.out}')
  except (ValueError, FileNotFoundError) as e:
    if FLAGS.traceback:
      raise
    fail('prepare_data', f'{e}\n(--traceback shows where it was raised)')


if __name__ == '__main__':
  run(main, 'prepare_data')
