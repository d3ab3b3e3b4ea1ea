"""Pretraining data: corpus sources -> tokenizer -> tokenize-once cache -> packed rows -> grain.

`build_data` is the one entry point. The corpus is read and tokenized once; the token ids of
each split land in `cache_dir/<key>/` (flat uint16/uint32 ids + int64 document offsets + a JSON
manifest) and any later run with the same sources, split and tokenizer memory-maps them.

Packing (see `PackedRows`): every document becomes `<s> tokens </s>` and is cut into chunks of at
most `seq_len`; chunks fill rows in order (next-fit), and a chunk that does not fit in what is
left of a row starts a new row, so rows end in padding only when the next chunk is too long.
Positions restart at 0 at every chunk, also a continuation chunk of a long document, because
the model reads positions == 0 as "attention may not look further back". The target of a
chunk's last token is the document's next token even when that token opens the next chunk, so
no prediction of the document is dropped; only `</s>` (nothing follows) and padding have
loss_mask 0.

data.source='synthetic' skips all of that: rows come from a `plt_jax.tasks` task (see
`build_synthetic`), whose fixed vocabulary is the tokenizer.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np
import tqdm

from plt_jax import tokenizer as tokenizer_lib

SOURCES = ('stdlib', 'files', 'jsonl', 'parquet', 'synthetic')
_CACHE_VERSION = 1
_STDLIB_TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})
_STDLIB_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings; the training seed and the batch/sequence shape come from the caller."""
  cfg = ml_collections.ConfigDict()
  cfg.source = 'stdlib'        # 'stdlib' | 'files' | 'jsonl' | 'parquet' | 'synthetic'
  cfg.paths = ()               # globs (recursive '**' allowed) for files/jsonl/parquet
  cfg.text_field = 'text'      # JSONL key / Parquet column holding a document
  cfg.stdlib_tests = False     # also take the stdlib's test/ folders (see README)
  cfg.max_chars = 4_000_000    # stop reading after this many characters; 0 = whole corpus
  cfg.val_fraction = 0.02      # share of documents (files, for file sources) held out
  cfg.split_seed = 0           # fixes the split and the capped subset, apart from the run seed
  cfg.tokenizer = 'bpe'        # 'bpe' | 'byte' | 'hf'
  cfg.tokenizer_path = ''      # hf: a tokenizer.json or a folder holding one
  cfg.vocab_size = 4096        # bpe only
  cfg.bpe_train_chars = 50_000_000  # characters of the train split the BPE learns from
  cfg.val_batches = 8          # validation batches kept; 0 = the whole validation split
  cfg.cache_dir = ''           # '' = <workdir>/data_cache; share one across runs to tokenize once
  cfg.read_threads = 1         # grain reader threads (rows are built from memory-mapped ids)
  cfg.prefetch = 4             # batches grain prepares ahead
  # synthetic only (see build_synthetic): a name of plt_jax.tasks.TASKS and its spec's fields.
  cfg.task = ''
  # Every task's difficulty fields, -1 = the spec's default (declared, and typed int, so that the
  # command line can set them: --config.data.task_params.hops=8).
  cfg.task_params = ml_collections.ConfigDict(_task_param_fields())
  cfg.task_heldout = 256       # held-out instances (validation loss and exact-match accuracy)
  return cfg


@dataclasses.dataclass
class DataBundle:
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: Any              # grain DatasetIterator of batch dicts, batch_size/process_count rows
  val_batches: list[dict]      # fixed validation batches, same row slice as train_iter
  stats: dict                  # counts; see build_data


# ----------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _SourceFile:
  path: str
  key: str       # machine-independent name: the split hash and manifests use it
  size: int
  mtime_ns: int


