"""The loop-count study as one call: train R = 1..4, the vanilla and deep baselines, then compare.

Variants: rN (PLT with N loops), vanillaN (the sequential looped baseline) and deepN (no loops,
N x the layers: the FLOPs per token of N loops with N x the layer parameters). All share the data
(one tokenize-once cache) and the shared-layer size; only `model.num_loops` / `model.loop_mode` /
`model.num_layers` change.

Budget (`sweep.budget`): 'steps' trains every variant `train.steps` steps (equal tokens); 'flops'
gives every variant the training FLOPs of the reference variant (r1 if listed, else the first one)
at `train.steps`, with the same batch, so each variant's step count is scaled instead.

Seeds (`sweep.seeds`, () = just `seed`): every variant trains once per seed, and the seed is both
the init and the data-order seed, so one seed means one data order across variants. The table
and plots report mean +- std (ddof=1) over seeds; with one seed the cells are that run's values.

Each run lives in <root>/<name>/ (one default seed) or <root>/<name>-seed<S>/ (explicit seeds), a
normal training work dir, and is finished when its sweep_result.json exists, so an interrupted
sweep resumes: finished runs are skipped, a half-trained one resumes from its checkpoint.
Synthetic tasks (data.source='synthetic') add each run's exact-match accuracy on the task's fixed
held-out set (`plt_jax.evaluation.synthetic`) to the table and plot it against R.

Outputs in <root>: sweep.md (the table), sweep.json (every run), sweep_summary.json (per variant,
and the gain-cost points), accuracy_vs_loops.png (synthetic tasks), val_loss_vs_loops.png,
loss_curves.png, gain_cost.png (per loop r >= 2 of each looped variant: the refinement gain, step
size and logit-lens KL, against the offset cost Omega(r), mean +- std over seeds).
"""
from __future__ import annotations

import math
import re
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from plt_jax import fileio
from plt_jax import train
from plt_jax.config import ModelConfig
from plt_jax.evaluation import synthetic
from plt_jax.infer import decode
from plt_jax.study import diagnostics
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops as flops_lib
from plt_jax.train import step as step_lib
from plt_jax.train.metrics import read_jsonl

RESULT_FILE = 'sweep_result.json'
BUDGETS = ('steps', 'flops')
_KINDS = {'r': 'plt', 'vanilla': 'vanilla', 'deep': 'deep'}


# A variant name ending in LOOP_LOSS trains with the per-loop loss, equal weights on every loop
# (train.loop_loss_weights = (1,) * N).
LOOP_LOSS = '+ll'


def parse_variants(spec: str) -> list[tuple[str, int, str]]:
  """'r1,r2,vanilla2,deep2,r3+ll' -> [(name, N, kind), ...], kind in 'plt' | 'vanilla' | 'deep';
  rN+ll and vanillaN+ll add the per-loop loss."""
  out = []
  for name in [s.strip() for s in spec.split(',') if s.strip()]:
    m = re.fullmatch(r'(r|vanilla|deep)(\d+)(\+ll)?', name)
    if not m or int(m.group(2)) < 1 or (m.group(3) and m.group(1) == 'deep'):
      raise ValueError(
          f'sweep.variants: {name!r} is not of the form rN, vanillaN or deepN (N >= 1), or '
          f'rN{LOOP_LOSS} / vanillaN{LOOP_LOSS} for the per-loop loss')
    out.append((name, int(m.group(2)), _KINDS[m.group(1)]))
  if not out:
    raise ValueError('sweep.variants is empty')
  if len({n for n, _, _ in out}) != len(out):
    raise ValueError(f'sweep.variants has duplicates: {spec!r}')
  return out


def reference_variant(variants: list[tuple[str, int, str]]) -> tuple[str, int, str]:
  """The FLOP budget's reference: r1 when it is listed, else the first variant."""
  return next((v for v in variants if v[0] == 'r1'), variants[0])


def sweep_seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  seeds = tuple(int(s) for s in (config.sweep.get('seeds') or ()))
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'sweep.seeds has duplicates: {seeds}')
  return seeds or (int(config.seed),)


def sweep_budget(config: ml_collections.ConfigDict) -> str:
  budget = config.sweep.get('budget', 'steps')
  if budget not in BUDGETS:
    raise ValueError(f'sweep.budget must be one of {BUDGETS}, got {budget!r}')
  return budget


