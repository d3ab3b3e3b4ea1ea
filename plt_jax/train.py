"""Pretraining: mesh, sharded train state, a pure jitted step, evaluation and the loop.

`train_and_evaluate(config, workdir)` is the one entry point (the absl launcher and notebooks
call it). The train state is a single NNX module (model + nnx.Optimizer) built by one init
function, split once into (graphdef, state); the step is a pure `jax.jit` over the state that
merges, updates and splits again, with the state donated. Parameters and AdamW moments carry
the model's logical axis names, so `plt_jax.sharding` rules place both; the batch is split over
data x fsdp. Step N+1 is dispatched before step N's metrics are pulled to the host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, ClassVar, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from plt_jax import checkpoint as ckpt_lib
from plt_jax import fileio
from plt_jax import flops as flops_lib
from plt_jax import metrics as metrics_lib
from plt_jax import optimizer as opt_lib
from plt_jax import sharding as sharding_lib
from plt_jax.config import ModelConfig
from plt_jax.model import NAMED_SCOPES, PLT
from plt_jax.runtime import Runtime

Batch = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


class TrainState(nnx.Module):
  """Model and optimizer in one module, so one split gives one state tree to jit and shard."""

  def __init__(self, model: PLT, tx: optax.GradientTransformation):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


# ------------------------------------------------------------------------------ multi-host

_CLUSTER_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE')


def multihost_requested(num_processes: Optional[int] = None,
                        coordinator_address: Optional[str] = None) -> bool:
  """True when flags or the environment describe a job with more than one process."""
  if coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if (num_processes or 0) > 1:
    return True
  for var in _CLUSTER_ENV:
    try:
      if int(os.environ.get(var, '1')) > 1:
        return True
    except ValueError:
      pass
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


# How long a process may go without a heartbeat before the others call it lost and exit. JAX's
# coordination service would notice too, after its own (longer) heartbeat timeout, and then end
# every process with a C++ fatal error instead of a message.
PEER_TIMEOUT_S = 30.0
PEER_HEARTBEAT_S = 2.0
_HEARTBEAT_DIR = 'plt_jax/heartbeat/'
_FINISHED = 'finished'


def initialize_distributed(mode: str = 'auto', *, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           peer_timeout_s: float = PEER_TIMEOUT_S,
                           on_peer_lost: Optional[Callable[[int, str], None]] = None) -> bool:
  """Calls `jax.distributed.initialize` for multi-process runs; must precede any JAX work.

  mode 'auto' initializes when `multihost_requested`; 'on' always; 'off' never. Without explicit
  arguments JAX detects SLURM, Open MPI and Cloud TPU pods itself.

  Then starts the peer watchdog (unless peer_timeout_s <= 0): when another process sends no
  heartbeat for peer_timeout_s, on_peer_lost(process index, reason) runs on the watchdog's
  thread; it must end this process (the default prints an error and exits with code 1).
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"multihost mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == 'off' or (mode == 'auto' and not multihost_requested(num_processes,
                                                                   coordinator_address)):
    return False
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  # JAX's own heartbeat timeout stays well above the watchdog's, so the watchdog speaks first.
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(max(100, 4 * peer_timeout_s)))
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if peer_timeout_s > 0 and jax.process_count() > 1:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    PeerWatchdog.start_global(distributed.global_state.client, jax.process_index(),
                              jax.process_count(), timeout_s=peer_timeout_s,
                              on_lost=on_peer_lost or _exit_on_lost_peer)
  return True