def _unit_hash(*parts) -> float:
  digest = hashlib.sha256(':'.join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(digest[:8], 'little') / 2.0**64


def _glob_base(pattern: str) -> str:
  """The leading folders of a glob that contain no wildcard (keys are relative to them)."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or '.'


def _stat(path: str, key: str) -> _SourceFile:
  st = os.stat(path)
  return _SourceFile(path, key, st.st_size, st.st_mtime_ns)


def _as_globs(paths) -> list[str]:
  if isinstance(paths, str):
    paths = [paths]
  return [str(p) for p in paths if str(p)]


def _glob_files(paths) -> list[_SourceFile]:
  patterns = _as_globs(paths)
  if not patterns:
    raise ValueError('data.paths is empty: give one or more globs, e.g. "data/**/*.txt"')
  matched = []
  for pattern in patterns:
    expanded = os.path.expanduser(pattern)
    matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not matches:
      raise ValueError(f'glob {pattern!r} matched no files')
    matched.append(matches)
  # Keys are relative to the globs' common fixed folder, so the split survives a move.
  base = os.path.commonpath([os.path.abspath(_glob_base(os.path.expanduser(p)))
                             for p in patterns])
  files: dict[str, _SourceFile] = {}
  for p in (p for matches in matched for p in matches):
    real = os.path.realpath(p)
    if real not in files:
      files[real] = _stat(p, os.path.relpath(os.path.abspath(p), base).replace(os.sep, '/'))
  return list(files.values())


def stdlib_files(include_tests: bool = False) -> list[_SourceFile]:
  """`*.py` of the running interpreter's standard library, without site-packages."""
  root = sysconfig.get_paths()['stdlib']
  skip = _STDLIB_SKIP_DIRS | (frozenset() if include_tests else _STDLIB_TEST_DIRS)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for name in sorted(filenames):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        out.append(_stat(path, os.path.relpath(path, root).replace(os.sep, '/')))
  if not out:
    raise ValueError(f'no *.py files under the stdlib folder {root}')
  return out


def _resolve_files(cfg) -> list[_SourceFile]:
  if cfg.source == 'stdlib':
    return stdlib_files(bool(cfg.stdlib_tests))
  return _glob_files(cfg.paths)


@dataclasses.dataclass
class _Corpus:
  train: list[str]
  val: list[str]
  val_keys: list[str]
  counts: dict


def _decode(raw: bytes, where: str, counts: dict) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:
    text = raw.decode('utf-8', errors='replace')
    counts['undecodable'] += 1
    counts['replaced_chars'] += text.count('\ufffd') - raw.count('\ufffd'.encode())
    if len(counts['undecodable_where']) < 50:
      counts['undecodable_where'].append(where)
    logging.warning('%s: not valid UTF-8; undecodable bytes replaced by U+FFFD', where)
    return text


def _read_text_file(f: _SourceFile, counts: dict) -> Iterator[tuple[str, str]]:
  with open(f.path, 'rb') as fh:
    raw = fh.read()
  if b'\x00' in raw[:8192]:
    counts['skipped_binary'] += 1
    if len(counts['skipped_where']) < 50:
      counts['skipped_where'].append(f.path)
    logging.warning('%s: looks binary (NUL bytes); skipped', f.path)
    return
  text = _decode(raw, f.path, counts)
  if text.startswith('\ufeff'):
    text = text[1:]
  yield f.key, text


def _read_jsonl(f: _SourceFile, field: str, counts: dict) -> Iterator[tuple[str, str]]:
  with open(f.path, 'rb') as fh:
    for lineno, raw in enumerate(fh, start=1):
      where = f'{f.path}:{lineno}'
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
      yield f'{f.key}:{lineno}', text


def _read_parquet(f: _SourceFile, field: str, counts: dict) -> Iterator[tuple[str, str]]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(f.path)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f'{f.path}: not a readable Parquet file ({e})') from None
  schema = pf.schema_arrow
  if field not in schema.names:
    raise ValueError(f'{f.path}: no text field {field!r} (columns: {schema.names})')
  kind = schema.field(field).type
  is_view = getattr(pa.types, 'is_string_view', lambda _: False)
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
    raise ValueError(f'{f.path}: column {field!r} is {kind}, not a string column')
  row = 0
  for batch in pf.iter_batches(batch_size=1024, columns=[field]):
    for text in batch.column(0).to_pylist():
      if text is None:
        counts['empty_records'] += 1
      else:
        yield f'{f.key}#{row}', text
      row += 1


