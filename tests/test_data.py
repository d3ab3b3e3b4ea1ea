"""Data: packing, lanes (process-count independence, state), tokenizers, build_data on prepared
shards, sources and bad data, the stdlib corpus, the synthetic source."""
import json
import os

import numpy as np
import pytest

from plt_jax import data
from plt_jax import tokenizer as tokenizer_lib
from plt_jax.data import packing
from plt_jax.data import pipeline
from plt_jax.data import prepare as prepare_lib

KEYS = packing.KEYS
CODE = [
    'def add(a, b):\n    return a + b\n',
    'class Point:\n    """A point."""\n    x: int = 0  # café ✓\n',
    'import os\nprint(os.path.join("a", "b") , "x" . strip())\n',
    'for i in range(10):\n    if i % 2:\n        print(i)\n',
    'while True:\n    break\n# 😀 end\n',
    'x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n',
]


def _rows(docs, seq_len, pad_id=0):
  return list(packing.pack_documents(docs, seq_len, bos_id=1, eos_id=2, pad_id=pad_id))


def _check(rows, expect):
  assert len(rows) == len(expect)
  for r, want in enumerate(expect):
    row = rows[r]
    assert row['inputs'].dtype == np.int32 and row['loss_mask'].dtype == np.float32
    for k in KEYS:
      np.testing.assert_array_equal(row[k], want[k], err_msg=f'row {r} {k}')


class ListDocs:
  """In-memory stand-in for pipeline.ShardedDocs (token id lists)."""

  def __init__(self, docs):
    self.docs = [np.asarray(d, np.uint16) for d in docs]

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    return self.docs[i]


def _random_docs(seed, num_docs, max_len=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 259, rng.integers(1, max_len)).tolist() for _ in range(num_docs)]


# ----------------------------------------------------------------------------------- packing

def test_packing_hand_made_example():
  # Sequences <s> doc </s> of lengths 5, 3, 9, 4 into rows of 8 (next-fit).
  rows = _rows([[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41]], 8)
  _check(rows, [
      dict(inputs=[1, 10, 11, 12, 2, 1, 20, 2], targets=[10, 11, 12, 2, 0, 20, 2, 0],
           positions=[0, 1, 2, 3, 4, 0, 1, 2], segment_ids=[1, 1, 1, 1, 1, 2, 2, 2],
           loss_mask=[1, 1, 1, 1, 0, 1, 1, 0]),
      # First chunk of the long document: its last target is the </s> that opens the next chunk.
      dict(inputs=[1, 30, 31, 32, 33, 34, 35, 36], targets=[30, 31, 32, 33, 34, 35, 36, 2],
           positions=list(range(8)), segment_ids=[1] * 8, loss_mask=[1] * 8),
      # Continuation chunk (just </s>) restarts at position 0; then doc 3; then padding.
      dict(inputs=[2, 1, 40, 41, 2, 0, 0, 0], targets=[0, 40, 41, 2, 0, 0, 0, 0],
           positions=[0, 0, 1, 2, 3, 0, 0, 0], segment_ids=[1, 2, 2, 2, 2, 0, 0, 0],
           loss_mask=[0, 1, 1, 1, 0, 0, 0, 0]),
  ])


