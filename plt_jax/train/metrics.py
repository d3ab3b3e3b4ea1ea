"""Run outputs: metrics.jsonl, TensorBoard event files, the loss-curve PNG, the progress bar; and
the two measures every part of the project reports the same way: next-token NLL, bits per byte.

The work dir may be local or a URL (gs://...). Only process 0 writes (`enabled=False`
elsewhere). Non-finite values are written as null (`fileio.json_safe`). On resume, records past
the restored step (written after the last checkpoint by a run that then died) are dropped, so the
files describe the one training trajectory that the checkpoints hold.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, Optional, Union

import jax.numpy as jnp
import optax
import tqdm

from plt_jax import fileio

JSONL = 'metrics.jsonl'
TB_DIR = 'tensorboard'
PNG = 'loss_curve.png'


def next_token_nll(logits, targets, weights=None):
  """Next-token negative log-likelihood (nats) per token, float32: logits [..., V], integer
  targets [...]; multiplied by `weights` (e.g. the loss mask) when given.

  The one definition shared by the training loss, held-out perplexity and the logit lens.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll if weights is None else nll * weights


def bits_per_byte(nats: float, num_bytes: float) -> float:
  """Summed NLL in nats over the UTF-8 bytes the scored tokens spell; NaN without bytes."""
  return nats / math.log(2) / num_bytes if num_bytes else float('nan')


def _scalar(v: Any) -> Any:
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def _parse_jsonl(text: str) -> list[dict]:
  out = []
  for line in text.splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # a torn last line from a killed run
      continue
  return out


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl (local or a URL); [] when it does not exist."""
  if not fileio.exists(path):
    return []
  return _parse_jsonl(fileio.read_text(path))


def _record_line(record: dict) -> str:
  return json.dumps(fileio.json_safe(record))


class MetricsWriter:
  """Appends {'step', 'split', 'time', ...} records to JSONL and TensorBoard.

  A local work dir gets the files directly (the JSONL appended line by line). In object storage,
  which has neither append nor rename, the JSONL is kept in memory and uploaded whole, and
  tensorboardX writes its event file to local scratch whose new bytes are uploaded as the next
  chunk file (`<event file>.000001`, ...; TensorBoard reads the chunks of a directory in name
  order, as one stream). Both happen on `flush()` (training calls it at every checkpoint), at
  `close()`, and otherwise at most every `sync_every_s` seconds.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True,
               sync_every_s: float = 30.0):
    self.enabled = enabled
    self.remote = fileio.is_remote(workdir)
    self.jsonl_path = fileio.join(workdir, JSONL)
    self.tb_dir = fileio.join(workdir, TB_DIR)
    self.png_path = fileio.join(workdir, PNG)
    self.sync_every_s = sync_every_s
    self._tb = None
    self._f = None
    self._lines: list[str] = []
    self._scratch: Optional[str] = None
    self._uploaded: dict[str, list[int]] = {}  # local event file -> [bytes uploaded, chunks]
    self._last_sync = time.monotonic()
    if not enabled:
      return
    records = read_jsonl(self.jsonl_path)
    keep = [r for r in records if r.get('step', 0) <= resume_step] if resume_step else []
    if self.remote:
      self._lines = [_record_line(r) for r in keep]
      if keep != records:
        self._upload_jsonl()
      self._scratch = tempfile.mkdtemp(prefix='plt_jax_tensorboard_')
      tb_local = self._scratch
    else:
      fileio.makedirs(workdir)
      if keep != records:
        fileio.write_text(self.jsonl_path, ''.join(_record_line(r) + '\n' for r in keep))
      self._f = open(self.jsonl_path, 'a')  # pylint: disable=consider-using-with
      tb_local = self.tb_dir
    from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
    # purge_step hides TensorBoard events from a run that died after its last checkpoint.
    self._tb = SummaryWriter(tb_local, purge_step=resume_step + 1 if resume_step else 0)

  def write(self, step: int, metrics: dict, split: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    line = _record_line(record)
    if self.remote:
      self._lines.append(line)
    else:
      self._f.write(line + '\n')
      self._f.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        self._tb.add_scalar(f'{split}/{k}', float(v), step)
    if self.remote and time.monotonic() - self._last_sync > self.sync_every_s:
      self.flush()

  def records(self) -> list[dict]:
    """Every record of this run so far (those written but not yet uploaded included)."""
    if self.remote and self.enabled:
      return _parse_jsonl('\n'.join(self._lines))
    if self._f is not None:
      self._f.flush()
    return read_jsonl(self.jsonl_path)

  def flush(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    if self.remote:
      self._upload_jsonl()
      self._upload_events()
      self._last_sync = time.monotonic()
    else:
      self._f.flush()

  def _upload_jsonl(self) -> None:
    fileio.write_text(self.jsonl_path, ''.join(line + '\n' for line in self._lines))

  def _upload_events(self) -> None:
    for name in sorted(os.listdir(self._scratch)):
      done = self._uploaded.setdefault(name, [0, 0])
      with open(os.path.join(self._scratch, name), 'rb') as f:
        f.seek(done[0])
        new = f.read()
      # Whole records only: tensorboardX's writer thread may be halfway through one.
      new = new[:_complete_records(new)]
      if new:
        fileio.write_bytes(fileio.join(self.tb_dir, f'{name}.{done[1]:06d}'), new)
        done[0] += len(new)
        done[1] += 1

  def close(self) -> None:
    if self.enabled:
      try:
        self._tb.close()
        if self.remote:
          self._upload_jsonl()
          self._upload_events()
        else:
          self._f.close()
      finally:
        self.enabled = False
        if self._scratch:
          shutil.rmtree(self._scratch, ignore_errors=True)


def _complete_records(data: bytes) -> int:
  """Length of the longest prefix of `data` made of whole TFRecords (u64 length, u32 CRC,
  payload, u32 CRC)."""
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack('<Q', data[pos:pos + 8])
    if pos + 16 + n > len(data):
      break
    pos += 16 + n
  return pos


def plot_loss_curve(records: Union[str, list[dict]], png_path: str,
                    title: str = '') -> Optional[str]:
  """Train loss (raw and smoothed) and validation loss against step; returns the PNG path.

  records: the metrics records, or the path of a metrics.jsonl holding them.
  """
  if isinstance(records, str):
    records = read_jsonl(records)
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
  return fileio.write_figure(png_path, fig)


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