def read_corpus(cfg, files: Sequence[_SourceFile]) -> _Corpus:
  """Reads documents until `max_chars` and splits them by document key (a file, for files).

  File sources are visited in an order hashed from `split_seed`, so a cap takes a random
  but fixed subset of files; record sources are read in file order. A document goes to
  validation when a second, independent hash of its key is below `val_fraction`.
  """
  counts = dict(files=len(files), files_read=0, skipped_binary=0, skipped_where=[],
                undecodable=0, replaced_chars=0, undecodable_where=[], empty_records=0,
                empty_docs=0, capped=False)
  seed, cap = int(cfg.split_seed), int(cfg.max_chars or 0)
  if cfg.source in ('stdlib', 'files'):
    files = sorted(files, key=lambda f: _unit_hash('order', seed, f.key))
  docs: list[tuple[float, str, str]] = []  # (split hash, key, text)
  total = 0
  for f in files:
    if cap and total >= cap:
      counts['capped'] = True
      break
    counts['files_read'] += 1
    if cfg.source == 'jsonl':
      reader = _read_jsonl(f, cfg.text_field, counts)
    elif cfg.source == 'parquet':
      reader = _read_parquet(f, cfg.text_field, counts)
    else:
      reader = _read_text_file(f, counts)
    for key, text in reader:
      if not text.strip():
        counts['empty_docs'] += 1
        continue
      docs.append((_unit_hash('split', seed, key), key, text))
      total += len(text)
      if cap and total >= cap:
        counts['capped'] = True
        break
  if not docs:
    raise ValueError(f'the corpus is empty: {len(files)} file(s) from source {cfg.source!r} gave '
                     f'no non-empty document ({counts["skipped_binary"]} skipped as binary, '
                     f'{counts["empty_docs"] + counts["empty_records"]} empty)')
  if len(docs) < 2:
    raise ValueError(f'the corpus has a single document ({docs[0][1]}); need at least 2 to '
                     'hold one out for validation')
  is_val = [h < cfg.val_fraction for h, _, _ in docs]
  if not any(is_val):  # small corpora: still hold out the lowest-hash document
    is_val[min(range(len(docs)), key=lambda i: docs[i][0])] = True
  if all(is_val):
    is_val[max(range(len(docs)), key=lambda i: docs[i][0])] = False
  train = [t for (_, _, t), v in zip(docs, is_val) if not v]
  val = [t for (_, _, t), v in zip(docs, is_val) if v]
  val_keys = [k for (_, k, _), v in zip(docs, is_val) if v]
  return _Corpus(train, val, val_keys, counts)


# -------------------------------------------------------------------------------- the cache


def _tokenize(tok: tokenizer_lib.Tokenizer, texts: Sequence[str], desc: str):
  """Flat ids of all documents (no bos/eos) and offsets[d]:offsets[d+1] per document."""
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  lengths, parts = [], []
  with tqdm.tqdm(total=sum(len(t) for t in texts), unit='char', unit_scale=True,
                 desc=f'tokenize {desc}', file=sys.stderr, mininterval=1.0) as bar:
    start = 0
    while start < len(texts):
      stop, chars = start, 0
      while stop < len(texts) and (chars < (1 << 20) or stop == start):
        chars += len(texts[stop])
        stop += 1
      for ids in tok.encode_batch(texts[start:stop]):
        parts.append(np.asarray(ids, dtype))
        lengths.append(len(ids))
      bar.update(chars)
      start = stop
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
  return tokens, offsets