def test_packing_odd_lengths_long_exact_and_empty_documents():
  # seq_len 7 (odd); pad id 9 so padding is told apart from token 0.
  # doc A: 13 tokens -> 15 framed = chunks 7, 7, 1; doc B: exactly seq_len-2 = 5 tokens -> one
  # full row; doc C: empty -> <s></s>; doc D: 1 token.
  a = list(range(100, 113))
  b = [50, 51, 52, 53, 54]
  rows = _rows([a, b, [], [77]], 7, pad_id=9)
  _check(rows, [
      dict(inputs=[1] + a[:6], targets=a[:7], positions=list(range(7)), segment_ids=[1] * 7,
           loss_mask=[1] * 7),
      dict(inputs=a[6:13], targets=a[7:13] + [2], positions=list(range(7)), segment_ids=[1] * 7,
           loss_mask=[1] * 7),
      # A's last chunk is </s> alone (predicts nothing); B's 7 entries do not fit after it.
      dict(inputs=[2, 9, 9, 9, 9, 9, 9], targets=[9] * 7, positions=[0] * 7,
           segment_ids=[1, 0, 0, 0, 0, 0, 0], loss_mask=[0] * 7),
      dict(inputs=[1] + b + [2], targets=b + [2, 9], positions=list(range(7)),
           segment_ids=[1] * 7, loss_mask=[1, 1, 1, 1, 1, 1, 0]),
      # The empty document still predicts its </s>; then D; segment ids restart per row.
      dict(inputs=[1, 2, 1, 77, 2, 9, 9], targets=[2, 9, 77, 2, 9, 9, 9],
           positions=[0, 1, 0, 1, 2, 0, 0], segment_ids=[1, 1, 2, 2, 2, 0, 0],
           loss_mask=[1, 0, 1, 1, 0, 0, 0]),
  ])


def test_packing_keeps_every_prediction_once():
  docs = _random_docs(seed=1, num_docs=50)
  rows = _rows(docs, 16)
  predicted = []  # (input, target) pairs in row order == document order
  for row in rows:
    assert np.all((row['positions'] == 0) == np.r_[True, np.diff(row['segment_ids']) != 0]
                  | (row['segment_ids'] == 0))
    m = row['loss_mask'] == 1
    predicted += list(zip(row['inputs'][m].tolist(), row['targets'][m].tolist()))
  want = [(a, b) for d in docs for a, b in zip([1] + d, d + [2])]
  assert predicted == want  # n+1 predictions per document, none lost across chunk borders


def test_batches_pad_with_empty_rows_and_slice_per_process():
  rows = _rows(_random_docs(seed=3, num_docs=6), 16)
  n = len(rows)
  one = packing.batches(rows, n + 1, seq_len=16)
  assert len(one) == 1 and one[0]['inputs'].shape == (n + 1, 16)
  assert one[0]['loss_mask'][n].sum() == 0 and one[0]['segment_ids'][n].sum() == 0
  np.testing.assert_array_equal(one[0]['inputs'][0], rows[0]['inputs'])
  assert len(packing.batches(rows, 2, seq_len=16, max_batches=1)) == 1
  half = packing.batches(rows, 2, seq_len=16, max_batches=1, process_index=1, process_count=2)
  np.testing.assert_array_equal(half[0]['targets'][0], rows[1]['targets'])
  with pytest.raises(ValueError, match='divisible'):
    packing.batches(rows, 3, seq_len=16, process_count=2)


# ------------------------------------------------------------------------------------ lanes

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def _lanes(docs, **kw):
  args = dict(batch_size=4, seq_len=16, seed=7, bos_id=1, eos_id=2)
  args.update(kw)
  return pipeline.LaneIterator(docs, **args)


