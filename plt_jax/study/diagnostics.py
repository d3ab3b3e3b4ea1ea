"""Per-loop diagnostics of a looped model (LoopCoder-v2 section 3.2; defined in docs/model.md).

Notation: h_0 = the loop-1 input E, h_r = output of loop r (r = 1..R). Every metric is a mean over
valid tokens of held-out text (segment_ids > 0); `loop_diagnostics` returns sums and counts so that
batches can be accumulated exactly, and `finalize` turns them into per-loop means.

| key | per loop r | definition |
|---|---|---|
| step_size | 1..R | ||h_r - h_{r-1}|| |
| alignment | 2..R | cos(h_r - h_{r-1}, h_{r-1} - h_{r-2}); negative = oscillation |
| effective_rank | 1..R | exp(entropy(singular values / sum)) of RMS-normalised [S, d] states, per row |
| fixed_point_gap | 1..R | ||h_r - F(h_r)||, F = one more loop with the same CLP / G-SWA context |
| offset_cost | 2..R | mean_i ||h_{r-1}[i] - h_{r-1}[i-1]|| within a document: what the shift costs |
| attn_entropy | 1..R | -sum_k A log A per query and head (mean over layers, heads, queries) |
| attn_kl | 2..R | KL(A_r || A_{r-1}); for G-SWA A = g A_glob + (1 - g) A_loc |
| gate | 2..R x L | mean gate per loop and layer |
| lens_kl | 2..R | KL(p_r || p_{r-1}), p_r = softmax(Head(Norm_f(h_r))) |
| lens_entropy | 1..R | entropy of p_r |
| lens_rank | 1..R | mean rank of the true next token under p_r (0 = top-1) |
| lens_top1 | 1..R | fraction where the true next token is top-1 |
Loops for which a metric is undefined hold NaN, so every list has length R.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plt_jax import data as data_lib
from plt_jax import fileio
from plt_jax.runtime import Runtime
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import metrics as metrics_lib

Array = jax.Array
_EPS = 1e-30


# --- metric primitives (pure functions; tested on constructed inputs) ---------------------------
def effective_rank(x_SD: Array, mask_S: Optional[Array] = None) -> Array:
  """exp(-sum p log p), p = singular values / their sum. Masked rows are zeroed (no effect)."""
  x = x_SD.astype(jnp.float32)
  if mask_S is not None:
    x = x * mask_S[:, None]
  s = jnp.linalg.svd(x, compute_uv=False)
  p = s / jnp.maximum(jnp.sum(s), _EPS)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, _EPS)), 0.0)))


def rms_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def kl_divergence(p: Array, q: Array, axis: int = -1) -> Array:
  """KL(p || q) along `axis` for probability tensors (0 log 0 = 0)."""
  p = p.astype(jnp.float32)
  q = q.astype(jnp.float32)
  terms = jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, _EPS)) - jnp.log(jnp.maximum(q, _EPS))), 0.)
  return jnp.sum(terms, axis=axis)


def entropy(p: Array, axis: int = -1) -> Array:
  p = p.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, _EPS)), 0.0), axis=axis)


def step_sizes(states: list[Array]) -> list[Array]:
  """||h_r - h_{r-1}|| per token for r = 1..len(states)-1; states[0] is h_0."""
  return [jnp.linalg.norm((states[r] - states[r - 1]).astype(jnp.float32), axis=-1)
          for r in range(1, len(states))]


def cosine(a: Array, b: Array) -> Array:
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1),
                                          1e-12)


def alignments(states: list[Array]) -> list[Array]:
  """cos(h_r - h_{r-1}, h_{r-1} - h_{r-2}) per token for r = 2..len(states)-1."""
  return [cosine(states[r] - states[r - 1], states[r - 1] - states[r - 2])
          for r in range(2, len(states))]


def offset_cost(h_BSD: Array, positions_BS: Array) -> tuple[Array, Array]:
  """Per-token ||h[i] - h[i-1]|| and its validity mask (i is not a document start)."""
  diff = h_BSD[:, 1:] - h_BSD[:, :-1]
  d = jnp.linalg.norm(diff.astype(jnp.float32), axis=-1)
  d = jnp.pad(d, ((0, 0), (1, 0)))
  return d, positions_BS > 0


def true_token_rank(logits_BSV: Array, targets_BS: Array) -> Array:
  """Number of vocabulary entries scoring strictly higher than the true token (0 = top-1)."""
  true = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)
  return jnp.sum(logits_BSV > true, axis=-1)


# --- the model-level pass ------------------------------------------------------------------------
def _mixed_probs(layer_out) -> Array:
  """Attention distribution over keys for one layer: plain, or g*A_glob + (1-g)*A_loc."""
  if isinstance(layer_out.probs, tuple):
    p_glob, p_loc = layer_out.probs
    g = jnp.transpose(layer_out.gate, (0, 2, 1))[..., None]  # [B, H, S, 1]
    return g * p_glob + (1.0 - g) * p_loc
  return layer_out.probs


def loop_diagnostics(model, batch: dict[str, Array], rt=None) -> dict[str, Array]:
  """Sums (and counts) of every diagnostic for one batch. Run under jit (see `accumulate`).
  rt: the `plt_jax.runtime.Runtime` (its mesh); attention always runs as the reference here,
  which is what captures the probabilities."""
  cfg = model.cfg
  tokens, positions = batch['inputs'], batch['positions']
  seg = batch.get('segment_ids')
  valid = (seg > 0) if seg is not None else jnp.ones(tokens.shape, bool)
  targets = batch.get('targets', jnp.roll(tokens, -1, axis=1))
  lmask = batch.get('loss_mask', valid.astype(jnp.float32)) > 0
  vf = valid.astype(jnp.float32)
  n_valid = jnp.sum(vf)
  R = cfg.num_loops

  rt = model.runtime(rt)
  _, loops = model(tokens, positions, seg, runtime=rt, return_loops=True, capture_attention=True)
  e = model.embed(tokens, rt)
  states = [e] + [lo.hidden for lo in loops]
  nan = jnp.float32(jnp.nan)
  out: dict[str, Any] = {'count_tokens': n_valid, 'count_lens': jnp.sum(lmask.astype(jnp.float32))}

  def msum(x, m=vf):
    return jnp.sum(x * m)

  out['step_size'] = jnp.stack([msum(d) for d in step_sizes(states)])
  out['alignment'] = jnp.stack([nan] + [msum(c) for c in alignments(states)])

  # Effective rank per row (over valid tokens), summed over rows.
  rows = jnp.float32(tokens.shape[0])
  out['effective_rank'] = jnp.stack([
      jnp.sum(jax.vmap(effective_rank)(rms_normalize(h), vf)) for h in states[1:]])
  out['count_rows'] = rows

  # Fixed-point gap: for r < R, F(h_r) = h_{r+1}; the last loop gets one extra loop.
  nxt = states[2:] + [_extra_loop(model, e, states[-1], loops, positions, seg, rt)]
  out['fixed_point_gap'] = jnp.stack([
      msum(jnp.linalg.norm((states[r] - nxt[r - 1]).astype(jnp.float32), axis=-1))
      for r in range(1, R + 1)])

  oc = []
  for r in range(1, R + 1):
    if r == 1:
      oc.append(nan)
      continue
    d, m = offset_cost(states[r - 1], positions)
    oc.append(msum(d, (m & valid).astype(jnp.float32)))
  out['offset_cost'] = jnp.stack(oc)
  out['count_offset'] = jnp.sum(((positions > 0) & valid).astype(jnp.float32))

  out.update(_attention_and_gates(model, loops, vf))
  out.update(_logit_lens(model, states[1:], targets, lmask.astype(jnp.float32), rt))
  return out


def _extra_loop(model, e: Array, h_last: Array, loops, positions: Array, seg, rt) -> Array:
  """One loop more after the last (on the first loop's global keys/values for G-SWA)."""
  cfg = model.cfg
  if cfg.num_loops == 1:  # an extra loop of a 1-loop PLT model has no gate: the causal pass
    x_extra = model.loop_input(e, h_last, positions) if cfg.loop_mode == 'plt' else h_last
    return model.run_loop(x_extra, positions, seg, None, rt=rt).hidden
  global_kv = [(lo.k, lo.v) for lo in loops[0].layers] if cfg.plt_uses_gswa else None
  return model.run_loop(model.loop_input(e, h_last, positions), positions, seg, global_kv,
                        rt=rt).hidden


def _attention_and_gates(model, loops, vf: Array) -> dict[str, Array]:
  """Attention entropy and inter-loop KL (mean over layers and heads, summed over valid
  queries) per loop; the gates [R, L], NaN for loop 1 (and for models without gates)."""
  R, nan = model.cfg.num_loops, jnp.float32(jnp.nan)
  probs = [[_mixed_probs(lo) for lo in loop.layers] for loop in loops]  # [R][L] of [B,H,S,T]
  qmask = vf[:, None, :]
  n_lh = len(model.layers) * model.cfg.num_heads
  out = {}
  out['attn_entropy'] = jnp.stack([
      sum(jnp.sum(entropy(p) * qmask) for p in probs[r]) / n_lh for r in range(R)])
  out['attn_kl'] = jnp.stack([nan] + [
      sum(jnp.sum(kl_divergence(probs[r][j], probs[r - 1][j]) * qmask)
          for j in range(len(model.layers))) / n_lh for r in range(1, R)])
  out['gate'] = jnp.stack([
      jnp.stack([nan if lo.gate is None else jnp.sum(jnp.mean(lo.gate, axis=-1) * vf)
                 for lo in loop.layers])
      for loop in loops])
  return out


def _logit_lens(model, hidden: list[Array], targets: Array, lm: Array, rt) -> dict[str, Array]:
  """Each loop's hidden state read through the output head: entropy, KL to the loop before,
  the true token's rank, top-1 hits and NLL, summed over the loss-masked tokens `lm`."""
  nan = jnp.float32(jnp.nan)
  lens_logits = [model.head(h, rt) for h in hidden]
  logps = [jax.nn.log_softmax(lg, axis=-1) for lg in lens_logits]
  ps = [jnp.exp(lp) for lp in logps]
  ranks = [true_token_rank(lp, targets) for lp in logps]
  return {
      'lens_entropy': jnp.stack([jnp.sum(entropy(p) * lm) for p in ps]),
      'lens_kl': jnp.stack([nan] + [jnp.sum(kl_divergence(ps[r], ps[r - 1]) * lm)
                                    for r in range(1, len(ps))]),
      'lens_rank': jnp.stack([jnp.sum(rk.astype(jnp.float32) * lm) for rk in ranks]),
      'lens_top1': jnp.stack([jnp.sum((rk == 0).astype(jnp.float32) * lm) for rk in ranks]),
      'lens_nll': jnp.stack([jnp.sum(metrics_lib.next_token_nll(lg, targets, lm))
                             for lg in lens_logits]),
  }


_DENOM = {
    'step_size': 'count_tokens', 'alignment': 'count_tokens', 'effective_rank': 'count_rows',
    'fixed_point_gap': 'count_tokens', 'offset_cost': 'count_offset',
    'attn_entropy': 'count_tokens', 'attn_kl': 'count_tokens', 'gate': 'count_tokens',
    'lens_entropy': 'count_lens', 'lens_kl': 'count_lens', 'lens_rank': 'count_lens',
    'lens_top1': 'count_lens', 'lens_nll': 'count_lens',
}


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, rt):
  return jax.jit(lambda state, batch: loop_diagnostics(nnx.merge(graphdef, state), batch, rt))


