"""Run outputs: metrics.jsonl, TensorBoard event files, the loss-curve PNG, the progress bar; and
the two measures every part of the project reports the same way: next-token NLL, bits per byte.

Only process 0 writes (`enabled=False` elsewhere). On resume, records past the restored step
(written after the last checkpoint by a run that then died) are dropped, so the files describe
the one training trajectory that the checkpoints hold.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

import tqdm

JSONL = 'metrics.jsonl'
TB_DIR = 'tensorboard'
PNG = 'loss_curve.png'


def next_token_nll(logits, targets, weights=None):
  """Next-token negative log-likelihood (nats) per token, float32: logits [..., V], integer
  targets [...]; multiplied by `weights` (e.g. the loss mask) when given.

  The one definition shared by the training loss, held-out perplexity and the logit lens.
  """
  # Imported here, so that reading run outputs (sweep reports, perplexity scoring) needs no JAX.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll if weights is None else nll * weights


def bits_per_byte(nats: float, num_bytes: float) -> float:
  """Summed NLL in nats over the UTF-8 bytes the scored tokens spell; NaN without bytes."""
  return nats / math.log(2) / num_bytes if num_bytes else float('nan')


def _scalar(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else repr(f)  # JSON has no NaN/Inf


def read_jsonl(path: str) -> list[dict]:
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a torn last line from a killed run
        continue
  return out


class MetricsWriter:
  """Appends {'step', 'split', 'time', ...} records to JSONL and TensorBoard."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, JSONL)
    self.tb_dir = os.path.join(workdir, TB_DIR)
    self.png_path = os.path.join(workdir, PNG)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    records = read_jsonl(self.jsonl_path)
    keep = [r for r in records if r.get('step', 0) <= resume_step] if resume_step else []
    if keep != records:
      tmp = self.jsonl_path + '.tmp'
      with open(tmp, 'w') as f:
        for r in keep:
          f.write(json.dumps(r) + '\n')
      os.replace(tmp, self.jsonl_path)
    from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
    # purge_step hides TensorBoard events from a run that died after its last checkpoint.
    self._tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step else 0)
    self._f = open(self.jsonl_path, 'a')

  def write(self, step: int, metrics: dict, split: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        self._tb.add_scalar(f'{split}/{k}', float(v), step)

  def flush(self) -> None:
    if self.enabled:
      self._f.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      self._tb.close()
      self.enabled = False


def plot_loss_curve(jsonl_path: str, png_path: str, title: str = '') -> Optional[str]:
  """Train loss (raw and smoothed) and validation loss against step; returns the PNG path."""
  records = read_jsonl(jsonl_path)
  # The last record of a step wins (a resumed run rewrites the steps after its checkpoint).
  train, val = {}, {}
  for r in records:
    target = train if r.get('split') == 'train' else val if r.get('split') == 'val' else None
    if target is not None and isinstance(r.get('loss'), (int, float)):
      target[r['step']] = r['loss']
  if not train and not val:
    return None
  # A Figure, not pyplot: no global backend switch (a notebook's inline plots keep working).
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.2), dpi=110)
  ax = fig.subplots()
  if train:
    steps = sorted(train)
    loss = [train[s] for s in steps]
    ax.plot(steps, loss, color='tab:blue', alpha=0.25, lw=0.8)
    ema, smooth = 0.0, []
    for i, x in enumerate(loss, start=1):
      ema = 0.9 * ema + 0.1 * x
      smooth.append(ema / (1 - 0.9 ** i))  # bias-corrected, so the start does not lag
    ax.plot(steps, smooth, color='tab:blue', lw=1.6, label='train (EMA 0.9)')
  if val:
    steps = sorted(val)
    ax.plot(steps, [val[s] for s in steps], 'o-', color='tab:orange', lw=1.6, ms=3.5,
            label='validation')
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats / token)')
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  tmp = png_path + '.tmp.png'
  fig.savefig(tmp)
  os.replace(tmp, png_path)
  return png_path


class Progress:
  """tqdm bar: step/total, loss, tokens/s and ETA (tqdm's rate of recent steps)."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.enabled = enabled
    self.bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                         unit='step', dynamic_ncols=True, mininterval=1.0, smoothing=0.1,
                         desc='train')

  def update(self, step: int, **postfix) -> None:
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix({k: (f'{v:.4g}' if isinstance(v, float) else v)
                          for k, v in postfix.items()}, refresh=False)

  def write(self, line: str) -> None:
    if self.enabled:
      self.bar.write(line, file=sys.stderr)

  def close(self) -> None:
    self.bar.close()
