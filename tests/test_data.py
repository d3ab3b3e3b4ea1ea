"""Data: packing, grain determinism and state, tokenizers, the cache, bad data, stdlib corpus."""
import json
import os

import numpy as np
import pytest

from plt_jax import data
from plt_jax import tokenizer as tokenizer_lib

KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')
CODE = [
    'def add(a, b):\n    return a + b\n',
    'class Point:\n    """A point."""\n    x: int = 0  # café ✓\n',
    'import os\nprint(os.path.join("a", "b") , "x" . strip())\n',
    'for i in range(10):\n    if i % 2:\n        print(i)\n',
    'while True:\n    break\n# 😀 end\n',
    'x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n',
]


def _flat(docs):
  tokens = np.array([t for d in docs for t in d], np.uint16)
  offsets = np.cumsum([0] + [len(d) for d in docs])
  return tokens, offsets


def _random_rows(seed=0, num_docs=40, seq_len=16):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(3, 259, rng.integers(1, 40)).tolist() for _ in range(num_docs)]
  tokens, offsets = _flat(docs)
  return docs, data.PackedRows(tokens, offsets, seq_len=seq_len, bos_id=1, eos_id=2)


def _write_corpus(folder, texts=CODE):
  os.makedirs(folder, exist_ok=True)
  for i, t in enumerate(texts):
    with open(os.path.join(folder, f'f{i}.py'), 'w', encoding='utf-8') as f:
      f.write(t * 3)
  return os.path.join(folder, '*.py')


def _files_cfg(pattern, **kw):
  cfg = data.default_data_config()
  cfg.source, cfg.paths, cfg.tokenizer, cfg.val_fraction = 'files', (pattern,), 'byte', 0.2
  cfg.read_threads, cfg.prefetch = 0, 2
  cfg.update(kw)
  return cfg


# ----------------------------------------------------------------------------------- packing

def test_packing_hand_made_example():
  # Sequences <s> doc </s> of lengths 5, 3, 9, 4 into rows of 8 (next-fit).
  tokens, offsets = _flat([[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41]])
  rows = data.PackedRows(tokens, offsets, seq_len=8, bos_id=1, eos_id=2)
  assert len(rows) == 3
  expect = [
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
  ]
  for r, want in enumerate(expect):
    row = rows[r]
    assert row['inputs'].dtype == np.int32 and row['loss_mask'].dtype == np.float32
    for k in KEYS:
      np.testing.assert_array_equal(row[k], want[k], err_msg=f'row {r} {k}')
  assert rows.pad_fraction == pytest.approx(3 / 24)


def test_packing_keeps_every_prediction_once():
  docs, rows = _random_rows(seed=1, num_docs=50, seq_len=16)
  assert sum(len(rows[r]['inputs']) for r in range(len(rows))) == 16 * len(rows)
  predicted = []  # (input, target) pairs in row order == document order
  for r in range(len(rows)):
    row = rows[r]
    assert np.all((row['positions'] == 0) == np.r_[True, np.diff(row['segment_ids']) != 0]
                  | (row['segment_ids'] == 0))
    m = row['loss_mask'] == 1
    predicted += list(zip(row['inputs'][m].tolist(), row['targets'][m].tolist()))
  want = [(a, b) for d in docs for a, b in zip([1] + d, d + [2])]
  assert predicted == want  # n+1 predictions per document, none lost across chunk borders


# -------------------------------------------------------------------------------- pipelines

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def test_pipeline_seed_determinism_state_and_process_slices():
  _, rows = _random_rows(seed=2, num_docs=12, seq_len=16)
  kw = dict(batch_size=4, read_threads=0, prefetch=0)
  a = _take(data.train_iterator(rows, seed=7, **kw), 12)  # > 1 epoch (len(rows) rows)
  assert len(rows) < 12 * 4
  assert a[0]['inputs'].shape == (4, 16) and a[0]['loss_mask'].dtype == np.float32
  assert _same(a, _take(data.train_iterator(rows, seed=7, **kw), 12))
  assert not _same(a, _take(data.train_iterator(rows, seed=8, **kw), 12))

  it = data.train_iterator(rows, seed=7, batch_size=4, read_threads=1, prefetch=3)
  _take(it, 5)
  state = it.get_state()
  after = _take(it, 4)
  assert _same(after, a[5:9])
  it.set_state(state)
  assert _same(_take(it, 4), after)
  fresh = data.train_iterator(rows, seed=7, batch_size=4, read_threads=1, prefetch=3)
  fresh.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoints)
  assert _same(_take(fresh, 4), after)

  parts = [_take(data.train_iterator(rows, seed=7, process_index=p, process_count=2, **kw), 6)
           for p in range(2)]
  for b in range(6):
    for k in KEYS:
      np.testing.assert_array_equal(np.concatenate([parts[0][b][k], parts[1][b][k]]), a[b][k])
  with pytest.raises(ValueError, match='divisible'):
    data.train_iterator(rows, seed=7, batch_size=3, process_count=2)