def _exit_on_lost_peer(process: int, reason: str) -> None:
  del process
  print(f'error: {reason}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


class PeerWatchdog:
  """Heartbeats through the coordination service's key-value store, one thread per process.

  Every `interval_s` each process writes a counter under its key and reads everyone's. A peer
  whose counter has not moved for `timeout_s`, or a store that stays unreachable that long (it
  lives in process 0), is lost: `on_lost(index, reason)` is called once, on this thread, while the
  main thread may be blocked in a collective that will never finish. `finish()` marks this
  process as done, so peers stop waiting for its heartbeats while it exits.
  """
  _global: ClassVar[Optional['PeerWatchdog']] = None

  def __init__(self, client, index: int, count: int, *, timeout_s: float,
               interval_s: float = PEER_HEARTBEAT_S, on_lost: Callable[[int, str], None]):
    self.client, self.index, self.count = client, index, count
    self.timeout_s, self.interval_s = float(timeout_s), min(float(interval_s), timeout_s / 4)
    self.on_lost = on_lost
    self.lost: Optional[int] = None
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(target=self._run, name='plt_jax-peer-watchdog', daemon=True)

  @classmethod
  def start_global(cls, client, index: int, count: int, **kwargs) -> 'PeerWatchdog':
    if cls._global is not None:
      cls._global.stop()
    cls._global = cls(client, index, count, **kwargs)
    cls._global._thread.start()
    return cls._global

  @classmethod
  def current(cls) -> Optional['PeerWatchdog']:
    return cls._global

  def finish(self) -> None:
    self._finished = True
    self._beat(_FINISHED)

  def stop(self) -> None:
    self._stop.set()

  def wait_for_loss(self) -> Optional[int]:
    """Blocks at most one timeout for the watchdog to find a lost peer (after an error that a
    lost peer may have caused); returns its index, or None if every peer is alive."""
    deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
    while self.lost is None and time.monotonic() < deadline and self._thread.is_alive():
      time.sleep(0.1)
    return self.lost

  def _beat(self, value: str) -> None:
    self.client.key_value_set(f'{_HEARTBEAT_DIR}{self.index}', value, allow_overwrite=True)

  def _declare(self, process: int, reason: str) -> None:
    self.lost = process
    self._stop.set()
    self.on_lost(process, reason)

  def _run(self) -> None:
    start = time.monotonic()
    seen = {p: (None, start) for p in range(self.count) if p != self.index}
    failing_since, beat = None, 0
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      try:
        if not self._finished:
          self._beat(str(beat))
          beat += 1
        values = dict(self.client.key_value_dir_get(_HEARTBEAT_DIR))
        failing_since = None
      except Exception as e:  # pylint: disable=broad-except
        failing_since = failing_since or now
        if now - failing_since >= self.timeout_s:
          self._declare(0, f'process 0 of {self.count} stopped responding; the coordination '
                        f'service it runs is unreachable ({str(e).splitlines()[0][:160]})')
          return
        continue
      for p, (last, since) in seen.items():
        value = values.get(f'{_HEARTBEAT_DIR}{p}')
        if value == _FINISHED:
          continue
        if value != last:
          seen[p] = (value, now)
        elif now - since >= self.timeout_s:
          self._declare(p, f'process {p} of {self.count} stopped responding; no heartbeat for '
                        f'{now - since:.0f} s')
          return


# ----------------------------------------------------------------------------- state / mesh

def build_mesh(mesh_cfg) -> jax.sharding.Mesh:
  devices = jax.devices()
  n = int(mesh_cfg.get('num_devices', -1))
  if n > 0:
    if jax.process_count() > 1:
      raise ValueError('mesh.num_devices only applies to single-process runs; use -1')
    if n > len(devices):
      raise ValueError(f'mesh.num_devices={n} but only {len(devices)} devices exist')
    devices = devices[:n]
  return sharding_lib.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


def _train_state(model_cfg: ModelConfig, tx, rng) -> TrainState:
  return TrainState(PLT(model_cfg, nnx.Rngs(rng)), tx)


def abstract_train_state(model_cfg: ModelConfig, tx, mesh, rules=None):
  """(graphdef, abstract state, shardings) without allocating anything."""
  rules = rules or sharding_lib.LOGICAL_RULES
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _train_state(model_cfg, tx, 0)))
  return graphdef, abstract, sharding_lib.param_shardings(abstract, mesh, rules)


def create_train_state(model_cfg: ModelConfig, tx, mesh, seed: int, rules=None):
  """(graphdef, state, shardings); every array is created directly on its shards.

  The same as `sharding.create_sharded` for model and optimizer together, with the seed as a
  traced argument so one compiled init serves every seed.
  """
  program = Program.build(model_cfg, tx, mesh, rules=rules)
  return program.graphdef, program.init(seed), program.shardings


