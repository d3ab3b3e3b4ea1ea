"""Make a LoopCoder-V2 release directory loadable by `AutoModelForCausalLM` as it is.

The release ships config.json (its own `model_type`, an `auto_map` naming only `AutoConfig`) and
safetensors weights, but no modeling file. `adopt_release(dir)` writes the project's configuration
and modeling files into the directory and points `auto_map`'s AutoConfig, AutoModel and
AutoModelForCausalLM at them, keeping the release's `model_type`. Nothing else changes: the weights
keep their bytes and their names (the gate under `loop_gate_proj` or `plt_gate`; one file or
shards), and every other file stays as it was. Then

  AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

loads the released weights. The directory is checked first (config.json with the plt_* fields,
safetensors whose tensor names are exactly those the config implies); a directory that fails the
check is left untouched. Running it again changes nothing.
"""
from __future__ import annotations

import json
import re
from typing import Any

from plt_jax import fileio
from plt_jax.hf import convert
from plt_jax.hf import export
from plt_jax.hf import importer

CONFIG_CLASS = 'configuration_plt.PLTConfig'
_MODEL_TYPE_LINE = re.compile(r'^  model_type = "[^"]*"$', re.M)


def _read_bytes(p) -> bytes:
  return fileio.path(p).read_bytes()


def _safetensors_header_names(p) -> list[str]:
  """Tensor names in a safetensors file's header (8-byte length, then JSON), without its data."""
  with fileio.path(p).open('rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    if not 0 < size < 1 << 30:
      raise ValueError(f'{p} is not a safetensors file (header length {size})')
    header = json.loads(f.read(size))
  return [k for k in header if k != '__metadata__']


def checkpoint_names(directory) -> list[str]:
  """Tensor names of a directory's safetensors checkpoint (one file, or shards with an index)."""
  d = fileio.path(directory)
  index = d / importer.INDEX_FILE
  if index.exists():
    weight_map = fileio.read_json(index).get('weight_map') or {}
    missing = sorted({fn for fn in weight_map.values() if not (d / fn).exists()})
    if missing:
      raise ValueError(f'{directory}: the index names shard files that are missing: {missing}')
    return list(weight_map)
  single = d / importer.SINGLE_FILE
  if single.exists():
    return _safetensors_header_names(single)
  raise ValueError(f'{directory} has no {importer.SINGLE_FILE} or {importer.INDEX_FILE}')


def check_release_layout(directory) -> dict:
  """config.json of a LoopCoder-V2 layout directory; ValueError (one line) if it is not one."""
  d = fileio.path(directory)
  what = f'{directory} is not a LoopCoder-V2 layout directory'
  if not d.is_dir():
    raise ValueError(f'{what}: no such directory')
  if not (d / 'config.json').exists():
    raise ValueError(f'{what}: no config.json')
  try:
    hf = fileio.read_json(d / 'config.json')
  except json.JSONDecodeError as e:
    raise ValueError(f'{what}: config.json is not JSON ({e})') from None
  if not isinstance(hf, dict) or 'plt_num_loops' not in hf:
    raise ValueError(f'{what}: config.json has no plt_num_loops (not a PLT configuration)')
  model_type = hf.get('model_type')
  if not isinstance(model_type, str) or not re.fullmatch(r'[A-Za-z0-9_.-]+', model_type):
    raise ValueError(f'{what}: config.json has no usable model_type ({model_type!r})')
  try:
    cfg = convert.model_config_from_hf(hf)
    names = checkpoint_names(d)
  except ValueError as e:
    raise ValueError(f'{what}: {e}') from None
  aliases = dict(importer.NAME_ALIASES)
  found = set()
  for name in names:
    for ours, theirs in aliases.items():
      name = name.replace(theirs, ours)
    found.add(name)
  want = set(convert.expected_hf_shapes(cfg))
  if hf.get('tie_word_embeddings'):
    found.add('lm_head.weight')
  missing = sorted(want - found)
  extra = sorted(n for n in found - want if not convert.is_ignored_hf_key(n))
  if missing or extra:
    raise ValueError(f'{what}: its weights do not match its config.json (missing {missing[:4]}, '
                     f'unexpected {extra[:4]})')
  return hf


def _configuration_source(model_type: str) -> str:
  """The project's configuration file, declaring the release's model_type."""
  src = (fileio.path(export.TORCH_SRC) / convert.CONFIG_FILE).read_text()
  if len(_MODEL_TYPE_LINE.findall(src)) != 1:
    raise AssertionError(f'{convert.CONFIG_FILE}: expected one model_type line')
  return _MODEL_TYPE_LINE.sub(f'  model_type = "{model_type}"', src)


def adopted_auto_map(hf: dict) -> dict[str, Any]:
  """The release's auto_map with our configuration and model classes."""
  auto_map = dict(hf.get('auto_map') or {})
  auto_map.update({'AutoConfig': CONFIG_CLASS, 'AutoModel': convert.AUTO_MAP['AutoModel'],
                   'AutoModelForCausalLM': convert.AUTO_MAP['AutoModelForCausalLM']})
  return auto_map


def adopt_release(directory) -> list[str]:
  """Writes the configuration and modeling files into `directory` and updates config.json's
  auto_map; returns the names of the files it wrote or changed (none on a second run)."""
  d = fileio.path(directory)
  hf = check_release_layout(directory)
  files = {
      convert.CONFIG_FILE: _configuration_source(hf['model_type']).encode(),
      convert.MODELING_FILE: _read_bytes(fileio.path(export.TORCH_SRC) / convert.MODELING_FILE),
  }
  auto_map = adopted_auto_map(hf)
  if hf.get('auto_map') != auto_map:
    files['config.json'] = (json.dumps({**hf, 'auto_map': auto_map}, indent=2) + '\n').encode()
  changed = []
  for name, data in files.items():
    target = d / name
    if target.exists() and target.read_bytes() == data:
      continue
    fileio.write_bytes(target, data)
    changed.append(name)
  return changed
