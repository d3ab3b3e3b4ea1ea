"""Entry points with a config flag: command-line and config errors end as one `prog: error:` line
(exit code 1), never a traceback. Each case fails while flags are parsed, before any JAX work."""
import os
import subprocess
import sys

import pytest

from helpers import REPO

CASES = {
    'override_typo': (
        'pretrain', ['--config=configs/r2.py', '--config.train.stpes=5'],
        'pretrain: error: --config.train.stpes=5: the config has no field \'stpes\'. '
        'Did you mean "steps" instead of "stpes"?'),
    'section_typo': (
        'pretrain', ['--config=configs/r2.py', '--config.trian.steps=5'],
        'pretrain: error: --config.trian.steps=5: the config has no field \'trian\'. '
        'Did you mean "train" instead of "trian"?'),
    'bad_value': (
        'pretrain', ['--config=configs/r2.py', '--config.train.steps=abc'],
        "pretrain: error: flag --config.train.steps=abc: invalid literal for int() with base 10: "
        "'abc'"),
    'bad_preset': (
        'pretrain', ['--config=configs/r2.py:nopreset'],
        "pretrain: error: flag --config=configs/r2.py:nopreset: unknown preset 'nopreset'"),
    'missing_file': (
        'pretrain', ['--config=configs/none.py'],
        "pretrain: error: --config=configs/none.py: [Errno 2] No such file or directory: "
        "'configs/none.py'"),
    # The sweep's default config is loaded when its flag is defined, overrides included.
    'default_config_typo': (
        'sweep', ['--config.sweep.varaints=r1'],
        'sweep: error: --config.sweep.varaints=r1: the config has no field \'varaints\'. '
        'Did you mean "variants" instead of "varaints"?'),
    'given_config_typo': (
        'sweep', ['--config=configs/sweep.py', '--config.sweep.varaints=r1'],
        'sweep: error: --config.sweep.varaints=r1: the config has no field \'varaints\'. '
        'Did you mean "variants" instead of "varaints"?'),
}


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """All cases at once, each in a fresh process (they only parse flags)."""
  workdir = tmp_path_factory.mktemp('cli')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = {}
  for name, (module, args, _) in CASES.items():
    cmd = [sys.executable, '-m', f'experiments.{module}', *args,
           f'--workdir={workdir / name}']
    procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate(timeout=300)
    out[name] = (p.returncode, stdout, stderr, workdir / name)
  return out


@pytest.mark.parametrize('name', list(CASES))
def test_config_error_is_one_line(results, name):
  rc, stdout, stderr, workdir = results[name]
  want = CASES[name][2]
  assert rc == 1, (rc, stderr[-2000:])
  assert 'Traceback' not in stderr, stderr[-2000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(want), stderr[-2000:]
  assert stdout == '' and not workdir.exists()
