"""The loop study over a finished sweep: python -m experiments.loop_study --workdir=SWEEP_DIR.

Scores every run of the sweep at test-time loop counts (--loops) and with adaptive-exit rules
(--exit_rules; default: a threshold sweep of confidence and kl), averages over seeds, and writes
loop_study.json / loop_study.md and two plots with error bars into the sweep directory. See
plt_jax/study/loop_study.py and docs/study.md.
"""
from absl import app, flags

from plt_jax.study import loop_study
from experiments.common import fail, quiet_library_logs

_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep directory (experiments.sweep).',
                               required=True)
_LOOPS = flags.DEFINE_list('loops', ['1', '2', '3', '4', '6'], 'Test-time loop counts.')
_RULES = flags.DEFINE_list('exit_rules', None, 'Exit rules, e.g. confidence:0.9,kl:0.01.')
_VARIANTS = flags.DEFINE_list('variants', None, 'Only these variants (default: all).')


def main(argv):
  del argv
  quiet_library_logs()
  try:
    study = loop_study.evaluate_sweep(_WORKDIR.value, loops=[int(x) for x in _LOOPS.value],
                                      rules=_RULES.value, variants=_VARIANTS.value)
  except (ValueError, FileNotFoundError) as e:
    fail('loop_study', str(e))
  print(loop_study.format_study(study))
  print(f'wrote {loop_study.RESULT_JSON}, {loop_study.RESULT_MD} and loop_study_*.png in '
        f'{_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main)