def test_lanes_pack_the_documents_of_their_stream_positions():
  import grain
  docs = _random_docs(seed=4, num_docs=13, max_len=60)
  it = _lanes(ListDocs(docs), batch_size=3, seq_len=11)
  got = _take(it, 9)
  n = len(docs)
  starts = []
  for j in range(3):  # lane j: positions j, j+3, ... of epoch after epoch, each a permutation
    order = []
    for t in range(j, 60, 3):
      epoch, i = divmod(t, n)
      seed = pipeline._epoch_seed(7, epoch)  # pylint: disable=protected-access
      order.append(grain.experimental.index_shuffle(i, max_index=n - 1, seed=seed, rounds=4))
    # The lane starts at a seeded chunk of its first document.
    first = len(docs[order[0]]) + 2
    start = pipeline._start_chunk(7, j, -(-first // 11))  # pylint: disable=protected-access
    starts.append(start)
    framed = [packing.framed(docs[d], 1, 2) for d in order]
    cursor = packing.DocCursor(lambda k: framed[k], chunk=start)
    want = [packing.fill_row(cursor, 11) for _ in range(9)]
    assert _same([{k: b[k][j] for k in KEYS} for b in got], want)
    if start:  # the row starts mid-document: position 0 but no <s>
      assert got[0]['inputs'][j][0] == framed[0][start * 11]
  assert len(set(starts)) > 1
  perm = [grain.experimental.index_shuffle(i, max_index=n - 1, seed=pipeline._epoch_seed(7, 0),
                                           rounds=4) for i in range(n)]  # pylint: disable=protected-access
  assert sorted(perm) == list(range(n)) and perm != list(range(n))


def test_global_batch_does_not_depend_on_the_process_count():
  docs = ListDocs(_random_docs(seed=5, num_docs=30, max_len=70))
  whole = _take(_lanes(docs, batch_size=8), 10)
  for count in (2, 4):
    parts = [_take(_lanes(docs, batch_size=8, process_index=p, process_count=count), 10)
             for p in range(count)]
    joined = [{k: np.concatenate([parts[p][b][k] for p in range(count)]) for k in KEYS}
              for b in range(10)]
    assert _same(joined, whole), count
  assert not _same(whole, _take(_lanes(docs, batch_size=8, seed=8), 10))
  with pytest.raises(ValueError, match='divisible'):
    _lanes(docs, batch_size=6, process_count=4)


@pytest.mark.parametrize('prefetch', [0, 3])
def test_lane_state_restores_exactly(prefetch):
  # Fewer documents than lanes: every lane still gets documents (the stream crosses epochs).
  docs = ListDocs(_random_docs(seed=6, num_docs=3, max_len=50))
  it = _lanes(docs, batch_size=5, prefetch=prefetch)
  ref = _take(_lanes(docs, batch_size=5), 14)
  assert _same(_take(it, 6), ref[:6])
  state = it.get_state()
  after = _take(it, 8)
  assert _same(after, ref[6:])
  it.set_state(state)
  assert _same(_take(it, 8), after)
  fresh = _lanes(docs, batch_size=5, prefetch=prefetch)
  fresh.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoints)
  assert _same(_take(fresh, 8), after)
  # A process's state is its lanes only; it does not fit another process's lanes.
  other = _lanes(docs, batch_size=6, process_index=1, process_count=2)
  with pytest.raises(ValueError, match='does not fit'):
    other.set_state(_lanes(docs, batch_size=6, process_index=0, process_count=2).get_state())
  it.close()
  fresh.close()


# ------------------------------------------------------------------------------- tokenizers

WEIRD = 'héllo </s> <s> wörld\n\tdef f(x): return x . y , z  ✓ 😀\r\n\x00\x7f'


def test_byte_tokenizer():
  tok = tokenizer_lib.build_tokenizer('byte', workdir=None)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tok.encode('Aé') == [ord('A') + 3, 0xC3 + 3, 0xA9 + 3]
  ids = tok.encode(WEIRD)
  assert len(ids) == len(WEIRD.encode('utf-8')) and min(ids) >= 3  # literal </s> stays text
  assert tok.decode(ids) == WEIRD
  assert tok.decode([1] + ids + [2, 0]) == WEIRD  # special tokens are dropped
  assert tok.token_bytes[:3].tolist() == [0, 0, 0] and set(tok.token_bytes[3:].tolist()) == {1}


def test_bpe_tokenizer_trains_once_and_reuses(tmp_path):
  texts = CODE * 20
  tok = tokenizer_lib.build_tokenizer('bpe', workdir=str(tmp_path), train_texts=texts,
                                      vocab_size=320)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert 290 < tok.vocab_size <= 320
  for t in CODE + [WEIRD]:
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    assert int(tok.token_bytes[ids].sum()) == len(t.encode('utf-8'))
  assert len(tok.encode(CODE[0])) < len(CODE[0])  # merges were learned
  meta = tokenizer_lib.read_meta(tmp_path / 'tokenizer')
  assert meta == {'kind': 'bpe', 'vocab_size': 320, 'vocab_size_actual': tok.vocab_size,
                  'sha256': tok.sha256}

  def no_training():
    raise AssertionError('retrained although workdir/tokenizer exists')
  again = tokenizer_lib.build_tokenizer('bpe', workdir=str(tmp_path), train_texts=no_training,
                                        vocab_size=320)
  assert again.sha256 == tok.sha256 and again.encode(CODE[1]) == tok.encode(CODE[1])
  with pytest.raises(ValueError, match='vocab_size'):
    tokenizer_lib.build_tokenizer('bpe', workdir=str(tmp_path), train_texts=texts,
                                  vocab_size=512)
  with pytest.raises(ValueError, match='must exceed 259'):
    tokenizer_lib.build_tokenizer('bpe', workdir=None, train_texts=texts, vocab_size=200)


def _saved(tmp_path):
  """The bpe and byte tokenizers, each saved with save_pretrained into tmp_path/<kind>."""
  out = {'bpe': tokenizer_lib.build_tokenizer('bpe', workdir=None, train_texts=CODE * 20,
                                              vocab_size=320),
         'byte': tokenizer_lib.build_tokenizer('byte', workdir=None)}
  for name, tok in out.items():
    tok.save_pretrained(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path / name)) == ['special_tokens_map.json', 'tokenizer.json',
                                                   'tokenizer_config.json']
  return out