def test_validation_batches_fixed_and_padded():
  _, rows = _random_rows(seed=3, num_docs=6, seq_len=16)
  n = len(rows)
  batches = data.validation_batches(rows, batch_size=n + 1, max_batches=4)
  assert len(batches) == 1 and batches[0]['inputs'].shape == (n + 1, 16)
  assert batches[0]['loss_mask'][n].sum() == 0 and batches[0]['segment_ids'][n].sum() == 0
  np.testing.assert_array_equal(batches[0]['inputs'][0], rows[0]['inputs'])
  capped = data.validation_batches(rows, batch_size=2, max_batches=1)
  assert len(capped) == 1
  half = data.validation_batches(rows, batch_size=2, max_batches=1, process_index=1,
                                 process_count=2)
  np.testing.assert_array_equal(half[0]['targets'][0], rows[1]['targets'])


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


# ------------------------------------------------------------------------ build_data + cache

def test_build_data_cache_reuse_and_split(tmp_path, monkeypatch):
  pattern = _write_corpus(str(tmp_path / 'src'))
  cfg = _files_cfg(pattern, val_batches=0)
  kw = dict(seq_len=32, batch_size=4, workdir=str(tmp_path / 'wd'))
  first = data.build_data(cfg, seed=0, **kw)
  s = first.stats
  assert not s['cache_hit'] and s['files'] == 6 and s['train_docs'] + s['val_docs'] == 6
  assert s['val_docs'] >= 1 and s['train_docs'] >= 1
  assert s['train_tokens'] == s['train_bytes'] and s['val_tokens'] == s['val_bytes']  # byte kind
  assert s['train_bytes'] + s['val_bytes'] == sum(len((t * 3).encode()) for t in CODE)
  assert s['val_eval_bytes'] == s['val_bytes']  # whole val split kept: bits-per-byte is exact
  assert s['val_eval_tokens'] == s['val_tokens'] + s['val_docs']
  manifest = os.path.join(s['cache_dir'], 'manifest.json')
  mtime = os.stat(manifest).st_mtime_ns
  with open(manifest) as f:
    m = json.load(f)
  assert m['splits']['train']['tokens'] == s['train_tokens'] and len(m['val_keys']) == s['val_docs']
  assert m['tokenizer']['sha256'] == first.tokenizer.sha256 and m['tokenizer']['dtype'] == 'uint16'

  def boom(*a, **k):
    raise AssertionError('re-tokenized although the cache exists')
  monkeypatch.setattr(data, '_tokenize', boom)
  monkeypatch.setattr(data, 'read_corpus', boom)
  second = data.build_data(cfg, seed=0, **kw)
  assert second.stats['cache_hit'] and os.stat(manifest).st_mtime_ns == mtime
  assert _same(_take(first.train_iter, 3), _take(second.train_iter, 3))
  # Another run seed reshuffles training but keeps the validation set.
  other = data.build_data(cfg, seed=1, **kw)
  assert _same(first.val_batches, other.val_batches) and len(first.val_batches) >= 1
  assert not _same(_take(first.train_iter, 3), _take(other.train_iter, 3))
  monkeypatch.undo()

  # Editing a source file changes the key: a new cache is written.
  with open(os.path.join(str(tmp_path / 'src'), 'f0.py'), 'a') as f:
    f.write('z = 1\n')
  third = data.build_data(cfg, seed=0, **kw)
  assert not third.stats['cache_hit'] and third.stats['cache_dir'] != s['cache_dir']


