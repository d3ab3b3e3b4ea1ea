"""What `build_data` returns: the tokenizer, the iterators and the data's counts."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from plt_jax import fileio
from plt_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass
class DataStats:
  """Counts of a run's data. Fields that do not apply to a source are None (a synthetic task
  has no files, no prepared directory and no bytes), and `to_json` leaves them out.

  The `stats['field']`, `stats.get('field')` and `'field' in stats` forms read the fields that
  are set, for code that treats the stats as the JSON they are logged as.
  """
  source: str
  tokenizer: str
  vocab_size: int
  # the training split
  train_docs: Optional[int] = None
  train_tokens: Optional[int] = None      # document tokens, without <s>/</s>
  train_chars: Optional[int] = None
  train_bytes: Optional[int] = None
  # Rows per epoch if no chunk left padding: (tokens + 2 per document) / seq_len, rounded up.
  # The lanes pack without end, so the exact count is not a property of the corpus.
  train_rows: Optional[int] = None
  # the validation split, and the part of it that val_batches holds
  val_docs: Optional[int] = None
  val_tokens: Optional[int] = None
  val_chars: Optional[int] = None
  val_bytes: Optional[int] = None
  val_rows: Optional[int] = None          # rows packed into val_batches (not padding rows)
  val_eval_batches: Optional[int] = None
  val_eval_tokens: Optional[int] = None   # loss-masked targets in the global val batches
  val_eval_bytes: Optional[int] = None    # the UTF-8 bytes those targets spell (bits per byte)
  # reading
  files: Optional[int] = None             # files matched (hf: dataset shards)
  files_read: Optional[int] = None
  skipped_binary: Optional[int] = None
  undecodable: Optional[int] = None       # files or lines decoded with replacement
  empty_docs: Optional[int] = None        # blank documents and null records, skipped
  capped: Optional[bool] = None           # data.max_chars stopped reading early
  # preparation
  prepared_dir: Optional[str] = None
  prepared_now: Optional[bool] = None     # this call prepared it (False: reused)
  prepare_seconds: Optional[float] = None
  build_seconds: Optional[float] = None
  # synthetic tasks
  task: Optional[str] = None
  task_params: Optional[dict] = None

  def to_json(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def to_json_text(self) -> str:
    return json.dumps(fileio.json_safe(self.to_json()))

  def __getitem__(self, key: str) -> Any:
    value = getattr(self, key, None) if key in self._names() else None
    if value is None:
      raise KeyError(key)
    return value

  def get(self, key: str, default: Any = None) -> Any:
    try:
      return self[key]
    except KeyError:
      return default

  def __contains__(self, key: str) -> bool:
    return self.get(key) is not None

  @classmethod
  def _names(cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass
class DataBundle:
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: Any              # grain DatasetIterator of batch dicts, batch_size/process_count rows
  val_batches: list[dict]      # fixed validation batches, same row slice as train_iter
  stats: DataStats