@dataclasses.dataclass
class Program:
  """Everything compiled for one (model, optimizer, mesh): the train state's graphdef and
  shardings and the jitted init / train / eval functions. `Program.get` caches them, so runs in
  one process with the same settings (tests, notebooks, a resume) compile once."""
  graphdef: Any
  abstract: nnx.State
  shardings: Any
  mesh: jax.sharding.Mesh
  schedule: Optional[optax.Schedule]
  init_fn: Callable
  train_step: Optional[Callable]
  eval_step: Callable

  def init(self, seed: int) -> nnx.State:
    return self.init_fn(jax.random.key(seed))

  @classmethod
  def build(cls, model_cfg: ModelConfig, tx, mesh, *, schedule=None, grad_accum: int = 1,
            rules=None) -> 'Program':
    rules = rules or sharding_lib.LOGICAL_RULES
    graphdef, abstract, shardings = abstract_train_state(model_cfg, tx, mesh, rules)
    init_fn = jax.jit(lambda rng: nnx.split(_train_state(model_cfg, tx, rng))[1],
                      out_shardings=shardings)
    # How the model runs inside the steps: the config's attention backend, on this mesh.
    rt = Runtime.for_model(model_cfg, sharding=sharding_lib.ShardingConfig(mesh, rules))
    train_step = None if schedule is None else make_train_step(
        graphdef, shardings, rt, schedule, grad_accum=grad_accum)
    return cls(graphdef, abstract, shardings, mesh, schedule, init_fn, train_step,
               make_eval_step(graphdef, shardings, rt))

  _cache: ClassVar[dict] = {}

  @classmethod
  def get(cls, model_cfg: ModelConfig, opt_cfg, total_steps: int, mesh, *,
          grad_accum: int = 1) -> 'Program':
    key = (model_cfg, mesh, opt_cfg.to_json(sort_keys=True), total_steps, grad_accum)
    if key not in cls._cache:
      tx = opt_lib.make_optimizer(opt_cfg, total_steps)
      schedule = opt_lib.learning_rate_schedule(opt_cfg, total_steps)
      while len(cls._cache) >= 4:  # compiled programs hold memory; keep the recent ones
        cls._cache.pop(next(iter(cls._cache)))
      cls._cache[key] = cls.build(model_cfg, tx, mesh, schedule=schedule, grad_accum=grad_accum)
    return cls._cache[key]


# ------------------------------------------------------------------------------- the math

# Scopes that label a train step's ops in profiles (`plt_jax.profiling`).
PROFILE_SCOPES = NAMED_SCOPES + ('loss', 'optimizer')


def loss_sums(model: PLT, batch: Batch, rt: Optional[Runtime] = None):
  """(sum of masked next-token cross-entropy, number of loss tokens) on final-loop logits."""
  logits = model(batch['inputs'], batch['positions'], batch['segment_ids'], runtime=rt)
  mask = batch['loss_mask'].astype(jnp.float32)
  with jax.named_scope('loss'):
    nll = metrics_lib.next_token_nll(logits, batch['targets'], mask)
  return jnp.sum(nll), jnp.sum(mask)


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ...: each spans every batch shard."""
  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def make_train_step(graphdef, state_shardings, rt: Runtime, schedule: optax.Schedule, *,
                    grad_accum: int = 1):
  """jit(state, batch) -> (state, metrics), state donated. rt: how the model runs (its
  sharding holds the mesh and rules).

  With grad_accum = n the batch is cut into n microbatches whose gradient *sums* are
  accumulated; dividing by the total number of loss tokens gives the same math as one big
  batch (only the float summation order differs).
  """
  batch_sharding = sharding_lib.batch_sharding(rt.sharding.mesh, rt.sharding.rules)

  def step(state, batch):
    ts = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(ts.model, nnx.Param, ...)

    def micro(p, mb):
      return loss_sums(nnx.merge(model_def, p, rest), mb, rt)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      def body(carry, mb):
        g_acc, l_acc, n_acc = carry
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
        (l, n), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (grads, loss_sum, count), _ = jax.lax.scan(
          body, init, _split_microbatches(batch, grad_accum))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    lr = schedule(ts.optimizer.step[...])
    with jax.named_scope('optimizer'):
      ts.optimizer.update(ts.model, grads)
    new_state = nnx.state(ts)
    metrics = dict(loss=loss_sum / denom, grad_norm=optax.global_norm(grads), lr=lr,
                   loss_tokens=count)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(graphdef, state_shardings, rt: Runtime):
  """jit(state, batch) -> (loss sum, token count) for the validation set."""
  def step(state, batch):
    return loss_sums(nnx.merge(graphdef, state).model, batch, rt)

  batch_sharding = sharding_lib.batch_sharding(rt.sharding.mesh, rt.sharding.rules)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding))


def device_batch(host_batch: dict, sharding) -> Batch:
  """This process's rows -> global arrays split over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def evaluate(eval_step, state, batches: list[Batch]) -> dict[str, float]:
  sums = [eval_step(state, b) for b in batches]  # all dispatched before any is read
  total = sum(float(s) for s, _ in sums)
  count = sum(float(n) for _, n in sums)
  loss = total / max(count, 1.0)
  return dict(loss=loss, perplexity=math.exp(min(loss, 80.0)), tokens=count, nats=total)


