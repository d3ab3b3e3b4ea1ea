"""Pretraining data: sources -> prepared ArrayRecord shards -> packed lanes -> grain iterator.

`build_data` is the one entry point of a training run. A corpus source (`stdlib`, `files`,
`jsonl`, `parquet`, `hf`) is prepared once into ArrayRecord shards (`prepare.py`; also
`python -m experiments.prepare_data`), in data.prepared when given, else in
`data.cache_dir/<dataset key>/` ('' = `<workdir>/data`), where a later run with the same source
and tokenizer settings finds and reuses it. Training reads the shards through grain's ArrayRecord
source and packs documents into rows on the fly (`pipeline.py`, `packing.py`).

data.source='synthetic' skips all of that: rows come from a `plt_jax.data.tasks` task
(`synthetic.py`), whose fixed vocabulary is the tokenizer. See docs/data.md.
"""
from __future__ import annotations

import math
import os
import time

from absl import logging
import ml_collections

from plt_jax import fileio
from plt_jax import tokenizer as tokenizer_lib
from plt_jax.data import packing
from plt_jax.data import pipeline
from plt_jax.data import prepare as prepare_lib
from plt_jax.data.bundle import DataBundle, DataStats
from plt_jax.data.sources import SOURCES, stdlib_files
from plt_jax.data.synthetic import (TaskTokenizer, build_synthetic, heldout_set,  # noqa: F401
                                    task_spec, _task_param_fields)

__all__ = ['DataBundle', 'DataStats', 'SOURCES', 'TaskTokenizer', 'build_data',
           'default_data_config', 'heldout_set', 'stdlib_files', 'task_spec']


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings; the training seed and the batch/sequence shape come from the caller."""
  cfg = ml_collections.ConfigDict()
  cfg.source = 'stdlib'        # 'stdlib' | 'files' | 'jsonl' | 'parquet' | 'hf' | 'synthetic'
  cfg.paths = ()               # globs (recursive '**' allowed; gs:// too) for files/jsonl/parquet;
                               # hf: the data files of hf_path, if any
  cfg.text_field = 'text'      # JSONL key / Parquet column / hf field holding a document
  cfg.hf_path = ''             # hf: a dataset name, or a builder such as 'json' or 'parquet'
  cfg.hf_name = ''             # hf: the dataset's configuration name, if any
  cfg.hf_split = 'train'       # hf: the split streamed
  cfg.stdlib_tests = False     # also take the stdlib's test/ folders (see README)
  cfg.max_chars = 4_000_000    # cap on the source read, in bytes (see docs/data.md); 0 = all
  cfg.val_fraction = 0.02      # share of documents (files, for file sources) held out
  cfg.split_seed = 0           # fixes the split and the capped subset, apart from the run seed
  cfg.tokenizer = 'bpe'        # 'bpe' | 'byte' | 'hf'
  cfg.tokenizer_path = ''      # hf: a tokenizer.json or a folder holding one
  cfg.vocab_size = 4096        # bpe only
  cfg.bpe_train_chars = 50_000_000  # characters of a seeded sample of the train split the BPE
                                    # learns from (0: the whole split)
  cfg.val_batches = 8          # validation batches kept; 0 = the whole validation split
  cfg.prepared = ''            # a prepared directory or URL to train on (experiments.prepare_data)
  cfg.cache_dir = ''           # where runs prepare their source: <cache_dir>/<dataset key>;
                               # '' = <workdir>/data. Share one across runs to prepare once.
  cfg.prepare_workers = 1      # grain worker processes when a run prepares its source
  cfg.unit_mib = 8.0           # source MiB per unit of preparation (one shard per split)
  cfg.prefetch = 4             # training batches a thread builds ahead (0: none)
  cfg.read_threads = 1         # accepted for older configs; the lanes read in the prefetch thread
  # synthetic only (see build_synthetic): a name of plt_jax.data.tasks.TASKS and its fields.
  cfg.task = ''
  # Every task's difficulty fields, -1 = the spec's default (declared, and typed int, so that the
  # command line can set them: --config.data.task_params.hops=8).
  cfg.task_params = ml_collections.ConfigDict(_task_param_fields())
  cfg.task_heldout = 256       # held-out instances (validation loss and exact-match accuracy)
  return cfg


def _run_tokenizer(cfg, workdir):
  """The run's own tokenizer (workdir/tokenizer) if it has one: a resumed run keeps it."""
  if not workdir or not (fileio.path(workdir) / 'tokenizer' / 'tokenizer.json').is_file():
    return None
  if cfg.prepared:  # the prepared directory decides; compared by sha256 below
    return tokenizer_lib.Tokenizer.from_pretrained(os.fspath(fileio.path(workdir) / 'tokenizer'))
  # Checks the saved kind / vocabulary size against the config, and loads it.
  return tokenizer_lib.build_tokenizer(cfg.tokenizer, workdir=workdir, vocab_size=cfg.vocab_size,
                                       path=cfg.tokenizer_path or None)


