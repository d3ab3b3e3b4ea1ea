"""The loop-count study as one call: train R = 1..4 and the vanilla baseline, then compare.

Every variant shares the data (one tokenize-once cache), seed, token budget and shared-layer size;
only `model.num_loops` / `model.loop_mode` change. Each variant lives in <root>/<name>/ (a normal
training work dir) and is finished when <root>/<name>/sweep_result.json exists, so an interrupted
sweep resumes: finished variants are skipped, a half-trained one resumes from its checkpoint.
Outputs in <root>: sweep.md (the table), sweep.json, val_loss_vs_loops.png, loss_curves.png.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import ml_collections
import numpy as np

RESULT_FILE = 'sweep_result.json'


def parse_variants(spec: str) -> list[tuple[str, int, str]]:
  """'r1,r2,vanilla2' -> [(name, num_loops, loop_mode), ...]."""
  out = []
  for name in [s.strip() for s in spec.split(',') if s.strip()]:
    m = re.fullmatch(r'(r|vanilla)(\d+)', name)
    if not m or int(m.group(2)) < 1:
      raise ValueError(f'sweep.variants: {name!r} is not of the form rN or vanillaN (N >= 1)')
    out.append((name, int(m.group(2)), 'plt' if m.group(1) == 'r' else 'vanilla'))
  if not out:
    raise ValueError('sweep.variants is empty')
  if len({n for n, _, _ in out}) != len(out):
    raise ValueError(f'sweep.variants has duplicates: {spec!r}')
  return out


def variant_config(config: ml_collections.ConfigDict, num_loops: int, loop_mode: str,
                   root: str) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.to_dict())
  del cfg['sweep']
  cfg.model.num_loops = num_loops
  cfg.model.loop_mode = loop_mode
  if not cfg.data.cache_dir:  # tokenize once for the whole sweep
    cfg.data.cache_dir = os.path.join(root, 'data_cache')
  return cfg


def decode_latency(model, *, batch: int, prompt_len: int, steps: int, warmup: int = 5) -> dict:
  """Median per-token decode latency (s) with PLT's (or vanilla's) cached step, same as the bench."""
  import jax  # pylint: disable=import-outside-toplevel
  from plt_jax import decode  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  max_len = prompt_len + warmup + steps + 1
  decoder = decode.Decoder(model, max_len=max_len)
  prompts = [list(rng.integers(3, model.cfg.vocab_size, prompt_len)) for _ in range(batch)]
  logits, cache = decoder.prefill(prompts)
  tok = np.asarray(jax.device_get(logits)).argmax(-1).astype(np.int32)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    logits, cache = decoder.step(cache, tok)
    tok = np.asarray(jax.device_get(logits)).argmax(-1).astype(np.int32)  # forces completion
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  bytes_ = decode.cache_nbytes(cache)
  return {'latency_s': float(np.median(times)), 'kv_bytes': int(bytes_['kv_total']),
          'kv_max_len': max_len, 'batch': batch}


def run_variant(config, name, num_loops, loop_mode, root, *, log=print) -> dict[str, Any]:
  from plt_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from plt_jax import diagnostics  # pylint: disable=import-outside-toplevel
  from plt_jax import flops as flops_lib  # pylint: disable=import-outside-toplevel
  from plt_jax import train  # pylint: disable=import-outside-toplevel
  from plt_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel

  workdir = os.path.join(root, name)
  done = os.path.join(workdir, RESULT_FILE)
  if os.path.exists(done):
    log(f'[sweep] {name}: finished earlier, skipping ({done})')
    with open(done) as f:
      return json.load(f)
  log(f'[sweep] {name}: training R={num_loops} {loop_mode} in {workdir}')
  cfg = variant_config(config, num_loops, loop_mode, root)
  summary = train.train_and_evaluate(cfg, workdir)
  if summary.get('stopped_by'):
    raise RuntimeError(f'[sweep] {name} stopped early ({summary["stopped_by"]}); rerun to resume')

  model, saved_cfg, _ = ckpt_lib.load_for_inference(workdir)
  mcfg: ModelConfig = model.cfg
  sw = config.sweep
  diag, diag_paths = diagnostics.diagnose_workdir(workdir, max_batches=sw.diagnose_batches)
  lat = decode_latency(model, batch=1, prompt_len=sw.decode_prompt_len, steps=sw.decode_steps)
  t = saved_cfg.train
  fpt = flops_lib.flops_per_token(mcfg, int(t.seq_len))
  tokens = int(t.steps) * int(t.batch_size) * int(t.seq_len)
  result = dict(
      name=name, num_loops=num_loops, loop_mode=loop_mode, params=mcfg.param_count(),
      train_tokens=tokens, train_flops=fpt['train'] * tokens,
      final_val_loss=summary['final_val_loss'], first_val_loss=summary['first_val_loss'],
      final_val_ppl=math.exp(summary['final_val_loss']), tokens_per_s=summary['tokens_per_s'],
      train_seconds=summary['wall_seconds'], decode=lat, diagnostics=diag,
      diagnostics_dir=os.path.dirname(diag_paths[0]), metrics=summary['metrics'])
  with open(done + '.tmp', 'w') as f:
    json.dump(diagnostics._json_safe(result), f, indent=2)  # pylint: disable=protected-access
  os.replace(done + '.tmp', done)
  return result


def _fmt(x, spec):
  return 'n/a' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_table(results: list[dict]) -> str:
  head = ('| variant | params | train FLOPs | val loss | val ppl | decode ms/token (B=1) | '
          'KV bytes | step size (last) | alignment (last) | eff. rank (last) | '
          'offset cost (last) | mean gate |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in results:
    d = r['diagnostics']
    gates = np.asarray([[np.nan if v is None else v for v in row] for row in d['gate']],
                       dtype=np.float64)
    mean_gate = float(np.nanmean(gates)) if np.isfinite(gates).any() else None
    last = lambda k: d[k][-1]  # noqa: E731
    lines.append(
        f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_flops']:.3g} | "
        f"{r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
        f"{r['decode']['latency_s'] * 1e3:.2f} | {r['decode']['kv_bytes']:,} | "
        f"{_fmt(last('step_size'), '.3g')} | {_fmt(last('alignment'), '.3f')} | "
        f"{_fmt(last('effective_rank'), '.1f')} | {_fmt(last('offset_cost'), '.3g')} | "
        f"{_fmt(mean_gate, '.3f')} |")
  return '\n'.join(lines)


def plot(results: list[dict], root: str) -> list[str]:
  # Figures, not pyplot: no global backend switch (a notebook's inline plots keep working).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from plt_jax.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

  paths = []
  plt_runs = sorted([r for r in results if r['loop_mode'] == 'plt'], key=lambda r: r['num_loops'])
  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.subplots()
  if plt_runs:
    ax.plot([r['num_loops'] for r in plt_runs], [r['final_val_loss'] for r in plt_runs],
            marker='o', label='PLT')
  for r in results:
    if r['loop_mode'] == 'vanilla':
      ax.scatter([r['num_loops']], [r['final_val_loss']], marker='s', color='C3', zorder=3,
                 label=f"vanilla R={r['num_loops']}")
  ax.set_xlabel('loops R')
  ax.set_ylabel('final validation loss (nats/token)')
  ax.set_xticks(sorted({r['num_loops'] for r in results}))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(root, 'val_loss_vs_loops.png'))
  fig.savefig(paths[-1], dpi=120)

  fig = Figure(figsize=(11, 3.8))
  axes = fig.subplots(1, 2)
  for i, r in enumerate(results):
    rows = read_jsonl(r['metrics'])
    tr = [(x['step'], x['loss']) for x in rows if x.get('split') == 'train' and 'loss' in x]
    va = [(x['step'], x['loss']) for x in rows if x.get('split') == 'val' and 'loss' in x]
    if tr:
      axes[0].plot(*zip(*tr), lw=0.8, color=f'C{i}', label=r['name'])
    if va:
      axes[1].plot(*zip(*va), marker='o', color=f'C{i}', label=r['name'])
  for ax, title in zip(axes, ('train loss', 'validation loss')):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(root, 'loss_curves.png'))
  fig.savefig(paths[-1], dpi=120)
  return paths


def run_sweep(config: ml_collections.ConfigDict, root: str, *, log=print) -> dict[str, Any]:
  """Trains, evaluates and diagnoses every variant (resuming), then writes the comparison."""
  root = os.path.abspath(os.path.expanduser(root))
  os.makedirs(root, exist_ok=True)
  variants = parse_variants(config.sweep.variants)
  t0 = time.time()
  results = [run_variant(config, n, r, m, root, log=log) for n, r, m in variants]
  table = markdown_table(results)
  paths = plot(results, root)
  md = os.path.join(root, 'sweep.md')
  with open(md, 'w') as f:
    f.write('# Loop-count sweep\n\n')
    f.write(f'Identical data, seed, token budget ({results[0]["train_tokens"]:,} tokens) and '
            'shared layers; only the loop count / mode differ.\n\n')
    f.write(table + '\n\n')
    for p in paths:
      f.write(f'![{os.path.basename(p)}]({os.path.basename(p)})\n')
  from plt_jax.diagnostics import _json_safe  # pylint: disable=import-outside-toplevel
  with open(os.path.join(root, 'sweep.json'), 'w') as f:
    json.dump(_json_safe(results), f, indent=2)
  log(table)
  log(f'[sweep] done in {(time.time() - t0) / 60:.1f} min. Wrote {md}, '
      f'{os.path.join(root, "sweep.json")}, ' + ', '.join(paths))
  return {'results': results, 'table': table, 'markdown': md, 'plots': paths}
