"""Evaluation runs behind `python -m experiments.evaluate` (HumanEval pass@k, perplexity,
exact-match accuracy on a synthetic task).

`run(suite, workdir=..., hf_dir=..., ...)` loads the model, evaluates and writes the results;
the CLI only parses flags and calls it, so notebooks and tests use the same function.
"""
from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Optional

import ml_collections

from plt_jax import fileio
from plt_jax.evaluation import humaneval, perplexity, sandbox, synthetic
from plt_jax.infer import loading
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import metrics as metrics_lib


def _tag(info: dict) -> str:
  return f'step{info["step"]}' if info['step'] is not None else 'hf'


# ---------------------------------------------------------------------------- the suites

def run_humaneval(model, tokenizer, info: dict, *, out_dir: str, samples: int = 1,
                  temperature: Optional[float] = None, top_p: float = 0.95, top_k: int = 0,
                  max_new_tokens: int = 384, limit: int = 0, batch_size: int = 16,
                  workers: int = 4, timeout: float = 10.0, memory_mb: int = 1024, nproc: int = 8,
                  seed: int = 0, ks=(1, 10, 100), overwrite: bool = False,
                  progress: bool = True, allow_weaker_isolation: bool = False,
                  sandbox_kwargs: Optional[dict] = None) -> dict[str, Any]:
  limits = check_sandbox(timeout=timeout, memory_mb=memory_mb, nproc=nproc,
                         allow_weaker_isolation=allow_weaker_isolation,
                         sandbox_kwargs=sandbox_kwargs)
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
  meta = dict(model=info, generation=gen, tokenizer_sha256=tokenizer.sha256)
  return humaneval.evaluate(problems, generate_fn, out_dir=out_dir, samples=samples,
                            batch_size=batch_size, limits=limits, workers=workers,
                            ks=[int(k) for k in ks], meta=meta, overwrite=overwrite,
                            progress=progress, sandbox_kwargs=sandbox_kwargs)


def check_sandbox(*, timeout: float = 10.0, memory_mb: int = 1024, nproc: int = 8,
                  allow_weaker_isolation: bool = False,
                  sandbox_kwargs: Optional[dict] = None):
  """The HumanEval sandbox limits, once a probe program showed every isolation layer works.

  A missing layer is a ValueError naming it and the flag that accepts weaker isolation."""
  limits = sandbox.Limits(timeout=float(timeout), memory_bytes=int(memory_mb) << 20,
                          nproc=int(nproc))
  sandbox.require_isolation(limits, allow_weaker=allow_weaker_isolation,
                            flag='allow_weaker_isolation', **dict(sandbox_kwargs or {}))
  return limits


def run_perplexity(model, tokenizer, info: dict, *, out_path: str, config=None,
                   workdir: Optional[str] = None, files=(), seq_len: int = 0,
                   eval_batches: int = -1, batch_size: int = 0,
                   progress: bool = True) -> dict[str, Any]:
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
    out['bits_per_byte'] = metrics_lib.bits_per_byte(result.nll_nats, out['text_bytes'])
    out['byte_counts_agree'] = result.bytes == out['text_bytes']
  else:
    out['byte_counts_agree'] = result.bytes == out['data_stats'].get('val_eval_bytes')
  return _write_result(out, out_path)


def run_synthetic(model, info: dict, *, out_path: str, config=None, batch_size: int = 0,
                  limit: int = 0) -> dict[str, Any]:
  """Exact-match accuracy on the held-out set of a run trained with data.source='synthetic'."""
  if config is None:
    raise ValueError('the synthetic suite needs --workdir (a run trained on a synthetic task)')
  out: dict[str, Any] = dict(suite='synthetic', model=info)
  out.update(synthetic.evaluate_run(model, config.data, batch_size=batch_size or 64,
                                    limit=limit))
  return _write_result(out, out_path)


def _write_result(out: dict, out_path: str) -> dict:
  """Writes a suite's result JSON atomically (a reader never sees half a file)."""
  fileio.write_json(out_path, out, sort_keys=True)
  out['out_path'] = out_path
  return out


