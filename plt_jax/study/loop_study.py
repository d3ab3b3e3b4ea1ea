"""The loop study over a finished sweep: test-time loop counts and adaptive exit, over seeds.

For every run of a sweep directory (`experiments.sweep`), `plt_jax.evaluation.loops` scores the
run at each test-time loop count R' and with each adaptive-exit rule (a run's results are kept in
its own eval/ folder, so a rerun only adds what is missing). The runs of one variant differ only
in their seed: their tables are averaged, with the standard deviation over seeds, into

  loop_study.json  per variant: fixed R' (exact match, nats) and every rule (mean loops, quality)
  loop_study.md    the same as tables
  loop_study_fixed.png   quality against R' per variant, error bars over seeds
  loop_study_pareto.png  quality against mean loops used: fixed R' and the confidence rule, per
                         variant (so a variant trained with the per-loop loss sits beside the one
                         without)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from plt_jax import fileio
from plt_jax.evaluation import loops as loops_lib
from plt_jax.study import sweep as sweep_lib

RESULT_JSON, RESULT_MD = 'loop_study.json', 'loop_study.md'


def _runs(root) -> list[dict]:
  """The finished runs of a sweep directory: their sweep results (name, seed, workdir...)."""
  runs = []
  for child in sorted(fileio.path(root).iterdir()):
    result = child / sweep_lib.RESULT_FILE
    if result.is_file():
      r = fileio.read_json(result)
      r['workdir'] = str(child)
      runs.append(r)
  if not runs:
    raise ValueError(f'{root}: no finished sweep runs (no */{sweep_lib.RESULT_FILE})')
  return runs


def _mean_std(values) -> dict:
  x = np.asarray(values, np.float64)
  return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
              n=int(x.size))


def aggregate(tables: Sequence[dict]) -> dict:
  """Tables of one variant's seeds -> mean and std over seeds, per R' and per rule."""
  key = 'exact_match' if 'exact_match' in tables[0]['fixed'][0] else 'nats_per_token'
  fixed = []
  for i, row in enumerate(tables[0]['fixed']):
    rows = [t['fixed'][i] for t in tables]
    fixed.append(dict(loops=row['loops'], **{key: _mean_std([r[key] for r in rows])}))
  if len({len(t['fixed']) for t in tables} | {len(t['adaptive']) for t in tables}) > 2:
    raise ValueError('the seeds of a variant were scored with different loop counts or rules; '
                     'delete their eval/loops-study folders and rerun')
  adaptive = []
  for i, row in enumerate(tables[0]['adaptive']):
    rows = [t['adaptive'][i] for t in tables]
    adaptive.append(dict(rule=row['rule'], kind=row['kind'], threshold=row['threshold'],
                         mean_loops=_mean_std([r['mean_loops'] for r in rows]),
                         **{key: _mean_std([r[key] for r in rows])}))
  return dict(metric=key, trained_loops=tables[0]['trained_loops'],
              loop_mode=tables[0]['loop_mode'], seeds=len(tables), fixed=fixed,
              adaptive=adaptive)


def evaluate_sweep(root, *, loops: Sequence[int] = (1, 2, 3, 4, 6), rules=None,
                   variants: Optional[Sequence[str]] = None, batch_size: int = 64,
                   log=print) -> dict:
  """Scores every run (or those of `variants`) and writes the study's files into `root`."""
  by_variant: dict[str, list[dict]] = {}
  for run in _runs(root):
    if variants and run['name'] not in variants:
      continue
    out = fileio.path(run['workdir']) / 'eval' / 'loops-study'
    if (out / 'loops.json').is_file():
      table = fileio.read_json(out / 'loops.json')
    else:
      log(f'[loop study] {run["name"]} seed {run["seed"]}: R\' = {list(loops)} and exit rules')
      table = loops_lib.evaluate_workdir('synthetic', loops, workdir=run['workdir'], rules=rules,
                                         out_dir=str(out), batch_size=batch_size)
    by_variant.setdefault(run['name'], []).append(table)
  study = {name: aggregate(tables) for name, tables in by_variant.items()}
  fileio.write_json(fileio.path(root) / RESULT_JSON, study, sort_keys=True)
  fileio.write_text(fileio.path(root) / RESULT_MD, format_study(study) + '\n')
  plot_fixed(study, fileio.path(root) / 'loop_study_fixed.png')
  plot_pareto(study, fileio.path(root) / 'loop_study_pareto.png')
  return study


def format_study(study: dict) -> str:
  lines = []
  for name, s in study.items():
    m = s['metric'].replace('_', ' ')
    lines += [f'### {name} (trained R={s["trained_loops"]}, {s["loop_mode"]}, {s["seeds"]} seeds)',
              '', f"| loops | mean loops | {m} |", '|---|---|---|']
    lines += [f"| R'={r['loops']} | {r['loops']:.2f} | {r[s['metric']]['mean']:.4f} "
              f"± {r[s['metric']]['std']:.4f} |" for r in s['fixed']]
    lines += [f"| {r['rule']} | {r['mean_loops']['mean']:.2f} | {r[s['metric']]['mean']:.4f} "
              f"± {r[s['metric']]['std']:.4f} |"
              for r in sorted(s['adaptive'], key=lambda r: r['mean_loops']['mean'])]
    lines.append('')
  return '\n'.join(lines)


def _save(fig, path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fileio.write_figure(path, fig, dpi=120)
  plt.close(fig)


def plot_fixed(study: dict, path) -> None:
  """Quality against the test-time loop count, one line per variant, error bars over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, s in study.items():
    k = s['metric']
    ax.errorbar([r['loops'] for r in s['fixed']], [r[k]['mean'] for r in s['fixed']],
                yerr=[r[k]['std'] for r in s['fixed']], marker='o', capsize=3,
                label=f'{name} (trained R={s["trained_loops"]})')
  ax.set_xlabel("test-time loop count R'")
  ax.set_ylabel(k.replace('_', ' '))
  ax.set_title('quality against loops at test time (mean ± std over seeds)')
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_pareto(study: dict, path, kind: str = 'confidence') -> None:
  """Quality against mean loops used: each variant's fixed R' (up to its trained R) and its
  `kind` exit rule, error bars over seeds on both axes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, (name, s) in enumerate(study.items()):
    if not s['adaptive']:
      continue
    k, color = s['metric'], f'C{i}'
    fixed = [r for r in s['fixed'] if r['loops'] <= s['trained_loops']]
    ax.errorbar([r['loops'] for r in fixed], [r[k]['mean'] for r in fixed],
                yerr=[r[k]['std'] for r in fixed], fmt='o-', color=color, capsize=3,
                label=f"{name}: fixed R'")
    pts = sorted((r for r in s['adaptive'] if r['kind'] == kind),
                 key=lambda r: r['mean_loops']['mean'])
    ax.errorbar([r['mean_loops']['mean'] for r in pts], [r[k]['mean'] for r in pts],
                xerr=[r['mean_loops']['std'] for r in pts], yerr=[r[k]['std'] for r in pts],
                fmt='s--', color=color, capsize=2, alpha=0.8, label=f'{name}: exit {kind}')
  ax.set_xlabel('mean loops used per token')
  ax.set_ylabel(k.replace('_', ' ') if study else '')
  ax.set_title('adaptive exit against fixed loop counts (mean ± std over seeds)')
  ax.legend(fontsize=7)
  _save(fig, path)
