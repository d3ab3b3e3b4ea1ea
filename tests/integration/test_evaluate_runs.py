"""The `experiments.evaluate` command and the evaluation runner on a tiny trained run (conftest's
`trained_run`): HumanEval through the sandbox in a fresh process, perplexity on the validation
split against the trainer's own numbers, and an exported Hugging Face checkpoint scoring the same.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import IS_ROOT, have_humaneval_data, linux_only, needs_humaneval_data

from helpers import REPO
from plt_jax.evaluation import humaneval

pytestmark = linux_only
ROOT = IS_ROOT
needs_data = needs_humaneval_data
_have_humaneval = have_humaneval_data


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  p = subprocess.run([sys.executable, '-m', 'experiments.evaluate', *args, '--progress=false'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


@pytest.mark.slow
@needs_data
def test_cli_humaneval_on_a_trained_run(trained_run):
  workdir, _ = trained_run
  out = _cli(f'--workdir={workdir}', '--suite=humaneval', '--limit=3', '--max_new_tokens=16',
             '--batch_size=3', '--timeout=20')
  assert 'pass@1' in out
  d = os.path.join(workdir, 'eval', 'humaneval-step2-n1-t0')
  recs = [json.loads(x) for x in open(os.path.join(d, 'samples.jsonl'))]
  assert [r['task_id'] for r in recs] == ['HumanEval/0', 'HumanEval/1', 'HumanEval/2']
  assert all(len(r['completions']) == 1 and len(r['results']) == 1 for r in recs)
  for r in recs:  # completions are truncated at the stop sequences
    assert humaneval.truncate(r['completions'][0]) == r['completions'][0]
  s = json.load(open(os.path.join(d, 'summary.json')))
  assert s['problems'] == 3 and s['samples'] == 3 and 0.0 <= s['pass@1'] <= 1.0
  assert s['meta']['model']['step'] == 2 and s['meta']['model']['num_loops'] == 2
  if ROOT:
    assert s['isolation']['throwaway_uid'] is True
  assert s['isolation']['missing'] == [] and s['isolation']['verdict'] == 'judge'
  # A second run finds every problem done and generates nothing new.
  mtime = os.path.getmtime(os.path.join(d, 'samples.jsonl'))
  _cli(f'--workdir={workdir}', '--suite=humaneval', '--limit=3', '--max_new_tokens=16',
       '--batch_size=3', '--timeout=20')
  assert os.path.getmtime(os.path.join(d, 'samples.jsonl')) == mtime
  assert len(open(os.path.join(d, 'samples.jsonl')).read().splitlines()) == 3


@pytest.mark.slow
def test_perplexity_on_the_validation_split_matches_the_trainer(trained_run):
  workdir, summary = trained_run
  from plt_jax.evaluation import runner as evaluate
  s = evaluate.run('perplexity', workdir=workdir, progress=False)
  val = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))
         if json.loads(x).get('split') == 'val'][-1]
  assert s['nats_per_token'] == pytest.approx(summary['final_val_loss'], rel=1e-5)
  assert s['bits_per_byte'] == pytest.approx(val['bits_per_byte'], rel=1e-5)
  assert s['tokens'] == s['data_stats']['val_eval_tokens']
  assert s['bytes'] == s['data_stats']['val_eval_bytes'] and s['byte_counts_agree']
  # The whole split: bytes are the validation documents' own UTF-8 bytes (byte tokenizer).
  full = evaluate.run('perplexity', workdir=workdir, eval_batches=0, progress=False)
  assert full['bytes'] == full['data_stats']['val_bytes']
  assert full['tokens'] == full['data_stats']['val_tokens'] + full['data_stats']['val_docs']
  assert os.path.isfile(full['out_path'])


@pytest.mark.slow
def test_an_exported_hf_checkpoint_scores_the_same(trained_run, tmp_path):
  pytest.importorskip('safetensors')
  from plt_jax.evaluation import runner as evaluate
  from plt_jax.hf import export_workdir
  workdir, summary = trained_run
  hf_dir = export_workdir(workdir, str(tmp_path / 'hf'), dtype='float32')
  s = evaluate.run('perplexity', hf_dir=hf_dir, workdir=workdir, out_dir=str(tmp_path),
                   progress=False)
  assert s['model']['source'] == 'hf'
  assert s['nats_per_token'] == pytest.approx(summary['final_val_loss'], rel=1e-5)
