"""Corpus sources, read as a stream of documents cut into units of work.

A source is planned into *units*: groups of whole files (`stdlib`, `files`), byte ranges of JSONL
files, row groups of Parquet files, or shards of a streaming Hugging Face dataset (`hf`). A unit
is the grain of parallel preparation, of multi-host assignment and of resume: it becomes one
ArrayRecord shard per split. Planning only lists and stats files (Parquet: reads footers); the
documents are read when a unit is prepared, one at a time, so nothing holds the corpus.

`data.max_chars` caps the corpus when planning, in source bytes: whole files for file sources (in
an order hashed from `split_seed`, so a cap takes a random but fixed subset), the bytes of JSONL
files in order (whole lines), Parquet row groups in order; each of the n shards of an `hf`
stream stops after max_chars / n characters (`capped` then says only that a cap was set).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import sysconfig
from typing import Any, Iterator, Optional

from absl import logging

from plt_jax import fileio

SOURCES = ('stdlib', 'files', 'jsonl', 'parquet', 'hf', 'synthetic')
_STDLIB_TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})
_STDLIB_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})
_MAGIC = re.compile(r'[*?\[]')
_WHERE_KEPT = 50   # paths of skipped / undecodable inputs kept in the manifest


def unit_hash(*parts) -> float:
  """A uniform number in [0, 1) from `parts`: the split and the file order use it."""
  digest = hashlib.sha256(':'.join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(digest[:8], 'little') / 2.0**64


# ------------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class SourceFile:
  path: str
  key: str       # machine-independent name: split hashes and keys of documents use it
  size: int


def _as_globs(paths) -> list[str]:
  if isinstance(paths, str):
    paths = [paths]
  return [str(p) for p in paths if str(p)]


def _split_glob(pattern: str) -> tuple[str, str]:
  """(the leading folders without a wildcard, the rest)."""
  parts = pattern.split('/')
  fixed = []
  for part in parts[:-1]:
    if _MAGIC.search(part):
      break
    fixed.append(part)
  base = '/'.join(fixed)
  if not base:
    base = '/' if pattern.startswith('/') else '.'
  rest = pattern[len('/'.join(fixed)):].lstrip('/') if fixed else pattern
  return base, rest


def _glob_regex(rest: str) -> re.Pattern:
  out, i = [], 0
  while i < len(rest):
    if rest.startswith('**/', i):
      out.append('(?:.*/)?')
      i += 3
    elif rest.startswith('**', i):
      out.append('.*')
      i += 2
    elif rest[i] == '*':
      out.append('[^/]*')
      i += 1
    elif rest[i] == '?':
      out.append('[^/]')
      i += 1
    elif rest[i] == '[':
      j = rest.find(']', i)
      if j < 0:
        out.append(re.escape(rest[i]))
        i += 1
      else:
        out.append('[' + rest[i + 1:j].replace('!', '^', 1) + ']')
        i = j + 1
    else:
      out.append(re.escape(rest[i]))
      i += 1
  return re.compile(''.join(out) + r'\Z')


def glob_files(paths) -> list[SourceFile]:
  """Files matched by the globs (local or gs://, recursive '**' allowed), deduplicated.

  Keys are the paths relative to the globs' common fixed folder, so the split survives a move.
  """
  patterns = _as_globs(paths)
  if not patterns:
    raise ValueError('data.paths is empty: give one or more globs, e.g. "data/**/*.txt"')
  matched = []
  for pattern in patterns:
    pattern = os.fspath(fileio.path(pattern))
    base, rest = _split_glob(pattern)
    root = fileio.path(base)
    if not _MAGIC.search(rest):
      hits = [root / rest] if (root / rest).is_file() else []
    elif '**' in rest:
      regex = _glob_regex(rest)
      hits = []
      for folder, _, names in root.walk():
        for name in names:
          p = fileio.path(folder) / name
          rel = os.fspath(p)[len(os.fspath(root)):].lstrip('/')
          if regex.match(rel):
            hits.append(p)
    else:
      hits = [p for p in root.glob(rest) if p.is_file()]
    if not hits:
      raise ValueError(f'glob {pattern!r} matched no files')
    matched.append((base, sorted(hits, key=os.fspath)))
  bases = [os.fspath(fileio.path(b)) for b, _ in matched]
  common = bases[0] if len(bases) == 1 else os.path.commonpath(bases) if not any(
      fileio.is_remote(b) for b in bases) else _common_prefix(bases)
  files: dict[str, SourceFile] = {}
  for _, hits in matched:
    for p in hits:
      name = os.fspath(p)
      if name not in files:
        key = name[len(common):].lstrip('/') if name.startswith(common) else name
        files[name] = SourceFile(name, key, int(p.stat().length))
  return list(files.values())


def _common_prefix(paths: list[str]) -> str:
  prefix = os.path.commonprefix(paths)
  return prefix[:prefix.rfind('/') + 1] if '/' in prefix else ''


def stdlib_files(include_tests: bool = False) -> list[SourceFile]:
  """`*.py` of the running interpreter's standard library, without site-packages."""
  root = sysconfig.get_paths()['stdlib']
  skip = _STDLIB_SKIP_DIRS | (frozenset() if include_tests else _STDLIB_TEST_DIRS)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for name in sorted(filenames):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        out.append(SourceFile(path, os.path.relpath(path, root).replace(os.sep, '/'),
                              os.path.getsize(path)))
  if not out:
    raise ValueError(f'no *.py files under the stdlib folder {root}')
  return out


# ------------------------------------------------------------------------------ planning


def _group(items: list[tuple[Any, int]], target: int) -> list[list[Any]]:
  """Consecutive items grouped until each group holds at least `target` bytes."""
  groups, current, size = [], [], 0
  for item, n in items:
    current.append(item)
    size += n
    if size >= target:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  return groups


def plan_units(cfg, unit_bytes: int) -> tuple[list[dict], dict]:
  """(units, listing facts) of the source in `cfg`; every unit is a JSON-able dict."""
  cap = int(cfg.max_chars or 0)
  seed = int(cfg.split_seed)
  if cfg.source in ('stdlib', 'files'):
    files = stdlib_files(bool(cfg.stdlib_tests)) if cfg.source == 'stdlib' else glob_files(
        cfg.paths)
    ordered = sorted(files, key=lambda f: unit_hash('order', seed, f.key))
    chosen, total = [], 0
    for f in ordered:
      if cap and total >= cap:
        break
      chosen.append(f)
      total += f.size
    groups = _group([((f.path, f.key), f.size) for f in chosen], unit_bytes)
    units = [dict(kind='files', files=g) for g in groups]
    return units, dict(files=len(files), files_planned=len(chosen),
                       capped=len(chosen) < len(files))
  if cfg.source == 'jsonl':
    files = sorted(glob_files(cfg.paths), key=lambda f: f.path)
    units, total = [], 0
    for f in files:
      stop_at = f.size if not cap else min(f.size, cap - total)
      for start in range(0, stop_at, unit_bytes):
        units.append(dict(kind='jsonl', path=f.path, key=f.key, start=start,
                          stop=min(start + unit_bytes, stop_at)))
      total += stop_at
      if cap and total >= cap:
        break
    return units, dict(files=len(files), capped=bool(cap) and sum(f.size for f in files) > cap)
  if cfg.source == 'parquet':
    files = sorted(glob_files(cfg.paths), key=lambda f: f.path)
    units, total, capped = [], 0, False
    for f in files:
      groups = _parquet_row_groups(f, cfg.text_field)
      items, first = [], 0
      for rg, (rows, size) in enumerate(groups):
        if cap and total >= cap:
          capped = True
          break
        items.append(((rg, first), size))
        first += rows
        total += size
      for g in _group(items, unit_bytes):
        units.append(dict(kind='parquet', path=f.path, key=f.key, row_groups=g))
      if capped:
        break
    return units, dict(files=len(files), capped=capped)
  if cfg.source == 'hf':
    ds = open_hf(cfg)
    n = max(1, int(getattr(ds, 'num_shards', None) or ds.n_shards))
    per_shard = -(-cap // n) if cap else 0
    return ([dict(kind='hf', shard=i, num_shards=n, max_chars=per_shard) for i in range(n)],
            dict(files=n, capped=bool(cap)))
  raise ValueError(f'unknown data.source {cfg.source!r}; expected one of {SOURCES}')


def _pyarrow():
  """pyarrow with its parquet module, imported on the first Parquet source: it takes a good part
  of a second to import and only Parquet needs it."""
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  return pyarrow


def _parquet_row_groups(f: SourceFile, field: str) -> list[tuple[int, int]]:
  """(rows, uncompressed bytes of the text column) of each row group; checks the column."""
  pa = _pyarrow()
  try:
    with fileio.path(f.path).open('rb') as fh:
      pf = pa.parquet.ParquetFile(fh)
      meta, schema = pf.metadata, pf.schema_arrow
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f'{f.path}: not a readable Parquet file ({e})') from None
  _check_parquet_column(f.path, schema, field)
  col = schema.names.index(field)
  out = []
  for rg in range(meta.num_row_groups):
    g = meta.row_group(rg)
    size = g.column(col).total_uncompressed_size if col < g.num_columns else g.total_byte_size
    out.append((g.num_rows, int(size)))
  return out


def _check_parquet_column(path: str, schema, field: str) -> None:
  pa = _pyarrow()
  if field not in schema.names:
    raise ValueError(f'{path}: no text field {field!r} (columns: {schema.names})')
  kind = schema.field(field).type
  is_view = getattr(pa.types, 'is_string_view', lambda _: False)
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
    raise ValueError(f'{path}: column {field!r} is {kind}, not a string column')


def open_hf(cfg):
  """The streaming `datasets.IterableDataset` of data.hf_path (a hub name or a builder such as
  'json'/'parquet' with data.paths as its data files)."""
  import datasets  # pylint: disable=g-import-not-at-top
  if not cfg.hf_path:
    raise ValueError('data.source=hf needs data.hf_path (a dataset name, or "json"/"parquet" '
                     'with data.paths)')
  kwargs = dict(split=cfg.hf_split or 'train', streaming=True)
  if cfg.hf_name:
    kwargs['name'] = cfg.hf_name
  files = _as_globs(cfg.paths)
  if files:
    kwargs['data_files'] = files
  try:
    return datasets.load_dataset(cfg.hf_path, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f'data.hf_path={cfg.hf_path!r}: {str(e).splitlines()[0]}') from None


# ------------------------------------------------------------------------------- reading


def new_counts() -> dict:
  return dict(files_read=0, skipped_binary=0, skipped_where=[], undecodable=0,
              replaced_chars=0, undecodable_where=[], empty_records=0, empty_docs=0)


def merge_counts(total: dict, part: dict) -> dict:
  for k, v in part.items():
    if isinstance(v, list):
      total[k] = (total.get(k, []) + v)[:_WHERE_KEPT]
    else:
      total[k] = total.get(k, 0) + v
  return total


def _note(counts: dict, key: str, where: str) -> None:
  if len(counts[key]) < _WHERE_KEPT:
    counts[key].append(where)


def _decode(raw: bytes, where: str, counts: dict) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:
    text = raw.decode('utf-8', errors='replace')
    counts['undecodable'] += 1
    counts['replaced_chars'] += text.count('\ufffd') - raw.count('\ufffd'.encode())
    _note(counts, 'undecodable_where', where)
    logging.warning('%s: not valid UTF-8; undecodable bytes replaced by U+FFFD', where)
    return text


def _read_files(unit: dict, counts: dict) -> Iterator[tuple[str, str]]:
  for path, key in unit['files']:
    raw = fileio.path(path).read_bytes()
    counts['files_read'] += 1
    if b'\x00' in raw[:8192]:
      counts['skipped_binary'] += 1
      _note(counts, 'skipped_where', path)
      logging.warning('%s: looks binary (NUL bytes); skipped', path)
      continue
    text = _decode(raw, path, counts)
    yield key, text[1:] if text.startswith('\ufeff') else text


def _read_jsonl(unit: dict, field: str, counts: dict) -> Iterator[tuple[str, str]]:
  """The lines that start in [start, stop) of the file: a line belongs to the range holding its
  first byte, so adjacent ranges share none and miss none."""
  path, start, stop = unit['path'], unit['start'], unit['stop']
  counts['files_read'] += start == 0
  with fileio.path(path).open('rb') as fh:
    pos = start
    if start:
      fh.seek(start - 1)
      pos = start - 1 + len(fh.readline())   # the rest of the line that began before `start`
    while pos < stop:
      raw = fh.readline()
      if not raw:
        break
      offset, pos = pos, pos + len(raw)
      where = f'{path} (line at byte {offset})'
      line = _decode(raw, where, counts).strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: invalid JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where}: no text field {field!r} (found {keys})')
      text = record[field]
      if text is None:
        counts['empty_records'] += 1
        continue
      if not isinstance(text, str):
        raise ValueError(f'{where}: field {field!r} is {type(text).__name__}, not a string')
      yield f'{unit["key"]}@{offset}', text


