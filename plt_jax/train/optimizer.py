"""AdamW as the LoopCoder-v2 paper sets it: beta (0.9, 0.95), eps 1e-15, weight decay 0.1,
global-norm clipping 1.0, linear warmup over 5% of the steps, then cosine decay.

Weight decay (ours): applied to every parameter with two or more dimensions (projection kernels,
the embedding, the LM head, the gate's [H, D] / [H, E] weight), and never to vectors: the RMSNorm
scales (including the gate's `gate_norm`) and the gate bias. Decaying a norm scale pulls it toward
0 rather than toward its identity value 1, and the gate bias sets the global/local mix, so both are
left alone (the common Llama practice; the paper does not say).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def default_optimizer_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.peak_lr = 4e-4
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-15
  c.weight_decay = 0.1
  c.clip_norm = 1.0              # global-norm clipping; 0 disables
  c.warmup_fraction = 0.05       # of train.steps; used when warmup_steps < 0
  c.warmup_steps = -1            # >= 0 overrides warmup_fraction
  c.schedule = 'cosine'          # 'cosine' | 'linear' | 'constant' (after warmup)
  c.final_lr_fraction = 0.1      # the decay ends at peak_lr * final_lr_fraction
  return c


def warmup_steps(cfg, total_steps: int) -> int:
  if cfg.warmup_steps >= 0:
    return int(cfg.warmup_steps)
  return int(round(cfg.warmup_fraction * total_steps))


def validate(cfg, total_steps: int) -> None:
  def bad(field, msg):
    raise ValueError(f'optimizer.{field}={getattr(cfg, field)!r}: {msg}')
  if not cfg.peak_lr > 0:
    bad('peak_lr', 'must be > 0')
  for f in ('b1', 'b2'):
    if not 0.0 <= getattr(cfg, f) < 1.0:
      bad(f, 'must be in [0, 1)')
  if not cfg.eps >= 0:
    bad('eps', 'must be >= 0')
  if not cfg.weight_decay >= 0:
    bad('weight_decay', 'must be >= 0')
  if not cfg.clip_norm >= 0:
    bad('clip_norm', 'must be >= 0 (0 disables clipping)')
  if not 0.0 <= cfg.warmup_fraction < 1.0:
    bad('warmup_fraction', 'must be in [0, 1)')
  if cfg.schedule not in ('cosine', 'linear', 'constant'):
    bad('schedule', "must be 'cosine', 'linear' or 'constant'")
  if not 0.0 <= cfg.final_lr_fraction <= 1.0:
    bad('final_lr_fraction', 'must be in [0, 1]')
  if warmup_steps(cfg, total_steps) > total_steps:
    bad('warmup_steps', f'exceeds train.steps={total_steps}')


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """lr(step) for the update that follows `step` completed updates (optax counts from 0).

  Warmup: peak * (step + 1) / warmup (never 0, so the first update already learns, and step
  warmup - 1 reaches the peak); then the decay runs from peak to peak * final_lr_fraction.
  """
  peak = float(cfg.peak_lr)
  warm = warmup_steps(cfg, total_steps)
  decay = max(1, total_steps - warm)
  end = peak * float(cfg.final_lr_fraction)
  if cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.final_lr_fraction)
  elif cfg.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay)
  else:
    after = optax.constant_schedule(peak)
  if warm == 0:
    return after

  def schedule(step):
    step = jnp.asarray(step)
    ramp = peak * (step + 1).astype(jnp.float32) / warm
    return jnp.where(step < warm, ramp, after(jnp.maximum(step - warm, 0)))
  return schedule


def decay_mask(params):
  """True where weight decay applies: parameters with ndim >= 2 (see the module docstring)."""
  return jax.tree.map(lambda p: getattr(p, 'ndim', 0) >= 2, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  validate(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
