"""Experiment-config presets: the ml_collections ConfigDicts that training and the sweep read.

  get_config(preset='default', *, num_loops=2)   one pretraining run
  r1(preset=None) .. r4(preset=None)             the same with num_loops = 1 .. 4
  sweep_config(preset='default')                 the loop-count sweep (experiments.sweep)

Presets: 'default' (trains on a 2-core CPU in about ten minutes), '125m', '1b', '7b' (the
LoopCoder-V2 release shape). The model shapes come from `plt_jax.config.PRESETS`; this module adds
the training, data, mesh, checkpoint and eval settings around them.

The files in the repository's `configs/` call these functions, so any field can be overridden on
the command line, e.g. `--config=configs/r2.py:125m --config.model.num_loops=4
--config.train.steps=1000`. From Python, override the returned ConfigDict:

  from plt_jax import presets
  config = presets.get_config('125m', num_loops=2)
  config.train.steps = 1000

Sections: model (plt_jax.config.ModelConfig), data (plt_jax.data), train, optimizer
(plt_jax.train.optimizer), mesh, checkpoint, eval; the sweep config adds sweep.

The sweep trains R = 1, 2, 3, 4 and the vanilla looped baseline at R = 2 (variants rR, vanillaR
and the deep non-looped deepR: R*L layers, one loop) with identical data and shared-layer size,
then evaluates, diagnoses and decode-benchmarks each. sweep.budget: 'steps' (every variant the
same steps) or 'flops' (the training FLOPs of r1, or of the first variant); sweep.seeds: every
variant once per seed (the same seed: the same init and data order), reported as mean +- std.
Its presets: 'default' (this 2-core CPU: 38.4 minutes measured, quiet machine), '125m', '1b'
(accelerators), and the synthetic-task study 'phop' (SWEEP_TASKS: r1, deep2, vanilla2, r2..r4 x 3
seeds on one-hop induction with a one-layer block). Override e.g. --config.sweep.variants=r1,r2
--config.train.steps=500.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from plt_jax.config import ModelConfig, PRESETS
from plt_jax.data import default_data_config
from plt_jax.train.optimizer import default_optimizer_config

# Per-preset training settings. 'default' is sized for the 2-core CPU; the others are
# starting points for accelerators (global batch in rows of seq_len tokens).
TRAIN_PRESETS = {
    'default': dict(steps=200, batch_size=16, seq_len=128, eval_every=40, ckpt_every=50,
                    peak_lr=3e-3),
    '125m': dict(steps=20_000, batch_size=256, seq_len=2048, eval_every=1000, ckpt_every=1000,
                 peak_lr=6e-4),
    '1b': dict(steps=50_000, batch_size=512, seq_len=4096, eval_every=2000, ckpt_every=1000,
               peak_lr=4e-4),
    '7b': dict(steps=100_000, batch_size=1024, seq_len=4096, eval_every=2000, ckpt_every=500,
               peak_lr=4e-4),
}

# The sweep's changes to TRAIN_PRESETS (presets not listed train as a single run would).
SWEEP_TRAIN = {
    # Smaller than a single default run so that all five variants fit in ~45 CPU minutes (150
    # steps took an estimated 45-50 on a quiet machine; 120 took 38.4 measured).
    'default': dict(steps=120, batch_size=16, seq_len=256, eval_every=40, ckpt_every=40),
}


# Synthetic-task sweeps, `configs/sweep.py:<task>`: the 'default' sweep config with the task as the
# data, a smaller block of shared layers and a budget that fits the whole study (r1, deep2,
# vanilla2 and PLT r2..r4, three seeds each) in an hour of a 2-core CPU.
SWEEP_TASKS = {
    # p-hop induction with one hop: the answer is the symbol after the last earlier occurrence of
    # the final symbol. That needs two attention layers in sequence (one that copies each
    # position's predecessor into it, one that matches the final symbol against those copies), so
    # with a block of one layer r1 cannot solve it and every two-pass variant can. Chosen by
    # measurement, 1 seed each: with L=1 at length 16 / alphabet 8 neither r1 nor deep2 got
    # past 31-33% exact match in 1500 steps (chance 12.5%); at length 8 / alphabet 4 (chance 25%)
    # deep2's held-out loss fell from 0.39 to 0.003 between steps 375 and 750 while r1 stayed at
    # 0.47, so 1000 steps leave room for a late transition. lr 1e-3 trained both better than 3e-3.
    # The whole preset then measured (3 seeds, 30.5 min): r1 0.565 +- 0.043 exact match, deep2
    # 1.000 +- 0.000, i.e. 10.1 seed stds apart (see the README).
    'phop': dict(
        task='phop', task_params=dict(hops=1, length=8, alphabet=4), num_layers=1,
        train=dict(steps=1000, batch_size=16, seq_len=128), eval_every=250, ckpt_every=500,
        peak_lr=1e-3, variants='r1,deep2,vanilla2,r2,r3,r4', seeds=(0, 1, 2)),
    # Two hops need more sequential attention than one: the calibrated study of how many loops.
    # Chosen by measurement (seed 0, 1000 steps, the 'phop' block and optimizer): at hops=2,
    # length 10, alphabet 4 (chance 25%), r1 0.570, r2 0.758, r3 0.902 exact match, so the curve
    # over r1..r4 is neither flat nor saturated. Measured on 3 seeds: docs/results/loop_study.md. r4+ll (equal per-loop loss weights) is the same
    # model trained so that every loop's readout predicts, for the adaptive-exit comparison;
    # vanilla4 is the sequential baseline at the same loop count.
    'phop2': dict(
        task='phop', task_params=dict(hops=2, length=10, alphabet=4), num_layers=1,
        train=dict(steps=1000, batch_size=16, seq_len=128), eval_every=250, ckpt_every=500,
        peak_lr=1e-3, variants='r1,r2,r3,r4,r4+ll,vanilla4', seeds=(0, 1, 2)),
}


def model_config(preset: str, num_loops: int) -> ml_collections.ConfigDict:
  """The model section of `preset` with `num_loops` loops, validated by ModelConfig."""
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {sorted(PRESETS)}')
  fields = ModelConfig().to_dict()
  fields.update(PRESETS[preset])
  fields['num_loops'] = num_loops
  if preset != 'default':
    fields.update(dtype='bfloat16', remat='dots_no_batch', attention_impl='auto')
  ModelConfig.from_dict(fields)  # validate early
  return ml_collections.ConfigDict(fields)


def get_config(preset: Optional[str] = 'default', *,
               num_loops: int = 2) -> ml_collections.ConfigDict:
  """The full pretraining config of `preset` (None means 'default')."""
  preset = preset or 'default'
  if preset not in TRAIN_PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}')
  p = TRAIN_PRESETS[preset]
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  cfg.seed = 0
  cfg.model = model_config(preset, num_loops)

  cfg.data = default_data_config()
  if preset == 'default':
    cfg.data.vocab_size = 2048   # BPE on the stdlib; a small vocabulary learns fastest on a CPU
  else:
    # Real runs bring their corpus (--config.data.source=jsonl --config.data.paths=...) and
    # usually a tokenizer (--config.data.tokenizer=hf --config.data.tokenizer_path=...).
    cfg.data.max_chars = 0
    cfg.data.vocab_size = cfg.model.vocab_size
    cfg.data.val_batches = 16

  cfg.train = ml_collections.ConfigDict(dict(
      steps=p['steps'],
      batch_size=p['batch_size'],          # global rows per optimizer step
      seq_len=p['seq_len'],
      grad_accum=1,                        # microbatches per step (same math as one batch)
      # Per-loop loss: one weight per loop (loop 1 first), normalised to sum 1; the loss is then
      # sum_r w_r * CE(Head(Norm_f(h_r))). () = the last loop only, the paper's recipe.
      loop_loss_weights=(),
      # model.vocab_size := the tokenizer's size rounded up to vocab_multiple.
      vocab_from_tokenizer=True,
      vocab_multiple=128,
      stop_at_step=-1,                     # stop early (and checkpoint) at this step; -1 = steps
      peak_tflops_per_device=0.0,          # for MFU; 0 = look the device up
      progress=True,                       # the progress bar
  ))

  cfg.optimizer = default_optimizer_config()
  cfg.optimizer.peak_lr = p['peak_lr']

  # Mesh axes; one may be -1 (fills the remaining devices). The batch splits over data x fsdp.
  cfg.mesh = ml_collections.ConfigDict(dict(
      data=-1 if preset == 'default' else 1,
      fsdp=1 if preset == 'default' else -1,
      tensor=1,
      num_devices=-1))                     # use only the first n devices (single process)

  cfg.checkpoint = ml_collections.ConfigDict(dict(
      every=p['ckpt_every'], max_to_keep=3, async_save=True))

  cfg.eval = ml_collections.ConfigDict(dict(
      every=p['eval_every'],               # steps (0: never); batches: data.val_batches
      at_start=True))                      # evaluate at step 0 (the starting loss)
  return cfg


def r1(preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config(preset, num_loops=1)`: R=1 is a standard Llama."""
  return get_config(preset, num_loops=1)


