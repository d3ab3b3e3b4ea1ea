"""Loop-count sweep: python -m experiments.sweep --config=configs/sweep.py [--workdir=DIR].

Trains every variant of config.sweep.variants (rR, vanillaR, deepR) for each of config.sweep.seeds
under one budget (sweep.budget: equal steps or equal training FLOPs), then evaluates, diagnoses
and decode-benchmarks each; writes DIR/sweep.md (mean +- std over seeds), sweep.json,
sweep_summary.json and plots. Rerunning with the same --workdir skips finished (variant, seed)
runs.
"""
from absl import flags

from plt_jax.study import sweep
from experiments.common import define_config_file, quiet_library_logs, run

_CONFIG = define_config_file('sweep', 'config', 'configs/sweep.py', 'Sweep config file.',
                             lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Root dir, one sub-dir per (variant, seed); default runs/sweep for the default '
    'preset, runs/sweep-PRESET for the others.')


def main(argv):
  del argv
  quiet_library_logs()
  config = _CONFIG.value
  preset = config.get('preset', 'sweep')
  default_root = 'runs/sweep' if preset == 'sweep' else f'runs/sweep-{preset}'
  sweep.run_sweep(config, _WORKDIR.value or default_root)


if __name__ == '__main__':
  run(main, 'sweep')
