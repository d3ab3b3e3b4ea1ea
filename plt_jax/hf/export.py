"""plt_jax model -> Hugging Face directory that `AutoModelForCausalLM(..., trust_remote_code=True)` loads.

An export holds: config.json (the LoopCoder-V2 release's fields plus our auto_map),
generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index when the
weights pass `max_shard_size`), the tokenizer files, and the PyTorch sources configuration_plt.py
and modeling_plt.py (torch + transformers only). R = 1 exports also load as a plain
`transformers.LlamaForCausalLM`.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional, Union

import numpy as np
from safetensors.numpy import save_file

from plt_jax import fileio
from plt_jax.hf import convert
from plt_jax.train import checkpoint

DEFAULT_MAX_SHARD_SIZE = '5GB'
TORCH_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_src')
_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'model-*-of-*.safetensors')
_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def parse_size(size: Union[int, str]) -> int:
  """Bytes from 1000000, '500MB', '5GB', '2GiB'."""
  if isinstance(size, int):
    value = size
  else:
    m = re.fullmatch(r'\s*([0-9.]+)\s*([A-Za-z]*)\s*', str(size))
    if not m or m.group(2).upper() not in _UNITS:
      raise ValueError(f'size {size!r}: expected bytes or a number with B/KB/MB/GB/KiB/MiB/GiB')
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if value <= 0:
    raise ValueError(f'size {size!r} must be positive')
  return value


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses an output path that is a file, or a non-empty directory unless `overwrite`
  (local or a URL)."""
  if fileio.isfile(out_dir):
    raise FileExistsError(f'output {out_dir!r} exists and is not a directory')
  entries = fileio.listdir(out_dir) if fileio.isdir(out_dir) else []
  if entries and not overwrite:
    raise FileExistsError(f'output directory {out_dir!r} is not empty ({len(entries)} entries); '
                          'pass --overwrite to replace its model files, or choose another --out')


def _remove_stale_weights(out_dir: str) -> None:
  for pattern in _WEIGHT_FILES:  # a new export may shard differently: leave no stale shard
    for path in glob.glob(os.path.join(out_dir, pattern)):
      os.remove(path)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _save_readable(save_file, tensors, path: str, metadata) -> None:
  """safetensors creates its files 0600; give them the mode every other file in the export gets
  (0666 less the umask), so whoever may read the directory may read the weights."""
  save_file(tensors, path, metadata=metadata)
  os.chmod(path, 0o666 & ~_umask())


def save_safetensors(tensors: dict[str, np.ndarray], out_dir: str,
                     max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """model.safetensors, or shards of at most `max_shard_size` bytes plus their index."""
  limit = parse_size(max_shard_size)
  shards, current, current_bytes = [], {}, 0
  for name, arr in tensors.items():
    if current and current_bytes + arr.nbytes > limit:
      shards.append(current)
      current, current_bytes = {}, 0
    current[name] = arr
    current_bytes += arr.nbytes
  shards.append(current)
  metadata = {'format': 'pt'}
  if len(shards) == 1:
    _save_readable(save_file, shards[0], os.path.join(out_dir, 'model.safetensors'), metadata)
    return ['model.safetensors']
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    fn = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _save_readable(save_file, shard, os.path.join(out_dir, fn), metadata)
    names.append(fn)
    weight_map.update({name: fn for name in shard})
  index = {'metadata': {'total_size': int(sum(a.nbytes for a in tensors.values()))},
           'weight_map': weight_map}
  _write_json(os.path.join(out_dir, 'model.safetensors.index.json'), index)
  return names


def _write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')


def export_model(model, tokenizer, out_dir: str, *, dtype: Any = 'float32',
                 max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False) -> str:
  """Writes `model` (a plt_jax PLT) and `tokenizer` (plt_jax Tokenizer or None) as an HF directory
  (`out_dir` may be a URL: the files are written in a local temporary folder, then uploaded)."""
  cfg = model.cfg
  dtype = convert.canonical_dtype(dtype)
  out_dir = fileio.abspath(out_dir)
  check_output_dir(out_dir, overwrite)
  if fileio.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix='plt_export_') as local:
      export_model(model, tokenizer, local, dtype=dtype, max_shard_size=max_shard_size)
      for name in fileio.listdir(out_dir) if fileio.isdir(out_dir) else []:
        if any(fnmatch.fnmatch(name, p) for p in _WEIGHT_FILES):  # no stale shard remains
          (fileio.path(out_dir) / name).unlink()
      fileio.upload_dir(local, out_dir)
    return out_dir
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens but the model only '
                     f'{cfg.vocab_size} embeddings')
  tensors = convert.jax_to_hf_tensors(model, dtype)
  bad = [name for name, arr in tensors.items() if not np.all(np.isfinite(arr.astype(np.float32)))]
  if bad:
    raise ValueError(f'refusing to export non-finite parameters (NaN/Inf) in {bad[:5]}')

  os.makedirs(out_dir, exist_ok=True)
  _remove_stale_weights(out_dir)
  save_safetensors(tensors, out_dir, max_shard_size)
  ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
  if tokenizer is not None:
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
    tokenizer.save_pretrained(out_dir)
  _write_json(os.path.join(out_dir, 'config.json'),
              convert.hf_config_dict(cfg, dtype=dtype, **ids))
  _write_json(os.path.join(out_dir, 'generation_config.json'),
              {**ids, 'do_sample': False})
  for fn in (convert.CONFIG_FILE, convert.MODELING_FILE):
    shutil.copyfile(os.path.join(TORCH_SRC, fn), os.path.join(out_dir, fn))
  return out_dir


def export_workdir(workdir: str, out_dir: str, *, step: Optional[int] = None,
                   dtype: Any = 'bfloat16', max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
                   overwrite: bool = False, mesh=None) -> str:
  """Exports a training run's checkpoint (`step`, default the latest complete one); the work
  dir and the output may be URLs."""
  workdir = fileio.abspath(workdir)
  convert.canonical_dtype(dtype)  # fail on a bad flag before any work
  check_output_dir(fileio.abspath(out_dir), overwrite)
  if not fileio.isdir(workdir):
    raise FileNotFoundError(f'work dir {workdir!r} does not exist')
  model, _, tokenizer = checkpoint.load_for_inference(workdir, step=step, mesh=mesh)
  return export_model(model, tokenizer, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite)