def r2(preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config(preset, num_loops=2)`."""
  return get_config(preset, num_loops=2)


def r3(preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config(preset, num_loops=3)`."""
  return get_config(preset, num_loops=3)


def r4(preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config(preset, num_loops=4)`."""
  return get_config(preset, num_loops=4)


def sweep_config(preset: Optional[str] = 'default') -> ml_collections.ConfigDict:
  """The sweep's config: `get_config(preset, num_loops=2)`, SWEEP_TRAIN and a sweep section.

  A name of SWEEP_TASKS ('phop') gives the 'default' shape trained on that synthetic task.
  """
  preset = preset or 'default'
  task = SWEEP_TASKS.get(preset)
  if task is None and preset not in TRAIN_PRESETS:
    raise ValueError(f'unknown sweep preset {preset!r}; choose one of '
                     f'{sorted(TRAIN_PRESETS) + sorted(SWEEP_TASKS)}')
  cfg = get_config('default' if task else preset, num_loops=2)
  for k, v in SWEEP_TRAIN.get(preset, {}).items():
    if k == 'eval_every':
      cfg.eval.every = v
    elif k == 'ckpt_every':
      cfg.checkpoint.every = v
    else:
      cfg.train[k] = v
  cfg.sweep = ml_collections.ConfigDict(dict(
      # rN = PLT with N loops, vanillaN = sequential baseline, deepN = R=1 with N x the layers
      variants='r1,r2,r3,r4,vanilla2',
      # 'steps': every variant trains train.steps steps (equal tokens); 'flops': every variant
      # gets the training FLOPs of the reference (r1 if listed, else the first variant) at
      # train.steps, so an N-loop model sees about 1/N of the reference's tokens.
      budget='steps',
      seeds=(),                         # () = (seed,); each variant trains once per seed
      diagnose_batches=4,               # held-out batches for the diagnostics
      decode_prompt_len=64,             # decode latency: prompt tokens, then
      decode_steps=48,                  # timed single-token steps at batch 1
  ))
  if task:
    cfg.preset = preset
    cfg.data.source = 'synthetic'
    cfg.data.task = task['task']
    cfg.data.task_params.update(task['task_params'])
    cfg.model.num_layers = task['num_layers']
    cfg.train.update(task['train'])
    cfg.eval.every = task['eval_every']
    cfg.checkpoint.every = task['ckpt_every']
    cfg.optimizer.peak_lr = task['peak_lr']
    cfg.sweep.update(variants=task['variants'], seeds=task['seeds'], diagnose_batches=2,
                     decode_steps=16)
  return cfg