def variant_config(config: ml_collections.ConfigDict, num_loops: int, loop_mode: str,
                   root: str, *, seed: Optional[int] = None, steps: Optional[int] = None,
                   loop_loss: bool = False) -> ml_collections.ConfigDict:
  """The training config of one variant (loop_mode 'deep': R=1 with num_loops x the layers;
  loop_loss: equal per-loop loss weights)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  del cfg['sweep']
  if loop_loss:
    cfg.train.loop_loss_weights = (1.0,) * num_loops
  if loop_mode == 'deep':
    cfg.model.num_layers = num_loops * int(config.model.num_layers)
    cfg.model.num_loops = 1
    cfg.model.loop_mode = 'plt'
  else:
    cfg.model.num_loops = num_loops
    cfg.model.loop_mode = loop_mode
  if seed is not None:
    cfg.seed = int(seed)
  if steps is not None:
    cfg.train.steps = int(steps)
  if not cfg.data.cache_dir:  # tokenize once for the whole sweep
    cfg.data.cache_dir = fileio.join(root, 'data_cache')
  return cfg


def variant_model_config(config: ml_collections.ConfigDict, num_loops: int, loop_mode: str,
                         vocab_size: Optional[int] = None):
  """The variant's ModelConfig (vocabulary as given, else as configured)."""
  cfg = variant_config(config, num_loops, loop_mode, root='')
  if vocab_size is not None:
    cfg.model.vocab_size = int(vocab_size)
  return ModelConfig.from_dict(cfg.model)


def budget_steps(config: ml_collections.ConfigDict, variants: list[tuple[str, int, str]],
                 vocab_size: Optional[int] = None) -> dict[str, int]:
  """Training steps per variant under `sweep.budget`."""
  steps = int(config.train.steps)
  if sweep_budget(config) == 'steps':
    return {n: steps for n, _, _ in variants}
  _, ref_r, ref_mode = reference_variant(variants)
  ref_cfg = variant_model_config(config, ref_r, ref_mode, vocab_size)
  seq_len = int(config.train.seq_len)
  return {n: flops_lib.steps_for_budget(variant_model_config(config, r, m, vocab_size), ref_cfg,
                                        seq_len, steps)
          for n, r, m in variants}


def decode_latency(model, *, batch: int, prompt_len: int, steps: int, warmup: int = 5) -> dict:
  """Median per-token decode latency (s) with PLT's (or vanilla's) cached step, same as the bench."""
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


def run_dir(root: str, name: str, seed: int, per_seed: bool) -> str:
  return fileio.join(root, f'{name}-seed{seed}' if per_seed else name)


def run_variant(config, name, num_loops, loop_mode, root, *, seed: Optional[int] = None,
                steps: Optional[int] = None, per_seed: bool = False, log=print) -> dict[str, Any]:
  """Trains (or resumes, or skips when finished) one (variant, seed) run and returns its result."""
  seed = int(config.seed) if seed is None else int(seed)
  workdir = run_dir(root, name, seed, per_seed)
  done = fileio.join(workdir, RESULT_FILE)
  if fileio.exists(done):
    log(f'[sweep] {name} seed {seed}: finished earlier, skipping ({done})')
    return fileio.read_json(done)
  cfg = variant_config(config, num_loops, loop_mode, root, seed=seed, steps=steps,
                       loop_loss=name.endswith(LOOP_LOSS))
  log(f'[sweep] {name} seed {seed}: training {cfg.train.steps} steps, R={cfg.model.num_loops} '
      f'L={cfg.model.num_layers} {cfg.model.loop_mode} in {workdir}')
  summary = train.train_and_evaluate(cfg, workdir)
  if summary.get('stopped_by'):
    raise RuntimeError(f'[sweep] {name} stopped early ({summary["stopped_by"]}); rerun to resume')

  model, saved_cfg, _ = ckpt_lib.load_for_inference(workdir)
  mcfg: ModelConfig = model.cfg
  sw = config.sweep
  diag, diag_paths = diagnostics.diagnose_workdir(workdir, max_batches=sw.diagnose_batches)
  lat = decode_latency(model, batch=1, prompt_len=sw.decode_prompt_len, steps=sw.decode_steps)
  exact_match = None
  if saved_cfg.data.source == 'synthetic':
    exact_match = synthetic.evaluate_run(model, saved_cfg.data)['accuracy']
    log(f'[sweep] {name} seed {seed}: exact match {exact_match:.4f} on the held-out set')
  t = saved_cfg.train
  fpt = flops_lib.flops_per_token(
      mcfg, int(t.seq_len),
      step_lib.normalized_loop_weights(t.get('loop_loss_weights', ()), mcfg.num_loops))
  tokens = int(t.steps) * int(t.batch_size) * int(t.seq_len)
  result = dict(
      name=name, kind=loop_mode + (LOOP_LOSS if name.endswith(LOOP_LOSS) else ''), R=num_loops,
      seed=seed, num_loops=mcfg.num_loops,
      loop_mode=mcfg.loop_mode, num_layers=mcfg.num_layers, vocab_size=mcfg.vocab_size,
      params=mcfg.param_count(), steps=int(t.steps), train_tokens=tokens,
      train_flops=fpt['train'] * tokens,
      final_val_loss=summary['final_val_loss'], first_val_loss=summary['first_val_loss'],
      final_val_ppl=math.exp(summary['final_val_loss']), exact_match=exact_match,
      tokens_per_s=summary['tokens_per_s'],
      train_seconds=summary['wall_seconds'], decode=lat, diagnostics=diag,
      diagnostics_dir=str(fileio.path(diag_paths[0]).parent), metrics=summary['metrics'])
  fileio.write_json(done, result)
  return result


