"""Loading a model for inference: from a training work dir or a Hugging Face export directory.

  loaded = load_model(path)                  # the kind of directory is recognised
  loaded = load_model(path, source='workdir', step=400, dtype='bfloat16')
  loaded.model, loaded.tokenizer, loaded.config, loaded.info

Both may be local or a gs:// URL. A work dir is what training writes (`plt_jax.train.checkpoint`: config.json, checkpoints/, tokenizer/);
an HF export is what `plt_jax.hf.export_model` writes (config.json, safetensors, tokenizer.json).
`random_model` gives random weights of a preset with the byte tokenizer, for smoke tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from flax import nnx

from plt_jax import fileio
from plt_jax import tokenizer as tok_lib
from plt_jax.hf import importer, load_hf_checkpoint
from plt_jax.model import PLT, param_count
from plt_jax.presets import PRESETS
from plt_jax.train import checkpoint as ckpt_lib

SOURCES = ('workdir', 'hf')


@dataclasses.dataclass
class LoadedModel:
  """model: a PLT. tokenizer: None for an HF export without tokenizer.json (and no override).
  config: the run's experiment ConfigDict (work dirs only, else None). info: identifies the
  weights (source, path, step) and describes the model (params, num_loops, dtype, ...)."""
  model: Any
  tokenizer: Any
  config: Any
  info: dict


def complete_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps, as Orbax decides: locally an unfinished step still has its
  temporary name, in object storage it lacks its commit marker."""
  d = fileio.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if not fileio.isdir(d):
    return []
  reader = ckpt_lib.Checkpointer(d, read_only=True)
  try:
    return reader.all_steps()
  finally:
    reader.close()


def detect_source(path: str) -> str:
  """'workdir' or 'hf' for the directory at `path`; a one-line error naming it otherwise."""
  if not fileio.isdir(path):
    raise FileNotFoundError(f'{path!r} is not a directory (expected a training work dir or a '
                            'Hugging Face export)')
  if fileio.isdir(fileio.join(path, ckpt_lib.CHECKPOINT_DIR)):
    return 'workdir'
  if any(fileio.isfile(fileio.join(path, f)) for f in (importer.SINGLE_FILE,
                                                        importer.INDEX_FILE)):
    return 'hf'
  raise ValueError(f'{path!r} is neither a training work dir (no {ckpt_lib.CHECKPOINT_DIR}/) nor '
                   f'a Hugging Face export (no {importer.SINGLE_FILE} or {importer.INDEX_FILE})')


def load_model(path: str, *, source: Optional[str] = None, step: Optional[int] = None,
               dtype: Optional[str] = None, tokenizer_path: Optional[str] = None,
               mesh=None) -> LoadedModel:
  """The model (and its tokenizer, config) saved at `path`, ready for inference.

  source: 'workdir' | 'hf' | None (recognised from the directory's contents).
  step: a work dir's checkpoint step (default: the latest complete one); HF exports have one.
  dtype: compute dtype (default: the run's for a work dir, float32 for an HF export).
  tokenizer_path: a tokenizer.json or its folder, replacing the one that comes with the model.
  mesh: parameters are sharded on it (None: the first device).
  """
  path = fileio.abspath(path)
  fileio.check_access(path, 'model path')
  source = source or detect_source(path)
  config = None
  if source == 'hf':
    model, tokenizer = load_hf_checkpoint(path, mesh=mesh, dtype=dtype or 'float32')
    step = None
  elif source == 'workdir':
    if step is None:  # resolved here: `info` records which step was loaded
      steps = complete_steps(path)
      if not steps:
        raise FileNotFoundError(f'no complete checkpoint in {path}')
      step = steps[-1]
    model, config, tokenizer = ckpt_lib.load_for_inference(path, step=step, mesh=mesh)
    if dtype and dtype != model.cfg.dtype:
      model = with_dtype(model, dtype)
    step = int(step)
  else:
    raise ValueError(f'source={source!r}: must be one of {SOURCES} or None')
  if tokenizer_path is not None:
    tokenizer = tok_lib.Tokenizer.from_pretrained(tokenizer_path)
  c = model.cfg
  info = dict(source=source, path=path, step=step, params=int(param_count(model)),
              num_loops=c.num_loops, loop_mode=c.loop_mode, dtype=c.dtype,
              vocab_size=c.vocab_size, max_seq_len=c.max_seq_len)
  return LoadedModel(model, tokenizer, config, info)


def with_dtype(model, dtype: str):
  """The same weights in a model whose compute dtype is `dtype`."""
  cfg = model.cfg.replace(dtype=dtype)
  target = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  graphdef, _ = nnx.split(target)
  _, state = nnx.split(model)
  return nnx.merge(graphdef, state)


def random_model(preset: str, seed: int = 0):
  """(model, tokenizer): random float32 weights of the model shape of a `plt_jax.presets.PRESETS`
  entry and the byte tokenizer, which exercise the whole inference path without a checkpoint."""
  if preset not in PRESETS:
    raise ValueError(f'--random_init: unknown preset {preset!r}; choose from {sorted(PRESETS)}')
  tokenizer = tok_lib.Tokenizer(tok_lib.make_byte_tokenizer(), bos_token=tok_lib.BOS,
                                eos_token=tok_lib.EOS, pad_token=tok_lib.PAD)
  cfg = PRESETS[preset].model.replace(vocab_size=tokenizer.vocab_size, dtype='float32',
                                      remat='none')
  return PLT(cfg, nnx.Rngs(seed)), tokenizer