def test_hf_kind_reads_saved_tokenizers(tmp_path):
  for name, tok in _saved(tmp_path).items():
    folder = tmp_path / name
    hf = tokenizer_lib.build_tokenizer('hf', workdir=str(tmp_path / f'wd_{name}'),
                                       path=str(folder / 'tokenizer.json'))
    ids = tok.encode(WEIRD)
    assert hf.encode(WEIRD) == ids and hf.decode(ids) == WEIRD
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, 0, tok.vocab_size)
    assert hf.sha256 == tok.sha256
    assert os.path.isfile(tmp_path / f'wd_{name}' / 'tokenizer' / 'tokenizer.json')
  lone = tmp_path / 'lone'  # a bare tokenizer.json: roles guessed from the token names
  lone.mkdir()
  (lone / 'tokenizer.json').write_text((tmp_path / 'bpe' / 'tokenizer.json').read_text())
  hf = tokenizer_lib.Tokenizer.from_pretrained(str(lone / 'tokenizer.json'))
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 0)
  with pytest.raises(ValueError, match='no tokenizer.json'):
    tokenizer_lib.build_tokenizer('hf', workdir=None, path=str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='holds a different tokenizer'):
    tokenizer_lib.build_tokenizer('byte', workdir=str(tmp_path / 'wd_bpe'))


def test_transformers_loads_saved_tokenizers(tmp_path, monkeypatch):
  transformers = pytest.importorskip('transformers')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  text = WEIRD.replace('</s>', '').replace('<s>', '')  # HF splits literal special tokens
  for name, tok in _saved(tmp_path).items():
    folder = tmp_path / name
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok.encode(text)
    assert auto.encode(text, add_special_tokens=False) == ids, name
    assert auto(text)['input_ids'] == [1] + ids  # prepends <s>, as in training
    assert auto.decode(ids) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'))
    assert fast.encode(text, add_special_tokens=False) == ids and fast.decode(ids) == text


# ---------------------------------------------------------------------------- build_data

def _write_corpus(folder, texts=CODE):
  os.makedirs(folder, exist_ok=True)
  for i, t in enumerate(texts):
    with open(os.path.join(folder, f'f{i}.py'), 'w', encoding='utf-8') as f:
      f.write(t * 3)
  return os.path.join(folder, '*.py')


def _files_cfg(pattern, **kw):
  cfg = data.default_data_config()
  cfg.source, cfg.paths, cfg.tokenizer, cfg.val_fraction = 'files', (pattern,), 'byte', 0.2
  cfg.prefetch = 2
  cfg.update(kw)
  return cfg