def _cache_key(cfg, files: Sequence[_SourceFile], tok: tokenizer_lib.Tokenizer) -> str:
  """Changes with anything that changes the ids: the sources (and mtimes), split, tokenizer."""
  spec = dict(
      version=_CACHE_VERSION, source=cfg.source, text_field=cfg.text_field,
      stdlib_tests=bool(cfg.stdlib_tests), max_chars=int(cfg.max_chars or 0),
      val_fraction=float(cfg.val_fraction), split_seed=int(cfg.split_seed),
      tokenizer=tok.sha256,
      files=[(f.path, f.key, f.size, f.mtime_ns) for f in files])
  if cfg.source == 'stdlib':
    spec['python'] = sys.version
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _write_cache(path: str, key: str, cfg, tok, corpus: _Corpus, files) -> dict:
  start = time.perf_counter()
  arrays, splits = {}, {}
  for split, texts in (('train', corpus.train), ('val', corpus.val)):
    tokens, offsets = _tokenize(tok, texts, split)
    arrays[f'{split}_tokens'], arrays[f'{split}_offsets'] = tokens, offsets
    splits[split] = dict(docs=len(texts), tokens=int(tokens.size),
                         chars=sum(len(t) for t in texts),
                         bytes=sum(len(t.encode('utf-8')) for t in texts))
  seconds = time.perf_counter() - start
  counts = dict(corpus.counts)
  manifest = dict(
      version=_CACHE_VERSION, key=key, created=time.strftime('%Y-%m-%dT%H:%M:%S'),
      sources=dict(source=cfg.source, paths=_as_globs(cfg.paths), text_field=cfg.text_field,
                   root=sysconfig.get_paths()['stdlib'] if cfg.source == 'stdlib' else None,
                   files_matched=len(files), max_chars=int(cfg.max_chars or 0),
                   val_fraction=float(cfg.val_fraction), split_seed=int(cfg.split_seed)),
      tokenizer=dict(sha256=tok.sha256, vocab_size=tok.vocab_size,
                     dtype=str(arrays['train_tokens'].dtype)),
      splits=splits, read=counts, val_keys=corpus.val_keys[:1000],
      tokenize_seconds=round(seconds, 3))
  tmp = f'{path}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, array in arrays.items():
    np.save(os.path.join(tmp, f'{name}.npy'), array)
  with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  try:
    os.replace(tmp, path)  # atomic: a reader sees a whole cache or none
  except OSError:  # another process published the same key first
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _load_cache(path: str) -> tuple[dict, dict]:
  with open(os.path.join(path, 'manifest.json')) as f:
    manifest = json.load(f)
  arrays = {name: np.load(os.path.join(path, f'{name}.npy'), mmap_mode='r')
            for name in ('train_tokens', 'train_offsets', 'val_tokens', 'val_offsets')}
  return manifest, arrays


# ---------------------------------------------------------------------------------- packing


