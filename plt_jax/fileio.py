"""Every file plt_jax reads or writes, local or in object storage (gs://, any fsspec URL).

One path type, `etils.epath.Path` (as Orbax uses), with gcsfs underneath for gs://. Arrays go
through Orbax/tensorstore, which speak gs:// themselves; everything else (configs, metrics,
tokenizers, manifests, plots) goes through here.

An object store has no rename and no append: `write_*` upload an object whole (it appears only
once its upload completes), and files that grow (metrics, TensorBoard events) are rewritten or
added in chunks by their writers. `check_access` turns the ways a URL can be unusable (the
filesystem package missing, no credentials, no such bucket) into one-line errors.

With STORAGE_EMULATOR_HOST set (a local Cloud Storage emulator, as in the tests), tensorstore is
pointed at the same server, and gcsfs is kept from probing the bucket type over gRPC, which an
emulator does not serve (the probe would retry for minutes). Real buckets keep gcsfs's probe.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Union

from etils import epath
import fsspec

PathLike = Union[str, os.PathLike, epath.Path]

_EMULATOR = os.environ.get('STORAGE_EMULATOR_HOST', '')
if _EMULATOR not in ('', 'default'):
  # Read by gcsfs when it is imported and by tensorstore when it opens a gs:// store.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', _EMULATOR if '://' in _EMULATOR
                        else f'http://{_EMULATOR}')

# The package fsspec needs for each URL scheme the project documents.
_PACKAGES = {'gs': 'gcsfs', 'gcs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs', 'hf': 'huggingface_hub'}


class StorageError(ValueError):
  """A path that cannot be used: its message is one line that names it and says what to do."""


def is_remote(p: PathLike) -> bool:
  """True for a URL (gs://bucket/..., s3://...), False for a local path."""
  return '://' in (str(p) if isinstance(p, epath.Path) else os.fspath(p))


def path(p: PathLike) -> epath.Path:
  """The epath.Path of `p`; a local path has '~' expanded."""
  if isinstance(p, epath.Path):
    return p
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def abspath(p: PathLike) -> str:
  """`p` as a string that names the same place from any working directory: a URL unchanged,
  a local path made absolute ('~' expanded)."""
  s = str(p) if isinstance(p, epath.Path) else os.fspath(p)
  return s.rstrip('/') if is_remote(s) else os.path.abspath(os.path.expanduser(s))


def join(p: PathLike, *parts: str) -> str:
  """`p` / parts as a string (URLs keep their scheme)."""
  return str(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  """A local directory, or a URL prefix holding at least one object."""
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def makedirs(p: PathLike) -> None:
  """Creates a local directory (and its parents); object stores need none, so nothing there."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names of the entries directly under `p`; [] when it does not exist."""
  d = path(p)
  if not d.is_dir():
    return []
  return sorted(c.name for c in d.iterdir())


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


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


def write_figure(p: PathLike, fig, **savefig_kwargs) -> str:
  """Saves a matplotlib Figure as `p` (its format from the suffix), atomically; returns `p`."""
  buf = io.BytesIO()
  fmt = path(p).suffix.lstrip('.') or 'png'
  fig.savefig(buf, format=fmt, **savefig_kwargs)
  write_bytes(p, buf.getvalue())
  return str(p)


def upload_dir(local: PathLike, dest: PathLike) -> None:
  """Copies the files under the local directory `local` to `dest` (a URL or a local path),
  keeping their relative paths; each file is written whole (`write_bytes`)."""
  root = os.fspath(local)
  for directory, _, files in os.walk(root):
    for name in files:
      rel = os.path.relpath(os.path.join(directory, name), root)
      with open(os.path.join(directory, name), 'rb') as f:
        write_bytes(path(dest) / rel, f.read())


def download_dir(src: PathLike, local: PathLike) -> str:
  """Copies the files under `src` (a URL) into the local directory `local`; returns `local`.
  For readers that need local files (safetensors maps them into memory)."""
  if not isdir(src):
    raise FileNotFoundError(f'{src}: no such directory')
  fs, root = fsspec.core.url_to_fs(abspath(src))   # one listing call (epath cannot glob ** on GCS)
  root = root.rstrip('/')
  for name in fs.find(root):
    target = os.path.join(os.fspath(local), name[len(root) + 1:])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with fs.open(name, 'rb') as f_in, open(target, 'wb') as f_out:
      f_out.write(f_in.read())
  return os.fspath(local)


# --------------------------------------------------------------------------- access checks

def _scheme(p: str) -> str:
  return p.split('://', 1)[0].lower()


def check_access(p: PathLike, what: str = 'path') -> None:
  """Nothing for a local path or a usable URL; else a StorageError naming `what`=`p` that says
  what is wrong: the scheme's filesystem package missing, no Google Cloud credentials, no such
  bucket, or the store refusing to list `p`. Writes nothing."""
  s = abspath(p)
  if not is_remote(s):
    return
  scheme = _scheme(s)
  label = f'{what}={s}'
  try:
    fs = fsspec.filesystem('gcs' if scheme == 'gs' else scheme)
  except ImportError as e:
    package = _PACKAGES.get(scheme)
    need = f'the {package} package (pip install {package})' if package else 'an fsspec filesystem'
    raise StorageError(f'{label}: {scheme}:// paths need {need}, which is not installed '
                       f'({e})') from e
  except ValueError as e:  # fsspec: "Protocol not known"
    raise StorageError(f'{label}: {e}') from e
  if scheme in ('gs', 'gcs'):
    _check_gcs_credentials(label)
  bucket = s.split('://', 1)[1].split('/', 1)[0]
  try:
    fs.ls(s)
    return
  except FileNotFoundError:
    pass  # a new run's prefix holds nothing yet; the bucket must exist though
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f'{label}: cannot list it: {_one_line(e)}') from e
  try:
    fs.info(f'{scheme}://{bucket}')
  except FileNotFoundError as e:
    hint = (f' (create it: gcloud storage buckets create gs://{bucket})'
            if scheme in ('gs', 'gcs') else '')
    raise StorageError(f'{label}: bucket {scheme}://{bucket} does not exist{hint}') from e
  except Exception:  # pylint: disable=broad-except
    pass  # e.g. no storage.buckets.get permission: listing above worked or found nothing


def _check_gcs_credentials(label: str) -> None:
  """gcsfs falls back to anonymous access without credentials, and then every request fails (or
  retries for a minute without a network); say so up front instead."""
  if _EMULATOR not in ('', 'default') or os.environ.get('STORAGE_EMULATOR_HOST'):
    return  # an emulator takes any credentials
  if any(k in fsspec.config.conf.get(proto, {}) for proto in ('gs', 'gcs')
         for k in ('token',)):
    return  # gcsfs was told which credentials to use
  import google.auth  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise StorageError(
        f'{label}: no Google Cloud credentials found. Run `gcloud auth application-default '
        'login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on a '
        'Cloud TPU VM the VM\'s service account is found by itself)') from e


def _one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[0] if lines else ""}'.rstrip(': ')