# ----------------------------------------------------------------------------- config checks

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def validate_config(config, mesh, process_count: int) -> None:
  t = config.train

  def bad(field, msg):
    raise ValueError(f'{field}: {msg}')
  for f in ('steps', 'batch_size', 'seq_len', 'grad_accum'):
    v = t[f]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      bad(f'train.{f}={v!r}', 'must be a positive integer')
  if t.seq_len > config.model.max_seq_len:
    bad(f'train.seq_len={t.seq_len}', f'exceeds model.max_seq_len={config.model.max_seq_len}')
  if t.batch_size % process_count:
    bad(f'train.batch_size={t.batch_size}', f'must be divisible by the {process_count} processes')
  if t.batch_size % t.grad_accum:
    bad(f'train.batch_size={t.batch_size}', f'must be divisible by train.grad_accum={t.grad_accum}')
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = t.batch_size // t.grad_accum
  if micro % shards:
    bad(f'train.batch_size={t.batch_size}',
        f'each microbatch ({micro} rows = batch_size / grad_accum) must split evenly over '
        f'mesh data x fsdp = {shards} devices')
  for f in ('every', 'max_to_keep'):
    if config.checkpoint[f] < 1:
      bad(f'checkpoint.{f}={config.checkpoint[f]!r}', 'must be >= 1')
  if config.eval.every < 0:
    bad(f'eval.every={config.eval.every!r}', 'must be >= 1, or 0 for no evaluation')


_IMPLEMENTATION_FIELDS = ('model.attention_impl:', 'model.remat:')


def _config_diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<missing>'), new.get(k, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f'{prefix}{k}.')
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f'{prefix}{k}: saved {a!r}, now {b!r}')
  return out


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
class _Throughput:
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
class _Checkpoints:
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
class _StepReporter:
  """Each step's metrics, read on the host one step late (the next step already runs): stops
  on a non-finite loss, adds throughput, writes the metrics files and the progress bar."""
  writer: metrics_lib.MetricsWriter
  progress: metrics_lib.Progress
  throughput: _Throughput
  checkpoints: _Checkpoints
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
class _Evaluator:
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


def _train_steps(state: nnx.State, step: int, *, end_step: int, train_step, train_iter,
                 batch_sharding, reporter: _StepReporter, evaluator: _Evaluator,
                 checkpoints: _Checkpoints):
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


def _build_data(config: ml_collections.ConfigDict, workdir: str):
  """The data bundle; its tokenizer lands in workdir/tokenizer. With several processes, process 0
  prepares the source into shards (and makes the tokenizer) when they are not there yet, and the
  others then read them."""
  from plt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  t = config.train
  build = lambda: data_lib.build_data(  # pylint: disable=g-long-lambda
      config.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed,
      workdir=workdir, process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  is_main = jax.process_index() == 0
  data = build() if is_main else None
  multihost_utils.sync_global_devices('plt_jax: data ready')
  return data if is_main else build()


def _model_config(config: ml_collections.ConfigDict, tok) -> ModelConfig:
  """The model config with its vocabulary fitted to the tokenizer (written back into config)."""
  t = config.train
  if t.vocab_from_tokenizer:
    config.model.vocab_size = _round_up(tok.vocab_size, max(1, t.vocab_multiple))
  elif config.model.vocab_size < tok.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tok.vocab_size})')
  return ModelConfig.from_dict(config.model)


def _check_saved_config(config: ml_collections.ConfigDict, workdir: str, say) -> str:
  """Refuses a workdir that holds another model; notes other differences. Returns its path."""
  config_path = fileio.join(workdir, ckpt_lib.CONFIG_FILE)
  if fileio.exists(config_path):
    saved = ckpt_lib.load_config(workdir).to_dict()
    diff = _config_diff(saved, config.to_dict())
    # How attention is computed or what is rematerialised leaves the model itself unchanged: a
    # resume with other choices is allowed (with the note below), if not bit for bit.
    model_diff = [d for d in diff if d.startswith('model.')
                  and not d.startswith(_IMPLEMENTATION_FIELDS)]
    if model_diff:
      raise ValueError(f'{workdir} holds a run with a different model; use a new --workdir. '
                       f'Differences: {"; ".join(model_diff)}')
    if diff:
      logging.warning('config differs from the saved run: %s', '; '.join(diff))
      say(f'note: config differs from {config_path}: {"; ".join(diff)}')
  return config_path