def accumulate(model, batches: Iterable[dict], *, sharding=None) -> dict[str, np.ndarray]:
  """sharding: a `plt_jax.sharding.ShardingConfig` to run on a mesh (None: one device)."""
  graphdef, state = nnx.split(model)
  fn = _jitted(graphdef, Runtime.for_model(model.cfg, sharding=sharding))
  total = None
  for batch in batches:
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    sums = jax.device_get(fn(state, b))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError('diagnostics: no batches given')
  return total


def finalize(sums: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-loop means as plain lists (NaN where undefined) plus token counts."""
  out: dict[str, Any] = {}
  for k, denom in _DENOM.items():
    out[k] = (np.asarray(sums[k], np.float64) / max(float(sums[denom]), 1.0)).tolist()
  out['lens_perplexity'] = [math.exp(x) for x in out.pop('lens_nll')]
  out['tokens'] = int(sums['count_tokens'])
  return out


def diagnose(model, batches: Iterable[dict], *, sharding=None) -> dict[str, Any]:
  """All diagnostics for a model over held-out batches (dicts with inputs/positions/...)."""
  res = finalize(accumulate(model, batches, sharding=sharding))
  res['num_loops'] = model.cfg.num_loops
  res['loop_mode'] = model.cfg.loop_mode
  return res


# --- output ----------------------------------------------------------------------------------------
FAMILIES = {
    'dynamics': [('step_size', 'step size ||h_r - h_{r-1}||'),
                 ('alignment', 'update alignment cos'),
                 ('fixed_point_gap', 'fixed-point gap ||h_r - F(h_r)||'),
                 ('offset_cost', 'offset cost Omega(r)')],
    'representation': [('effective_rank', 'effective rank')],
    'attention': [('attn_entropy', 'attention entropy (nats)'),
                  ('attn_kl', 'KL(A_r || A_{r-1})')],
    'gates': [('gate', 'mean gate per layer')],
    'logit_lens': [('lens_kl', 'KL(p_r || p_{r-1})'), ('lens_entropy', 'entropy of p_r'),
                   ('lens_rank', 'mean rank of true token'), ('lens_perplexity', 'perplexity')],
}


def write_report(results: dict[str, Any], out_dir: str, title: str = '') -> list[str]:
  """Writes diagnostics.json and one PNG per family (loops on the x-axis). Returns the paths."""
  # A Figure, not pyplot: no global backend switch (a notebook's inline plots keep working).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  paths = [fileio.join(out_dir, 'diagnostics.json')]
  fileio.write_json(paths[0], results)
  R = results['num_loops']
  loops = np.arange(1, R + 1)
  for family, metrics in FAMILIES.items():
    fig = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
      vals = np.asarray(results[key], dtype=np.float64)
      if key == 'gate':
        for j in range(vals.shape[1]):
          ax.plot(loops, vals[:, j], marker='o', label=f'layer {j}')
        ax.axhline(0.5, color='gray', lw=0.8, ls='--')
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
      else:
        ax.plot(loops, vals, marker='o')
      if key == 'alignment':
        ax.axhline(0.0, color='gray', lw=0.8, ls='--')
      ax.set_title(label, fontsize=10)
      ax.set_xlabel('loop r')
      ax.set_xticks(loops)
      ax.grid(alpha=0.3)
    fig.suptitle(f'{title} {family}'.strip())
    fig.tight_layout()
    paths.append(fileio.write_figure(fileio.join(out_dir, f'diagnostics_{family}.png'), fig,
                                     dpi=110))
  return paths


def format_table(results: dict[str, Any]) -> str:
  """A per-loop text table for the terminal."""
  keys = ['step_size', 'alignment', 'effective_rank', 'fixed_point_gap', 'offset_cost',
          'attn_entropy', 'attn_kl', 'lens_kl', 'lens_entropy', 'lens_rank', 'lens_perplexity']
  R = results['num_loops']
  head = f"{'metric':<18}" + ''.join(f'{"loop " + str(r):>12}' for r in range(1, R + 1))
  lines = [head, '-' * len(head)]
  for k in keys:
    lines.append(f'{k:<18}' + ''.join(f'{v:>12.4g}' for v in results[k]))
  gates = np.asarray(results['gate'])
  lines.append(f"{'mean gate':<18}" + ''.join(f'{np.nanmean(g) if np.isfinite(g).any() else float("nan"):>12.4g}' for g in gates))
  return '\n'.join(lines)


def diagnose_workdir(workdir: str, *, step: Optional[int] = None, max_batches: int = 0,
                     batch_size: int = 0, out_dir: str = '') -> tuple[dict[str, Any], list[str]]:
  """Loads a training run's checkpoint and held-out (validation) data, diagnoses, writes a report.

  The validation batches are those the run evaluates on (same tokenizer, packing and split).
  Returns (results, written paths). Default out_dir: <workdir>/diagnostics.
  """
  model, config, _ = ckpt_lib.load_for_inference(workdir, step=step)
  bsz = batch_size or min(int(config.train.batch_size), 8)
  bundle = data_lib.build_data(config.data, seq_len=int(config.train.seq_len), batch_size=bsz,
                               seed=int(config.seed), workdir=workdir)
  batches = bundle.val_batches
  if max_batches:
    batches = batches[:max_batches]
  if not batches:
    raise ValueError(f'{workdir}: the validation split produced no batches to diagnose')
  results = diagnose(model, batches)
  out_dir = out_dir or fileio.join(workdir, 'diagnostics')
  title = f"R={model.cfg.num_loops} {model.cfg.loop_mode}"
  return results, write_report(results, out_dir, title=title)
