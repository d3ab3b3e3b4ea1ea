"""Loop-count sweep: python -m experiments.sweep --config=configs/sweep.py [--workdir=DIR].

Trains every variant of config.sweep.variants under identical data/seed/budget, then evaluates,
diagnoses and decode-benchmarks each; writes DIR/sweep.md, sweep.json and plots. Rerunning with
the same --workdir resumes without redoing finished variants.
"""
from absl import flags

from plt_jax import sweep
from experiments.common import define_config_file, quiet_library_logs, run

_CONFIG = define_config_file('sweep', 'config', 'configs/sweep.py', 'Sweep config file.',
                             lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/sweep', 'Root dir; one sub-dir per variant.')


def main(argv):
  del argv
  quiet_library_logs()
  sweep.run_sweep(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  run(main, 'sweep')
