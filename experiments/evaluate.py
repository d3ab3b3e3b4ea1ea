"""Evaluate a checkpoint: `python -m experiments.evaluate --workdir=RUN --suite=humaneval|perplexity`.

  --suite=humaneval   generate with the PLT decode path, run every completion in the sandbox,
                      score pass@k. Writes OUT/samples.jsonl (one line per problem; a rerun
                      resumes), OUT/summary.json and OUT/meta.json.
                      OUT defaults to <run>/eval/humaneval-step<S>-n<samples>-t<temperature>.
  --suite=perplexity  bits per byte and token perplexity on the run's validation split, or on
                      --files=GLOB[,GLOB...]. Writes <run>/eval/perplexity-*.json.
The model comes from a training work dir (--workdir, latest or --step checkpoint) or from an
imported Hugging Face directory (--hf_dir). `run(...)` is the same thing as a function.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Optional

from absl import app, flags

_SUITE = flags.DEFINE_enum('suite', 'humaneval', ['humaneval', 'perplexity'], 'What to evaluate.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training work dir (config.json, checkpoints/).')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (instead of a '
                              'work dir for the model; --workdir may still supply the val split).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest complete one).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Compute dtype (default: the run\'s; float32 for --hf_dir).')
_OUT = flags.DEFINE_string('out_dir', None, 'Output directory (default: <run>/eval/...).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress bars.')
# humaneval
_SAMPLES = flags.DEFINE_integer('samples', 1, 'Samples per problem (n of pass@k).')
_TEMPERATURE = flags.DEFINE_float('temperature', None,
                                  'Sampling temperature (default: 0 = greedy for --samples=1, '
                                  'else 0.8).')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass (when temperature > 0).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 384, 'Tokens generated per completion at most.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Only the first N problems (0 = all 164).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per generation batch.')
_WORKERS = flags.DEFINE_integer('workers', 4, 'Sandboxes running at once.')
_TIMEOUT = flags.DEFINE_float('timeout', 10.0, 'Wall-clock seconds per program.')
_MEMORY = flags.DEFINE_integer('memory_mb', 1024, 'Address-space limit per process (MiB).')
_NPROC = flags.DEFINE_integer('nproc', 8, 'Processes a program may have (itself included).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_KS = flags.DEFINE_list('ks', ['1', '10', '100'], 'k of pass@k (those <= --samples are reported).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Discard earlier results in the output dir.')
# perplexity
_FILES = flags.DEFINE_list('files', [], 'Globs of text files to score instead of the val split.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Row length (default: the run\'s train.seq_len; '
                                'for --hf_dir with --files, 1024 capped at max_seq_len).')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', -1, 'Validation batches: -1 = as many as '
                                     'the run evaluated, 0 = the whole split.')
_EVAL_BATCH_SIZE = flags.DEFINE_integer('eval_batch_size', 0,
                                        'Rows per perplexity batch (default: the run\'s).')


# ------------------------------------------------------------------------------ loading

def complete_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps (Orbax writes unfinished ones under a temporary name)."""
  from plt_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  d = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def load_model(workdir: Optional[str] = None, hf_dir: Optional[str] = None,
               step: Optional[int] = None, dtype: Optional[str] = None):
  """(model, tokenizer, config or None, info). info identifies the weights (for resume checks)."""
  from plt_jax.model import param_count  # pylint: disable=g-import-not-at-top
  if hf_dir:
    from plt_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
    hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
    model, tokenizer = load_hf_checkpoint(hf_dir, dtype=dtype or 'float32')
    if tokenizer is None:
      raise ValueError(f'{hf_dir} has no tokenizer.json; evaluation needs the tokenizer')
    info = dict(source='hf', path=hf_dir, step=None)
    config = None
  elif workdir:
    from plt_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if step is None:
      steps = complete_steps(workdir)
      if not steps:
        raise FileNotFoundError(f'no complete checkpoint in {workdir}')
      step = steps[-1]
    model, config, tokenizer = ckpt_lib.load_for_inference(workdir, step=step)
    if dtype and dtype != model.cfg.dtype:
      model = _with_dtype(model, dtype)
    info = dict(source='workdir', path=workdir, step=int(step))
  else:
    raise ValueError('give --workdir (a training run) or --hf_dir (a Hugging Face checkpoint)')
  c = model.cfg
  info.update(params=int(param_count(model)), num_loops=c.num_loops, loop_mode=c.loop_mode,
              dtype=c.dtype, vocab_size=c.vocab_size, max_seq_len=c.max_seq_len)
  return model, tokenizer, config, info


