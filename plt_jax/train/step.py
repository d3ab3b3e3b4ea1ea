"""The train state, its mesh and shardings, and the pure jitted train and eval steps."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from plt_jax import sharding as sharding_lib
from plt_jax.config import ModelConfig
from plt_jax.model import NAMED_SCOPES, PLT
from plt_jax.runtime import Runtime
from plt_jax.train import metrics as metrics_lib
from plt_jax.train import optimizer as opt_lib

Batch = dict[str, jax.Array]

class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


class TrainState(nnx.Module):
  """Model and optimizer in one module, so one split gives one state tree to jit and shard."""

  def __init__(self, model: PLT, tx: optax.GradientTransformation):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)



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
            rules=None, loop_weights: Optional[tuple] = None) -> 'Program':
    rules = rules or sharding_lib.LOGICAL_RULES
    graphdef, abstract, shardings = abstract_train_state(model_cfg, tx, mesh, rules)
    init_fn = jax.jit(lambda rng: nnx.split(_train_state(model_cfg, tx, rng))[1],
                      out_shardings=shardings)
    # How the model runs inside the steps: the config's attention backend, on this mesh.
    rt = Runtime.for_model(model_cfg, sharding=sharding_lib.ShardingConfig(mesh, rules))
    train_step = None if schedule is None else make_train_step(
        graphdef, shardings, rt, schedule, grad_accum=grad_accum, loop_weights=loop_weights)
    return cls(graphdef, abstract, shardings, mesh, schedule, init_fn, train_step,
               make_eval_step(graphdef, shardings, rt))

  _cache: ClassVar[dict] = {}

  @classmethod
  def get(cls, model_cfg: ModelConfig, opt_cfg, total_steps: int, mesh, *,
          grad_accum: int = 1, loop_weights: Optional[tuple] = None) -> 'Program':
    key = (model_cfg, mesh, opt_cfg.to_json(sort_keys=True), total_steps, grad_accum,
           loop_weights)
    if key not in cls._cache:
      tx = opt_lib.make_optimizer(opt_cfg, total_steps)
      schedule = opt_lib.learning_rate_schedule(opt_cfg, total_steps)
      while len(cls._cache) >= 4:  # compiled programs hold memory; keep the recent ones
        cls._cache.pop(next(iter(cls._cache)))
      cls._cache[key] = cls.build(model_cfg, tx, mesh, schedule=schedule, grad_accum=grad_accum,
                                  loop_weights=loop_weights)
    return cls._cache[key]


# ------------------------------------------------------------------------------- the math

# Scopes that label a train step's ops in profiles (`experiments.bench.profiling`).
PROFILE_SCOPES = NAMED_SCOPES + ('loss', 'optimizer')


def normalized_loop_weights(weights, num_loops: int) -> Optional[tuple]:
  """train.loop_loss_weights -> R weights summing to 1, or None when the per-loop loss is off.

  () is off (the paper's recipe: the loss is on the last loop only). Otherwise one non-negative
  weight per loop, loop 1 first, with a positive sum.
  """
  weights = tuple(float(w) for w in (weights or ()))
  if not weights:
    return None
  if len(weights) != num_loops or any(not w >= 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f'train.loop_loss_weights={weights}: give one weight >= 0 per loop '
                     f'({num_loops}), with a positive sum, or () for the last loop only')
  total = sum(weights)
  return tuple(w / total for w in weights)


def loss_sums(model: PLT, batch: Batch, rt: Optional[Runtime] = None,
              loop_weights: Optional[tuple] = None):
  """(sum of masked next-token cross-entropy, number of loss tokens) on final-loop logits.

  loop_weights (from `normalized_loop_weights`): the loss is instead sum_r w_r * CE_r, where
  CE_r is the cross-entropy of loop r's readout Head(Norm_f(h_r)) (the last loop's is the
  logits); loops of weight 0 get no readout.
  """
  mask = batch['loss_mask'].astype(jnp.float32)
  if loop_weights is None:
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'], runtime=rt)
    with jax.named_scope('loss'):
      nll = metrics_lib.next_token_nll(logits, batch['targets'], mask)
    return jnp.sum(nll), jnp.sum(mask)
  logits, loops = model(batch['inputs'], batch['positions'], batch['segment_ids'], runtime=rt,
                        return_loops=True)
  total = jnp.zeros((), jnp.float32)
  with jax.named_scope('loss'):
    for r, w in enumerate(loop_weights):
      if w == 0:
        continue
      readout = logits if r == len(loop_weights) - 1 else model.head(loops[r].hidden, rt)
      total += w * jnp.sum(metrics_lib.next_token_nll(readout, batch['targets'], mask))
  return total, jnp.sum(mask)


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ...: each spans every batch shard."""
  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def make_train_step(graphdef, state_shardings, rt: Runtime, schedule: optax.Schedule, *,
                    grad_accum: int = 1, loop_weights: Optional[tuple] = None):
  """jit(state, batch) -> (state, metrics), state donated. rt: how the model runs (its
  sharding holds the mesh and rules). loop_weights: the per-loop loss (see `loss_sums`); the
  metric `loss` is then that weighted loss.

  With grad_accum = n the batch is cut into n microbatches whose gradient *sums* are
  accumulated; dividing by the total number of loss tokens gives the same math as one big
  batch (only the float summation order differs).
  """
  batch_sharding = sharding_lib.batch_sharding(rt.sharding.mesh, rt.sharding.rules)

  def step(state, batch):
    ts = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(ts.model, nnx.Param, ...)

    def micro(p, mb):
      return loss_sums(nnx.merge(model_def, p, rest), mb, rt, loop_weights)

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