def _fmt(x, spec):
  return 'n/a' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def mean_std(values) -> dict[str, Any]:
  """mean and std (ddof=1; None below two values) of the finite values, None for none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
  return dict(mean=float(v.mean()) if v.size else None,
              std=float(v.std(ddof=1)) if v.size >= 2 else None, n=int(v.size))


def _pm(stat: dict, spec: str) -> str:
  if stat['std'] is None:
    return _fmt(stat['mean'], spec)
  return f"{format(stat['mean'], spec)} ± {format(stat['std'], spec)}"


def _mean_gate(diag) -> Optional[float]:
  gates = np.asarray([[np.nan if v is None else v for v in row] for row in diag['gate']],
                     dtype=np.float64)
  return float(np.nanmean(gates)) if np.isfinite(gates).any() else None


_LAST = ('step_size', 'alignment', 'effective_rank', 'offset_cost')


def summarize(results: list[dict]) -> list[dict]:
  """Per variant (in first-seen order): its fixed facts and mean/std over seeds of the rest."""
  by_name: dict[str, list[dict]] = {}
  for r in results:
    by_name.setdefault(r['name'], []).append(r)
  out = []
  for name, runs in by_name.items():
    first = runs[0]
    row = dict(name=name, kind=first.get('kind', first['loop_mode']),
               R=first.get('R', first['num_loops']), seeds=[r.get('seed') for r in runs],
               params=first['params'], steps=first.get('steps'),
               train_tokens=first['train_tokens'], train_flops=first['train_flops'],
               kv_bytes=first['decode']['kv_bytes'],
               final_val_loss=mean_std(r['final_val_loss'] for r in runs),
               final_val_ppl=mean_std(r['final_val_ppl'] for r in runs),
               exact_match=mean_std(r.get('exact_match') for r in runs),
               decode_ms=mean_std(r['decode']['latency_s'] * 1e3 for r in runs),
               mean_gate=mean_std(_mean_gate(r['diagnostics']) for r in runs))
    for k in _LAST:
      row[k] = mean_std(r['diagnostics'][k][-1] for r in runs)
    row['metrics'] = [r['metrics'] for r in runs]
    row['runs'] = [dict(seed=r.get('seed'), diagnostics=r['diagnostics']) for r in runs]
    out.append(row)
  return out


def _has_accuracy(summary: list[dict]) -> bool:
  return any(s['exact_match']['mean'] is not None for s in summary)


def markdown_table(summary: list[dict]) -> str:
  accuracy = _has_accuracy(summary)
  head = ('| variant | seeds | params | steps | train tokens | train FLOPs | '
          + ('exact match | ' if accuracy else '') + 'val loss | val ppl | '
          'decode ms/token (B=1) | KV bytes | step size (last) | alignment (last) | '
          'eff. rank (last) | offset cost (last) | mean gate |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for s in summary:
    lines.append(
        f"| {s['name']} | {len(s['seeds'])} | {s['params'] / 1e6:.2f}M | {_fmt(s['steps'], 'd')} | "
        f"{s['train_tokens']:,} | {s['train_flops']:.3g} | "
        + (f"{_pm(s['exact_match'], '.3f')} | " if accuracy else '')
        + f"{_pm(s['final_val_loss'], '.4f')} | "
        f"{_pm(s['final_val_ppl'], '.2f')} | {_pm(s['decode_ms'], '.2f')} | {s['kv_bytes']:,} | "
        f"{_pm(s['step_size'], '.3g')} | {_pm(s['alignment'], '.3f')} | "
        f"{_pm(s['effective_rank'], '.1f')} | {_pm(s['offset_cost'], '.3g')} | "
        f"{_pm(s['mean_gate'], '.3f')} |")
  return '\n'.join(lines)


def depth_check(summary: list[dict], heldout: int = 0) -> str:
  """'deepN - r1' exact-match gaps in units of the larger seed std (the calibration reading).

  heldout: the held-out set's size; when given, the gap is also put against the sampling error
  of two accuracies measured on that many instances, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n).
  """
  by = {s['name']: s for s in summary}
  r1 = by.get('r1')
  if r1 is None or r1['exact_match']['mean'] is None:
    return ''
  lines = []
  for s in summary:
    if s['kind'] != 'deep' or s['exact_match']['mean'] is None:
      continue
    p_deep, p_r1 = s['exact_match']['mean'], r1['exact_match']['mean']
    gap = p_deep - p_r1
    stds = [x['exact_match']['std'] for x in (s, r1) if x['exact_match']['std'] is not None]
    line = f"Depth check: {s['name']} - r1 exact match = {gap:+.3f}"
    if stds:
      sigma = max(stds)
      ratio = gap / sigma if sigma > 0 else math.copysign(math.inf, gap) if gap else 0.0
      line += (f", {ratio:.1f} x the larger seed std ({sigma:.3g}); the task needs depth if this "
               'exceeds 3')
    else:
      line += ' (one seed, no std)'
    if heldout:
      se = math.sqrt((p_deep * (1 - p_deep) + p_r1 * (1 - p_r1)) / heldout)
      line += (f'; {gap / se:.1f} x the sampling error of the gap on {heldout} held-out '
               f'instances ({se:.3g})' if se > 0 else '')
    lines.append(line + '.')
  return '\n'.join(lines)


def _mean_curve(paths: list[str], split: str):
  """(steps, mean, std) of the loss at the steps every seed logged; std is 0 for one seed."""
  per_step: dict[int, list[float]] = {}
  for p in paths:
    for x in read_jsonl(p):
      if x.get('split') == split and 'loss' in x:
        per_step.setdefault(int(x['step']), []).append(float(x['loss']))
  steps = sorted(s for s, v in per_step.items() if len(v) == len(paths))
  vals = [np.asarray(per_step[s]) for s in steps]
  mean = np.asarray([v.mean() for v in vals])
  std = np.asarray([v.std(ddof=1) if v.size >= 2 else 0.0 for v in vals])
  return np.asarray(steps), mean, std


def _per_loop(runs_diagnostics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std (ddof=1; 0 for one seed) over seeds of a per-loop diagnostic, [R] each."""
  v = np.asarray([[np.nan if x is None else x for x in d[key]] for d in runs_diagnostics],
                 dtype=np.float64)
  std = v.std(axis=0, ddof=1) if v.shape[0] >= 2 else np.zeros(v.shape[1])
  return v.mean(axis=0), std