def test_build_data_prepares_once_and_reuses(tmp_path, monkeypatch):
  pattern = _write_corpus(str(tmp_path / 'src'))
  cfg = _files_cfg(pattern, val_batches=0)
  kw = dict(seq_len=32, batch_size=4, workdir=str(tmp_path / 'wd'))
  first = data.build_data(cfg, seed=0, **kw)
  s = first.stats
  assert isinstance(s, data.DataStats) and s.prepared_now and s.files == 6
  assert s.train_docs + s.val_docs == 6 and s.val_docs >= 1 and s.train_docs >= 1
  assert s.train_tokens == s.train_bytes and s.val_tokens == s.val_bytes  # byte kind
  assert s.train_bytes + s.val_bytes == sum(len((t * 3).encode()) for t in CODE)
  assert s.val_eval_bytes == s.val_bytes  # whole val split kept: bits-per-byte is exact
  assert s.val_eval_tokens == s.val_tokens + s.val_docs
  assert s.prepared_dir == str(tmp_path / 'wd' / 'data' / prepare_lib.dataset_key(cfg))
  assert s['train_docs'] == s.train_docs and 'task' not in s and s.get('task', 3) == 3
  assert json.loads(s.to_json_text())['val_docs'] == s.val_docs
  m = json.load(open(os.path.join(s.prepared_dir, 'manifest.json')))
  assert m['splits']['train']['tokens'] == s.train_tokens
  assert m['tokenizer']['sha256'] == first.tokenizer.sha256 and m['tokenizer']['dtype'] == 'uint16'
  assert sum(sh['records'] for sh in m['splits']['val']['shards']) == s.val_docs
  assert os.path.isfile(tmp_path / 'wd' / 'tokenizer' / 'tokenizer.json')

  def boom(*a, **k):
    raise AssertionError('prepared again although the shards exist')
  monkeypatch.setattr(prepare_lib, 'prepare', boom)
  monkeypatch.setattr(prepare_lib.sources, 'plan_units', boom)
  second = data.build_data(cfg, seed=0, **kw)
  assert not second.stats.prepared_now
  assert _same(_take(first.train_iter, 3), _take(second.train_iter, 3))
  # Another run seed reshuffles training but keeps the validation set.
  other = data.build_data(cfg, seed=1, **kw)
  assert _same(first.val_batches, other.val_batches) and len(first.val_batches) >= 1
  assert not _same(_take(first.train_iter, 3), _take(other.train_iter, 3))
  # Two "processes" read their halves of the same global batches and validation batches.
  halves = [data.build_data(cfg, seed=0, process_index=p, process_count=2, **kw)
            for p in range(2)]
  ref = data.build_data(cfg, seed=0, **kw)
  got = [_take(h.train_iter, 4) for h in halves]
  want = _take(ref.train_iter, 4)
  for b in range(4):
    for k in KEYS:
      np.testing.assert_array_equal(np.concatenate([got[0][b][k], got[1][b][k]]), want[b][k])
  np.testing.assert_array_equal(np.concatenate([h.val_batches[0]['inputs'] for h in halves]),
                                ref.val_batches[0]['inputs'])
  assert halves[1].stats.val_eval_tokens == ref.stats.val_eval_tokens
  monkeypatch.undo()
  # Other source settings are another dataset: prepared apart, under another key.
  third = data.build_data(_files_cfg(pattern, val_batches=0, val_fraction=0.4), seed=0, **kw)
  assert third.stats.prepared_now and third.stats.prepared_dir != s.prepared_dir


def test_train_on_a_prepared_directory(tmp_path):
  pattern = _write_corpus(str(tmp_path / 'src'))
  out = str(tmp_path / 'prepared')
  prepare_lib.prepare(_files_cfg(pattern), out, say=lambda _: None)
  cfg = data.default_data_config()   # its source and tokenizer settings do not matter now
  cfg.prepared, cfg.val_batches = out, 1
  b = data.build_data(cfg, seq_len=24, batch_size=2, seed=0, workdir=str(tmp_path / 'wd'))
  assert b.tokenizer.vocab_size == 259 and not b.stats.prepared_now
  assert b.stats.source == 'files' and b.stats.tokenizer == 'byte'
  assert next(b.train_iter)['inputs'].shape == (2, 24)
  assert (tmp_path / 'wd' / 'tokenizer' / 'tokenizer.json').is_file()
  assert not (tmp_path / 'wd' / 'data').exists()


