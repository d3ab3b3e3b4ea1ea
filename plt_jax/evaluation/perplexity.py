"""Held-out perplexity: bits per byte and token perplexity.

  bits_per_byte    = sum of next-token NLL (nats) / ln 2 / UTF-8 bytes of the text predicted
  token_perplexity = exp(sum of NLL / number of predicted tokens)

Bits per byte divides by a property of the text, not of the tokenizer, so models with different
vocabularies are comparable; token perplexity is not. The byte count is taken over exactly the
tokens scored: every loss-masked target contributes the UTF-8 bytes it spells
(`Tokenizer.token_bytes`; 0 for <s>/</s>/padding), so a subset of the validation split is
counted as exactly as the whole. The </s> closing each document is predicted and scored (its NLL
counts, its bytes are 0), as in training.

Documents are packed as in training (`plt_jax.data.packing`): `<s> text </s>`, cut into
`seq_len` chunks. Positions restart at every chunk, so tokens after a cut see less context.

Sources:
- `workdir_validation`: the validation batches of a training run, the ones its eval loss used.
- `file_batches`: any files matched by globs, each file one document. For these the real UTF-8
  byte count of the text is known too. It is the denominator, and it must equal the per-token
  count for byte-level tokenizers; a mismatch means the tokenizer is not byte-exact.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Iterable, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from plt_jax import data as data_lib
from plt_jax import fileio
from plt_jax.data import packing, sources
from plt_jax.runtime import Runtime
from plt_jax.train import metrics as metrics_lib

Batch = dict


@dataclasses.dataclass
class PerplexityResult:
  nll_nats: float       # summed over scored tokens
  tokens: int           # scored (loss-masked) targets
  bytes: int            # UTF-8 bytes those targets spell
  rows: int             # rows of seq_len evaluated (padding rows excluded)

  @property
  def nats_per_token(self) -> float:
    return self.nll_nats / max(self.tokens, 1)

  @property
  def bits_per_token(self) -> float:
    return self.nats_per_token / math.log(2)

  @property
  def token_perplexity(self) -> float:
    return math.exp(self.nats_per_token)

  @property
  def bits_per_byte(self) -> float:
    return metrics_lib.bits_per_byte(self.nll_nats, self.bytes)

  def to_json(self) -> dict:
    return dict(bits_per_byte=self.bits_per_byte, token_perplexity=self.token_perplexity,
                nats_per_token=self.nats_per_token, bits_per_token=self.bits_per_token,
                nll_nats=self.nll_nats, tokens=self.tokens, bytes=self.bytes, rows=self.rows)


# ----------------------------------------------------------------------------- the model

def make_nll_fn(model, *, sharding=None) -> Callable[[Batch], np.ndarray]:
  """batch (inputs, targets, positions, segment_ids) -> next-token NLL [B, S] float32 (host).

  One jitted forward, reused for every batch of the same shape. sharding: a
  `plt_jax.sharding.ShardingConfig` to run on a mesh (activation constraints and per-shard
  kernels); None: one device.
  """
  graphdef, state = nnx.split(model)
  rt = Runtime.for_model(model.cfg, sharding=sharding)

  @jax.jit
  def nll(state, inputs, targets, positions, segment_ids):
    logits = nnx.merge(graphdef, state)(inputs, positions, segment_ids, runtime=rt)
    return metrics_lib.next_token_nll(logits, targets)

  def fn(batch: Batch) -> np.ndarray:
    return np.asarray(nll(state, *(jnp.asarray(batch[k]) for k in
                                   ('inputs', 'targets', 'positions', 'segment_ids'))))

  return fn


def score(nll_fn: Callable[[Batch], np.ndarray], batches: Iterable[Batch],
          token_bytes: np.ndarray, *, progress: bool = False,
          total: Optional[int] = None) -> PerplexityResult:
  """Sums NLL, scored tokens and their bytes over the loss-masked targets of `batches`."""
  nll_sum, tokens, nbytes, rows = 0.0, 0, 0, 0
  token_bytes = np.asarray(token_bytes, np.int64)
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total, unit='batch', desc='perplexity', file=sys.stderr)
  for batch in batches:
    nll = np.asarray(nll_fn(batch), np.float64)
    mask = np.asarray(batch['loss_mask']) > 0
    if nll.shape != mask.shape:
      raise ValueError(f'nll_fn returned shape {nll.shape} for a batch of shape {mask.shape}')
    nll_sum += float(nll[mask].sum())
    tokens += int(mask.sum())
    nbytes += int(token_bytes[np.asarray(batch['targets'])[mask]].sum())
    rows += int(mask.any(axis=-1).sum())
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return PerplexityResult(nll_sum, tokens, nbytes, rows)


# ------------------------------------------------------------------------------ the data

def read_files(patterns: Sequence[str] | str) -> list[tuple[str, str]]:
  """(path, text) of every file matched by the globs (recursive '**' allowed, gs:// too),
  sorted per glob, deduplicated.

  Text is decoded as UTF-8 (invalid bytes become U+FFFD, which the byte count then sees as
  3 bytes); a leading BOM is dropped.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(',') if p]
  out = []
  for f in sources.glob_files(patterns):
    text = fileio.path(f.path).read_bytes().decode('utf-8', errors='replace')
    if text.startswith('\ufeff'):
      text = text[1:]
    if text:
      out.append((f.path, text))
  if not out:
    raise ValueError(f'the files matched by {list(patterns)} are all empty')
  return out


class Rows(list):
  """Packed rows in order; `num_tokens` counts their entries that are not padding."""

  @property
  def num_tokens(self) -> int:
    return sum(int((r['segment_ids'] > 0).sum()) for r in self)


def rows_from_texts(texts: Sequence[str], tokenizer, seq_len: int) -> Rows:
  """Packed rows (`plt_jax.data.packing`) of the texts, each text one document."""
  ids = tokenizer.encode_batch(list(texts))
  return Rows(packing.pack_documents(ids, seq_len, bos_id=tokenizer.bos_id,
                                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))


def batches_from_rows(rows, batch_size: int, *, pad_id: int = 0) -> list[Batch]:
  """All rows in order, batch_size at a time; the last batch is padded with empty rows."""
  if not rows:
    return []
  return packing.batches(rows, batch_size, seq_len=len(rows[0]['inputs']), pad_id=pad_id)


def file_batches(patterns, tokenizer, *, seq_len: int, batch_size: int):
  """(batches, info) for user files; info has files, docs, text_bytes, chars."""
  files = read_files(patterns)
  texts = [t for _, t in files]
  rows = rows_from_texts(texts, tokenizer, seq_len)
  info = dict(files=len(files), text_bytes=sum(len(t.encode('utf-8')) for t in texts),
              chars=sum(len(t) for t in texts), paths=[p for p, _ in files][:50])
  return batches_from_rows(rows, batch_size, pad_id=tokenizer.pad_id), info


def workdir_validation(workdir: str, config, *, max_batches: Optional[int] = None,
                       batch_size: Optional[int] = None):
  """(batches, tokenizer, stats) of a training run's validation split (`plt_jax.data`).

  max_batches None: as many as the run evaluated (config.data.val_batches); 0: the whole split.
  batch_size None: the run's global batch size.
  """
  dcfg = ml_collections.ConfigDict(config.data.to_dict())
  if max_batches is not None:
    dcfg.val_batches = int(max_batches)
  bundle = data_lib.build_data(dcfg, seq_len=int(config.train.seq_len),
                               batch_size=int(batch_size or config.train.batch_size),
                               seed=int(config.seed), workdir=workdir)
  return bundle.val_batches, bundle.tokenizer, bundle.stats
