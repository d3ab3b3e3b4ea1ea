"""Data benchmark: `python -m experiments.bench_data [--sizes_mib=100,400] [--work_dir=DIR]`.

On a generated corpus (JSONL of code-like documents) of each size, measures:
  prepare      chars/s and tokens/s of prepare_data with 1 and 2 workers, and peak RSS of the
               whole process tree (the case runs in a subprocess; psutil sums the tree's RSS)
  start-up     a training run's build_data on the prepared shards, to its first batch
  pipeline     packed-batch tokens/s of the training iterator on one host
  old path     the tokenize-once cache of commit 6852080 (plt_jax/data.py, loaded from git
               history into a temporary module): build_data to the first batch, peak RSS
All cases use one byte-level BPE trained once on a bounded sample (so every case tokenizes with
the same vocabulary); its training time is reported apart. Not a test: numbers depend on the
machine and on what else runs on it.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

flags.DEFINE_list('sizes_mib', ['100', '400'], 'Corpus sizes in MiB.')
flags.DEFINE_string('work_dir', '', 'Where corpora and outputs go (default: a temp folder).')
flags.DEFINE_list('workers', ['1', '2'], 'Worker counts of the prepare cases.')
flags.DEFINE_bool('old_path', True, 'Also measure the tokenize-once cache of commit 6852080.')
flags.DEFINE_string('old_commit', '6852080', 'The commit whose plt_jax/data.py is the old path.')
flags.DEFINE_integer('vocab_size', 4096, 'BPE vocabulary.')
flags.DEFINE_integer('bpe_train_chars', 20_000_000, 'Characters the BPE is trained on.')
flags.DEFINE_integer('batch_size', 32, 'Rows per host batch for start-up and pipeline.')
flags.DEFINE_integer('seq_len', 2048, 'Row length for start-up and pipeline.')
flags.DEFINE_float('pipeline_seconds', 10.0, 'How long the pipeline case draws batches.')
flags.DEFINE_string('case', '', 'internal: run one case in this process (JSON).')
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IDENTS = ['value', 'index', 'result', 'items', 'count', 'name', 'path', 'data', 'config', 'node',
           'left', 'right', 'total', 'buffer', 'token', 'offset', 'size', 'key', 'cache', 'state']
_CALLS = ['len', 'range', 'sorted', 'print', 'isinstance', 'enumerate', 'zip', 'min', 'max']


def write_corpus(path: str, mib: int, seed: int = 0) -> None:
  """JSONL of Python-like functions and classes, ~4 KB per document, until `mib` MiB."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  target = mib * 2**20
  tmp = f'{path}.tmp'
  written = 0
  with open(tmp, 'w', encoding='utf-8') as f:
    while written < target:
      lines = []
      for fn in range(int(rng.integers(2, 8))):
        name = f'{rng.choice(_IDENTS)}_{rng.choice(_IDENTS)}_{int(rng.integers(0, 999))}'
        args = ', '.join(rng.choice(_IDENTS, int(rng.integers(1, 4)), replace=False))
        lines.append(f'def {name}({args}):')
        lines.append(f'    """Return the {rng.choice(_IDENTS)} of {rng.choice(_IDENTS)}."""')
        for _ in range(int(rng.integers(3, 14))):
          a, b, c = rng.choice(_IDENTS, 3)
          kind = int(rng.integers(0, 5))
          if kind == 0:
            lines.append(f'    {a} = {rng.choice(_CALLS)}({b}) + {int(rng.integers(0, 100))}')
          elif kind == 1:
            lines.append(f'    for {a} in {rng.choice(_CALLS)}({b}):')
            lines.append(f'        {c}.append({a} * 2)')
          elif kind == 2:
            lines.append(f'    if {a} is None or {b} > {c}:')
            lines.append(f'        return {c}  # {rng.choice(_IDENTS)} café')
          elif kind == 3:
            lines.append(f'    {a}[{b!r}] = {{"{c}": {int(rng.integers(0, 9))}, "k": {a}}}')
          else:
            lines.append(f'    {a} = self.{b}.get({c!r}, [])')
        lines.append(f'    return {rng.choice(_IDENTS)}')
        lines.append('')
      line = json.dumps({'text': '\n'.join(lines)}) + '\n'
      f.write(line)
      written += len(line.encode('utf-8'))
  os.replace(tmp, path)


# ------------------------------------------------------------------------- cases (children)


def _case_prepare(c: dict) -> dict:
  from plt_jax.data import default_data_config  # pylint: disable=g-import-not-at-top
  from plt_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  cfg = default_data_config()
  cfg.update(source='jsonl', paths=(c['corpus'],), max_chars=0, tokenizer='hf',
             tokenizer_path=c['tokenizer'], unit_mib=c['unit_mib'])
  t0 = time.perf_counter()
  m = prepare_lib.prepare(cfg, c['out'], workers=c['workers'], say=lambda _: None)
  seconds = time.perf_counter() - t0
  s = m['splits']
  return dict(seconds=seconds, chars=s['train']['chars'] + s['val']['chars'],
              tokens=s['train']['tokens'] + s['val']['tokens'], units=m['units'])


