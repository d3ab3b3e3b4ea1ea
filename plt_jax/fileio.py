"""Every file plt_jax reads or writes, local or in object storage (gs://, any fsspec URL).

One path type, `etils.epath.Path` (as Orbax uses), with gcsfs underneath for gs://. Arrays go
through Orbax/tensorstore, which speak gs:// themselves; everything else (configs, metrics,
tokenizers, manifests, plots) goes through here.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(p: PathLike) -> bool:
  """True for a URL (gs://bucket/..., s3://...), False for a local path."""
  return '://' in os.fspath(p) if not isinstance(p, epath.Path) else '://' in str(p)


def path(p: PathLike) -> epath.Path:
  """The epath.Path of `p`; a local path has '~' expanded."""
  if isinstance(p, epath.Path):
    return p
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def json_safe(obj: Any) -> Any:
  """The one NaN policy: non-finite floats become null, so every JSON file is standard JSON."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if hasattr(obj, 'item') and getattr(obj, 'shape', None) == ():   # numpy / jax scalars
    return json_safe(obj.item())
  return obj


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `p` whole or not at all: a local file by rename, an object by a single upload (an
  object appears only when its upload completes)."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f'.{p.name}.tmp{os.getpid()}'
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def write_json(p: PathLike, obj: Any, *, sort_keys: bool = False) -> None:
  """Atomic JSON write with the NaN policy of `json_safe`."""
  write_text(p, json.dumps(json_safe(obj), indent=2, sort_keys=sort_keys) + '\n')


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())
