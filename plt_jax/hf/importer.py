"""Hugging Face directory -> plt_jax model (optionally sharded), for training or JAX generation.

Reads config.json (ours, the LoopCoder-V2 release's, or a plain Llama's) and model.safetensors or a
sharded model-*.safetensors + index. Tensors are read one at a time and placed straight onto their
shards, so host memory holds one tensor at a time, not the model. Parameters are float32 (a bf16
checkpoint widens exactly); `dtype` sets the model's compute dtype.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from plt_jax import fileio
from plt_jax import presets
from plt_jax import sharding as sharding_lib
from plt_jax import tokenizer as tok_lib
from plt_jax.config import ModelConfig
from plt_jax.hf import convert
from plt_jax.model import PLT
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import optimizer as opt_lib

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
# Other spellings of our tensor names in checkpoints of the same architecture: the authors'
# inference code also accepts the gate under `loop_gate_proj`.
NAME_ALIASES = (('.self_attn.plt_gate.', '.self_attn.loop_gate_proj.'),)


def _source_name(name: str, available) -> str:
  """The checkpoint's name for our tensor `name`: itself, or an accepted alias present."""
  if name in available:
    return name
  for ours, theirs in NAME_ALIASES:
    if ours in name and name.replace(ours, theirs) in available:
      return name.replace(ours, theirs)
  return name


def read_hf_config(directory: str) -> dict:
  path = fileio.join(fileio.abspath(directory), 'config.json')
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{directory!r} is not a Hugging Face model directory: no config.json')
  return json.loads(fileio.read_text(path))


class SafetensorsReader:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, directory: str):
    self._safe_open = safe_open
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      missing = sorted({fn for fn in weight_map.values()
                        if not os.path.isfile(os.path.join(directory, fn))})
      if missing:
        raise FileNotFoundError(f'{directory}: the index names shard files that are missing: '
                                f'{missing}')
      self.files = {name: os.path.join(directory, fn) for name, fn in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, framework='numpy') as f:
        self.files = {name: single for name in f.keys()}
    else:
      found = sorted(os.listdir(directory))
      raise FileNotFoundError(f'{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found {found}); '
                              'only safetensors checkpoints are supported')
    self._open = {}

  def keys(self) -> list[str]:
    return list(self.files)

  def get(self, name: str) -> np.ndarray:
    path = self.files[name]
    if path not in self._open:
      self._open[path] = self._safe_open(path, framework='numpy')
    return self._open[path].get_tensor(name)

  def close(self) -> None:
    self._open.clear()


def hf_tensors_to_state(reader, cfg: ModelConfig, *, mesh=None, tie_word_embeddings=False,
                        strict: bool = True):
  """(graphdef, nnx.State) of a PLT with `cfg` holding the checkpoint's tensors.

  reader: anything with `keys()` and `get(name) -> array` (a SafetensorsReader or a dict).
  mesh: place each parameter on its shards (plt_jax.sharding rules); None: the default device.
  strict: refuse checkpoint tensors the model has no place for.
  """
  abstract = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = {}
  if mesh is not None:
    flat_sh = nnx.to_flat_state(sharding_lib.param_shardings(abstract_state, mesh))
    shardings = {path: (s.get_value() if isinstance(s, nnx.Variable) else s)
                 for path, s in flat_sh}
  available = set(reader.keys())
  used, items, problems = set(), [], []
  for path, var in nnx.to_flat_state(abstract_state):
    name, transpose = convert.jax_to_hf_name(path)
    source = _source_name(name, available)
    if name not in available and name == 'lm_head.weight' and tie_word_embeddings:
      source = 'model.embed_tokens.weight'  # tied head: the embedding is the output matrix
    if source not in available:
      problems.append(f'missing tensor {name}')
      continue
    arr = np.asarray(reader.get(source))
    used.add(source)
    if not jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):  # (bf16 is kind 'V' to numpy)
      problems.append(f'{source} has non-float dtype {arr.dtype}')
      continue
    stored_shape = arr.shape
    arr = arr.astype(np.float32)
    if transpose:
      arr = arr.T
    want = tuple(var.shape)
    if arr.shape != want:
      problems.append(f'{source}: shape {tuple(stored_shape)} does not fit '
                      f'plt_jax {".".join(map(str, path))} {want} (config.json disagrees with '
                      'the weights)')
      continue
    value = (jax.device_put(arr, shardings[path]) if path in shardings
             else jax.device_put(arr))
    items.append((path, var.replace(value=value)))
  unexpected = sorted(k for k in available - used if not convert.is_ignored_hf_key(k))
  if strict and unexpected:
    problems.append(f'tensors the model has no place for: {unexpected[:8]}'
                    f'{" ..." if len(unexpected) > 8 else ""} (num_loops / loop mode / gate mode '
                    'in config.json may not match the weights)')
  if problems:
    raise ValueError('cannot load checkpoint: ' + '; '.join(problems))
  return graphdef, nnx.from_flat_state(items)


