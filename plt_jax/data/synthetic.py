"""data.source='synthetic': rows generated on the fly by a `plt_jax.data.tasks` task.

The task's fixed vocabulary is the tokenizer (`TaskTokenizer`); nothing is read or prepared.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from absl import logging
import grain
import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from plt_jax import fileio
from plt_jax import tokenizer as tokenizer_lib
from plt_jax.data import tasks
from plt_jax.data.bundle import DataBundle, DataStats



def _task_param_fields() -> dict:
  return {f.name: -1 for cls in tasks.TASKS.values() for f in dataclasses.fields(cls)}


def task_spec(cfg):
  """The `plt_jax.tasks` spec named by data.task with data.task_params; one-line errors."""
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
  tok_dir = fileio.path(workdir) / 'tokenizer'
  if (tok_dir / 'tokenizer.json').is_file():
    meta = tokenizer_lib.read_meta(tok_dir) or {}
    if meta.get('sha256') != tok.sha256:
      raise ValueError(f'{tok_dir} holds a different tokenizer than task {task!r}; use a new '
                       'workdir or delete that folder')
    return
  tokenizer_lib.save_folder(tok, tok_dir, {'kind': 'synthetic', 'task': task})


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
  stats = DataStats(
      source=cfg.source, task=cfg.task, task_params=dataclasses.asdict(spec),
      tokenizer='task', vocab_size=tok.vocab_size,
      # The training stream is endless: no epoch, so no train token or row count.
      train_tokens=0, train_rows=0, val_docs=len(held), val_tokens=val_tokens,
      val_rows=val_rows, val_eval_batches=len(val_batches),
      val_eval_tokens=int(sum(float(b['loss_mask'].sum()) for b in val_global)),
      build_seconds=round(time.perf_counter() - t0, 3))
  logging.info('data: %s', stats.to_json_text())
  return DataBundle(tokenizer=tok, train_iter=train_iter, val_batches=val_batches, stats=stats)