class PackedRows:
  """Random-access rows of `seq_len` tokens, built on demand from flat ids + offsets.

  Only the placement of chunks is precomputed (a few ints per chunk), so the memory cost
  does not grow with the corpus beyond the memory-mapped ids.
  """

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray, *, seq_len: int, bos_id: int,
               eos_id: int, pad_id: int = 0, doc_order: np.ndarray | None = None):
    if seq_len < 2:
      raise ValueError(f'seq_len must be at least 2, got {seq_len}')
    self.tokens, self.offsets = tokens, np.asarray(offsets, np.int64)
    self.seq_len, self.bos_id, self.eos_id, self.pad_id = seq_len, bos_id, eos_id, pad_id
    num_docs = len(self.offsets) - 1
    order = np.arange(num_docs) if doc_order is None else np.asarray(doc_order, np.int64)
    doc_len = (self.offsets[1:] - self.offsets[:-1])[order] + 2        # <s> ... </s>
    num_chunks = -(-doc_len // seq_len)
    self.chunk_doc = np.repeat(order, num_chunks)
    first = np.repeat(np.cumsum(num_chunks) - num_chunks, num_chunks)
    self.chunk_start = (np.arange(len(self.chunk_doc)) - first) * seq_len
    self.chunk_len = np.minimum(seq_len, np.repeat(doc_len, num_chunks) - self.chunk_start)
    # Next-fit: a chunk goes into the current row if it fits, else it starts a new row.
    self.chunk_col = np.zeros(len(self.chunk_len), np.int64)
    row_starts, used = [], seq_len
    for i, n in enumerate(self.chunk_len.tolist()):
      if used + n > seq_len:
        row_starts.append(i)
        used = 0
      self.chunk_col[i] = used
      used += n
    self.row_ptr = np.array(row_starts + [len(self.chunk_len)], np.int64)
    self.num_tokens = int(self.chunk_len.sum())

  def __len__(self) -> int:
    return len(self.row_ptr) - 1

  @property
  def pad_fraction(self) -> float:
    return 1.0 - self.num_tokens / max(1, len(self) * self.seq_len)

  def _doc_slice(self, doc: int, start: int, stop: int) -> np.ndarray:
    """Entries start..stop-1 of `<s> tokens </s>` for `doc`, pad past the end."""
    lo, n = int(self.offsets[doc]), int(self.offsets[doc + 1] - self.offsets[doc])
    j = np.arange(start, stop)
    out = np.full(j.shape, self.pad_id, np.int32)
    body = (j >= 1) & (j <= n)
    out[body] = self.tokens[lo + j[body] - 1]
    out[j == 0] = self.bos_id
    out[j == n + 1] = self.eos_id
    return out

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    if not 0 <= row < len(self):
      raise IndexError(row)
    s = self.seq_len
    inputs = np.full(s, self.pad_id, np.int32)
    targets = np.full(s, self.pad_id, np.int32)
    positions = np.zeros(s, np.int32)
    segment_ids = np.zeros(s, np.int32)
    loss_mask = np.zeros(s, np.float32)
    for seg, c in enumerate(range(self.row_ptr[row], self.row_ptr[row + 1]), start=1):
      doc, start, n, col = (int(self.chunk_doc[c]), int(self.chunk_start[c]),
                            int(self.chunk_len[c]), int(self.chunk_col[c]))
      ids = self._doc_slice(doc, start, start + n + 1)
      inputs[col:col + n] = ids[:n]
      targets[col:col + n] = ids[1:]
      positions[col:col + n] = np.arange(n)
      segment_ids[col:col + n] = seg
      doc_len = int(self.offsets[doc + 1] - self.offsets[doc]) + 2
      loss_mask[col:col + n] = 1.0
      if start + n == doc_len:   # this chunk ends the document: </s> predicts nothing
        loss_mask[col + n - 1] = 0.0
    return dict(inputs=inputs, targets=targets, positions=positions, segment_ids=segment_ids,
                loss_mask=loss_mask)


# -------------------------------------------------------------------------------- pipelines


def _grain_seed(seed: int) -> int:
  # grain shuffles epoch e with seed + e, so nearby run seeds would share shifted epochs.
  return int(np.random.SeedSequence([int(seed), 0x5eed]).generate_state(1)[0])


def train_iterator(rows: PackedRows, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, read_threads: int = 1, prefetch: int = 4):
  """Endless shuffled batches; process p gets rows [p*L, (p+1)*L) of each global batch.

  Batching L = batch_size / process_count consecutive rows of the shuffled stream and taking
  every process_count-th such batch gives exactly that slice, and each process only builds
  its own rows.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} outside [0, {process_count})')
  local = batch_size // process_count
  ds = grain.MapDataset.source(rows).shuffle(seed=_grain_seed(seed)).repeat()
  ds = ds.batch(local, drop_remainder=True)
  if process_count > 1:
    ds = ds[process_index::process_count]
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def validation_batches(rows: PackedRows, *, batch_size: int, max_batches: int,
                       process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first rows of the validation split in a fixed order, padded to whole batches."""
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  n = len(rows) if max_batches <= 0 else min(len(rows), max_batches * batch_size)
  local = batch_size // process_count
  empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
  batches = []
  for b in range(math.ceil(n / batch_size)):
    first = b * batch_size + process_index * local
    items = [rows[i] if i < n else empty for i in range(first, first + local)]
    batches.append({k: np.stack([it[k] for it in items]) for k in empty})
  return batches


# ------------------------------------------------------------------------------- build_data


def build_data(cfg, *, seq_len: int, batch_size: int, seed: int, workdir: str,
               process_index: int = 0, process_count: int = 1) -> DataBundle:
  """Tokenizer, endless train iterator and fixed validation batches for one run.

  stats: files (matched), files_read, skipped_binary, undecodable (files or lines decoded with
  replacement), {train,val}_{docs,tokens,chars,bytes,rows}, train_pad_fraction, val_eval_tokens
  and val_eval_bytes (loss-masked targets in val_batches and the UTF-8 bytes they spell, for
  bits-per-byte), cache_hit, cache_dir, tokenize_seconds, build_seconds, vocab_size.
  """
  t0 = time.perf_counter()
  if cfg.source not in SOURCES:
    raise ValueError(f'unknown data.source {cfg.source!r}; expected one of {SOURCES}')
  if cfg.source == 'synthetic':
    return build_synthetic(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           workdir=workdir, process_index=process_index,
                           process_count=process_count)
  if not 0.0 < cfg.val_fraction < 1.0:
    raise ValueError(f'data.val_fraction must be in (0, 1), got {cfg.val_fraction}')
  files = _resolve_files(cfg)

  corpus = None

  def get_corpus() -> _Corpus:
    nonlocal corpus
    if corpus is None:
      corpus = read_corpus(cfg, files)
    return corpus

  def bpe_texts():
    budget, out = int(cfg.bpe_train_chars or 0), []
    for text in get_corpus().train:
      out.append(text)
      budget -= len(text)
      if cfg.bpe_train_chars and budget <= 0:
        break
    return out

  tok = tokenizer_lib.build_tokenizer(
      cfg.tokenizer, workdir=workdir, train_texts=bpe_texts, vocab_size=cfg.vocab_size,
      path=cfg.tokenizer_path or None)

  key = _cache_key(cfg, files, tok)
  cache_root = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else os.path.join(
      workdir, 'data_cache')
  path = os.path.join(cache_root, key)
  cache_hit = os.path.isfile(os.path.join(path, 'manifest.json'))
  if not cache_hit:
    os.makedirs(cache_root, exist_ok=True)
    _write_cache(path, key, cfg, tok, get_corpus(), files)
  manifest, arrays = _load_cache(path)

  def rows_of(split, order=None):
    return PackedRows(arrays[f'{split}_tokens'], arrays[f'{split}_offsets'], seq_len=seq_len,
                      bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, doc_order=order)

  num_train_docs = len(arrays['train_offsets']) - 1
  train_rows = rows_of('train', np.random.default_rng(seed).permutation(num_train_docs))
  val_rows = rows_of('val')
  train_iter = train_iterator(
      train_rows, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, read_threads=cfg.read_threads, prefetch=cfg.prefetch)
  val_batches = validation_batches(val_rows, batch_size=batch_size, max_batches=cfg.val_batches,
                                   process_index=process_index, process_count=process_count)
  # Counted over the rows of the global validation batches, so every process reports the same.
  token_bytes = tok.token_bytes
  val_eval_tokens = val_eval_bytes = 0
  num_val = len(val_rows) if cfg.val_batches <= 0 else min(len(val_rows),
                                                           cfg.val_batches * batch_size)
  for i in range(num_val):
    row = val_rows[i]
    keep = row['loss_mask'] > 0
    val_eval_tokens += int(keep.sum())
    val_eval_bytes += int(token_bytes[row['targets'][keep]].sum())

  read, splits = manifest['read'], manifest['splits']
  stats = dict(
      source=cfg.source, tokenizer=cfg.tokenizer, vocab_size=tok.vocab_size,
      files=read['files'], files_read=read['files_read'], skipped_binary=read['skipped_binary'],
      undecodable=read['undecodable'], empty_docs=read['empty_docs'] + read['empty_records'],
      capped=read['capped'],
      **{f'{s}_{k}': splits[s][k] for s in ('train', 'val') for k in
         ('docs', 'tokens', 'chars', 'bytes')},
      train_rows=len(train_rows), val_rows=len(val_rows),
      train_pad_fraction=round(train_rows.pad_fraction, 4),
      val_eval_batches=len(val_batches), val_eval_tokens=int(val_eval_tokens),
      val_eval_bytes=int(val_eval_bytes),
      cache_hit=cache_hit, cache_dir=path,
      tokenize_seconds=0.0 if cache_hit else manifest['tokenize_seconds'],
      build_seconds=round(time.perf_counter() - t0, 3))
  logging.info('data: %s', json.dumps(stats))
  return DataBundle(tokenizer=tok, train_iter=train_iter, val_batches=val_batches, stats=stats)



# ------------------------------------------------------------------------------ synthetic


def _task_param_fields() -> dict:
  from plt_jax import tasks  # pylint: disable=g-import-not-at-top
  return {f.name: -1 for cls in tasks.TASKS.values() for f in dataclasses.fields(cls)}


def task_spec(cfg):
  """The `plt_jax.tasks` spec named by data.task with data.task_params; one-line errors."""
  from plt_jax import tasks  # pylint: disable=g-import-not-at-top
  if cfg.task not in tasks.TASKS:
    raise ValueError(f'data.task={cfg.task!r}: unknown task; expected one of {tuple(tasks.TASKS)}')
  cls = tasks.TASKS[cfg.task]
  params = cfg.task_params
  params = params.to_dict() if hasattr(params, 'to_dict') else dict(params or {})
  params = {k: v for k, v in params.items() if v is not None and not (
      isinstance(v, int) and not isinstance(v, bool) and v == -1)}
  fields = tuple(f.name for f in dataclasses.fields(cls))
  for k, v in params.items():
    if k not in fields:
      raise ValueError(f'data.task_params.{k}: not a parameter of task {cfg.task!r}; expected '
                       f'one of {fields}')
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f'data.task_params.{k}={v!r}: must be an integer')
  try:
    return cls(**{k: int(v) for k, v in params.items()})
  except ValueError as e:
    raise ValueError(f'data.task_params: {e}') from None