def test_jsonl_and_parquet_sources(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  jl = tmp_path / 'a.jsonl'
  jl.write_text('\n'.join(json.dumps({'content': t, 'id': i}) for i, t in enumerate(CODE))
                + '\n\n')
  pq.write_table(pa.table({'content': CODE[::-1] + [None]}), str(tmp_path / 'b.parquet'),
                 row_group_size=2)
  for source, name in (('jsonl', 'a.jsonl'), ('parquet', 'b.parquet')):
    # Tiny units: several JSONL byte ranges / Parquet row groups, each its own shard.
    cfg = _files_cfg(str(tmp_path / name), source=source, text_field='content', val_fraction=0.3,
                     unit_mib=100 / 2**20, val_batches=0)
    b = data.build_data(cfg, seq_len=16, batch_size=2, seed=0, workdir=str(tmp_path / source))
    assert b.stats.train_docs + b.stats.val_docs == len(CODE)
    assert b.stats.train_bytes + b.stats.val_bytes == sum(len(t.encode()) for t in CODE)
    assert b.stats.empty_docs == (1 if source == 'parquet' else 0)
    m = json.load(open(os.path.join(b.stats.prepared_dir, 'manifest.json')))
    assert m['units'] >= 3
    # Every document lands in exactly one shard: decoding all of them gives the corpus back.
    docs = []
    for split in ('train', 'val'):
      sd = pipeline.ShardedDocs(b.stats.prepared_dir, m['splits'][split], 'uint16')
      docs += [b.tokenizer.decode(sd[i]) for i in range(len(sd))]
    assert sorted(docs) == sorted(CODE)


def test_bad_data_errors(tmp_path):
  build = lambda cfg, wd='wd': data.build_data(cfg, seq_len=16, batch_size=2, seed=0,
                                               workdir=str(tmp_path / wd))
  with pytest.raises(ValueError, match=r"glob '.*nothing\*\.txt' matched no files"):
    build(_files_cfg(str(tmp_path / 'nothing*.txt')))

  (tmp_path / 'blank').mkdir()
  (tmp_path / 'blank' / 'a.txt').write_text('  \n')
  (tmp_path / 'blank' / 'b.txt').write_text('')
  with pytest.raises(ValueError, match='corpus is empty'):
    build(_files_cfg(str(tmp_path / 'blank' / '*.txt')))

  bad_field = tmp_path / 'field.jsonl'
  bad_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"field\.jsonl \(line at byte 15\): no text field 'text'"):
    build(_files_cfg(str(bad_field), source='jsonl'))

  bad_json = tmp_path / 'broken.jsonl'
  bad_json.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(ValueError, match=r'broken\.jsonl \(line at byte 16\): invalid JSON'):
    build(_files_cfg(str(bad_json), source='jsonl'))

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'body': ['a', 'b']}), str(tmp_path / 'cols.parquet'))
  with pytest.raises(ValueError, match=r"cols\.parquet: no text field 'text'"):
    build(_files_cfg(str(tmp_path / 'cols.parquet'), source='parquet'))
  pq.write_table(pa.table({'text': [1, 2]}), str(tmp_path / 'ints.parquet'))
  with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' is int64"):
    build(_files_cfg(str(tmp_path / 'ints.parquet'), source='parquet'))
  with pytest.raises(ValueError, match=r"unknown data.source 'csv'"):
    build(_files_cfg('x', source='csv'))

  # Undecodable bytes are replaced and counted; a binary file is skipped and counted.
  mixed = tmp_path / 'mixed'
  _write_corpus(str(mixed), CODE[:4])
  (mixed / 'latin1.py').write_bytes('x = "café"\n'.encode('latin-1'))
  (mixed / 'blob.py').write_bytes(b'\x89PNG\x00\x00\x01\x02')
  b = build(_files_cfg(str(mixed / '*.py'), val_batches=0), 'wd_mixed')
  assert (b.stats.undecodable, b.stats.skipped_binary) == (1, 1)
  assert b.stats.train_docs + b.stats.val_docs == 5 and b.stats.files_read == 6
  skipped = json.load(open(os.path.join(b.stats.prepared_dir, 'manifest.json')))['skipped']
  assert skipped['undecodable_where'] == [str(mixed / 'latin1.py')]
  assert skipped['binary_where'] == [str(mixed / 'blob.py')] and skipped['replaced_chars'] == 1


