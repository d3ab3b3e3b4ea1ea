"""Per-loop diagnostics of a trained run: python -m experiments.diagnose --workdir=RUN.

WORKDIR and --out may be gs:// URLs. Writes <workdir>/diagnostics/diagnostics.json and one PNG per family (loops on the x-axis), and
prints a per-loop table. See plt_jax/study/diagnostics.py for the definitions.
"""
from absl import app, flags

from plt_jax.study import diagnostics
from experiments.common import fail, quiet_library_logs

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training work dir (with checkpoints/).',
                               required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest complete one).')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', 0, 'Use at most this many validation batches.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Rows per batch (default: min(train, 8)).')
_OUT = flags.DEFINE_string('out', '', 'Output dir (default: WORKDIR/diagnostics).')


def main(argv):
  del argv
  quiet_library_logs()
  try:
    results, paths = diagnostics.diagnose_workdir(
        _WORKDIR.value, step=_STEP.value, max_batches=_MAX_BATCHES.value,
        batch_size=_BATCH_SIZE.value, out_dir=_OUT.value)
  except (ValueError, FileNotFoundError) as e:  # a bad work dir, step or URL: one line
    fail('diagnose', str(e))
  print(diagnostics.format_table(results))
  print(f"\n{results['tokens']} held-out tokens. Wrote:")
  for p in paths:
    print('  ' + p)


if __name__ == '__main__':
  app.run(main)