def _vs_loops(fig, summary: list[dict], key: str, ylabel: str, n_seeds: int) -> None:
  """One metric against R: PLT as a line, vanilla and deep as separate markers, std bars."""
  ax = fig.subplots()

  def err(s):
    return s[key]['std'] or 0.0

  plt_runs = sorted([s for s in summary if s['kind'] == 'plt' and s[key]['mean'] is not None],
                    key=lambda s: s['R'])
  if plt_runs:
    ax.errorbar([s['R'] for s in plt_runs], [s[key]['mean'] for s in plt_runs],
                yerr=[err(s) for s in plt_runs], marker='o', capsize=3, label='PLT')
  for kind, marker, color in (('vanilla', 's', 'C3'), ('deep', '^', 'C2'),
                              ('plt' + LOOP_LOSS, 'D', 'C4')):
    for s in summary:
      if s['kind'] == kind and s[key]['mean'] is not None:
        ax.errorbar([s['R']], [s[key]['mean']], yerr=[err(s)], marker=marker,
                    color=color, capsize=3, linestyle='none', zorder=3,
                    label=f"{kind} {'x' if kind == 'deep' else 'R'}={s['R']}")
  ax.set_xlabel('loops R (deep: layer multiple)')
  ax.set_ylabel(ylabel + (f'\nmean ± std over {n_seeds} seeds' if n_seeds > 1 else ''))
  ax.set_xticks(sorted({s['R'] for s in summary}))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()