def heldout_set(cfg) -> list:
  """The task's fixed held-out instances: drawn with data.split_seed, not the run seed, so runs
  that differ only in their seed are scored on the same set."""
  from plt_jax import tasks  # pylint: disable=g-import-not-at-top
  n = int(cfg.task_heldout)
  if n < 1:
    raise ValueError(f'data.task_heldout={cfg.task_heldout!r}: must be >= 1')
  return tasks.heldout(task_spec(cfg), n, seed=int(cfg.split_seed))


class TaskTokenizer(tokenizer_lib.Tokenizer):
  """A synthetic task's fixed vocabulary: id i is the token string `vocab.tokens[i]`.

  The tokens are symbols, not text, so none spells any bytes: `token_bytes` is all 0, which
  leaves bits per byte absent (or NaN) rather than a number with no meaning.
  """

  def __init__(self, vocab):
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    from plt_jax import tasks  # pylint: disable=g-import-not-at-top
    backend = tokenizers.Tokenizer(models.WordLevel(
        {t: i for i, t in enumerate(vocab.tokens)}, unk_token=tasks.PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in tasks.SPECIALS])
    super().__init__(backend, bos_token=tasks.BOS, eos_token=tasks.EOS, pad_token=tasks.PAD,
                     source='synthetic task')
    self.vocab = vocab

  @property
  def token_bytes(self) -> np.ndarray:
    return np.zeros(self.vocab_size, np.int32)