def _case_startup(c: dict) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from plt_jax import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config()
  cfg.update(prepared=c['out'], prefetch=0)
  t0 = time.perf_counter()
  b = data.build_data(cfg, seq_len=c['seq_len'], batch_size=c['batch_size'], seed=0,
                      workdir=c['workdir'])
  next(b.train_iter)
  startup = time.perf_counter() - t0
  n, real, t1 = 0, 0, time.perf_counter()
  while time.perf_counter() - t1 < c['pipeline_seconds']:
    batch = next(b.train_iter)
    n += 1
    real += int(np.count_nonzero(batch['segment_ids']))
  seconds = time.perf_counter() - t1
  return dict(startup_s=startup, pipeline_tokens_per_s=n * c['batch_size'] * c['seq_len'] / seconds,
              pipeline_real_tokens_per_s=real / seconds, batches=n)


def _case_old(c: dict) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  from plt_jax.data import tasks  # pylint: disable=g-import-not-at-top
  # The old module imports the task module under its old name, plt_jax.tasks.
  sys.modules.setdefault('plt_jax.tasks', tasks)
  spec = importlib.util.spec_from_file_location('plt_jax_old_data', c['module'])
  old = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = old
  spec.loader.exec_module(old)
  cfg = old.default_data_config()
  cfg.update(source='jsonl', paths=(c['corpus'],), max_chars=0, tokenizer='hf',
             tokenizer_path=c['tokenizer'], cache_dir=c['cache'], read_threads=0, prefetch=0)
  t0 = time.perf_counter()
  b = old.build_data(cfg, seq_len=c['seq_len'], batch_size=c['batch_size'], seed=0,
                     workdir=c['workdir'])
  next(b.train_iter)
  return dict(seconds=time.perf_counter() - t0, tokens=b.stats['train_tokens'] +
              b.stats['val_tokens'], tokenize_seconds=b.stats['tokenize_seconds'])


def _case_bpe(c: dict) -> dict:
  from plt_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  def texts():
    budget = c['chars']
    with open(c['corpus'], encoding='utf-8') as f:
      for line in f:
        text = json.loads(line)['text']
        yield text
        budget -= len(text)
        if budget <= 0:
          return
  t0 = time.perf_counter()
  tok = tokenizer_lib.build_tokenizer('bpe', workdir=None, train_texts=texts(),
                                      vocab_size=c['vocab_size'])
  tok.save_pretrained(c['out'])
  return dict(seconds=time.perf_counter() - t0, vocab=tok.vocab_size)


_CASES = dict(prepare=_case_prepare, startup=_case_startup, old=_case_old, bpe=_case_bpe)


