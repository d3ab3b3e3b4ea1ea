"""tools/device_check.py's orchestrator on stand-in steps, each a fresh process: it keeps going
past a failing and a hanging step, and skips a step the budget no longer allows."""
import json
import os
import sys

from tools import device_check as dc


def test_orchestrator_keeps_going(tmp_path, monkeypatch):
  """A passing, a failing and a hanging stand-in step, then one the budget no longer allows."""
  scripts = {
      'kernels': "import json,sys; json.dump({'cases': []}, open(sys.argv[1], 'w')); print('hi')",
      'attention': "import sys; print('working'); raise ValueError('bad tolerance')",
      'train': "import json,sys,time; json.dump({'runs': []}, open(sys.argv[1], 'w')); "
               "time.sleep(60)",
      'decode': "pass",
  }
  monkeypatch.setattr(dc, 'step_command',
                      lambda name, args, path: [sys.executable, '-c', scripts[name], path])
  monkeypatch.setattr(dc, 'DRY_TIMEOUT_S', dict(kernels=30, attention=30, train=1.5, decode=30))
  out = tmp_path / 'out'
  # The train step uses its whole 1.5 s: under 15 s of the budget are left for decode.
  rc = dc.orchestrate(dc.parse_args(['--dry_run', '--out', str(out), '--steps', 'a,b,c,d',
                                     '--budget_s', '16.2']))
  assert rc == 1
  assert sorted(os.listdir(out)) == ['device_check.json', 'device_check.log', 'device_check.md']
  report = json.loads((out / 'device_check.json').read_text())
  steps = report['steps']
  assert steps['kernels']['status'] == 'ok' and steps['kernels']['result'] == {'cases': []}
  assert steps['attention']['status'] == 'failed'
  assert steps['attention']['error'] == 'exit 1: ValueError: bad tolerance'
  assert 'working' in steps['attention']['log_tail']
  assert steps['train']['status'] == 'timeout' and steps['train']['result'] == {'runs': []}
  assert steps['train']['seconds'] < 15
  assert steps['decode']['status'] == 'skipped' and steps['decode']['result'] is None
  log = (out / 'device_check.log').read_text()
  assert '[a] hi' in log and '[b] working' in log
  assert '| attention | failed |' in (out / 'device_check.md').read_text()
