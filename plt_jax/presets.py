"""Experiment presets: one table of typed sections, and the ConfigDicts built from it.

  PRESETS[name]                           a `Preset`: model, train, optimizer, data, mesh, eval,
                                          checkpoint and (for study presets) sweep sections
  get_config(name='default', *, num_loops=2)   one pretraining run of a preset
  sweep_config(name='sweep')                   the loop-count sweep of a preset

The files in the repository's `configs/` call these: `configs/r1.py` .. `configs/r4.py` choose the
loop count and `configs/sweep.py` the sweep, each taking the preset name after a colon
(`--config=configs/r2.py:125m`, `--config=configs/sweep.py:phop2`). Every field can then be
overridden on the command line, e.g. `--config.train.steps=1000 --config.model.window_size=129`.

Each section's fields carry the names of the ConfigDict keys they set, so a preset reads as the
config it produces. Sections whose fields default to None leave the library's default in place
(`plt_jax.data.default_data_config`, `plt_jax.train.optimizer.default_optimizer_config`).

The presets:
  default           trains on a 2-core CPU in a few minutes (BPE on the Python stdlib)
  125m, 1b, 7b      starting points for accelerators; 7b is the LoopCoder-V2 release shape. They
                    compute in bfloat16 with rematerialisation, as their model sections state.
  sweep             the CPU loop-count sweep: the default model, shorter runs at seq_len 256
  phop, phop2       the synthetic-task loop studies (p-hop induction, a one-layer block)

A preset without a sweep section sweeps with `SweepSection()`'s defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections

from plt_jax.config import ModelConfig
from plt_jax.data import default_data_config
from plt_jax.train.optimizer import default_optimizer_config


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int
  batch_size: int           # global rows per optimizer step
  seq_len: int


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
  peak_lr: float


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Changes to `plt_jax.data.default_data_config()`; None keeps its value."""
  source: Optional[str] = None
  vocab_size: Optional[int] = None
  max_chars: Optional[int] = None
  val_batches: Optional[int] = None
  task: Optional[str] = None
  task_params: Optional[dict[str, int]] = None