def run_case(name: str, **c) -> dict:
  """Runs a case in a subprocess; adds peak RSS of its process tree (MiB)."""
  import psutil  # pylint: disable=g-import-not-at-top
  with tempfile.NamedTemporaryFile('r', suffix='.json') as result:
    c['result'] = result.name
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    proc = subprocess.Popen([sys.executable, '-m', 'experiments.bench_data',
                             f'--case={json.dumps(dict(c, name=name))}'], cwd=REPO, env=env)
    peak, done = [0], threading.Event()

    def watch():
      p = psutil.Process(proc.pid)
      while not done.is_set():
        try:
          tree = [p] + p.children(recursive=True)
          peak[0] = max(peak[0], sum(x.memory_info().rss for x in tree if x.is_running()))
        except psutil.Error:
          pass
        done.wait(0.1)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc = proc.wait()
    done.set()
    watcher.join()
    if rc:
      raise RuntimeError(f'case {name} failed (exit {rc})')
    out = json.load(open(result.name))
  out['peak_rss_mib'] = peak[0] / 2**20
  out['maxrss_children_mib'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return out


def _old_module(work: str) -> tuple[str, str]:
  """(path of the old plt_jax/data.py, '') or ('', why not)."""
  try:
    text = subprocess.run(['git', 'show', f'{FLAGS.old_commit}:plt_jax/data.py'], cwd=REPO,
                          capture_output=True, text=True, check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    return '', f'git unavailable or commit missing ({e.__class__.__name__})'
  path = os.path.join(work, 'old_data.py')
  with open(path, 'w') as f:
    f.write(text)
  return path, ''


def main(argv):
  del argv
  if FLAGS.case:
    c = json.loads(FLAGS.case)
    res = _CASES[c['name']](c)
    with open(c['result'], 'w') as f:
      json.dump(res, f)
    return
  work = FLAGS.work_dir or tempfile.mkdtemp(prefix='bench_data_')
  os.makedirs(work, exist_ok=True)
  print(f'bench_data: work dir {work}; machine: {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.2f} at start', flush=True)
  old_module, old_why = _old_module(work) if FLAGS.old_path else ('', 'disabled by --old_path')
  if old_module:
    print(f'old path: plt_jax/data.py of commit {FLAGS.old_commit}, loaded from git history into '
          'a temporary module', flush=True)
  else:
    print(f'old path: skipped ({old_why})', flush=True)
  rows = []
  tokenizer = os.path.join(work, 'tokenizer')
  for size in (int(s) for s in FLAGS.sizes_mib):
    corpus = os.path.join(work, f'corpus_{size}mib.jsonl')
    if not os.path.isfile(corpus):
      t0 = time.perf_counter()
      write_corpus(corpus, size)
      print(f'generated {corpus} in {time.perf_counter() - t0:.0f} s', flush=True)
    if not os.path.isdir(tokenizer):
      bpe = run_case('bpe', corpus=corpus, chars=FLAGS.bpe_train_chars, out=tokenizer,
                     vocab_size=FLAGS.vocab_size)
      print(f'BPE ({bpe["vocab"]} tokens) trained on {FLAGS.bpe_train_chars:,} chars in '
            f'{bpe["seconds"]:.1f} s, peak RSS {bpe["peak_rss_mib"]:.0f} MiB', flush=True)
    row = dict(size_mib=size)
    for w in (int(x) for x in FLAGS.workers):
      out = os.path.join(work, f'prepared_{size}_{w}')
      subprocess.run(['rm', '-rf', out], check=True)
      r = run_case('prepare', corpus=corpus, tokenizer=tokenizer, out=out, workers=w,
                   unit_mib=8.0)
      row[f'prep{w}'] = r
      print(f'{size} MiB prepare, {w} worker(s): {r["seconds"]:.1f} s, '
            f'{r["chars"] / r["seconds"] / 1e6:.2f} M chars/s, '
            f'{r["tokens"] / r["seconds"] / 1e6:.2f} M tokens/s, peak RSS (tree) '
            f'{r["peak_rss_mib"]:.0f} MiB, {r["units"]} units', flush=True)
    prepared = os.path.join(work, f'prepared_{size}_{FLAGS.workers[0]}')
    s = run_case('startup', out=prepared, workdir=os.path.join(work, f'run_{size}'),
                 seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                 pipeline_seconds=FLAGS.pipeline_seconds)
    subprocess.run(['rm', '-rf', os.path.join(work, f'run_{size}')], check=True)
    row['startup'] = s
    print(f'{size} MiB start-up on prepared shards: {s["startup_s"]:.2f} s; pipeline '
          f'{s["pipeline_tokens_per_s"] / 1e6:.2f} M tokens/s '
          f'({s["pipeline_real_tokens_per_s"] / 1e6:.2f} M non-padding), batch '
          f'{FLAGS.batch_size}x{FLAGS.seq_len}, peak RSS {s["peak_rss_mib"]:.0f} MiB', flush=True)
    if old_module:
      cache = os.path.join(work, f'old_cache_{size}')
      subprocess.run(['rm', '-rf', cache, os.path.join(work, f'old_run_{size}')], check=True)
      o = run_case('old', module=old_module, corpus=corpus, tokenizer=tokenizer, cache=cache,
                   workdir=os.path.join(work, f'old_run_{size}'), seq_len=FLAGS.seq_len,
                   batch_size=FLAGS.batch_size)
      subprocess.run(['rm', '-rf', cache], check=True)
      row['old'] = o
      print(f'{size} MiB old path (read all, tokenize, cache, walk): {o["seconds"]:.1f} s to the '
            f'first batch (tokenize {o["tokenize_seconds"]:.1f} s), '
            f'{o["tokens"] / o["tokenize_seconds"] / 1e6:.2f} M tokens/s while tokenizing, '
            f'peak RSS {o["peak_rss_mib"]:.0f} MiB', flush=True)
    rows.append(row)
  _table(rows, old_why)
  with open(os.path.join(work, 'bench_data.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  print(f'load average at the end {os.getloadavg()[0]:.2f}; results in {work}/bench_data.json')


def _table(rows, old_why):
  ws = [int(x) for x in FLAGS.workers]
  head = ['size']
  for w in ws:
    head += [f'prep {w}w Mtok/s', f'prep {w}w Mchar/s', f'prep {w}w RSS MiB']
  if len(ws) > 1:
    head.append(f'{ws[-1]}w/{ws[0]}w')
  head += ['start-up s', 'pipeline Mtok/s', 'old: to 1st batch s', 'old: RSS MiB']
  print('\n| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for r in rows:
    cells = [f'{r["size_mib"]} MiB']
    for w in ws:
      p = r[f'prep{w}']
      cells += [f'{p["tokens"] / p["seconds"] / 1e6:.2f}', f'{p["chars"] / p["seconds"] / 1e6:.2f}',
                f'{p["peak_rss_mib"]:.0f}']
    if len(ws) > 1:
      a, b = r[f'prep{ws[0]}'], r[f'prep{ws[-1]}']
      cells.append(f'{a["seconds"] / b["seconds"]:.2f}x')
    s = r['startup']
    cells += [f'{s["startup_s"]:.2f}', f'{s["pipeline_tokens_per_s"] / 1e6:.2f}']
    if 'old' in r:
      cells += [f'{r["old"]["seconds"]:.1f}', f'{r["old"]["peak_rss_mib"]:.0f}']
    else:
      cells += [f'skipped ({old_why})', '-']
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