def _save_task_tokenizer(tok: TaskTokenizer, workdir: str, task: str) -> None:
  """Writes workdir/tokenizer (what loading and export read), or checks the one already there."""
  tok_dir = os.path.join(workdir, 'tokenizer')
  meta_path = os.path.join(tok_dir, tokenizer_lib._META_FILE)  # pylint: disable=protected-access
  if os.path.isfile(os.path.join(tok_dir, 'tokenizer.json')):
    meta = {}
    if os.path.isfile(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
    if meta.get('sha256') != tok.sha256:
      raise ValueError(f'{tok_dir} holds a different tokenizer than task {task!r}; use a new '
                       'workdir or delete that folder')
    return
  tmp = f'{tok_dir}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tok.save_pretrained(tmp)
  with open(os.path.join(tmp, os.path.basename(meta_path)), 'w') as f:
    json.dump({'kind': 'synthetic', 'task': task, 'vocab_size_actual': tok.vocab_size,
               'sha256': tok.sha256}, f, indent=2)
  try:
    os.replace(tmp, tok_dir)
  except OSError:  # another process wrote it first; the same vocabulary
    shutil.rmtree(tmp, ignore_errors=True)


class SyntheticIterator(grain.DatasetIterator):
  """Endless packed training batches of a task; process p gets rows [p*L, (p+1)*L).

  Its state is the number of batches produced: the stream is a pure function of (spec, seed,
  held-out set), so `set_state` rebuilds it and skips that many batches, and a resumed run
  sees exactly the batches an uninterrupted one would.
  """

  def __init__(self, spec, *, batch_size: int, seq_len: int, seed: int, exclude: Sequence,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    if batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} is not divisible by process_count '
                       f'{process_count}')
    self._spec, self._batch_size, self._seq_len, self._seed = spec, batch_size, seq_len, seed
    self._exclude = list(exclude)
    local = batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    self._restart(0)

  def _restart(self, batches: int) -> None:
    from plt_jax import tasks  # pylint: disable=g-import-not-at-top
    self._stream = tasks.train_batches(self._spec, batch_size=self._batch_size,
                                       seq_len=self._seq_len, seed=self._seed,
                                       exclude=self._exclude)
    self._count = 0
    for _ in range(batches):
      next(self._stream)
      self._count += 1

  def __next__(self) -> dict:
    batch = next(self._stream)
    self._count += 1
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'batches': self._count}

  def set_state(self, state: dict) -> None:
    self._restart(int(state['batches']))


