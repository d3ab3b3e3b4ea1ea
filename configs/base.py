"""Shared experiment config. `configs/r{1,2,3,4}.py` differ only in `model.num_loops`.

`get_config(arg)` takes a preset name: 'default' (trains on a 2-core CPU in about ten minutes),
'125m', '1b', '7b' (the LoopCoder-V2 release shape). Any field can be overridden on the command
line, e.g. `--config=configs/r2.py:125m --config.model.num_loops=4 --config.train.steps=1000`.

Sections: model (plt_jax.config.ModelConfig), data (plt_jax.data), train, optimizer
(plt_jax.optimizer), mesh, checkpoint, eval.
"""
from __future__ import annotations

import ml_collections

from plt_jax.config import ModelConfig, PRESETS
from plt_jax.data import default_data_config
from plt_jax.optimizer import default_optimizer_config

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


def model_config(preset: str, num_loops: int) -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {sorted(PRESETS)}')
  fields = ModelConfig().to_dict()
  fields.update(PRESETS[preset])
  fields['num_loops'] = num_loops
  if preset != 'default':
    fields.update(dtype='bfloat16', remat='dots_no_batch', attention_impl='auto')
  ModelConfig.from_dict(fields)  # validate early
  return ml_collections.ConfigDict(fields)


def get_config(arg: str | None = None, *, num_loops: int) -> ml_collections.ConfigDict:
  preset = arg or 'default'
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
