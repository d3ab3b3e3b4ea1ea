"""Model FLOPs per token of a (parallel) looped transformer, and MFU.

Every loop runs the whole layer stack, so the dense part is counted R times. Attention is
counted by the keys each query actually visits (4 * H * E FLOPs per query-key pair: q.k and
p.v), with the causal half taken into account:
  * global causal attention (loop 1, every loop of the vanilla baseline, and the K1/V1 branch
    of each G-SWA loop): (T + 1) / 2 keys on average over a row of T tokens;
  * the G-SWA window branch of loops r >= 2: mean_i min(i + 1, W) keys, about W when T >> W.
The gate is counted for loops r >= 2, the LM head once per readout: the last loop's logits, plus
one per earlier loop that the per-loop loss (train.loop_loss_weights) weighs.
Training is 3x the forward pass (backward = 2x forward); rematerialisation is not counted
(these are model FLOPs, as MFU conventionally uses). Packed documents would attend to fewer
keys; we count full rows, the usual convention.
"""
from __future__ import annotations

from typing import Optional

import jax

from plt_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against `device_kind`.
PEAK_FLOPS = (
    ('h200', 989e12), ('h100 pcie', 756e12), ('h100', 989e12), ('a100', 312e12),
    ('l40s', 362e12), ('l4', 121e12), ('a10', 125e12), ('v100', 125e12), ('t4', 65e12),
    ('tpu v6', 918e12), ('tpu v5 lite', 197e12), ('tpu v5e', 197e12), ('tpu v5p', 459e12),
    ('tpu v5', 459e12), ('tpu v4', 275e12), ('tpu v3', 123e12), ('tpu v2', 45e12),
)


def mean_window_keys(seq_len: int, window: int) -> float:
  """mean over i in [0, T) of min(i + 1, W): keys a windowed causal query visits."""
  t, w = seq_len, min(window, seq_len)
  return (w * (w + 1) / 2 + (t - w) * w) / t


def flops_per_token(cfg: ModelConfig, seq_len: int,
                    loop_weights: Optional[tuple] = None) -> dict[str, float]:
  """Forward and training FLOPs per token, broken down by part. loop_weights: the per-loop loss
  weights (loop 1 first), whose non-zero entries before the last loop add a readout each."""
  d, h, k, e, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
  r, n_layers = cfg.num_loops, cfg.num_layers
  dense_layer = 2 * d * h * e + 2 * 2 * d * k * e + 2 * h * e * d + 2 * 3 * d * f
  per_pair = 4 * h * e
  causal_keys = (seq_len + 1) / 2
  gated = cfg.plt_uses_gswa
  gate_layer = (2 * d * h if cfg.gate_mode == 'hidden' else 2 * h * e) if gated else 0
  out = dict(
      dense=float(n_layers * dense_layer * r),
      attention_global=float(n_layers * per_pair * causal_keys * r),
      attention_window=float(n_layers * per_pair * mean_window_keys(seq_len, cfg.window_size)
                             * (r - 1) if gated else 0.0),
      gate=float(n_layers * gate_layer * (r - 1)),
      head=float(2 * d * cfg.vocab_size * (1 + sum(1 for w in (loop_weights or ())[:-1] if w))),
  )
  out['forward'] = sum(out.values())
  out['train'] = 3.0 * out['forward']
  return out


def peak_flops_per_device(device: Optional[jax.Device] = None) -> Optional[float]:
  """Datasheet bf16 peak of `device` (default: the first device), None when unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '').lower()
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def throughput(tokens_per_second: float, flops_per_token_train: float, num_devices: int,
               peak_per_device: Optional[float]) -> dict[str, Optional[float]]:
  """TFLOP/s per device and MFU (None when the peak is unknown)."""
  achieved = tokens_per_second * flops_per_token_train / max(1, num_devices)
  return dict(tflops_per_device=achieved / 1e12,
              mfu=(achieved / peak_per_device) if peak_per_device else None)


def steps_for_budget(cfg: ModelConfig, ref_cfg: ModelConfig, seq_len: int, steps: int) -> int:
  """Steps that give `cfg` the training FLOPs of `ref_cfg` trained for `steps`.

  Both use the same batch and sequence length, so the batch cancels:
  round(steps * train_flops_per_token(ref) / train_flops_per_token(cfg)), at least 1.
  """
  ratio = (flops_per_token(ref_cfg, seq_len)['train'] / flops_per_token(cfg, seq_len)['train'])
  return max(1, int(round(steps * ratio)))
