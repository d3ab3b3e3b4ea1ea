"""The training loop: steps, stop signals, throughput, checkpoints, reports and evaluation."""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops as flops_lib
from plt_jax.train import metrics as metrics_lib
from plt_jax.train.step import Batch, NonFiniteLossError, device_batch, evaluate

# ------------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class _Pending:
  step: int
  metrics: dict


class _StopSignal:
  """SIGTERM/SIGINT set a flag the loop checks after each step (a second SIGINT aborts)."""

  def __init__(self):
    self.received: Optional[str] = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _stop_requested(signals: _StopSignal, step: int, every: int = 10) -> bool:
  """Single process: the local flag. Several: all processes agree (every `every` steps), so
  they stop, and save, at the same step."""
  if jax.process_count() == 1:
    return signals.received is not None
  if step % every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(signals.received is not None))
  return bool(np.any(flags))


@dataclasses.dataclass
class Throughput:
  """Tokens/s and FLOP/s of training steps alone: after `pause()` (evaluation, a checkpoint)
  the next step starts the clock again instead of being timed."""
  tokens_per_step: int
  flops_per_token: float
  num_devices: int
  peak_flops: float
  t_prev: Optional[float] = None
  steps: int = 0
  seconds: float = 0.0
  ema: Optional[float] = None

  def tick(self, now: float) -> Optional[float]:
    """Tokens/s since the previous tick; None for the first tick after a pause."""
    tps = None
    if self.t_prev is not None:
      dt = now - self.t_prev
      self.steps += 1
      self.seconds += dt
      tps = self.tokens_per_step / max(dt, 1e-9)
      self.ema = tps if self.ema is None else 0.9 * self.ema + 0.1 * tps
    self.t_prev = now
    return tps

  def pause(self) -> None:
    self.t_prev = None

  def rates(self, tps: float) -> dict:
    return flops_lib.throughput(tps, self.flops_per_token, self.num_devices, self.peak_flops)

  @property
  def steady(self) -> Optional[float]:
    """Tokens/s over all timed steps."""
    return self.steps * self.tokens_per_step / self.seconds if self.seconds > 0 else None


@dataclasses.dataclass
class Checkpoints:
  """The checkpoint policy: every `every` steps and at the last step, at most once per step.
  `last_saved` is the step a stopped run resumes from (the restored one before any save)."""
  ckpt: ckpt_lib.Checkpointer
  every: int
  end_step: int
  last_saved: Optional[int]
  data_iter: Any
  config: ml_collections.ConfigDict

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.end_step

  def save(self, step: int, state: nnx.State) -> None:
    if self.last_saved == step:
      return
    self.ckpt.save(step, state['model'], state['optimizer'], self.data_iter.get_state(),
                   {'config': self.config.to_dict()})
    self.last_saved = step

  def describe_last(self) -> str:
    if self.last_saved is None:
      return (f'no checkpoint was saved yet in {self.ckpt.directory}, so running again starts '
              'from step 0')
    return (f'the last good checkpoint is step {self.last_saved} in {self.ckpt.directory} '
            '(nothing after it was saved)')


@dataclasses.dataclass
class StepReporter:
  """Each step's metrics, read on the host one step late (the next step already runs): stops
  on a non-finite loss, adds throughput, writes the metrics files and the progress bar."""
  writer: metrics_lib.MetricsWriter
  progress: metrics_lib.Progress
  throughput: Throughput
  checkpoints: Checkpoints
  pending: Optional[_Pending] = None
  last: dict = dataclasses.field(default_factory=dict)  # the last train metrics, with their step

  def push(self, step: int, metrics: dict) -> None:
    """Reports the step held so far and holds `step`'s (still on the device) instead."""
    self.drain()
    self.pending = _Pending(step, metrics)

  def drain(self) -> None:
    if self.pending is None:
      return
    p, self.pending = self.pending, None
    m = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    now = time.time()
    if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
      raise NonFiniteLossError(
          f'non-finite training loss at step {p.step}: loss={m["loss"]}, '
          f'grad_norm={m["grad_norm"]}, lr={m["lr"]:.3g}. Training stopped; '
          f'{self.checkpoints.describe_last()}. '
          'Lower optimizer.peak_lr, keep optimizer.clip_norm > 0, or check the data.')
    tps = self.throughput.tick(now)
    if tps is not None:
      m['tokens_per_s'] = tps
      thr = self.throughput.rates(tps)
      m['tflops_per_device'] = thr['tflops_per_device']
      if thr['mfu'] is not None:
        m['mfu'] = thr['mfu']
    self.writer.write(p.step, m, split='train')
    self.last.update(m, step=p.step)
    ema = self.throughput.ema
    self.progress.update(p.step, loss=m['loss'], lr=m['lr'],
                         **({'tok/s': f'{ema:,.0f}'} if ema else {}))


@dataclasses.dataclass
class Evaluator:
  """Validation loss on the fixed val batches, written to the metrics files and the loss curve;
  also bits per byte when the batches hold exactly the tokens whose bytes the data counted."""
  eval_step: Callable
  val_batches: list[Batch]
  stats: dict
  every: int
  end_step: int
  writer: metrics_lib.MetricsWriter
  title: str
  is_main: bool

  def due(self, step: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == self.end_step)

  def __call__(self, state: nnx.State, step: int) -> dict:
    t0 = time.time()
    ev = evaluate(self.eval_step, state, self.val_batches)
    st = self.stats
    if st.get('val_eval_bytes') and abs(ev['tokens'] - st['val_eval_tokens']) < 0.5:
      ev['bits_per_byte'] = metrics_lib.bits_per_byte(ev['nats'], st['val_eval_bytes'])
    ev['seconds'] = time.time() - t0
    self.writer.write(step, {k: v for k, v in ev.items() if k != 'nats'}, split='val')
    if self.is_main:
      metrics_lib.plot_loss_curve(self.writer.records(), self.writer.png_path, self.title)
    return ev


def run_steps(state: nnx.State, step: int, *, end_step: int, train_step, train_iter,
                 batch_sharding, reporter: StepReporter, evaluator: Evaluator,
                 checkpoints: Checkpoints):
  """Trains from `step` to `end_step`, or until SIGTERM/SIGINT (then saves a checkpoint).

  Returns (state, step, what stopped it or None, the last evaluation or None).
  """
  stop, last_val = None, None
  with _StopSignal() as signals:
    while step < end_step:
      host_batch = next(train_iter)
      state, metrics = train_step(state, device_batch(host_batch, batch_sharding))
      step += 1
      reporter.push(step, metrics)  # step - 1's metrics, read while step runs
      if _stop_requested(signals, step):
        stop = signals.received or 'signal on another process'
        break
      if evaluator.due(step):
        reporter.drain()
        reporter.throughput.pause()  # evaluation time is not training throughput
        last_val = evaluator(state, step)
        reporter.progress.write(
            f'step {step}: val loss {last_val["loss"]:.4f} (ppl {last_val["perplexity"]:.2f}), '
            f'train loss {reporter.last.get("loss", float("nan")):.4f}')
      if checkpoints.due(step):
        reporter.drain()  # only checkpoints whose every step had a finite loss
        checkpoints.save(step, state)
        reporter.writer.flush()  # the metrics files hold every step a checkpoint holds
        reporter.throughput.pause()
    reporter.drain()
    if stop:
      checkpoints.save(step, state)
      reporter.writer.flush()
  return state, step, stop, last_val
