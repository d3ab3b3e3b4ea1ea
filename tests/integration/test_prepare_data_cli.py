"""experiments.prepare_data in a fresh process: it prepares a JSON-lines corpus and prints the
flag that trains on the result."""
import json
import os
import subprocess
import sys

from helpers import REPO, random_code_docs, write_jsonl


def test_command_line(tmp_path):
  corpus = [write_jsonl(tmp_path / 'a.jsonl', random_code_docs(400, seed=1)[:250])]
  out = str(tmp_path / 'cli')
  base = [sys.executable, '-m', 'experiments.prepare_data', '--config=configs/r2.py',
          '--config.data.source=jsonl', f'--config.data.paths={corpus[0]}',
          '--config.data.tokenizer=byte', '--workers=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(base + [f'--out={out}'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'--config.data.prepared={out}' in done.stdout
  assert json.load(open(os.path.join(out, 'manifest.json')))['splits']['train']['docs'] > 100
