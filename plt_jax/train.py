"""Pretraining: mesh, sharded train state, a pure jitted step, evaluation and the loop.

`train_and_evaluate(config, workdir)` is the one entry point (the absl launcher and notebooks
call it). The train state is a single NNX module (model + nnx.Optimizer) built by one init
function, split once into (graphdef, state); the step is a pure `jax.jit` over the state that
merges, updates and splits again, with the state donated. Parameters and AdamW moments carry
the model's logical axis names, so `plt_jax.sharding` rules place both; the batch is split over
data x fsdp. Step N+1 is dispatched before step N's metrics are pulled to the host.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
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
from plt_jax import flops as flops_lib
from plt_jax import metrics as metrics_lib
from plt_jax import optimizer as opt_lib
from plt_jax import sharding as sharding_lib
from plt_jax.config import ModelConfig
from plt_jax.model import PLT

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


def initialize_distributed(mode: str = 'auto', *, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` for multi-process runs; must precede any JAX work.

  mode 'auto' initializes when `multihost_requested`; 'on' always; 'off' never. Without explicit
  arguments JAX detects SLURM, Open MPI and Cloud TPU pods itself.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"multihost mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == 'off' or (mode == 'auto' and not multihost_requested(num_processes,
                                                                   coordinator_address)):
    return False
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


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
    train_step = None if schedule is None else make_train_step(
        graphdef, shardings, mesh, schedule, grad_accum=grad_accum, rules=rules)
    return cls(graphdef, abstract, shardings, mesh, schedule, init_fn, train_step,
               make_eval_step(graphdef, shardings, mesh, rules))

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

def loss_sums(model: PLT, batch: Batch):
  """(sum of masked next-token cross-entropy, number of loss tokens) on final-loop logits."""
  logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  mask = batch['loss_mask'].astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ...: each spans every batch shard."""
  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def make_train_step(graphdef, state_shardings, mesh, schedule: optax.Schedule, *,
                    grad_accum: int = 1, rules=None):
  """jit(state, batch) -> (state, metrics), state donated.

  With grad_accum = n the batch is cut into n microbatches whose gradient *sums* are
  accumulated; dividing by the total number of loss tokens gives the same math as one big
  batch (only the float summation order differs).
  """
  rules = rules or sharding_lib.LOGICAL_RULES
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)

  def step(state, batch):
    with sharding_lib.activation_sharding(mesh, rules):
      ts = nnx.merge(graphdef, state)
      model_def, params, rest = nnx.split(ts.model, nnx.Param, ...)

      def micro(p, mb):
        return loss_sums(nnx.merge(model_def, p, rest), mb)

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
      ts.optimizer.update(ts.model, grads)
      new_state = nnx.state(ts)
    metrics = dict(loss=loss_sum / denom, grad_norm=optax.global_norm(grads), lr=lr,
                   loss_tokens=count)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(graphdef, state_shardings, mesh, rules=None):
  """jit(state, batch) -> (loss sum, token count) for the validation set."""
  rules = rules or sharding_lib.LOGICAL_RULES

  def step(state, batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return loss_sums(nnx.merge(graphdef, state).model, batch)

  return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary of the run and its outputs."""
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked private copy
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  ModelConfig.from_dict(config.model)  # bad model fields fail before any work
  mesh = build_mesh(config.mesh)
  validate_config(config, mesh, jax.process_count())
  opt_lib.validate(config.optimizer, config.train.steps)
  os.makedirs(workdir, exist_ok=True)
  say(f'workdir {workdir}')

  # --- data and tokenizer (the tokenizer lands in workdir/tokenizer) ---
  from plt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  t = config.train
  build = lambda: data_lib.build_data(  # pylint: disable=g-long-lambda
      config.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed,
      workdir=workdir, process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() == 1:
    data = build()
  else:  # process 0 trains the tokenizer and fills the cache; the others then reuse them
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if is_main:
      data = build()
    multihost_utils.sync_global_devices('plt_jax: data ready')
    if not is_main:
      data = build()
  tok = data.tokenizer
  if t.vocab_from_tokenizer:
    config.model.vocab_size = _round_up(tok.vocab_size, max(1, t.vocab_multiple))
  elif config.model.vocab_size < tok.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tok.vocab_size})')
  model_cfg = ModelConfig.from_dict(config.model)

  # --- resume or start ---
  config_path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if os.path.exists(config_path):
    saved = ckpt_lib.load_config(workdir).to_dict()
    diff = _config_diff(saved, config.to_dict())
    model_diff = [d for d in diff if d.startswith('model.')]
    if model_diff:
      raise ValueError(f'{workdir} holds a run with a different model; use a new --workdir. '
                       f'Differences: {"; ".join(model_diff)}')
    if diff:
      logging.warning('config differs from the saved run: %s', '; '.join(diff))
      say(f'note: config differs from {config_path}: {"; ".join(diff)}')
  program = Program.get(model_cfg, config.optimizer, t.steps, mesh, grad_accum=t.grad_accum)
  shardings = program.shardings
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                               max_to_keep=config.checkpoint.max_to_keep,
                               async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = program.abstract
    restored = ckpt.restore(
        latest, params_target=ckpt_lib.abstract_tree(abstract['model'], shardings['model']),
        opt_target=ckpt_lib.abstract_tree(abstract['optimizer'], shardings['optimizer']),
        data_iter=data.train_iter if ckpt.has_item(latest, 'data') else None)
    state = ckpt_lib.tree_into_state(
        abstract, {'model': restored['params'], 'optimizer': restored['opt_state']})
    start_step = int(latest)
    say(f'resumed from {ckpt.directory}/{latest}')
  else:
    state = program.init(config.seed)
    start_step = 0
  if is_main:
    ckpt_lib.save_config(workdir, config)

  n_params = sum(x.size for x in jax.tree.leaves(state['model']))
  fpt = flops_lib.flops_per_token(model_cfg, t.seq_len)
  peak = (t.peak_tflops_per_device * 1e12 if t.peak_tflops_per_device > 0
          else flops_lib.peak_flops_per_device())
  tokens_per_step = t.batch_size * t.seq_len
  say(f'model: {n_params / 1e6:.2f}M params, R={model_cfg.num_loops} ({model_cfg.loop_mode}), '
      f'L={model_cfg.num_layers}, d={model_cfg.d_model}, vocab={model_cfg.vocab_size}, '
      f'dtype={model_cfg.dtype}; {fpt["train"] / 1e6:.1f} MFLOP/token (train)')
  say(f'mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s); '
      f'batch {t.batch_size} x {t.seq_len} ({t.grad_accum} microbatch(es)); steps {t.steps}')
  st = data.stats
  say(f'data: {st["source"]}, {st["tokenizer"]} tokenizer ({st["vocab_size"]}), '
      f'{st["train_tokens"]:,} train / {st["val_tokens"]:,} val tokens, '
      f'{st["train_rows"]:,} rows (~{st["train_rows"] // max(1, t.batch_size)} steps per epoch)')

  train_step, eval_step = program.train_step, program.eval_step
  bsh = sharding_lib.batch_sharding(mesh)
  val_batches = [device_batch(b, bsh) for b in data.val_batches]
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main)
  title = (f'R={model_cfg.num_loops} {model_cfg.loop_mode}, {n_params / 1e6:.1f}M params, '
           f'{config.preset}')

  def run_eval(step: int) -> dict:
    t0 = time.time()
    ev = evaluate(eval_step, state, val_batches)
    if st.get('val_eval_bytes') and abs(ev['tokens'] - st['val_eval_tokens']) < 0.5:
      ev['bits_per_byte'] = ev['nats'] / math.log(2) / st['val_eval_bytes']
    ev['seconds'] = time.time() - t0
    writer.write(step, {k: v for k, v in ev.items() if k != 'nats'}, split='val')
    if is_main:
      metrics_lib.plot_loss_curve(writer.jsonl_path, writer.png_path, title)
    return ev

  end_step = t.steps if t.stop_at_step < 0 else min(t.steps, t.stop_at_step)
  history = dict(first_val=None, last_val=None)
  do_eval = config.eval.every > 0
  if start_step == 0 and config.eval.at_start and do_eval:
    history['first_val'] = run_eval(0)
    say(f'step 0: val loss {history["first_val"]["loss"]:.4f}')
  elif start_step > 0:  # the starting loss of a resumed run is in its metrics
    first = [r for r in metrics_lib.read_jsonl(writer.jsonl_path)
             if r.get('split') == 'val' and r.get('step') == 0]
    history['first_val'] = first[0] if first else None

  step = start_step
  last_saved = start_step if latest is not None else None
  pending: Optional[_Pending] = None
  progress = metrics_lib.Progress(t.steps, start_step, enabled=is_main and t.progress)
  timing = dict(t_prev=None, steps=0, seconds=0.0, tps_ema=None)
  last_train: dict = {}

  def report(p: _Pending) -> None:
    m = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    now = time.time()
    if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
      raise NonFiniteLossError(
          f'non-finite training loss at step {p.step}: loss={m["loss"]}, '
          f'grad_norm={m["grad_norm"]}, lr={m["lr"]:.3g}. Training stopped; the last good '
          f'checkpoint is step {last_saved} in {ckpt.directory} (nothing after it was saved). '
          'Lower optimizer.peak_lr, keep optimizer.clip_norm > 0, or check the data.')
    if timing['t_prev'] is not None:
      dt = now - timing['t_prev']
      timing['steps'] += 1
      timing['seconds'] += dt
      tps = tokens_per_step / max(dt, 1e-9)
      timing['tps_ema'] = tps if timing['tps_ema'] is None else 0.9 * timing['tps_ema'] + 0.1 * tps
      m['tokens_per_s'] = tps
      thr = flops_lib.throughput(tps, fpt['train'], mesh.devices.size, peak)
      m['tflops_per_device'] = thr['tflops_per_device']
      if thr['mfu'] is not None:
        m['mfu'] = thr['mfu']
    timing['t_prev'] = now
    writer.write(p.step, m, split='train')
    last_train.update(m, step=p.step)
    progress.update(p.step, loss=m['loss'], lr=m['lr'],
                    **({'tok/s': f'{timing["tps_ema"]:,.0f}'} if timing['tps_ema'] else {}))

  def drain() -> None:
    nonlocal pending
    if pending is not None:
      p, pending = pending, None
      report(p)

  def save(step: int) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    ckpt.save(step, state['model'], state['optimizer'], data.train_iter.get_state(),
              {'config': config.to_dict()})
    last_saved = step

  stop = None
  with _StopSignal() as signals:
    try:
      while step < end_step:
        host_batch = next(data.train_iter)
        state, metrics = train_step(state, device_batch(host_batch, bsh))
        step += 1
        drain()  # step - 1's metrics, read while step runs
        pending = _Pending(step, metrics)
        if _stop_requested(signals, step):
          stop = signals.received or 'signal on another process'
          break
        if do_eval and (step % config.eval.every == 0 or step == end_step):
          drain()
          timing['t_prev'] = None  # evaluation time is not training throughput
          history['last_val'] = ev = run_eval(step)
          progress.write(f'step {step}: val loss {ev["loss"]:.4f} (ppl {ev["perplexity"]:.2f}), '
                         f'train loss {last_train.get("loss", float("nan")):.4f}')
        if step % config.checkpoint.every == 0 or step == end_step:
          drain()  # only checkpoints whose every step had a finite loss
          save(step)
          timing['t_prev'] = None
      drain()
      if stop:
        save(step)
    except NonFiniteLossError:
      progress.close()
      ckpt.close()
      writer.close()
      raise
    finally:
      progress.close()
  if stop:
    say(f'{stop}: saved a checkpoint at step {step}; run the same command to resume.')
  ckpt.close()
  writer.flush()
  png = metrics_lib.plot_loss_curve(writer.jsonl_path, writer.png_path, title) if is_main else None
  writer.close()

  if history['last_val'] is None and is_main:  # nothing left to train: report the saved one
    last = [r for r in metrics_lib.read_jsonl(writer.jsonl_path)
            if r.get('split') == 'val' and r.get('step') == step]
    history['last_val'] = last[-1] if last else None
  wall = time.time() - t_start
  steady_tps = (timing['steps'] * tokens_per_step / timing['seconds']
                if timing['seconds'] > 0 else None)
  summary = dict(
      workdir=workdir, start_step=start_step, step=step, steps=t.steps, stopped_by=stop,
      wall_seconds=wall, params=n_params,
      first_val_loss=history['first_val']['loss'] if history['first_val'] else None,
      final_val_loss=history['last_val']['loss'] if history['last_val'] else None,
      final_train_loss=last_train.get('loss'), tokens_per_s=steady_tps,
      tflops_per_device=(flops_lib.throughput(steady_tps, fpt['train'], mesh.devices.size,
                                              peak)['tflops_per_device']
                         if steady_tps else None),
      checkpoints=ckpt.directory, checkpoint_steps=ckpt.all_steps() if is_main else None,
      metrics=writer.jsonl_path, tensorboard=writer.tb_dir, loss_curve=png,
      config=config_path, tokenizer=os.path.join(workdir, ckpt_lib.TOKENIZER_DIR),
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