@dataclasses.dataclass(frozen=True)
class MeshSection:
  """Mesh axes; one may be -1 (fills the remaining devices). The batch splits over data x fsdp."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  num_devices: int = -1      # use only the first n devices (single process)


@dataclasses.dataclass(frozen=True)
class EvalSection:
  every: int                 # steps (0: never); batches: data.val_batches
  at_start: bool = True      # evaluate at step 0 (the starting loss)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int
  max_to_keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class SweepSection:
  # rN = PLT with N loops, vanillaN = sequential baseline, deepN = R=1 with N x the layers;
  # a '+ll' suffix trains with equal per-loop loss weights.
  variants: str = 'r1,r2,r3,r4,vanilla2'
  # 'steps': every variant trains train.steps steps (equal tokens); 'flops': every variant gets
  # the training FLOPs of the reference (r1 if listed, else the first variant) at train.steps, so
  # an N-loop model sees about 1/N of the reference's tokens.
  budget: str = 'steps'
  seeds: tuple[int, ...] = ()   # () = (seed,); each variant trains once per seed
  diagnose_batches: int = 4     # held-out batches for the diagnostics
  decode_prompt_len: int = 64   # decode latency: prompt tokens, then
  decode_steps: int = 48        # timed single-token steps at batch 1


@dataclasses.dataclass(frozen=True)
class Preset:
  model: ModelConfig         # num_loops is the caller's (configs/rN.py)
  train: TrainSection
  optimizer: OptimizerSection
  eval: EvalSection
  checkpoint: CheckpointSection
  data: DataSection = DataSection()
  mesh: MeshSection = MeshSection()
  sweep: Optional[SweepSection] = None


# The model shape that trains on a 2-core CPU in minutes; its vocabulary comes from the tokenizer.
_CPU_MODEL = ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=384,
                         max_seq_len=2048, window_size=65)
# Accelerator presets compute in bfloat16 and rematerialise all but the batched matmuls.
_ACCELERATOR = dict(dtype='bfloat16', remat='dots_no_batch', attention_impl='auto')
# A real run brings its corpus (--config.data.source=jsonl --config.data.paths=...) and usually
# its tokenizer (--config.data.tokenizer=hf --config.data.tokenizer_path=...).
_ACCELERATOR_MESH = MeshSection(data=1, fsdp=-1)
# The CPU presets learn fastest with a small BPE vocabulary on the stdlib.
_CPU_DATA = DataSection(vocab_size=2048)


def _accelerator_data(model: ModelConfig) -> DataSection:
  return DataSection(max_chars=0, vocab_size=model.vocab_size, val_batches=16)


_125M = ModelConfig(vocab_size=32768, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                    ffn_dim=2048, max_seq_len=4096, window_size=65, **_ACCELERATOR)
_1B = ModelConfig(vocab_size=76800, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                  ffn_dim=5632, max_seq_len=8192, window_size=65, **_ACCELERATOR)
# The LoopCoder-V2 release shape (about 7.62B parameters).
_7B = ModelConfig(vocab_size=76800, d_model=5120, num_layers=14, num_heads=40, num_kv_heads=8,
                  ffn_dim=27648, max_seq_len=131072, window_size=65, rope_theta=500_000.0,
                  emb_scale=0.707, hidden_scale=0.053, gate_mode='hidden',
                  normalize_per_loop=True, **_ACCELERATOR)

# The synthetic-task studies share the CPU model with a block of one layer, and their optimizer.
_TASK_MODEL = _CPU_MODEL.replace(num_layers=1)
_TASK_TRAIN = TrainSection(steps=1000, batch_size=16, seq_len=128)
_TASK_SWEEP = dict(seeds=(0, 1, 2), diagnose_batches=2, decode_steps=16)

PRESETS: dict[str, Preset] = {
    'default': Preset(
        model=_CPU_MODEL, train=TrainSection(steps=200, batch_size=16, seq_len=128),
        optimizer=OptimizerSection(peak_lr=3e-3), eval=EvalSection(every=40),
        checkpoint=CheckpointSection(every=50), data=_CPU_DATA),
    '125m': Preset(
        model=_125M, train=TrainSection(steps=20_000, batch_size=256, seq_len=2048),
        optimizer=OptimizerSection(peak_lr=6e-4), eval=EvalSection(every=1000),
        checkpoint=CheckpointSection(every=1000), data=_accelerator_data(_125M),
        mesh=_ACCELERATOR_MESH),
    '1b': Preset(
        model=_1B, train=TrainSection(steps=50_000, batch_size=512, seq_len=4096),
        optimizer=OptimizerSection(peak_lr=4e-4), eval=EvalSection(every=2000),
        checkpoint=CheckpointSection(every=1000), data=_accelerator_data(_1B),
        mesh=_ACCELERATOR_MESH),
    '7b': Preset(
        model=_7B, train=TrainSection(steps=100_000, batch_size=1024, seq_len=4096),
        optimizer=OptimizerSection(peak_lr=4e-4), eval=EvalSection(every=2000),
        checkpoint=CheckpointSection(every=500), data=_accelerator_data(_7B),
        mesh=_ACCELERATOR_MESH),
    # The five text variants within a CPU hour: shorter runs than 'default', at seq_len 256
    # (its measured time is in docs/results/loop_study.md).
    'sweep': Preset(
        model=_CPU_MODEL, train=TrainSection(steps=120, batch_size=16, seq_len=256),
        optimizer=OptimizerSection(peak_lr=3e-3), eval=EvalSection(every=40),
        checkpoint=CheckpointSection(every=40), data=_CPU_DATA, sweep=SweepSection()),
    # p-hop induction with one hop: the answer is the symbol after the last earlier occurrence of
    # the final symbol. That takes two attention layers in sequence (one copies each position's
    # predecessor into it, one matches the final symbol against those copies), so with a block of
    # one layer r1 cannot solve it and every two-pass variant can. Length 8 and alphabet 4 were
    # chosen by measurement (length 16 / alphabet 8 left r1 and deep2 near chance after 1500
    # steps), as were lr 1e-3 and 1000 steps; docs/results/loop_study.md gives the search.
    'phop': Preset(
        model=_TASK_MODEL, train=_TASK_TRAIN, optimizer=OptimizerSection(peak_lr=1e-3),
        eval=EvalSection(every=250), checkpoint=CheckpointSection(every=500),
        data=DataSection(source='synthetic', vocab_size=2048, task='phop',
                         task_params=dict(hops=1, length=8, alphabet=4)),
        sweep=SweepSection(variants='r1,deep2,vanilla2,r2,r3,r4', **_TASK_SWEEP)),
    # Two hops need more sequential attention than one: the calibrated study of how many loops.
    # Hops 2, length 10, alphabet 4 were chosen by measurement so that the accuracy curve over
    # r1..r4 is neither flat nor saturated (docs/results/loop_study.md). r4+ll is R=4 trained so
    # that every loop's readout predicts, for adaptive exit; vanilla4 is the sequential baseline.
    'phop2': Preset(
        model=_TASK_MODEL, train=_TASK_TRAIN, optimizer=OptimizerSection(peak_lr=1e-3),
        eval=EvalSection(every=250), checkpoint=CheckpointSection(every=500),
        data=DataSection(source='synthetic', vocab_size=2048, task='phop',
                         task_params=dict(hops=2, length=10, alphabet=4)),
        sweep=SweepSection(variants='r1,r2,r3,r4,r4+ll,vanilla4', **_TASK_SWEEP)),
}


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; choose one of {sorted(PRESETS)}')
  return PRESETS[name]


def _section(section) -> dict[str, Any]:
  return {k: v for k, v in dataclasses.asdict(section).items() if v is not None}


def get_config(name: Optional[str] = 'default', *,
               num_loops: int = 2) -> ml_collections.ConfigDict:
  """The pretraining config of preset `name` (None: 'default') with `num_loops` loops."""
  name = name or 'default'
  preset = _preset(name)
  cfg = ml_collections.ConfigDict()
  cfg.preset = name
  cfg.seed = 0
  cfg.model = ml_collections.ConfigDict(preset.model.replace(num_loops=num_loops).to_dict())

  cfg.data = default_data_config()
  data = _section(preset.data)
  cfg.data.task_params.update(data.pop('task_params', {}))
  cfg.data.update(data)

  cfg.train = ml_collections.ConfigDict(dict(
      **dataclasses.asdict(preset.train),
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
  cfg.optimizer.update(_section(preset.optimizer))
  cfg.mesh = ml_collections.ConfigDict(dataclasses.asdict(preset.mesh))
  cfg.checkpoint = ml_collections.ConfigDict(dataclasses.asdict(preset.checkpoint))
  cfg.eval = ml_collections.ConfigDict(dataclasses.asdict(preset.eval))
  return cfg


def sweep_config(name: Optional[str] = 'sweep') -> ml_collections.ConfigDict:
  """The loop-count sweep of preset `name` (None: 'sweep'): its run config and sweep section."""
  name = name or 'sweep'
  cfg = get_config(name, num_loops=2)
  sweep = PRESETS[name].sweep or SweepSection()  # get_config checked the name
  cfg.sweep = ml_collections.ConfigDict(dataclasses.asdict(sweep))
  return cfg