def _restore_or_init(program: Program, ckpt: ckpt_lib.Checkpointer, data, seed: int, say):
  """(state, start step, whether it was restored): the latest complete checkpoint (with the data
  iterator's position, where saved), else a fresh init."""
  latest = ckpt.latest_step()
  if latest is None:
    return program.init(seed), 0, False
  abstract, shardings = program.abstract, program.shardings
  restored = ckpt.restore(
      latest, params_target=ckpt_lib.abstract_tree(abstract['model'], shardings['model']),
      opt_target=ckpt_lib.abstract_tree(abstract['optimizer'], shardings['optimizer']))
  # Read directly rather than through grain, so that a run may resume on another process count.
  data_state = ckpt.data_state(latest, jax.process_index(), jax.process_count())
  if data_state is not None:
    data.train_iter.set_state(data_state)
  state = ckpt_lib.tree_into_state(
      abstract, {'model': restored['params'], 'optimizer': restored['opt_state']})
  say(f'resumed from {ckpt.directory}/{latest}')
  return state, int(latest), True


def _val_record(records: list[dict], step: int, *, last: bool = False) -> Optional[dict]:
  """The first (or last) validation record of `step` among the metrics records."""
  records = [r for r in records if r.get('split') == 'val' and r.get('step') == step]
  if not records:
    return None
  return records[-1] if last else records[0]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary of the run and its outputs.

  The checkpointer, the metric writers and the progress bar are closed on every exit, an error
  included, so a checkpoint being written asynchronously is always finished.
  """
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked private copy
  workdir = fileio.abspath(workdir)
  fileio.check_access(workdir, 'workdir')  # an unusable URL fails here, before any work
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  ModelConfig.from_dict(config.model)  # bad model fields fail before any work
  mesh = build_mesh(config.mesh)
  validate_config(config, mesh, jax.process_count())
  opt_lib.validate(config.optimizer, config.train.steps)
  fileio.makedirs(workdir)
  say(f'workdir {workdir}')

  data = _build_data(config, workdir)
  model_cfg = _model_config(config, data.tokenizer)
  config_path = _check_saved_config(config, workdir, say)
  t = config.train
  program = Program.get(model_cfg, config.optimizer, t.steps, mesh, grad_accum=t.grad_accum)
  end_step = t.steps if t.stop_at_step < 0 else min(t.steps, t.stop_at_step)

  with contextlib.ExitStack() as cleanup:
    ckpt = ckpt_lib.Checkpointer(fileio.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                                 max_to_keep=config.checkpoint.max_to_keep,
                                 async_save=config.checkpoint.async_save)
    cleanup.callback(ckpt.close)  # waits for a save in flight
    state, start_step, restored = _restore_or_init(program, ckpt, data, config.seed, say)
    if is_main:
      ckpt_lib.save_config(workdir, config)

    n_params = sum(x.size for x in jax.tree.leaves(state['model']))
    fpt = flops_lib.flops_per_token(model_cfg, t.seq_len)
    peak = (t.peak_tflops_per_device * 1e12 if t.peak_tflops_per_device > 0
            else flops_lib.peak_flops_per_device())
    st = data.stats
    say(f'model: {n_params / 1e6:.2f}M params, R={model_cfg.num_loops} ({model_cfg.loop_mode}), '
        f'L={model_cfg.num_layers}, d={model_cfg.d_model}, vocab={model_cfg.vocab_size}, '
        f'dtype={model_cfg.dtype}; {fpt["train"] / 1e6:.1f} MFLOP/token (train)')
    say(f'mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} '
        f'device(s); batch {t.batch_size} x {t.seq_len} ({t.grad_accum} microbatch(es)); '
        f'steps {t.steps}')
    size = (f'{st["train_tokens"]:,} train / {st["val_tokens"]:,} val tokens, {st["train_rows"]:,} '
            f'rows (~{st["train_rows"] // max(1, t.batch_size)} steps per epoch)'
            if st['train_rows'] else
            f'training rows generated without end, {st["val_tokens"]:,} val tokens')
    say(f'data: {st["source"]}, {st["tokenizer"]} tokenizer ({st["vocab_size"]}), {size}')

    bsh = sharding_lib.batch_sharding(mesh)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main)
    cleanup.callback(writer.close)
    title = (f'R={model_cfg.num_loops} {model_cfg.loop_mode}, {n_params / 1e6:.1f}M params, '
             f'{config.preset}')
    evaluator = _Evaluator(program.eval_step, [device_batch(b, bsh) for b in data.val_batches],
                           st, every=config.eval.every, end_step=end_step, writer=writer,
                           title=title, is_main=is_main)
    first_val = None
    if start_step == 0 and config.eval.at_start and evaluator.every > 0:
      first_val = evaluator(state, 0)
      say(f'step 0: val loss {first_val["loss"]:.4f}')
    elif start_step > 0:  # the starting loss of a resumed run is in its metrics
      first_val = _val_record(writer.records(), 0)

    checkpoints = _Checkpoints(ckpt, every=config.checkpoint.every, end_step=end_step,
                               last_saved=start_step if restored else None,
                               data_iter=data.train_iter, config=config)
    throughput = _Throughput(t.batch_size * t.seq_len, fpt['train'], mesh.devices.size, peak)
    progress = metrics_lib.Progress(t.steps, start_step, enabled=is_main and t.progress)
    reporter = _StepReporter(writer, progress, throughput, checkpoints)
    with contextlib.closing(progress):
      state, step, stop, last_val = _train_steps(
          state, start_step, end_step=end_step, train_step=program.train_step,
          train_iter=data.train_iter, batch_sharding=bsh, reporter=reporter,
          evaluator=evaluator, checkpoints=checkpoints)
    if stop:
      say(f'{stop}: saved a checkpoint at step {step}; run the same command to resume.')
    writer.flush()
    png = (metrics_lib.plot_loss_curve(writer.records(), writer.png_path, title) if is_main
           else None)

  if last_val is None and is_main:  # nothing left to train: report the saved one
    last_val = _val_record(metrics_lib.read_jsonl(writer.jsonl_path), step, last=True)
  steady_tps = throughput.steady
  summary = dict(
      workdir=workdir, start_step=start_step, step=step, steps=t.steps, stopped_by=stop,
      wall_seconds=time.time() - t_start, params=n_params,
      first_val_loss=first_val['loss'] if first_val else None,
      final_val_loss=last_val['loss'] if last_val else None,
      final_train_loss=reporter.last.get('loss'), tokens_per_s=steady_tps,
      tflops_per_device=throughput.rates(steady_tps)['tflops_per_device'] if steady_tps else None,
      checkpoints=ckpt.directory, checkpoint_steps=ckpt.all_steps() if is_main else None,
      metrics=writer.jsonl_path, tensorboard=writer.tb_dir, loss_curve=png,
      config=config_path, tokenizer=fileio.join(workdir, ckpt_lib.TOKENIZER_DIR),
      data_cache=st.get('cache_dir'))
  if is_main:
    _print_summary(summary)
  return summary


def _print_summary(s: dict) -> None:
  def f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else 'n/a'
  lines = [
      '',
      f'done: step {s["step"]}/{s["steps"]} in {s["wall_seconds"] / 60:.1f} min'
      + (f' (stopped by {s["stopped_by"]})' if s['stopped_by'] else ''),
      f'  val loss      {f(s["first_val_loss"], ".4f")} -> {f(s["final_val_loss"], ".4f")}'
      f'   (train loss {f(s["final_train_loss"], ".4f")})',
      f'  throughput    {f(s["tokens_per_s"], ",.0f")} tokens/s, '
      f'{f(s["tflops_per_device"], ".3f")} TFLOP/s per device',
      f'  workdir       {s["workdir"]}',
      f'  checkpoints   {s["checkpoints"]}  steps {s["checkpoint_steps"]}',
      f'  metrics       {s["metrics"]}',
      f'  tensorboard   tensorboard --logdir {s["tensorboard"]}',
      f'  loss curve    {s["loss_curve"]}',
      f'  config        {s["config"]}',
      f'  tokenizer     {s["tokenizer"]}',
  ]
  print('\n'.join(lines), flush=True)
