"""The training loop: steps, stop signals, throughput, checkpoints, reports and evaluation."""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from flax import nnx

from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops as flops_lib
from plt_jax.train import metrics as metrics_lib
from plt_jax.train.step import Batch, NonFiniteLossError, device_batch, evaluate

# ------------------------------------------------------------------------------- the loop
#
# `train_steps` yields each step's `StepInfo`; `run_hooks` runs, after each step, the hooks that
# are due (reporting, stop signals, evaluation, checkpoints), each with its own cadence.

@dataclasses.dataclass(frozen=True)
class StepInfo:
  """One training step's outcome: its number (the steps done so far), the new state and its
  metrics, still on the device (reading them would wait for the step)."""
  step: int
  state: nnx.State
  metrics: dict


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(info)` after every `every`-th step (never for `every` 0) and after step `last`. A hook
  returns None to go on, or a reason (a string) to stop the loop at once."""
  fn: Callable[[StepInfo], Optional[str]]
  every: int = 1
  last: Optional[int] = None

  def due(self, step: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == self.last)


def train_steps(state: nnx.State, step: int, *, end_step: int, train_step, train_iter,
                batch_sharding) -> Iterator[StepInfo]:
  """Runs the steps after `step` up to `end_step`, yielding each one's info. A batch is drawn
  only when its step runs, so a loop stopped after step s has consumed exactly s batches."""
  while step < end_step:
    state, metrics = train_step(state, device_batch(next(train_iter), batch_sharding))
    step += 1
    yield StepInfo(step, state, metrics)


def run_hooks(steps: Iterable[StepInfo], hooks: Sequence[Hook]):
  """Runs the due hooks, in order, after each step, until one gives a reason to stop.

  Returns (the last step's info, None without steps; the reason, None when the steps ran out).
  """
  info = None
  for info in steps:
    for hook in hooks:
      if hook.due(info.step):
        reason = hook.fn(info)
        if reason:
          return info, reason
  return info, None


class StopSignal:
  """SIGTERM/SIGINT set a flag the loop checks after each step (a second SIGINT aborts). With
  several processes all of them agree on it every `MULTI_PROCESS_EVERY` steps, so that they stop,
  and save, at the same step."""
  MULTI_PROCESS_EVERY = 10

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

  @property
  def every(self) -> int:
    return 1 if jax.process_count() == 1 else self.MULTI_PROCESS_EVERY

  def on_step(self, info: StepInfo) -> Optional[str]:
    """The hook: why to stop (the signal's name), or None."""
    del info
    if jax.process_count() == 1:
      return self.received
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return (self.received or 'signal on another process') if np.any(flags) else None


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
  """Saves the state with the data iterator's position and the config, at most once per step.
  `last_saved` is the step a stopped run resumes from (the restored one before any save)."""
  ckpt: ckpt_lib.Checkpointer
  last_saved: Optional[int]
  data_iter: Any
  config: ml_collections.ConfigDict

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
class _Pending:
  step: int
  metrics: dict


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

  def on_step(self, info: StepInfo) -> None:
    """The hook: reports the previous step, read while this one runs."""
    self.push(info.step, info.metrics)

  def settle(self) -> None:
    """Reports the step held and restarts the throughput clock: before work that is not
    training (evaluation, a checkpoint), which the next step's time must not include."""
    self.drain()
    self.throughput.pause()

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
  writer: metrics_lib.MetricsWriter
  title: str
  is_main: bool

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
              batch_sharding, reporter: StepReporter, evaluator: Evaluator, eval_every: int,
              checkpoints: Checkpoints, checkpoint_every: int, extra_hooks: Sequence[Hook] = ()):
  """Trains from `step` to `end_step`, or until SIGTERM/SIGINT (then saves a checkpoint).

  After each step the hooks run in this order: the report of the step before (every step), the
  stop signals, evaluation (every `eval_every` steps, 0: never) and a checkpoint (every
  `checkpoint_every` steps), both also at `end_step`; then `extra_hooks`.
  Returns (state, step, what stopped it or None, the last evaluation or None).
  """
  last_val = None

  def evaluate(info: StepInfo) -> None:
    nonlocal last_val
    reporter.settle()  # evaluation time is not training throughput
    last_val = evaluator(info.state, info.step)
    reporter.progress.write(
        f'step {info.step}: val loss {last_val["loss"]:.4f} '
        f'(ppl {last_val["perplexity"]:.2f}), '
        f'train loss {reporter.last.get("loss", float("nan")):.4f}')

  def checkpoint(info: StepInfo) -> None:
    reporter.drain()  # only checkpoints whose every step had a finite loss
    checkpoints.save(info.step, info.state)
    reporter.writer.flush()  # the metrics files hold every step a checkpoint holds
    reporter.throughput.pause()

  with StopSignal() as signals:
    hooks = [Hook(reporter.on_step),
             Hook(signals.on_step, every=signals.every),
             Hook(evaluate, every=eval_every, last=end_step),
             Hook(checkpoint, every=checkpoint_every, last=end_step),
             *extra_hooks]
    last, stop = run_hooks(train_steps(state, step, end_step=end_step, train_step=train_step,
                                       train_iter=train_iter, batch_sharding=batch_sharding),
                           hooks)
    if last is not None:
      state, step = last.state, last.step
    reporter.drain()
    if stop:
      checkpoints.save(step, state)
      reporter.writer.flush()
  return state, step, stop, last_val