def _read_parquet(unit: dict, field: str, counts: dict) -> Iterator[tuple[str, str]]:
  path = unit['path']
  with fileio.path(path).open('rb') as fh:
    pf = _pyarrow().parquet.ParquetFile(fh)
    _check_parquet_column(path, pf.schema_arrow, field)
    counts['files_read'] += unit['row_groups'][0][0] == 0
    for rg, first in unit['row_groups']:
      column = pf.read_row_group(rg, columns=[field]).column(0)
      for i, text in enumerate(column.to_pylist()):
        if text is None:
          counts['empty_records'] += 1
        else:
          yield f'{unit["key"]}#{first + i}', text


def _read_hf(unit: dict, cfg, counts: dict) -> Iterator[tuple[str, str]]:
  ds = open_hf(cfg)
  if unit['num_shards'] > 1:
    ds = ds.shard(num_shards=unit['num_shards'], index=unit['shard'])
  counts['files_read'] += 1
  field, cap, total = cfg.text_field, unit['max_chars'], 0
  for i, record in enumerate(ds):
    if field not in record:
      raise ValueError(f'data.hf_path={cfg.hf_path!r}: no text field {field!r} '
                       f'(found {sorted(record)})')
    text = record[field]
    if text is None:
      counts['empty_records'] += 1
      continue
    if not isinstance(text, str):
      raise ValueError(f'data.hf_path={cfg.hf_path!r}: field {field!r} is '
                       f'{type(text).__name__}, not a string')
    yield f'{unit["shard"]}/{i}', text
    total += len(text)
    if cap and total >= cap:
      break


