"""How many loops a trained model needs: fixed test-time loop counts and adaptive exit, offline.

One forward pass at the largest loop count asked for gives every loop's readout
(`Head(Norm_f(h_r))`). Loop r of an R'-loop run does not depend on later loops, so the readout
of loop r *is* the model run at R' = r: every fixed loop count comes from that one pass
(counts above the trained R run the shared weights further, `model.with_num_loops`).

Adaptive exit (`plt_jax.loop_exit`) picks, per token, the first loop whose readout passes a rule,
within the trained R. Offline, every loop still runs in full; only the readout changes. Each rule
and threshold gives one point: quality against the mean loops used, beside the fixed counts.

Quality is exact match for a synthetic task (teacher forced: an instance counts when every answer
token and the closing EOS is the top prediction given the right prefix, which is what greedy
decoding produces) and next-token loss (nats, and bits per byte where bytes are known) for text.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plt_jax import data as data_lib
from plt_jax import fileio
from plt_jax import loop_exit
from plt_jax.evaluation import perplexity
from plt_jax.infer import loading
from plt_jax.model import with_num_loops
from plt_jax.runtime import Runtime
from plt_jax.train import checkpoint as ckpt_lib

CONFIDENCE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
KL_THRESHOLDS = (1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4)


def default_rules() -> list[loop_exit.ExitRule]:
  return ([loop_exit.ExitRule('confidence', t) for t in CONFIDENCE_THRESHOLDS]
          + [loop_exit.ExitRule('kl', t) for t in KL_THRESHOLDS])


@dataclasses.dataclass
class LoopStats:
  """Per loop r (axis 0) and scored token (axis 1), on the host."""
  nll: np.ndarray        # [R, N] -log p_r(target)
  correct: np.ndarray    # [R, N] bool: argmax p_r == target
  top_logp: np.ndarray   # [R, N] max log p_r
  kl_prev: np.ndarray    # [R, N] KL(p_r || p_{r-1}), 0 at r = 1
  group: np.ndarray      # [N] which instance (synthetic) or row (text) a token belongs to
  nbytes: np.ndarray     # [N] UTF-8 bytes of each target (0 where unknown)


def make_stats_fn(model, num_loops: int, *, sharding=None):
  """batch -> per-loop statistics [R', B, S] of every position, R' = num_loops (one jit)."""
  model = with_num_loops(model, num_loops)
  graphdef, state = nnx.split(model)
  rt = Runtime.for_model(model.cfg, sharding=sharding)

  @jax.jit
  def stats(state, inputs, targets, positions, segment_ids):
    m = nnx.merge(graphdef, state)
    _, loops = m(inputs, positions, segment_ids, runtime=rt, return_loops=True)
    logp = loop_exit.loop_log_probs(m, loops, rt)                     # [R', B, S, V]
    nll = -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logp, axis=-1) == targets[None]
    top, kl = loop_exit.readout_stats(logp)
    return nll, correct, top, kl

  def fn(batch: dict):
    keys = ('inputs', 'targets', 'positions', 'segment_ids')
    return [np.asarray(x) for x in stats(state, *(jnp.asarray(batch[k]) for k in keys))]

  return fn


def collect(stats_fn, batches: Iterable[dict], token_bytes: Optional[np.ndarray] = None,
            group_by_row: bool = True) -> LoopStats:
  """Runs `stats_fn` over batches and keeps the loss-masked positions. Each row is one group
  (one instance, for synthetic tasks packed one instance per row)."""
  parts: list[list[np.ndarray]] = [[] for _ in range(6)]
  row0 = 0
  for batch in batches:
    nll, correct, top, kl = stats_fn(batch)
    mask = np.asarray(batch['loss_mask']) > 0
    rows = np.broadcast_to(np.arange(mask.shape[0])[:, None] + row0, mask.shape)
    row0 += mask.shape[0]
    targets = np.asarray(batch['targets'])
    nb = (np.asarray(token_bytes, np.int64)[targets] if token_bytes is not None
          else np.zeros_like(targets))
    for i, x in enumerate((nll, correct, top, kl)):
      parts[i].append(x[:, mask])
    parts[4].append(rows[mask])
    parts[5].append(nb[mask])
  if not parts[0]:
    raise ValueError('no batches to evaluate')
  cat = [np.concatenate(p, axis=-1) for p in parts]
  return LoopStats(*cat)


def _quality(s: LoopStats, pick: np.ndarray, task: bool) -> dict[str, float]:
  """Quality when token n reads loop pick[n]."""
  n = np.arange(pick.shape[0])
  nll = s.nll[pick, n].astype(np.float64)
  out = dict(nats_per_token=float(nll.mean()), token_accuracy=float(s.correct[pick, n].mean()))
  if s.nbytes.sum() > 0:
    out['bits_per_byte'] = float(nll.sum() / np.log(2) / s.nbytes.sum())
  if task:
    ok = np.ones(int(s.group.max()) + 1, bool)
    np.logical_and.at(ok, s.group, s.correct[pick, n])
    present = np.zeros_like(ok)
    present[s.group] = True
    out['exact_match'] = float(ok[present].mean())
  return out


def loop_table(s: LoopStats, *, trained_loops: int, loops: Sequence[int],
               rules: Sequence[loop_exit.ExitRule] = (), task: bool = False) -> dict[str, Any]:
  """{'fixed': [per R'], 'adaptive': [per rule]} from statistics over max(loops, R) loops."""
  num_tokens = s.nll.shape[1]
  fixed = []
  for r in loops:
    if not 1 <= r <= s.nll.shape[0]:
      raise ValueError(f'loop count {r} outside the {s.nll.shape[0]} loops evaluated')
    fixed.append(dict(loops=int(r), mean_loops=float(r),
                      **_quality(s, np.full(num_tokens, r - 1), task)))
  adaptive = []
  top, kl = s.top_logp[:trained_loops], s.kl_prev[:trained_loops]
  for rule in rules:
    pick = loop_exit.exit_from_stats(top, kl, rule)
    adaptive.append(dict(rule=str(rule), kind=rule.kind, threshold=rule.threshold,
                         mean_loops=float(pick.mean() + 1),
                         exited_early=float((pick < trained_loops - 1).mean()),
                         **_quality(s, pick, task)))
  return dict(trained_loops=int(trained_loops), tokens=int(num_tokens),
              groups=int(np.unique(s.group).size), fixed=fixed, adaptive=adaptive)


def task_rows(instances, seq_len: Optional[int] = None, eos_id: int = 2) -> list[dict]:
  """One row per (prompt, answer) instance, teacher forced: the loss mask covers the answer
  tokens and the closing EOS, so a row is right iff greedy decoding would give answer + EOS."""
  seqs = [np.concatenate([np.asarray(p), np.asarray(a), [eos_id]]).astype(np.int32)
          for p, a in instances]
  width = int(seq_len or max(len(x) for x in seqs) - 1)
  rows = []
  for (p, _), x in zip(instances, seqs):
    n = len(x) - 1
    if n > width:
      raise ValueError(f'an instance of {n + 1} tokens does not fit rows of {width}')
    inputs = np.zeros(width, np.int32)
    targets = np.zeros(width, np.int32)
    mask = np.zeros(width, np.float32)
    inputs[:n], targets[:n] = x[:-1], x[1:]
    mask[len(p) - 1:n] = 1.0
    seg = np.zeros(width, np.int32)
    seg[:n] = 1
    pos = np.where(seg > 0, np.arange(width), 0).astype(np.int32)
    rows.append(dict(inputs=inputs, targets=targets, loss_mask=mask, segment_ids=seg,
                     positions=pos))
  return rows


def batches_of(rows: Sequence[dict], batch_size: int) -> list[dict]:
  """Stacks rows into batches; the last one is padded with empty rows (mask 0)."""
  out = []
  for i in range(0, len(rows), batch_size):
    chunk = list(rows[i:i + batch_size])
    chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
    out.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
  return out


def format_table(t: dict) -> str:
  """Markdown: fixed loop counts, then the adaptive rules, by mean loops."""
  task = 'exact_match' in (t['fixed'] or t['adaptive'] or [{}])[0]
  cols = ['exact_match'] if task else []
  cols += ['nats_per_token', 'token_accuracy']
  if t['fixed'] and 'bits_per_byte' in t['fixed'][0]:
    cols.append('bits_per_byte')
  head = '| loops | mean loops | ' + ' | '.join(c.replace('_', ' ') for c in cols) + ' |'
  lines = [head, '|' + '---|' * (len(cols) + 2)]
  for row in t['fixed']:
    lines.append(f'| R\'={row["loops"]} | {row["mean_loops"]:.2f} | '
                 + ' | '.join(f'{row[c]:.4f}' for c in cols) + ' |')
  for row in sorted(t['adaptive'], key=lambda r: r['mean_loops']):
    lines.append(f'| {row["rule"]} | {row["mean_loops"]:.2f} | '
                 + ' | '.join(f'{row[c]:.4f}' for c in cols) + ' |')
  return '\n'.join(lines)


def plot_pareto(t: dict, png_path: str, title: str = '') -> str:
  """Quality against mean loops used: the fixed counts as a line, each rule as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  key = 'exact_match' if 'exact_match' in t['fixed'][0] else 'nats_per_token'
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [r['mean_loops'] for r in t['fixed']]
  ax.plot(xs, [r[key] for r in t['fixed']], 'o-', color='k', label="fixed R'")
  for kind, marker in (('confidence', 's--'), ('kl', '^--')):
    pts = sorted((r['mean_loops'], r[key]) for r in t['adaptive'] if r['kind'] == kind)
    if pts:
      ax.plot(*zip(*pts), marker, label=f'exit: {kind}')
  ax.axvline(t['trained_loops'], color='0.8', lw=1, zorder=0)
  ax.set_xlabel('mean loops used per token')
  ax.set_ylabel(key.replace('_', ' '))
  ax.set_title(title or 'quality against loops')
  ax.legend()
  fig.tight_layout()
  fileio.write_figure(png_path, fig, dpi=120)
  plt.close(fig)
  return str(png_path)


def parse_loops(spec) -> list[int]:
  """'1,2,3,4,6' (or a sequence) -> sorted distinct loop counts >= 1."""
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  try:
    loops = sorted({int(x) for x in items if str(x).strip()})
  except ValueError:
    raise ValueError(f'--loops={spec!r}: expected comma-separated loop counts, e.g. 1,2,3,4') \
        from None
  if not loops or loops[0] < 1:
    raise ValueError(f'--loops={spec!r}: loop counts are integers >= 1')
  return loops


def _suite_batches(suite: str, loaded, workdir, *, batch_size: int, limit: int):
  """(batches, token_bytes or None, whether it is a task) for the `suite` of a loaded run."""
  config = loaded.config
  if config is None:
    if not workdir:
      raise ValueError(f'--loops with --suite={suite} needs --workdir (a training run)')
    config = ckpt_lib.load_config(fileio.abspath(workdir))
  if suite == 'synthetic':
    if config.data.source != 'synthetic':
      raise ValueError(f'data.source={config.data.source!r}: --suite=synthetic needs a run '
                       "trained with data.source='synthetic'")
    held = data_lib.heldout_set(config.data)
    if limit:
      held = held[:int(limit)]
    rows = task_rows(held, eos_id=loaded.tokenizer.eos_id)
    return batches_of(rows, batch_size or 64), None, True
  if suite == 'perplexity':
    batches, tok, _ = perplexity.workdir_validation(
        fileio.abspath(workdir or loaded.info['path']), config,
        batch_size=batch_size or None)
    if tok.sha256 != loaded.tokenizer.sha256:
      raise ValueError('the model\'s tokenizer differs from the one of the run\'s data')
    return batches, tok.token_bytes, False
  raise ValueError(f'--loops evaluates --suite=synthetic or perplexity, not {suite!r}')


def evaluate_workdir(suite: str, loops, *, workdir: Optional[str] = None,
                     hf_dir: Optional[str] = None, step: Optional[int] = None,
                     rules: Optional[Sequence] = None, out_dir: Optional[str] = None,
                     batch_size: int = 0, limit: int = 0, dtype: Optional[str] = None) -> dict:
  """Fixed loop counts and adaptive-exit rules of a run on a suite, written to
  <run>/eval/loops-<suite>-<step>/ (loops.json, loops.md, pareto.png). Returns the table, with
  `out_dir` and `table_md` added."""
  source, path = ('hf', hf_dir) if hf_dir else ('workdir', workdir)
  if not path:
    raise ValueError('give --workdir (a training run) or --hf_dir')
  loops = parse_loops(loops)
  rules = [r if isinstance(r, loop_exit.ExitRule) else loop_exit.ExitRule.parse(r)
           for r in (default_rules() if rules is None else rules)]
  loaded = loading.load_model(path, source=source, step=step, dtype=dtype)
  model, info = loaded.model, loaded.info
  cfg = model.cfg
  if cfg.loop_mode == 'vanilla' or cfg.num_loops == 1:
    rules = []   # sequential loops, or a single one: the fixed counts are the comparison
  batches, token_bytes, task = _suite_batches(suite, loaded, workdir, batch_size=batch_size,
                                              limit=limit)
  skipped = []
  if cfg.num_loops == 1 and cfg.replace(num_loops=2).plt_uses_gswa:
    # A one-loop PLT has no G-SWA gates to run more loops with: it is scored at R' = 1 only.
    skipped = [r for r in loops if r > 1]
    loops = [r for r in loops if r == 1]
  stats_fn = make_stats_fn(model, max(max(loops), cfg.num_loops))
  table = loop_table(collect(stats_fn, batches, token_bytes), trained_loops=cfg.num_loops,
                     loops=loops, rules=rules, task=task)
  table.update(suite=suite, model=info, loop_mode=cfg.loop_mode, skipped_loops=skipped)
  tag = f'step{info["step"]}' if info.get('step') is not None else 'hf'
  out = fileio.path(out_dir) if out_dir else (
      fileio.path(info['path'] if source == 'workdir' else fileio.abspath(workdir or hf_dir))
      / 'eval' / f'loops-{suite}-{tag}')
  md = format_table(table)
  fileio.write_json(out / 'loops.json', table, sort_keys=True)
  fileio.write_text(out / 'loops.md', md + '\n')
  plot_pareto(table, os.fspath(out / 'pareto.png'),
              title=f'{suite}: R={cfg.num_loops} {cfg.loop_mode}, {tag}')
  table.update(out_dir=os.fspath(out), table_md=md)
  return table