def test_jsonl_and_parquet_sources(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  jl = tmp_path / 'a.jsonl'
  jl.write_text('\n'.join(json.dumps({'content': t, 'id': i}) for i, t in enumerate(CODE))
                + '\n\n')
  pq.write_table(pa.table({'content': CODE[::-1] + [None]}), str(tmp_path / 'b.parquet'))
  for source, name in (('jsonl', 'a.jsonl'), ('parquet', 'b.parquet')):
    cfg = _files_cfg(str(tmp_path / name), source=source, text_field='content', val_fraction=0.3)
    b = data.build_data(cfg, seq_len=16, batch_size=2, seed=0, workdir=str(tmp_path / source))
    assert b.stats['train_docs'] + b.stats['val_docs'] == len(CODE)
    assert b.stats['train_bytes'] + b.stats['val_bytes'] == sum(len(t.encode()) for t in CODE)
    assert b.stats['empty_docs'] == (1 if source == 'parquet' else 0)


def test_bad_data_errors(tmp_path):
  wd = str(tmp_path / 'wd')
  build = lambda cfg: data.build_data(cfg, seq_len=16, batch_size=2, seed=0, workdir=wd)
  with pytest.raises(ValueError, match=r"glob '.*nothing\*\.txt' matched no files"):
    build(_files_cfg(str(tmp_path / 'nothing*.txt')))

  (tmp_path / 'blank').mkdir()
  (tmp_path / 'blank' / 'a.txt').write_text('  \n')
  (tmp_path / 'blank' / 'b.txt').write_text('')
  with pytest.raises(ValueError, match='corpus is empty'):
    build(_files_cfg(str(tmp_path / 'blank' / '*.txt')))

  bad_field = tmp_path / 'field.jsonl'
  bad_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"field\.jsonl:2: no text field 'text'"):
    build(_files_cfg(str(bad_field), source='jsonl'))

  bad_json = tmp_path / 'broken.jsonl'
  bad_json.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(ValueError, match=r'broken\.jsonl:3: invalid JSON'):
    build(_files_cfg(str(bad_json), source='jsonl'))

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'body': ['a', 'b']}), str(tmp_path / 'cols.parquet'))
  with pytest.raises(ValueError, match=r"cols\.parquet: no text field 'text'"):
    build(_files_cfg(str(tmp_path / 'cols.parquet'), source='parquet'))
  pq.write_table(pa.table({'text': [1, 2]}), str(tmp_path / 'ints.parquet'))
  with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' is int64"):
    build(_files_cfg(str(tmp_path / 'ints.parquet'), source='parquet'))

  # Undecodable bytes are replaced and counted; a binary file is skipped and counted.
  mixed = tmp_path / 'mixed'
  _write_corpus(str(mixed), CODE[:4])
  (mixed / 'latin1.py').write_bytes('x = "café"\n'.encode('latin-1'))
  (mixed / 'blob.py').write_bytes(b'\x89PNG\x00\x00\x01\x02')
  b = data.build_data(_files_cfg(str(mixed / '*.py'), val_batches=0), seq_len=16, batch_size=2,
                      seed=0, workdir=str(tmp_path / 'wd_mixed'))
  assert (b.stats['undecodable'], b.stats['skipped_binary']) == (1, 1)
  assert b.stats['train_docs'] + b.stats['val_docs'] == 5
  with open(os.path.join(b.stats['cache_dir'], 'manifest.json')) as f:
    read = json.load(f)['read']
  assert read['undecodable_where'] == [str(mixed / 'latin1.py')]
  assert read['skipped_where'] == [str(mixed / 'blob.py')] and read['replaced_chars'] == 1


def test_stdlib_corpus_small(tmp_path):
  files = data.stdlib_files()
  keys = {f.key for f in files}
  assert 'os.py' in keys and 'json/decoder.py' in keys and len(files) > 300
  assert not any(k.startswith(('test/', 'site-packages/')) or '/tests/' in k for k in keys)
  cfg = data.default_data_config()
  cfg.max_chars, cfg.vocab_size, cfg.val_fraction, cfg.val_batches = 200_000, 384, 0.1, 2
  cfg.read_threads, cfg.prefetch = 0, 2
  b = data.build_data(cfg, seq_len=64, batch_size=4, seed=0, workdir=str(tmp_path))
  s = b.stats
  assert s['source'] == 'stdlib' and s['files'] == len(files) and s['capped']
  assert 200_000 <= s['train_chars'] + s['val_chars'] < 200_000 + 400_000
  assert s['val_docs'] >= 1 and s['train_tokens'] < s['train_bytes']  # BPE compresses code
  assert b.tokenizer.vocab_size == 384 and len(b.val_batches) == 2
  batch = next(b.train_iter)
  assert batch['inputs'].shape == (4, 64) and batch['inputs'].max() < 384
  assert batch['loss_mask'].sum() > 200
  assert 0 < s['val_eval_bytes'] and s['val_eval_tokens'] == sum(
      int(v['loss_mask'].sum()) for v in b.val_batches)
  text = b.tokenizer.decode(batch['inputs'][0])
  assert len(text) > 64  # real code, several bytes per token


def test_synthetic_source_reads_no_corpus(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise AssertionError('a synthetic source must not read or tokenize a corpus')
  monkeypatch.setattr(data, '_resolve_files', boom)
  monkeypatch.setattr(tokenizer_lib, 'build_tokenizer', boom)
  cfg = data.default_data_config()
  assert cfg.task == '' and 'synthetic' in data.SOURCES
  cfg.source, cfg.task, cfg.task_params = 'synthetic', 'addition', {'digits': 2}
  bundle = data.build_data(cfg, seq_len=32, batch_size=2, seed=0, workdir=str(tmp_path))
  assert bundle.stats['source'] == 'synthetic' and bundle.stats['vocab_size'] == 16
  assert next(bundle.train_iter)['inputs'].shape == (2, 32)
  assert os.path.isfile(tmp_path / 'tokenizer' / 'tokenizer.json')