def test_a_tiny_corpus_still_gets_both_splits(tmp_path):
  pattern = _write_corpus(str(tmp_path / 'src'), CODE[:2])
  for fraction in (0.01, 0.99):  # the hash sends both documents to one split
    b = data.build_data(_files_cfg(pattern, val_fraction=fraction), seq_len=16, batch_size=2,
                        seed=0, workdir=str(tmp_path / f'wd{fraction}'))
    assert (b.stats.train_docs, b.stats.val_docs) == (1, 1)
  (tmp_path / 'one').mkdir()
  (tmp_path / 'one' / 'a.py').write_text('x = 1\n')
  with pytest.raises(ValueError, match='single document'):
    data.build_data(_files_cfg(str(tmp_path / 'one' / '*.py')), seq_len=16, batch_size=2,
                    seed=0, workdir=str(tmp_path / 'wd1'))


def test_stdlib_corpus_small(tmp_path):
  files = data.stdlib_files()
  keys = {f.key for f in files}
  assert 'os.py' in keys and 'json/decoder.py' in keys and len(files) > 300
  assert not any(k.startswith(('test/', 'site-packages/')) or '/tests/' in k for k in keys)
  cfg = data.default_data_config()
  cfg.max_chars, cfg.vocab_size, cfg.val_fraction, cfg.val_batches = 200_000, 384, 0.1, 2
  cfg.prefetch = 2
  b = data.build_data(cfg, seq_len=64, batch_size=4, seed=0, workdir=str(tmp_path))
  s = b.stats
  assert s.source == 'stdlib' and s.files == len(files) and s.capped
  assert 200_000 <= s.train_bytes + s.val_bytes < 200_000 + 400_000
  assert s.val_docs >= 1 and s.train_tokens < s.train_bytes  # BPE compresses code
  assert b.tokenizer.vocab_size == 384 and len(b.val_batches) == 2
  batch = next(b.train_iter)
  assert batch['inputs'].shape == (4, 64) and batch['inputs'].max() < 384
  assert batch['loss_mask'].sum() > 200
  assert 0 < s.val_eval_bytes and s.val_eval_tokens == sum(
      int(v['loss_mask'].sum()) for v in b.val_batches)
  text = b.tokenizer.decode(batch['inputs'][0])
  assert len(text) > 64  # real code, several bytes per token
  b.train_iter.close()


def test_synthetic_source_reads_no_corpus(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise AssertionError('a synthetic source must not read or tokenize a corpus')
  monkeypatch.setattr(prepare_lib, 'prepare', boom)
  monkeypatch.setattr(tokenizer_lib, 'build_tokenizer', boom)
  cfg = data.default_data_config()
  assert cfg.task == '' and 'synthetic' in data.SOURCES
  cfg.source, cfg.task, cfg.task_params = 'synthetic', 'addition', {'digits': 2}
  bundle = data.build_data(cfg, seq_len=32, batch_size=2, seed=0, workdir=str(tmp_path))
  assert bundle.stats.source == 'synthetic' and bundle.stats.vocab_size == 16
  assert bundle.stats.task == 'addition' and 'val_eval_bytes' not in bundle.stats
  assert next(bundle.train_iter)['inputs'].shape == (2, 32)
  assert os.path.isfile(tmp_path / 'tokenizer' / 'tokenizer.json')
  assert tokenizer_lib.read_meta(tmp_path / 'tokenizer')['kind'] == 'synthetic'
