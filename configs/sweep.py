"""The loop-count sweep: python -m experiments.sweep --config=configs/sweep.py[:PRESET].

Trains R = 1, 2, 3, 4 and the vanilla looped baseline at R = 2 with identical data, seed, token
budget and shared-layer size, then evaluates, diagnoses and decode-benchmarks each.
Presets: 'default' (this 2-core CPU: 38.4 minutes measured, quiet machine), '125m', '1b'
(accelerators).
Override e.g. --config.sweep.variants=r1,r2 --config.train.steps=500.
"""
import ml_collections

from configs import base

SWEEP_TRAIN = {
    # Smaller than a single default run so that all five variants fit in ~45 CPU minutes (150
    # steps took an estimated 45-50 on a quiet machine; 120 took 38.4 measured).
    'default': dict(steps=120, batch_size=16, seq_len=256, eval_every=40, ckpt_every=40),
}


def get_config(arg=None):
  preset = arg or 'default'
  cfg = base.get_config(preset, num_loops=2)
  for k, v in SWEEP_TRAIN.get(preset, {}).items():
    if k == 'eval_every':
      cfg.eval.every = v
    elif k == 'ckpt_every':
      cfg.checkpoint.every = v
    else:
      cfg.train[k] = v
  cfg.sweep = ml_collections.ConfigDict(dict(
      variants='r1,r2,r3,r4,vanilla2',  # rN = PLT with N loops, vanillaN = sequential baseline
      diagnose_batches=4,               # held-out batches for the diagnostics
      decode_prompt_len=64,             # decode latency: prompt tokens, then
      decode_steps=48,                  # timed single-token steps at batch 1
  ))
  return cfg