def read_unit(unit: dict, cfg, counts: dict) -> Iterator[tuple[str, str]]:
  """(key, text) of the unit's non-empty documents, one at a time; counts what was skipped."""
  kind = unit['kind']
  if kind == 'files':
    reader = _read_files(unit, counts)
  elif kind == 'jsonl':
    reader = _read_jsonl(unit, cfg.text_field, counts)
  elif kind == 'parquet':
    reader = _read_parquet(unit, cfg.text_field, counts)
  else:
    reader = _read_hf(unit, cfg, counts)
  for key, text in reader:
    if not text.strip():
      counts['empty_docs'] += 1
      continue
    yield key, text


def source_spec(cfg) -> dict:
  """What identifies the documents of a source (the key of prepared data hashes it)."""
  spec = dict(source=cfg.source, paths=_as_globs(cfg.paths), text_field=cfg.text_field,
              max_chars=int(cfg.max_chars or 0), val_fraction=float(cfg.val_fraction),
              split_seed=int(cfg.split_seed))
  if cfg.source == 'stdlib':
    spec.update(stdlib_tests=bool(cfg.stdlib_tests), root=sysconfig.get_paths()['stdlib'],
                python=sys.version)
  if cfg.source == 'hf':
    spec.update(hf_path=cfg.hf_path, hf_name=cfg.hf_name, hf_split=cfg.hf_split)
  return spec


def describe(cfg) -> Optional[str]:
  return f'{cfg.source}:{",".join(_as_globs(cfg.paths))}' if cfg.paths else cfg.source