def prepared_directory(cfg, workdir) -> fileio.PathLike:
  """Where the run's prepared data is: data.prepared, else <cache_dir or workdir/data>/<key>."""
  if cfg.prepared:
    return fileio.path(cfg.prepared)
  root = fileio.path(cfg.cache_dir) if cfg.cache_dir else fileio.path(workdir) / 'data'
  return root / prepare_lib.dataset_key(cfg)


def build_data(cfg, *, seq_len: int, batch_size: int, seed: int, workdir: str,
               process_index: int = 0, process_count: int = 1) -> DataBundle:
  """Tokenizer, endless train iterator and fixed validation batches for one run.

  Prepares the source first when its prepared directory has no manifest (with several
  processes, process 0 calls this first and the others after it, see train._build_data).
  """
  t0 = time.perf_counter()
  if cfg.source not in SOURCES:
    raise ValueError(f'unknown data.source {cfg.source!r}; expected one of {SOURCES}')
  if cfg.source == 'synthetic':
    return build_synthetic(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           workdir=workdir, process_index=process_index,
                           process_count=process_count)
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  run_tok = _run_tokenizer(cfg, workdir)
  pdir = prepared_directory(cfg, workdir)
  prepared_now, prepare_seconds = False, 0.0
  if cfg.prepared or (pdir / prepare_lib.MANIFEST).is_file():
    manifest = prepare_lib.read_manifest(pdir)
  else:
    t1 = time.perf_counter()
    manifest = prepare_lib.prepare(cfg, pdir, workers=int(cfg.prepare_workers), tokenizer=run_tok)
    prepared_now, prepare_seconds = True, round(time.perf_counter() - t1, 3)
  tok = tokenizer_lib.Tokenizer.from_pretrained(os.fspath(pdir / 'tokenizer'))
  if tok.sha256 != manifest['tokenizer']['sha256']:
    raise ValueError(f'{pdir}: tokenizer/ is not the tokenizer its shards were made with')
  if run_tok is not None and run_tok.sha256 != tok.sha256:
    raise ValueError(f'{pdir}: its tokenizer (sha256 {tok.sha256[:12]}) differs from the run\'s '
                     f'({workdir}/tokenizer, sha256 {run_tok.sha256[:12]}); use the data the run '
                     'started with, or a new workdir')
  if run_tok is None and workdir:
    meta = {k: v for k, v in (tokenizer_lib.read_meta(pdir / 'tokenizer') or {}).items()
            if k not in ('sha256', 'vocab_size_actual')}
    tokenizer_lib.save_folder(tok, fileio.path(workdir) / 'tokenizer', meta)

  dtype, splits = manifest['tokenizer']['dtype'], manifest['splits']
  train_iter = pipeline.LaneIterator(
      pipeline.ShardedDocs(pdir, splits['train'], dtype), batch_size=batch_size,
      seq_len=seq_len, seed=seed, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
      process_index=process_index, process_count=process_count, prefetch=int(cfg.prefetch))
  val_rows = pipeline.validation_rows(pipeline.ShardedDocs(pdir, splits['val'], dtype),
                                      seq_len=seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                      pad_id=tok.pad_id)
  # Counted over the global batches, so every process reports the same.
  global_val = packing.batches(val_rows, batch_size, seq_len=seq_len, pad_id=tok.pad_id,
                               max_batches=int(cfg.val_batches))
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  val_batches = [{k: v[rows] for k, v in b.items()} for b in global_val]
  token_bytes = tok.token_bytes
  eval_tokens = eval_bytes = used_rows = 0
  for b in global_val:
    keep = b['loss_mask'] > 0
    eval_tokens += int(keep.sum())
    eval_bytes += int(token_bytes[b['targets'][keep]].sum())
    used_rows += int((b['segment_ids'] > 0).any(axis=1).sum())

  train, skipped = splits['train'], manifest['skipped']
  stats = DataStats(
      source=manifest['source']['source'], tokenizer=manifest['tokenizer']['kind'] or 'hf',
      vocab_size=tok.vocab_size,
      **{f'{s}_{k}': splits[s][k] for s in ('train', 'val') for k in
         ('docs', 'tokens', 'chars', 'bytes')},
      train_rows=math.ceil((train['tokens'] + 2 * train['docs']) / seq_len),
      val_rows=used_rows, val_eval_batches=len(val_batches), val_eval_tokens=eval_tokens,
      val_eval_bytes=eval_bytes, files=manifest['facts'].get('files'),
      files_read=manifest['files_read'], skipped_binary=skipped['binary'],
      undecodable=skipped['undecodable'],
      empty_docs=skipped['empty_docs'] + skipped['empty_records'],
      capped=bool(manifest['facts'].get('capped')), prepared_dir=os.fspath(pdir),
      prepared_now=prepared_now, prepare_seconds=prepare_seconds,
      build_seconds=round(time.perf_counter() - t0, 3))
  logging.info('data: %s', stats.to_json_text())
  return DataBundle(tokenizer=tok, train_iter=train_iter, val_batches=val_batches, stats=stats)
