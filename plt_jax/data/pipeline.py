"""Training input from prepared shards: lanes of packed documents, as a grain iterator.

The global batch has `batch_size` lanes. Lane j packs (next-fit, see packing.py) the documents
at positions j, j+B, j+2B, ... of an endless stream that visits the training documents epoch
after epoch, each epoch in its own order: position t is document `index_shuffle(t mod N)` of
epoch t // N, a permutation computed per index by grain (no order array is held). Process p of
P builds lanes [p*L, (p+1)*L), L = B/P, so the global batch does not depend on the process count.

A lane's state is two integers (its next stream position and chunk), so the iterator's state is
small, restores exactly, and describes the same global batch for any process count. A lane
starts at a seeded chunk of its first document (see LaneIterator). Start-up
reads the manifest and names the shards; nothing walks the corpus.
"""
from __future__ import annotations

import os
import queue
import tempfile
import threading
from typing import Optional

import grain
import numpy as np

from plt_jax import fileio
from plt_jax.data import packing

_SHUFFLE_ROUNDS = 4


class ShardedDocs:
  """Random access to one split's documents (token ids) across its ArrayRecord shards.

  Local shards are read in place by `grain.sources.ArrayRecordDataSource`; the record counts
  come from the manifest, so no shard is opened before it is read. Shards in object storage are
  copied to local scratch when first read (ArrayRecord reads local files).
  """

  def __init__(self, directory, split_info: dict, dtype: str):
    self._dir = fileio.path(directory)
    self._dtype = np.dtype(dtype).newbyteorder('<')
    self._shards = [s for s in split_info['shards'] if s['records'] > 0]
    self._starts = np.cumsum([0] + [s['records'] for s in self._shards])
    self._remote = fileio.is_remote(self._dir)
    self._source = None
    self._per_shard: dict[int, object] = {}
    self._scratch: Optional[str] = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _local_source(self):
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(
          [f'{os.fspath(self._dir / s["path"])}[0:{s["records"]}]' for s in self._shards])
    return self._source

  def _remote_record(self, i: int) -> bytes:
    s = int(np.searchsorted(self._starts, i, side='right')) - 1
    with self._lock:
      if s not in self._per_shard:
        if self._scratch is None:
          self._scratch = tempfile.mkdtemp(prefix='plt_shards_')
        local = os.path.join(self._scratch, f'{s:05d}.arrayrecord')
        with open(local, 'wb') as f:
          f.write((self._dir / self._shards[s]['path']).read_bytes())
        self._per_shard[s] = grain.sources.ArrayRecordDataSource(local)
    return self._per_shard[s][i - int(self._starts[s])]

  def __getitem__(self, i: int) -> np.ndarray:
    raw = self._remote_record(i) if self._remote else self._local_source()[i]
    return np.frombuffer(raw, self._dtype)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(epoch), 0x5eed]).generate_state(1)[0])


def _start_chunk(seed: int, lane: int, chunks: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(lane), 0x1a4e]).generate_state(1)[0]) % chunks


class LaneIterator(grain.DatasetIterator):
  """Endless packed training batches of this process's lanes; see the module docstring.

  State: {'lanes': [[position, chunk], ...] of lanes first_lane.., 'first_lane', 'batch_size'}.
  With prefetch > 0 a thread builds that many batches ahead; the state is always the one after
  the last batch returned.
  """

  def __init__(self, docs: ShardedDocs, *, batch_size: int, seq_len: int, seed: int,
               bos_id: int, eos_id: int, pad_id: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 0):
    super().__init__()
    if batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} is not divisible by process_count '
                       f'{process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    if seq_len < 2:
      raise ValueError(f'seq_len must be at least 2, got {seq_len}')
    if not len(docs):
      raise ValueError('the training split has no documents')
    self._docs, self._n = docs, len(docs)
    self._batch_size, self._seq_len, self._seed = batch_size, seq_len, seed
    self._bos, self._eos, self._pad = bos_id, eos_id, pad_id
    local = batch_size // process_count
    self._first = process_index * local
    self._local = local
    self._prefetch = int(prefetch)
    self._seeds: dict[int, int] = {}
    self._thread = None
    self._set_lanes([[self._first + j, 0] for j in range(local)])
    # Each lane starts at a seeded chunk of its first document, so that lanes do not walk
    # similar documents in step (identical rows in a batch); the chunks before it are skipped
    # once per run.
    for j, cursor in enumerate(self._cursors):
      chunks = -(-len(cursor.seq) // seq_len)
      cursor.chunk = _start_chunk(seed, self._first + j, chunks)
    self._state = self._lane_state()

  # -- the stream
  def _load(self, t: int) -> np.ndarray:
    epoch, i = divmod(t, self._n)
    seed = self._seeds.get(epoch)
    if seed is None:
      seed = self._seeds[epoch] = _epoch_seed(self._seed, epoch)
      if len(self._seeds) > 4:
        self._seeds.pop(min(self._seeds))
    d = grain.experimental.index_shuffle(i, max_index=self._n - 1, seed=seed,
                                         rounds=_SHUFFLE_ROUNDS) if self._n > 1 else 0
    return packing.framed(self._docs[d], self._bos, self._eos)

  def _set_lanes(self, lanes) -> None:
    self._stop_thread()
    self._cursors = [packing.DocCursor(self._load, doc=int(t), chunk=int(c),
                                       step=self._batch_size) for t, c in lanes]
    self._state = self._lane_state()

  def _lane_state(self) -> list[list[int]]:
    return [[c.doc, c.chunk] for c in self._cursors]

  def _build(self) -> dict:
    rows = [packing.fill_row(c, self._seq_len, self._pad) for c in self._cursors]
    return {k: np.stack([r[k] for r in rows]) for k in packing.KEYS}

  # -- prefetch
  def _producer(self, q: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        item = (self._build(), self._lane_state())
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except Exception as e:  # pylint: disable=broad-except
      q.put(e)

  def _stop_thread(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __next__(self) -> dict:
    if self._prefetch <= 0:
      batch = self._build()
      self._state = self._lane_state()
      return batch
    if self._thread is None:
      self._queue, self._stop = queue.Queue(self._prefetch), threading.Event()
      self._thread = threading.Thread(target=self._producer, args=(self._queue, self._stop),
                                      daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    return dict(lanes=[list(x) for x in self._state], first_lane=self._first,
                batch_size=self._batch_size)

  def set_state(self, state: dict) -> None:
    lanes = state['lanes']
    if (int(state.get('batch_size', self._batch_size)) != self._batch_size
        or int(state.get('first_lane', self._first)) != self._first or len(lanes) != self._local):
      raise ValueError(f'data iterator state for lanes {state.get("first_lane")}.. of batch '
                       f'{state.get("batch_size")} does not fit lanes {self._first}.. of batch '
                       f'{self._batch_size}')
    self._set_lanes(lanes)

  def close(self) -> None:
    self._stop_thread()

  def __del__(self):
    try:
      self._stop_thread()
    except Exception:  # pylint: disable=broad-except
      pass


def validation_rows(docs: ShardedDocs, *, seq_len: int, bos_id: int, eos_id: int,
                    pad_id: int = 0):
  """The validation split's rows, its documents in order."""
  load = lambda d: packing.framed(docs[d], bos_id, eos_id) if d < len(docs) else None
  cursor = packing.DocCursor(load)
  while (row := packing.fill_row(cursor, seq_len, pad_id)) is not None:
    yield row