_GAINS = (('step_size', 'refinement step ||h_r - h_(r-1)||'),
          ('lens_kl', 'logit-lens KL(p_r || p_(r-1))'))


def gain_cost_points(summary: list[dict]) -> list[dict]:
  """Per looped variant and loop r >= 2: offset cost and refinement gains, mean/std over seeds."""
  out = []
  for s in summary:
    if s['kind'] == 'deep' or s['R'] < 2:
      continue
    diags = [r['diagnostics'] for r in s['runs']]
    cost, cost_std = _per_loop(diags, 'offset_cost')
    gains = {k: _per_loop(diags, k) for k, _ in _GAINS}
    for r in range(2, s['R'] + 1):
      point = dict(name=s['name'], kind=s['kind'], R=s['R'], loop=r,
                   offset_cost=float(cost[r - 1]), offset_cost_std=float(cost_std[r - 1]))
      for k, (mean, std) in gains.items():
        point[k], point[k + '_std'] = float(mean[r - 1]), float(std[r - 1])
      out.append(point)
  return out


def _gain_cost(fig, points: list[dict], n_seeds: int) -> None:
  """The refinement gain of each loop against its offset cost Omega(r), one panel per gain."""
  axes = fig.subplots(1, len(_GAINS))
  names = list(dict.fromkeys(p['name'] for p in points))
  for ax, (key, label) in zip(axes, _GAINS):
    for i, name in enumerate(names):
      pts = [p for p in points if p['name'] == name]
      ax.errorbar([p['offset_cost'] for p in pts], [p[key] for p in pts],
                  xerr=[p['offset_cost_std'] for p in pts], yerr=[p[key + '_std'] for p in pts],
                  marker='s' if pts[0]['kind'] == 'vanilla' else 'o', color=f'C{i}', capsize=2,
                  label=name)
      for p in pts:
        ax.annotate(f"r={p['loop']}", (p['offset_cost'], p[key]), fontsize=7,
                    textcoords='offset points', xytext=(4, 3))
    ax.set_xlabel('offset cost Ω(r) = mean ||h_(r-1)[i] - h_(r-1)[i-1]||')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle('gain vs cost per loop' + (f' (mean ± std, {n_seeds} seeds)' if n_seeds > 1
                                          else ''), fontsize=10)
  fig.tight_layout()


def plot(summary: list[dict], root: str, points: Optional[list[dict]] = None) -> list[str]:
  """Writes the sweep's figures into root; points: `gain_cost_points(summary)` if computed."""
  # Figures, not pyplot: no global backend switch (a notebook's inline plots keep working).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  paths = []
  n_seeds = max(len(s['seeds']) for s in summary)

  def save(fig, name):
    paths.append(fileio.write_figure(fileio.join(root, name), fig, dpi=120))

  if _has_accuracy(summary):
    fig = Figure(figsize=(5.5, 3.8))
    _vs_loops(fig, summary, 'exact_match', 'held-out exact-match accuracy', n_seeds)
    save(fig, 'accuracy_vs_loops.png')
  fig = Figure(figsize=(5.5, 3.8))
  _vs_loops(fig, summary, 'final_val_loss', 'final validation loss (nats/token)', n_seeds)
  save(fig, 'val_loss_vs_loops.png')

  fig = Figure(figsize=(11, 3.8))
  axes = fig.subplots(1, 2)
  for i, s in enumerate(summary):
    for ax, split, kw in ((axes[0], 'train', dict(lw=0.8)), (axes[1], 'val', dict(marker='o'))):
      steps, mean, std = _mean_curve(s['metrics'], split)
      if steps.size:
        ax.plot(steps, mean, color=f'C{i}', label=s['name'], **kw)
        if len(s['seeds']) > 1:
          ax.fill_between(steps, mean - std, mean + std, color=f'C{i}', alpha=0.2, lw=0)
  for ax, title in zip(axes, ('train loss', 'validation loss')):
    ax.set_title(title + (f' (mean ± std, {n_seeds} seeds)' if n_seeds > 1 else ''))
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  save(fig, 'loss_curves.png')

  points = gain_cost_points(summary) if points is None else points
  if points:
    fig = Figure(figsize=(11, 4.2))
    _gain_cost(fig, points, n_seeds)
    save(fig, 'gain_cost.png')
  return paths