def _with_dtype(model, dtype: str):
  """The same weights in a model whose compute dtype is `dtype`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from plt_jax.model import PLT  # pylint: disable=g-import-not-at-top
  cfg = model.cfg.replace(dtype=dtype)
  target = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  graphdef, _ = nnx.split(target)
  _, state = nnx.split(model)
  return nnx.merge(graphdef, state)


def _tag(info: dict) -> str:
  return f'step{info["step"]}' if info['step'] is not None else 'hf'


# ---------------------------------------------------------------------------- the suites

def run_humaneval(model, tokenizer, info: dict, *, out_dir: str, samples: int = 1,
                  temperature: Optional[float] = None, top_p: float = 0.95, top_k: int = 0,
                  max_new_tokens: int = 384, limit: int = 0, batch_size: int = 16,
                  workers: int = 4, timeout: float = 10.0, memory_mb: int = 1024, nproc: int = 8,
                  seed: int = 0, ks=(1, 10, 100), overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
  from plt_jax.evaluation import humaneval, sandbox  # pylint: disable=g-import-not-at-top
  if temperature is None:
    temperature = 0.0 if samples == 1 else 0.8
  if samples > 1 and temperature == 0:
    print('evaluate: warning: --samples > 1 with greedy decoding gives identical samples',
          file=sys.stderr)
  greedy = temperature == 0
  gen = dict(temperature=float(temperature), top_p=1.0 if greedy else float(top_p),
             top_k=0 if greedy else int(top_k), max_new_tokens=int(max_new_tokens),
             seed=None if greedy else int(seed))
  problems = humaneval.load_problems(limit=limit or None)
  generate_fn = humaneval.model_generate_fn(
      model, tokenizer, max_new_tokens=max_new_tokens, temperature=gen['temperature'],
      top_p=gen['top_p'], top_k=gen['top_k'], batch_size=batch_size, seed=seed)
  limits = sandbox.Limits(timeout=float(timeout), memory_bytes=int(memory_mb) << 20,
                          nproc=int(nproc))
  meta = dict(model=info, generation=gen, tokenizer_sha256=tokenizer.sha256)
  return humaneval.evaluate(problems, generate_fn, out_dir=out_dir, samples=samples,
                            batch_size=batch_size, limits=limits, workers=workers,
                            ks=[int(k) for k in ks], meta=meta, overwrite=overwrite,
                            progress=progress)


def run_perplexity(model, tokenizer, info: dict, *, out_path: str, config=None,
                   workdir: Optional[str] = None, files=(), seq_len: int = 0,
                   eval_batches: int = -1, batch_size: int = 0,
                   progress: bool = True) -> dict[str, Any]:
  from plt_jax.evaluation import perplexity  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = dict(suite='perplexity', model=info)
  if files:
    if not seq_len:
      seq_len = int(config.train.seq_len) if config is not None else min(
          1024, model.cfg.max_seq_len)
    bs = batch_size or (int(config.train.batch_size) if config is not None else 8)
    batches, finfo = perplexity.file_batches(files, tokenizer, seq_len=seq_len, batch_size=bs)
    out.update(source='files', patterns=list(files), **finfo)
  else:
    if config is None or workdir is None:
      raise ValueError('perplexity on a validation split needs --workdir (a training run); '
                       'with only --hf_dir, give --files')
    if seq_len and seq_len != int(config.train.seq_len):
      config = _with_seq_len(config, seq_len)
    batches, data_tok, stats = perplexity.workdir_validation(
        workdir, config, max_batches=None if eval_batches < 0 else eval_batches,
        batch_size=batch_size or None)
    if data_tok.sha256 != tokenizer.sha256:
      raise ValueError(f'the model\'s tokenizer differs from the one of {workdir}\'s data')
    bs = int(batches[0]['inputs'].shape[0]) if batches else 0
    seq_len = int(config.train.seq_len)
    out.update(source='validation', data_stats={k: stats[k] for k in (
        'source', 'val_docs', 'val_tokens', 'val_bytes', 'val_rows', 'val_eval_batches',
        'val_eval_tokens', 'val_eval_bytes') if k in stats})
  if not batches:
    raise ValueError('nothing to evaluate (no batches)')
  nll_fn = perplexity.make_nll_fn(model)
  result = perplexity.score(nll_fn, batches, tokenizer.token_bytes, progress=progress,
                            total=len(batches))
  out.update(result.to_json(), seq_len=int(seq_len), batch_size=int(bs), batches=len(batches))
  if out['source'] == 'files':
    # The definition's denominator is the text's own byte count; for byte-level tokenizers the
    # per-token count must agree exactly.
    out['bytes_from_tokens'] = result.bytes
    out['bytes'] = out['text_bytes']
    out['bits_per_byte'] = result.nll_nats / 0.6931471805599453 / out['text_bytes']
    out['byte_counts_agree'] = result.bytes == out['text_bytes']
  else:
    out['byte_counts_agree'] = result.bytes == out['data_stats'].get('val_eval_bytes')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path + '.tmp', 'w') as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(out_path + '.tmp', out_path)
  out['out_path'] = out_path
  return out


def _with_seq_len(config, seq_len: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.seq_len = int(seq_len)
  return c


def run(suite: str, *, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
        step: Optional[int] = None, dtype: Optional[str] = None, out_dir: Optional[str] = None,
        files=(), seq_len: int = 0, eval_batches: int = -1, eval_batch_size: int = 0,
        **humaneval_kwargs) -> dict[str, Any]:
  """Loads the model and runs one suite; returns its summary (also written to disk)."""
  model, tokenizer, config, info = load_model(workdir, hf_dir, step, dtype)
  if config is None and workdir and not files:  # an HF model scored on a run's val split
    from plt_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    config = ckpt_lib.load_config(os.path.abspath(os.path.expanduser(workdir)))
  base = os.path.join(info['path'] if info['source'] == 'workdir' else (
      os.path.abspath(workdir) if workdir else info['path']), 'eval')
  if suite == 'humaneval':
    samples = int(humaneval_kwargs.get('samples', 1))
    t = humaneval_kwargs.get('temperature')
    t = (0.0 if samples == 1 else 0.8) if t is None else t
    out_dir = out_dir or os.path.join(base, f'humaneval-{_tag(info)}-n{samples}-t{t:g}')
    return run_humaneval(model, tokenizer, info, out_dir=out_dir, **humaneval_kwargs)
  if suite == 'perplexity':
    if files:
      key = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:8]
      name = f'perplexity-{_tag(info)}-files-{key}.json'
    else:
      name = f'perplexity-{_tag(info)}-val.json'
    out_path = os.path.join(out_dir, name) if out_dir else os.path.join(base, name)
    return run_perplexity(model, tokenizer, info, out_path=out_path, config=config,
                          workdir=os.path.abspath(workdir) if workdir else None, files=files,
                          seq_len=seq_len, eval_batches=eval_batches,
                          batch_size=eval_batch_size,
                          progress=humaneval_kwargs.get('progress', True))
  raise ValueError(f'unknown suite {suite!r}')


def format_summary(s: dict) -> str:
  if s['suite'] == 'humaneval':
    ks = ', '.join(f'{k} = {v:.4f}' for k, v in s.items() if k.startswith('pass@'))
    return (f'humaneval: {ks}  ({s["problems_solved"]}/{s["problems"]} problems solved, '
            f'{s["samples_passed"]}/{s["samples"]} samples passed; {s["status_counts"]})\n'
            f'  sandbox: {s["isolation"]}\n  results: {s["out_dir"]}')
  return (f'perplexity ({s["source"]}): {s["bits_per_byte"]:.4f} bits/byte, token perplexity '
          f'{s["token_perplexity"]:.3f} ({s["tokens"]:,} tokens, {s["bytes"]:,} bytes, '
          f'byte counts agree: {s["byte_counts_agree"]})\n  results: {s["out_path"]}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  suite = _SUITE.value
  kwargs: dict[str, Any] = dict(progress=_PROGRESS.value)
  if suite == 'humaneval':
    kwargs.update(samples=_SAMPLES.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                  top_k=_TOP_K.value, max_new_tokens=_MAX_NEW.value, limit=_LIMIT.value,
                  batch_size=_BATCH.value, workers=_WORKERS.value, timeout=_TIMEOUT.value,
                  memory_mb=_MEMORY.value, nproc=_NPROC.value, seed=_SEED.value,
                  ks=[int(k) for k in _KS.value], overwrite=_OVERWRITE.value)
  try:
    summary = run(suite, workdir=_WORKDIR.value, hf_dir=_HF_DIR.value, step=_STEP.value,
                  dtype=_DTYPE.value, out_dir=_OUT.value, files=_FILES.value,
                  seq_len=_SEQ_LEN.value, eval_batches=_EVAL_BATCHES.value,
                  eval_batch_size=_EVAL_BATCH_SIZE.value, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    print(f'evaluate: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(format_summary(summary), flush=True)


if __name__ == '__main__':
  app.run(main)
