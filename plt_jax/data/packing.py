"""Packing documents into rows of `seq_len` tokens, and rows into batches.

Every document becomes `<s> tokens </s>` and is cut into chunks of at most `seq_len`; chunks fill
rows in order (next-fit): a chunk that does not fit in what is left of a row starts a new row,
so a row ends in padding only when the next chunk is too long. Positions restart at 0 at every
chunk, also a continuation chunk of a long document, because the model reads positions == 0 as
"attention may not look further back". The target of a chunk's last token is the document's
next token even when that token opens the next chunk, so no prediction of the document is
dropped; only `</s>` (nothing follows) and padding have loss_mask 0. Segment ids count the
chunks of a row from 1; padding is 0.

`DocCursor` is the position in a stream of documents (which document, which chunk of it);
`fill_row` builds one row from a cursor and advances it. The training lanes, the validation
split and the perplexity evaluation all pack through `fill_row`, and `batches` is the one place
that stacks rows into batches padded with empty rows.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def empty_row(seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """A row of padding only: it scores nothing."""
  return dict(inputs=np.full(seq_len, pad_id, np.int32), targets=np.full(seq_len, pad_id, np.int32),
              positions=np.zeros(seq_len, np.int32), segment_ids=np.zeros(seq_len, np.int32),
              loss_mask=np.zeros(seq_len, np.float32))


def framed(ids, bos_id: int, eos_id: int) -> np.ndarray:
  """`<s> ids </s>` as int32."""
  ids = np.asarray(ids)
  out = np.empty(ids.size + 2, np.int32)
  out[0], out[-1] = bos_id, eos_id
  out[1:-1] = ids
  return out


class DocCursor:
  """A position in a stream of documents: the document `doc` (its `<s> .. </s>` ids in `seq`)
  and the index `chunk` of its next chunk. `load(doc)` gives the framed ids of a document, or
  None past the end of a finite stream; `step` is the distance from one document to the next."""

  def __init__(self, load: Callable[[int], Optional[np.ndarray]], doc: int = 0, chunk: int = 0,
               step: int = 1):
    self._load, self.step = load, step
    self.doc, self.chunk = doc, chunk
    self.seq = load(doc)

  def advance(self, seq_len: int) -> None:
    self.chunk += 1
    if self.chunk * seq_len >= len(self.seq):
      self.doc += self.step
      self.chunk = 0
      self.seq = self._load(self.doc)


def fill_row(cursor: DocCursor, seq_len: int, pad_id: int = 0) -> Optional[dict[str, np.ndarray]]:
  """The next row of `cursor`'s stream (next-fit), or None when the stream has ended."""
  if cursor.seq is None:
    return None
  row = empty_row(seq_len, pad_id)
  inputs, targets, positions = row['inputs'], row['targets'], row['positions']
  segment_ids, loss_mask = row['segment_ids'], row['loss_mask']
  used = seg = 0
  while cursor.seq is not None:
    seq = cursor.seq
    start = cursor.chunk * seq_len
    n = min(seq_len, len(seq) - start)
    if used + n > seq_len:
      break
    end = used + n
    inputs[used:end] = seq[start:start + n]
    nxt = seq[start + 1:start + n + 1]          # one shorter when this chunk ends the document
    targets[used:used + len(nxt)] = nxt
    positions[used:end] = np.arange(n, dtype=np.int32)
    seg += 1
    segment_ids[used:end] = seg
    loss_mask[used:end] = 1.0
    if start + n == len(seq):                    # </s> predicts nothing
      loss_mask[end - 1] = 0.0
    used = end
    cursor.advance(seq_len)
  return row


def pack_documents(docs: Sequence, seq_len: int, *, bos_id: int, eos_id: int,
                   pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Rows of the documents (token id lists, without <s>/</s>) in order."""
  if seq_len < 2:
    raise ValueError(f'seq_len must be at least 2, got {seq_len}')
  load = lambda d: framed(docs[d], bos_id, eos_id) if d < len(docs) else None
  cursor = DocCursor(load)
  while (row := fill_row(cursor, seq_len, pad_id)) is not None:
    yield row


def batches(rows: Iterable[dict], batch_size: int, *, seq_len: int, pad_id: int = 0,
            max_batches: int = 0, process_index: int = 0,
            process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Global batches of `batch_size` rows in order (the last one padded with empty rows), cut to
  `max_batches` (0: all); each keeps this process's rows [p*L, (p+1)*L)."""
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}')
  local = batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  out, current, empty = [], [], empty_row(seq_len, pad_id)
  rows = iter(rows)
  while not max_batches or len(out) < max_batches:
    row = next(rows, None)
    if row is None and not current:
      break
    current.append(row if row is not None else empty)
    if row is None:
      current += [empty] * (batch_size - len(current))
    if len(current) == batch_size:
      out.append({k: np.stack([r[k] for r in current[lo:hi]]) for k in KEYS})
      current = []
  return out