def build_synthetic(cfg, *, seq_len: int, batch_size: int, seed: int, workdir: str,
                    process_index: int = 0, process_count: int = 1) -> DataBundle:
  """`build_data` for data.source='synthetic': a `plt_jax.tasks` task instead of a corpus.

  Training rows come from the task's stream for the run seed, without the held-out instances;
  validation is the loss on the held-out set (`heldout_set`), packed the same way and cut to
  data.val_batches batches. The vocabulary is the task's own (`TaskTokenizer`).
  """
  from plt_jax import tasks  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  spec = task_spec(cfg)
  if spec.max_len > seq_len:
    raise ValueError(f'train.seq_len={seq_len}: shorter than the longest {cfg.task} instance '
                     f'({spec.max_len} tokens)')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  tok = TaskTokenizer(spec.vocab)
  if workdir and process_index == 0:
    _save_task_tokenizer(tok, workdir, cfg.task)
  held = heldout_set(cfg)
  train_iter = SyntheticIterator(spec, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                 exclude=held, process_index=process_index,
                                 process_count=process_count)
  val_global = list(tasks.pack_rows(held, rows=batch_size, seq_len=seq_len))
  if cfg.val_batches > 0:
    val_global = val_global[:cfg.val_batches]
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  val_batches = [{k: v[rows] for k, v in b.items()} for b in val_global]
  val_rows = sum(int((b['segment_ids'] > 0).any(axis=1).sum()) for b in val_global)
  val_tokens = sum(int((b['segment_ids'] > 0).sum()) for b in val_global)
  stats = dict(
      source=cfg.source, task=cfg.task, task_params=dataclasses.asdict(spec),
      tokenizer='task', vocab_size=tok.vocab_size,
      # The training stream is endless: no epoch, so no train token or row count.
      train_tokens=0, train_rows=0, val_docs=len(held), val_tokens=val_tokens,
      val_rows=val_rows, val_eval_batches=len(val_batches),
      val_eval_tokens=int(sum(float(b['loss_mask'].sum()) for b in val_global)),
      build_seconds=round(time.perf_counter() - t0, 3))
  logging.info('data: %s', json.dumps(stats))
  return DataBundle(tokenizer=tok, train_iter=train_iter, val_batches=val_batches, stats=stats)
