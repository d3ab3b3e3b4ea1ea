"""Adaptive loop exit for parallel loops: per-token exit rules read from the per-loop readouts.

Every loop r has a readout, the logit lens `p_r = softmax(Head(Norm_f(h_r)))`. An exit rule picks,
per token, the first loop whose readout is good enough, and the prediction is that loop's
readout. Two rules:
  * `confidence:TAU`: exit at the first loop whose top probability is at least TAU;
  * `kl:EPS`: exit at the first loop r >= 2 whose readout moved less than EPS nats from loop r-1's,
    KL(p_r || p_{r-1}) < EPS.
A token that meets no rule uses the last loop. `confidence:1` (or more) and `kl:0` (or less) never
exit early, so they reproduce the plain R-loop model exactly.

In a PLT all loops of a token run in the same decode step, so an early exit saves work only when
every sequence of a batch has exited a loop (the rows can then be skipped); see
`plt_jax.infer.decode.plt_exit_decode_step`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

RULES = ('confidence', 'kl')


@dataclasses.dataclass(frozen=True)
class ExitRule:
  kind: str
  threshold: float

  def __post_init__(self):
    if self.kind not in RULES:
      raise ValueError(f'exit rule {self.kind!r}: expected one of {RULES} (e.g. confidence:0.9)')
    t = float(self.threshold)
    if t != t:
      raise ValueError(f'exit rule {self.kind}: threshold is NaN')
    if self.kind == 'confidence' and t <= 0:
      raise ValueError(f'exit rule confidence:{t}: the threshold is a probability in (0, 1]')

  @classmethod
  def parse(cls, spec: str) -> 'ExitRule':
    """'confidence:0.9' or 'kl:5e-4'."""
    kind, sep, value = str(spec).partition(':')
    if not sep:
      raise ValueError(f'exit rule {spec!r}: expected KIND:THRESHOLD, KIND one of {RULES}')
    try:
      threshold = float(value)
    except ValueError:
      raise ValueError(f'exit rule {spec!r}: {value!r} is not a number') from None
    return cls(kind.strip(), threshold)

  @property
  def never_exits(self) -> bool:
    return (self.kind == 'confidence' and self.threshold >= 1.0) or (
        self.kind == 'kl' and self.threshold <= 0.0)

  def __str__(self) -> str:
    return f'{self.kind}:{self.threshold:g}'


def loop_log_probs(model, loops, rt=None) -> jax.Array:
  """[R, ..., V] float32 log-probabilities of every loop's readout (Head(Norm_f(h_r)))."""
  return jnp.stack([jax.nn.log_softmax(model.head(lo.hidden, rt), axis=-1) for lo in loops])


def readout_stats(logp: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What the rules read from logp [R, ..., V]: the top log-probability of every loop [R, ...]
  and KL(p_r || p_{r-1}) [R, ...] (0 for the first loop)."""
  top = jnp.max(logp, axis=-1)
  kl = jnp.sum(jnp.exp(logp[1:]) * (logp[1:] - logp[:-1]), axis=-1)
  return top, jnp.concatenate([jnp.zeros_like(top[:1]), kl])


def exit_met(top_logp, kl_prev, rule: ExitRule):
  """bool [R, ...]: whether loop r's readout meets the rule (the last loop is not forced)."""
  xp = jnp if isinstance(top_logp, jax.Array) else np
  num_loops = top_logp.shape[0]
  if rule.never_exits:
    return xp.zeros(top_logp.shape, bool)
  if rule.kind == 'confidence':
    return top_logp >= xp.log(xp.float32(rule.threshold))
  return (kl_prev < rule.threshold) & (xp.arange(num_loops) >= 1).reshape(
      (num_loops,) + (1,) * (top_logp.ndim - 1))


def exit_from_stats(top_logp, kl_prev, rule: ExitRule):
  """int32 [...]: the 0-based exit loop from `readout_stats` (jax or numpy arrays)."""
  xp = jnp if isinstance(top_logp, jax.Array) else np
  num_loops = top_logp.shape[0]
  if rule.never_exits or num_loops == 1:
    return xp.full(top_logp.shape[1:], num_loops - 1, xp.int32)
  ok = exit_met(top_logp, kl_prev, rule)
  ok = xp.concatenate([ok[:-1], xp.ones_like(ok[-1:])])
  return xp.argmax(ok, axis=0).astype(xp.int32)   # argmax of bools: the first True


def exit_loops(logp: jax.Array, rule: ExitRule) -> jax.Array:
  """int32 [...]: the 0-based loop each token exits at, from logp [R, ..., V]."""
  return exit_from_stats(*readout_stats(logp), rule)


def take_exit(logp: jax.Array, exit_at: jax.Array) -> jax.Array:
  """[..., V]: each token's readout at its exit loop."""
  return jnp.take_along_axis(logp, exit_at[None, ..., None], axis=0)[0]