def _with_seq_len(config, seq_len: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.seq_len = int(seq_len)
  return c


def run(suite: str, *, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
        step: Optional[int] = None, dtype: Optional[str] = None, out_dir: Optional[str] = None,
        files=(), seq_len: int = 0, eval_batches: int = -1, eval_batch_size: int = 0,
        **humaneval_kwargs) -> dict[str, Any]:
  """Loads the model and runs one suite; returns its summary (also written to disk)."""
  if suite == 'humaneval':  # before the model loads: a sandbox that falls short fails fast
    check_sandbox(**{k: humaneval_kwargs[k] for k in (
        'timeout', 'memory_mb', 'nproc', 'allow_weaker_isolation', 'sandbox_kwargs')
        if k in humaneval_kwargs})
  if not (hf_dir or workdir):
    raise ValueError('give --workdir (a training run) or --hf_dir (a Hugging Face checkpoint)')
  # --hf_dir names the model when both are given; --workdir may still supply the val split.
  source, path = ('hf', hf_dir) if hf_dir else ('workdir', workdir)
  loaded = loading.load_model(path, source=source, step=step, dtype=dtype)
  if loaded.tokenizer is None:
    raise ValueError(f'{loaded.info["path"]} has no tokenizer.json; evaluation needs the '
                     'tokenizer')
  model, tokenizer, config, info = loaded.model, loaded.tokenizer, loaded.config, loaded.info
  if config is None and workdir and not files:  # an HF model scored on a run's val split
    config = ckpt_lib.load_config(fileio.abspath(workdir))
  base = fileio.join(info['path'] if info['source'] == 'workdir' else (
      fileio.abspath(workdir) if workdir else info['path']), 'eval')
  if suite == 'humaneval':
    samples = int(humaneval_kwargs.get('samples', 1))
    t = humaneval_kwargs.get('temperature')
    t = (0.0 if samples == 1 else 0.8) if t is None else t
    out_dir = out_dir or fileio.join(base, f'humaneval-{_tag(info)}-n{samples}-t{t:g}')
    return run_humaneval(model, tokenizer, info, out_dir=out_dir, **humaneval_kwargs)
  if suite == 'perplexity':
    if files:
      key = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:8]
      name = f'perplexity-{_tag(info)}-files-{key}.json'
    else:
      name = f'perplexity-{_tag(info)}-val.json'
    out_path = fileio.join(out_dir or base, name)
    return run_perplexity(model, tokenizer, info, out_path=out_path, config=config,
                          workdir=fileio.abspath(workdir) if workdir else None, files=files,
                          seq_len=seq_len, eval_batches=eval_batches,
                          batch_size=eval_batch_size,
                          progress=humaneval_kwargs.get('progress', True))
  if suite == 'synthetic':
    name = f'synthetic-{_tag(info)}.json'
    out_path = fileio.join(out_dir or base, name)
    return run_synthetic(model, info, out_path=out_path, config=config,
                         batch_size=eval_batch_size,
                         limit=int(humaneval_kwargs.get('limit', 0) or 0))
  raise ValueError(f'unknown suite {suite!r}')


def format_summary(s: dict) -> str:
  if s['suite'] == 'synthetic':
    return synthetic.format_summary(s)
  if s['suite'] == 'humaneval':
    ks = ', '.join(f'{k} = {v:.4f}' for k, v in s.items() if k.startswith('pass@'))
    return (f'humaneval: {ks}  ({s["problems_solved"]}/{s["problems"]} problems solved, '
            f'{s["samples_passed"]}/{s["samples"]} samples passed; {s["status_counts"]})\n'
            f'  sandbox: {s["isolation"]}\n  results: {s["out_dir"]}')
  return (f'perplexity ({s["source"]}): {s["bits_per_byte"]:.4f} bits/byte, token perplexity '
          f'{s["token_perplexity"]:.3f} ({s["tokens"]:,} tokens, {s["bytes"]:,} bytes, '
          f'byte counts agree: {s["byte_counts_agree"]})\n  results: {s["out_path"]}')
