"""Preparing a corpus: documents -> token ids -> ArrayRecord shards + a manifest.

Layout of a prepared directory (local or gs://):

  plan.json                 the dataset key, the data config and the units (see sources.py)
  tokenizer/                the tokenizer every shard was encoded with (tokenizer.save_folder)
  train/train-00003-of-00012.arrayrecord, val/val-00003-of-00012.arrayrecord
                            one shard per unit and split; a record is one document's token ids
                            (little-endian uint16, or uint32 above 65536 ids), no <s>/</s>
  units/unit-00003.json     written after the unit's shards: its counts; marks the unit done
  manifest.json             written once every unit is done: what a training run reads

Parallelism is grain's: the units form a `grain.MapDataset` whose map prepares one unit (reads
its documents, tokenizes them a batch at a time, writes its shards), and `mp_prefetch` runs that
map in worker processes. A unit's shards depend on the unit alone, so any number of workers (and
hosts) writes the same bytes. Host i of N prepares the units u with u % N == i; the host that
finishes last (it finds every unit marked done) writes the manifest, or `finalize` does.
A killed run resumes at unit granularity: units already marked done are skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Callable, Optional

from absl import flags
from absl import logging
from array_record.python import array_record_module
import grain
import ml_collections
import numpy as np
import tokenizers

from plt_jax import fileio
from plt_jax import tokenizer as tokenizer_lib
from plt_jax.data import sources

FORMAT = 'plt_jax.prepared'
VERSION = 1
MANIFEST, PLAN = 'manifest.json', 'plan.json'
SPLITS = ('train', 'val')
_ENCODE_CHARS = 1 << 20   # characters tokenized per call: bounds a worker's memory


def dataset_key(cfg) -> str:
  """Changes with anything that changes the shards: the source, the split, the tokenizer
  settings and the unit size."""
  spec = dict(version=VERSION, source=sources.source_spec(cfg), tokenizer=cfg.tokenizer,
              unit_mib=float(cfg.unit_mib))
  if cfg.tokenizer == 'bpe':
    spec.update(vocab_size=int(cfg.vocab_size), bpe_train_chars=int(cfg.bpe_train_chars or 0))
  if cfg.tokenizer == 'hf':
    spec.update(tokenizer_path=str(cfg.tokenizer_path))
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def ids_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 2**16 else 'uint32'


def shard_path(split: str, unit: int, num_units: int) -> str:
  return f'{split}/{split}-{unit:05d}-of-{num_units:05d}.arrayrecord'


def _unit_marker(out, unit: int):
  return fileio.path(out) / 'units' / f'unit-{unit:05d}.json'


def _is_val(cfg, key: str, force: dict) -> bool:
  if key in force:
    return force[key] == 'val'
  return sources.unit_hash('split', int(cfg.split_seed), key) < float(cfg.val_fraction)


# ------------------------------------------------------------------------ one unit of work


class PrepareUnit:
  """grain map: a job {index, unit, force} -> that unit's record (its shards are written).

  Picklable (plain data only), so grain's worker processes get their own copy; the tokenizer is
  rebuilt from its JSON in each process on first use.
  """

  def __init__(self, data_config: dict, out: str, tokenizer_json: str, roles: dict,
               dtype: str, num_units: int):
    self.data_config, self.out, self.tokenizer_json = data_config, out, tokenizer_json
    self.roles, self.dtype, self.num_units = roles, dtype, num_units
    self._tok = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_tok'}

  def __setstate__(self, state):
    self.__dict__.update(state, _tok=None)

  def _tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tok is None:
      self._tok = tokenizer_lib.Tokenizer(tokenizers.Tokenizer.from_str(self.tokenizer_json),
                                          **self.roles)
    return self._tok

  def __call__(self, job: dict) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg = ml_collections.ConfigDict(self.data_config)
    index, force = job['index'], job.get('force') or {}
    tok, dtype = self._tokenizer(), np.dtype(self.dtype).newbyteorder('<')
    counts = sources.new_counts()
    out = fileio.path(self.out)
    remote = fileio.is_remote(out)
    scratch = tempfile.mkdtemp(prefix='plt_prepare_') if remote else None
    finals, temps, writers = {}, {}, {}
    for split in SPLITS:
      finals[split] = out / shard_path(split, index, self.num_units)
      if remote:
        temps[split] = os.path.join(scratch, finals[split].name)
      else:
        finals[split].parent.mkdir(parents=True, exist_ok=True)
        for stale in finals[split].parent.glob(f'.{finals[split].name}.tmp*'):  # a killed run's
          stale.unlink()
        temps[split] = os.fspath(finals[split].parent / f'.{finals[split].name}.tmp{os.getpid()}')
      writers[split] = array_record_module.ArrayRecordWriter(temps[split], 'group_size:1')
    totals = {s: dict(docs=0, tokens=0, chars=0, bytes=0) for s in SPLITS}
    # Where the splits could borrow from if one of them comes out empty (see finalize).
    lowest_train, highest_val = None, None
    seed = int(cfg.split_seed)

    def flush(batch):
      for (key, split, text), ids in zip(batch, tok.encode_batch([t for _, _, t in batch])):
        writers[split].write(np.asarray(ids, dtype).tobytes())
        t = totals[split]
        t['docs'] += 1
        t['tokens'] += len(ids)
        t['chars'] += len(text)
        t['bytes'] += len(text.encode('utf-8'))

    batch, chars = [], 0
    for key, text in sources.read_unit(job['unit'], cfg, counts):
      val = _is_val(cfg, key, force)
      h = sources.unit_hash('split', seed, key)
      if not val and (lowest_train is None or h < lowest_train[0]):
        lowest_train = [h, key]
      if val and (highest_val is None or h > highest_val[0]):
        highest_val = [h, key]
      batch.append((key, 'val' if val else 'train', text))
      chars += len(text)
      if chars >= _ENCODE_CHARS:
        flush(batch)
        batch, chars = [], 0
    if batch:
      flush(batch)
    for split in SPLITS:
      writers[split].close()
      if remote:
        with open(temps[split], 'rb') as f:
          fileio.write_bytes(finals[split], f.read())
        os.remove(temps[split])
      else:
        os.replace(temps[split], finals[split])
    if scratch:
      os.rmdir(scratch)
    record = dict(unit=index, splits=totals, counts=counts, lowest_train=lowest_train,
                  highest_val=highest_val, force=force,
                  seconds=round(time.perf_counter() - t0, 3),
                  cpu_seconds=round(time.process_time() - cpu0, 3))
    fileio.write_json(_unit_marker(out, index), record)
    return record


def run_units(fn: Callable[[dict], dict], jobs: list[dict], workers: int):
  """Yields fn(job) for every job, in order, with `workers` grain worker processes (1: here)."""
  if not jobs:
    return
  ds = grain.MapDataset.source(jobs).map(fn)
  if workers <= 1:
    # One unit at a time on this thread: an error or a Ctrl-C stops the work where it is, with
    # no reader thread left writing shards behind it.
    for i in range(len(ds)):
      yield ds[i]
    return
  if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults suffice)
    flags.FLAGS.mark_as_parsed()
  yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)) \
      .mp_prefetch(grain.MultiprocessingOptions(num_workers=min(workers, len(jobs)),
                                                per_worker_buffer_size=4))


# ---------------------------------------------------------------------------- tokenizer


def _tokenizer_meta(cfg) -> dict:
  want = {'kind': cfg.tokenizer}
  if cfg.tokenizer == 'bpe':
    want['vocab_size'] = int(cfg.vocab_size)
  if cfg.tokenizer == 'hf':
    want['path'] = str(cfg.tokenizer_path)
  return want


def bpe_sample(cfg, units: list[dict]):
  """Training-split texts for the BPE: units in an order seeded by data.split_seed, until
  data.bpe_train_chars characters (0: all of them). Streams: nothing is kept."""
  budget = int(cfg.bpe_train_chars or 0)
  order = sorted(range(len(units)), key=lambda i: sources.unit_hash('bpe', cfg.split_seed, i))
  for i in order:
    for key, text in sources.read_unit(units[i], cfg, sources.new_counts()):
      if _is_val(cfg, key, {}):
        continue
      yield text
      budget -= len(text)
      if cfg.bpe_train_chars and budget <= 0:
        return


def _make_tokenizer(cfg, units: list[dict]) -> tokenizer_lib.Tokenizer:
  kind = cfg.tokenizer
  if kind == 'byte':
    return tokenizer_lib.build_tokenizer('byte', workdir=None)
  if kind == 'hf':
    return tokenizer_lib.build_tokenizer('hf', workdir=None, path=cfg.tokenizer_path or None)
  if kind == 'bpe':
    return tokenizer_lib.build_tokenizer('bpe', workdir=None, train_texts=bpe_sample(cfg, units),
                                         vocab_size=cfg.vocab_size)
  raise ValueError(f'unknown data.tokenizer {kind!r}; expected one of {tokenizer_lib.KINDS}')


def _shard_tokenizer(cfg, out, units, *, first_host: bool, given, wait_s: float):
  """The tokenizer of `out`: made once (by the first host, before any unit is tokenized) and
  saved in out/tokenizer; the other hosts wait for it. `given` (a run's own tokenizer) is used
  instead of making one, and must equal the one already there."""
  folder = fileio.path(out) / 'tokenizer'
  if tokenizer_lib.read_meta(folder) is None:
    if first_host or given is not None:
      tok = given if given is not None else _make_tokenizer(cfg, units)
      tokenizer_lib.save_folder(tok, folder, _tokenizer_meta(cfg))
    else:
      deadline = time.monotonic() + wait_s
      while tokenizer_lib.read_meta(folder) is None:
        if time.monotonic() > deadline:
          raise ValueError(f'{folder}: no tokenizer after {wait_s:.0f} s; it is made by the host '
                           'with --shard=0')
        time.sleep(2.0)
  tok = tokenizer_lib.Tokenizer.from_pretrained(os.fspath(folder))
  if given is not None and given.sha256 != tok.sha256:
    raise ValueError(f'{out}: its tokenizer (sha256 {tok.sha256[:12]}) differs from the run\'s '
                     f'(sha256 {given.sha256[:12]}); use another data.cache_dir or workdir')
  return tok


# ------------------------------------------------------------------------- the whole job


def _plan(cfg, out, key: str) -> dict:
  """The plan in `out` (made and written when there is none); refuses another dataset's."""
  out = fileio.path(out)
  for name in (MANIFEST, PLAN):
    if (out / name).is_file():
      held = fileio.read_json(out / name).get('key')
      if held != key:
        raise ValueError(f'{out} holds another dataset (key {held}, this config gives {key}); '
                         'use another --out')
  if (out / PLAN).is_file():
    return fileio.read_json(out / PLAN)
  if out.exists() and any(True for _ in out.iterdir()):
    raise ValueError(f'{out} is not empty and holds no {PLAN}: not a prepared data directory; '
                     'use an empty or new --out')
  unit_bytes = max(1, int(float(cfg.unit_mib) * 2**20))
  units, facts = sources.plan_units(cfg, unit_bytes)
  if not units:
    raise ValueError(f'data.source={cfg.source!r}: nothing to read (no unit planned)')
  plan = dict(format=FORMAT, version=VERSION, key=key, data_config=cfg.to_dict(),
              source=sources.source_spec(cfg), facts=facts, units=units)
  fileio.write_json(out / PLAN, plan)
  return fileio.read_json(out / PLAN)   # a host that wrote first wins; the content is the same


def prepare(cfg, out, *, workers: int = 1, shard: int = 0, num_shards: int = 1,
            tokenizer: Optional[tokenizer_lib.Tokenizer] = None, finalize_when_done: bool = True,
            tokenizer_wait_s: float = 3600.0, say: Callable[[str], None] = logging.info
            ) -> Optional[dict]:
  """Prepares this host's units of `cfg`'s corpus into `out`; returns the manifest once every
  unit of every host is done (written here by the host finishing last), else None."""
  if not 0 <= shard < num_shards:
    raise ValueError(f'--shard={shard} is out of range [0, {num_shards}) for --num_shards='
                     f'{num_shards}')
  if cfg.source == 'synthetic':
    raise ValueError('data.source=synthetic is generated on the fly; there is nothing to prepare')
  if cfg.source not in sources.SOURCES:
    raise ValueError(f'unknown data.source {cfg.source!r}; expected one of {sources.SOURCES}')
  if not 0.0 < float(cfg.val_fraction) < 1.0:
    raise ValueError(f'data.val_fraction must be in (0, 1), got {cfg.val_fraction}')
  t0 = time.perf_counter()
  out = fileio.path(out)
  key = dataset_key(cfg)
  plan = _plan(cfg, out, key)
  if (out / MANIFEST).is_file():
    _shard_tokenizer(cfg, out, plan['units'], first_host=shard == 0, given=tokenizer,
                     wait_s=tokenizer_wait_s)
    return fileio.read_json(out / MANIFEST)
  units = plan['units']
  tok = _shard_tokenizer(cfg, out, units, first_host=shard == 0, given=tokenizer,
                         wait_s=tokenizer_wait_s)
  fn = _unit_fn(plan, out, tok)
  todo = [dict(index=i, unit=u) for i, u in enumerate(units)
          if i % num_shards == shard and not _unit_marker(out, i).is_file()]
  mine = sum(1 for i in range(len(units)) if i % num_shards == shard)
  say(f'prepare: {len(units)} units in {out}; this host: {mine} ({mine - len(todo)} already '
      f'done), {workers} worker(s)')
  # One tokenizer thread per worker: `workers` is the parallelism.
  previous = os.environ.get('TOKENIZERS_PARALLELISM')
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  try:
    for n, record in enumerate(run_units(fn, todo, workers), start=1):
      t = record['splits']['train']
      say(f'prepare: unit {record["unit"]} done ({n}/{len(todo)}): {t["docs"]:,} train docs, '
          f'{t["tokens"]:,} tokens, {record["seconds"]:.1f} s')
  finally:
    if previous is None:
      os.environ.pop('TOKENIZERS_PARALLELISM', None)
    else:
      os.environ['TOKENIZERS_PARALLELISM'] = previous
  if not finalize_when_done:
    return None
  missing = [i for i in range(len(units)) if not _unit_marker(out, i).is_file()]
  if missing:
    say(f'prepare: {len(missing)} unit(s) of other hosts still missing; the last host to '
        'finish writes the manifest')
    return None
  return finalize(out, seconds=time.perf_counter() - t0, say=say)


def _unit_fn(plan: dict, out, tok) -> PrepareUnit:
  return PrepareUnit(plan['data_config'], os.fspath(out), tok.backend.to_str(),
                     dict(bos_token=tok.bos_token, eos_token=tok.eos_token,
                          pad_token=tok.pad_token),
                     ids_dtype(tok.vocab_size), len(plan['units']))


def finalize(out, *, seconds: float = 0.0, say: Callable[[str], None] = logging.info) -> dict:
  """Writes out/manifest.json from the units' records (every unit must be done).

  A split that came out empty borrows one document: the training document with the lowest split
  hash goes to validation (the highest validation one to training), by preparing its unit again
  with that document moved, so even a tiny corpus has both splits.
  """
  out = fileio.path(out)
  if not (out / PLAN).is_file():
    raise ValueError(f'{out}: no {PLAN}; not a prepared data directory')
  plan = fileio.read_json(out / PLAN)
  units = plan['units']
  missing = [i for i in range(len(units)) if not _unit_marker(out, i).is_file()]
  if missing:
    raise ValueError(f'{out}: {len(missing)} of {len(units)} units are not prepared yet (the first '
                     f'is unit {missing[0]}); run prepare_data for the remaining --shard values')
  records = [fileio.read_json(_unit_marker(out, i)) for i in range(len(units))]
  cfg = ml_collections.ConfigDict(plan['data_config'])

  def total(split, field):
    return sum(r['splits'][split][field] for r in records)

  counts = sources.new_counts()
  for r in records:
    sources.merge_counts(counts, r['counts'])
  docs = total('train', 'docs') + total('val', 'docs')
  if docs == 0:
    raise ValueError(f'the corpus is empty: source {cfg.source!r} gave no non-empty document '
                     f'({counts["skipped_binary"]} skipped as binary, '
                     f'{counts["empty_docs"] + counts["empty_records"]} empty)')
  if docs < 2:
    raise ValueError('the corpus has a single document; need at least 2 to hold one out for '
                     'validation')
  for split, pick, field, sign in (('val', 'train', 'lowest_train', 1),
                                   ('train', 'val', 'highest_val', -1)):
    if total(split, 'docs'):
      continue
    donor = min((r for r in records if r[field]), key=lambda r: sign * r[field][0])
    say(f'prepare: the {split} split is empty; moving {donor[field][1]} from {pick} to {split}')
    tok = tokenizer_lib.Tokenizer.from_pretrained(os.fspath(out / 'tokenizer'))
    force = {**donor.get('force', {}), donor[field][1]: split}
    fresh = _unit_fn(plan, out, tok)(dict(index=donor['unit'], unit=units[donor['unit']],
                                          force=force))
    records[donor['unit']] = fresh
  tok_meta = tokenizer_lib.read_meta(out / 'tokenizer') or {}
  manifest = dict(
      format=FORMAT, version=VERSION, key=plan['key'],
      created=time.strftime('%Y-%m-%dT%H:%M:%S'),
      source=plan['source'], facts=plan['facts'], units=len(units),
      tokenizer=dict(kind=tok_meta.get('kind'), vocab_size=tok_meta.get('vocab_size_actual'),
                     sha256=tok_meta.get('sha256'),
                     dtype=ids_dtype(int(tok_meta.get('vocab_size_actual') or 0))),
      splits={split: dict(
          docs=total(split, 'docs'), tokens=total(split, 'tokens'), chars=total(split, 'chars'),
          bytes=total(split, 'bytes'),
          shards=[dict(path=shard_path(split, r['unit'], len(units)),
                       records=r['splits'][split]['docs']) for r in records])
              for split in SPLITS},
      skipped=dict(binary=counts['skipped_binary'], binary_where=counts['skipped_where'],
                   undecodable=counts['undecodable'],
                   undecodable_where=counts['undecodable_where'],
                   replaced_chars=counts['replaced_chars'], empty_docs=counts['empty_docs'],
                   empty_records=counts['empty_records']),
      files_read=counts['files_read'],
      unit_seconds=round(sum(r['seconds'] for r in records), 3),
      finalize_seconds=round(seconds, 3))
  fileio.write_json(out / MANIFEST, manifest)
  say(f'prepare: wrote {out / MANIFEST}: {manifest["splits"]["train"]["docs"]:,} train / '
      f'{manifest["splits"]["val"]["docs"]:,} val documents')
  return manifest


def read_manifest(directory) -> dict:
  """The manifest of a prepared directory; a one-line error when there is none."""
  p = fileio.path(directory) / MANIFEST
  if not p.is_file():
    hint = (' (its units are not all done: finish them, or run prepare_data --finalize)'
            if (fileio.path(directory) / PLAN).is_file() else '')
    raise ValueError(f'{directory}: no {MANIFEST}; not a prepared data directory{hint}')
  manifest = fileio.read_json(p)
  if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
    raise ValueError(f'{p}: not a manifest of this version ({manifest.get("format")} '
                     f'v{manifest.get("version")}, expected {FORMAT} v{VERSION})')
  return manifest