def run_sweep(config: ml_collections.ConfigDict, root: str, *, log=print) -> dict[str, Any]:
  """Trains, evaluates and diagnoses every (variant, seed), resuming; writes the comparison."""
  root = fileio.abspath(root)
  fileio.check_access(root, 'sweep workdir')
  fileio.makedirs(root)
  variants = parse_variants(config.sweep.variants)
  budget = sweep_budget(config)
  seeds = sweep_seeds(config)
  per_seed = bool(config.sweep.get('seeds'))
  t0 = time.time()

  done: dict[tuple[str, int], dict] = {}
  total = len(variants) * len(seeds)

  def run(v, seed, steps):
    if (v[0], seed) not in done:
      log(f'[sweep] run {len(done) + 1}/{total}: {v[0]} seed {seed} '
          f'({(time.time() - t0) / 60:.1f} min so far)')
      done[v[0], seed] = run_variant(config, *v, root, seed=seed, steps=steps, per_seed=per_seed,
                                     log=log)
    return done[v[0], seed]

  ref = reference_variant(variants)
  vocab = None
  if budget == 'flops':
    # The reference trains the configured steps; its run fixes the vocabulary (which may follow
    # the tokenizer) that the other variants' FLOPs are counted with.
    vocab = run(ref, seeds[0], int(config.train.steps))['vocab_size']
  steps = budget_steps(config, variants, vocab)
  results = [run(v, seed, steps[v[0]]) for seed in seeds for v in variants]
  summary = summarize(results)
  table = markdown_table(summary)
  points = gain_cost_points(summary)
  paths = plot(summary, root, points)
  md = fileio.join(root, 'sweep.md')
  md_parts = []
  md_parts.append('# Loop-count sweep\n\n')
  if budget == 'steps':
    md_parts.append(f'Identical data, token budget ({results[0]["train_tokens"]:,} tokens) '
                    'and shared layers; only the loop count / mode / depth differ.\n\n')
  else:
    ref_flops = next(s['train_flops'] for s in summary if s['name'] == ref[0])
    md_parts.append(f'Equal training FLOPs: every variant gets those of {ref[0]} at '
                    f'{int(config.train.steps)} steps ({ref_flops:.3g}), so the step and token '
                    'counts differ; identical data order and shared layers.\n\n')
  md_parts.append(f'Seeds: {", ".join(map(str, seeds))}' + (
      '; cells are mean ± std (ddof=1) over seeds.\n\n' if len(seeds) > 1 else '.\n\n'))
  md_parts.append(table + '\n\n')
  check = depth_check(summary, int(config.data.task_heldout)
                      if config.data.source == 'synthetic' else 0)
  if check:
    md_parts.append(check + '\n\n')
  for p in paths:
    name = fileio.path(p).name
    md_parts.append(f'![{name}]({name})\n')
  fileio.write_text(md, ''.join(md_parts))
  fileio.write_json(fileio.join(root, 'sweep.json'), results)
  fileio.write_json(fileio.join(root, 'sweep_summary.json'), dict(
      budget=budget, reference=ref[0], seeds=list(seeds),
      variants=[{k: v for k, v in s.items() if k != 'runs'} for s in summary],
      gain_cost=points, depth_check=check))
  log(table)
  if check:
    log(check)
  log(f'[sweep] done in {(time.time() - t0) / 60:.1f} min. Wrote {md}, '
      f'{fileio.join(root, "sweep.json")}, ' + ', '.join(paths))
  return {'results': results, 'summary': summary, 'table': table, 'markdown': md,
          'plots': paths}