def load_hf_checkpoint(directory: str, mesh=None, dtype: Any = 'float32', *, strict: bool = True,
                       **overrides):
  """(PLT, Tokenizer | None) from a Hugging Face directory.

  dtype: compute dtype of the JAX model ('float32' | 'bfloat16'; parameters stay float32).
  overrides: further ModelConfig fields (attention_impl, remat, max_seq_len, ...).
  The tokenizer is loaded when the directory has a tokenizer.json, else None. A URL is copied
  to a local temporary folder first (safetensors reads local files).
  """
  if fileio.is_remote(directory):
    with tempfile.TemporaryDirectory(prefix='plt_import_') as local:
      fileio.download_dir(directory, local)
      return load_hf_checkpoint(local, mesh, dtype, strict=strict, **overrides)
  directory = os.path.expanduser(directory)
  hf = read_hf_config(directory)
  cfg = convert.model_config_from_hf(hf, dtype=convert.canonical_dtype(dtype), **overrides)
  reader = SafetensorsReader(directory)
  try:
    graphdef, state = hf_tensors_to_state(
        reader, cfg, mesh=mesh, tie_word_embeddings=bool(hf.get('tie_word_embeddings')),
        strict=strict)
  finally:
    reader.close()
  model = nnx.merge(graphdef, state)
  tokenizer: Optional[tok_lib.Tokenizer] = None
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    tokenizer = tok_lib.Tokenizer.from_pretrained(directory)
  return model, tokenizer


def save_as_workdir(model, tokenizer, workdir: str, config, *, source: str = '',
                    step: int = 0) -> str:
  """Writes `model` as a training work dir (plt_jax.train.checkpoint's layout) at `step`.

  config: the experiment ConfigDict saved as workdir/config.json; its `model` section must
  describe `model`, and its `optimizer` / `train.steps` size the fresh optimizer state stored with
  the parameters (moments at zero, step 0). The grain iterator position is not stored: an
  imported checkpoint starts its data from the beginning. The work dir must not hold a run yet.
  """
  workdir = fileio.abspath(workdir)
  if ModelConfig.from_dict(config.model) != model.cfg:
    raise ValueError('config.model does not describe the model being saved')
  for name in (ckpt_lib.CONFIG_FILE, ckpt_lib.CHECKPOINT_DIR, ckpt_lib.TOKENIZER_DIR):
    if fileio.exists(fileio.join(workdir, name)):
      raise FileExistsError(f'{workdir!r} already holds a run ({name} exists); choose a new '
                            '--workdir')
  fileio.makedirs(workdir)
  if tokenizer is not None:
    # What build_tokenizer('hf', path=<source>) expects to find on reuse.
    tok_lib.save_folder(tokenizer, fileio.join(workdir, ckpt_lib.TOKENIZER_DIR),
                        {'kind': 'hf', 'path': source})
  optimizer = nnx.Optimizer(model, opt_lib.make_optimizer(config.optimizer, config.train.steps),
                            wrt=nnx.Param)
  ckpt = ckpt_lib.Checkpointer(fileio.join(workdir, ckpt_lib.CHECKPOINT_DIR), async_save=False)
  try:
    ckpt.save(step, nnx.state(model), nnx.state(optimizer), None,
              {'config': config.to_dict(), 'imported_from': source})
  finally:
    ckpt.close()
  ckpt_lib.save_config(workdir, config)
  return workdir


def import_as_workdir(hf_dir: str, workdir: str, *, preset: str = 'default', dtype=None) -> str:
  """Loads `hf_dir` and saves it as a training work dir; returns the work dir."""
  hf_dir = fileio.abspath(hf_dir)
  hf_cfg = read_hf_config(hf_dir)
  config = presets.get_config(preset, num_loops=int(hf_cfg.get('plt_num_loops') or 1))
  runtime = {k: config.model[k] for k in ('dtype', 'remat', 'attention_impl')}
  if dtype is not None:
    runtime['dtype'] = convert.canonical_dtype(dtype)
  model, tokenizer = load_hf_checkpoint(hf_dir, **runtime)
  config.model = model.cfg.to_dict()
  config.train.vocab_from_tokenizer = False  # the checkpoint fixes the vocabulary
  if tokenizer is not None:
    config.data.tokenizer = 'hf'
    config.data.tokenizer_path = hf_dir
  return save_as_workdir(model, tokenizer, workdir, config, source=hf_dir)
