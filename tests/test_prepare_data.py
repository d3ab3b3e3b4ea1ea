"""prepare_data: shards independent of workers and hosts, resume after a kill, the hf source,
bounded memory, bad input, and prepared data in a gs:// bucket. The command line is tested in
tests/integration/test_prepare_data_cli.py."""
import json
import os
import threading

import numpy as np
import pytest

from helpers import random_code_docs, write_jsonl
from plt_jax import data
from plt_jax import fileio
from plt_jax import tokenizer as tokenizer_lib
from plt_jax.data import pipeline
from plt_jax.data import prepare as prepare_lib
from plt_jax.data import sources

quiet = lambda _: None


def _cfg(paths, **kw):
  cfg = data.default_data_config()
  cfg.source, cfg.paths, cfg.tokenizer, cfg.val_fraction = 'jsonl', tuple(paths), 'byte', 0.1
  cfg.unit_mib = 4096 / 2**20      # ~4 KB units: several shards from a small corpus
  cfg.update(kw)
  return cfg


def _shard_bytes(out):
  """{relative path: bytes} of every shard and the manifest's split counts."""
  found = {}
  for split in ('train', 'val'):
    for name in sorted(os.listdir(os.path.join(out, split))):
      found[f'{split}/{name}'] = open(os.path.join(out, split, name), 'rb').read()
  return found


def _documents(out, tok=None):
  m = json.load(open(os.path.join(out, 'manifest.json')))
  tok = tok or tokenizer_lib.Tokenizer.from_pretrained(os.path.join(out, 'tokenizer'))
  res = {}
  for split in ('train', 'val'):
    sd = pipeline.ShardedDocs(out, m['splits'][split], m['tokenizer']['dtype'])
    res[split] = [tok.decode(sd[i]) for i in range(len(sd))]
  return res


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp('corpus')
  docs = random_code_docs(400, seed=1)
  return write_jsonl(d / 'a.jsonl', docs[:250]), write_jsonl(d / 'b.jsonl', docs[250:]), docs


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The corpus prepared in one go, one worker, one host (bpe, so the tokenizer is trained)."""
  out = str(tmp_path_factory.mktemp('ref') / 'out')
  cfg = _cfg(corpus[:2], tokenizer='bpe', vocab_size=300, bpe_train_chars=20_000)
  manifest = prepare_lib.prepare(cfg, out, say=quiet)
  return cfg, out, manifest


def test_prepared_shards_hold_every_document_once(corpus, reference):
  _, out, m = reference
  docs = _documents(out)
  assert sorted(docs['train'] + docs['val']) == sorted(corpus[2])
  assert m['units'] > 4 and len(m['splits']['train']['shards']) == m['units']
  assert m['splits']['train']['docs'] == len(docs['train']) and len(docs['val']) >= 20
  assert m['splits']['train']['chars'] + m['splits']['val']['chars'] == sum(
      len(d) for d in corpus[2])
  assert m['tokenizer']['kind'] == 'bpe' and m['tokenizer']['dtype'] == 'uint16'
  assert m['key'] == prepare_lib.dataset_key(reference[0])
  assert m['skipped']['binary'] == 0 and m['files_read'] == 2


def test_two_workers_write_the_same_shards(reference, tmp_path):
  cfg, out, _ = reference
  two = str(tmp_path / 'two')
  manifest = prepare_lib.prepare(cfg, two, workers=2, say=quiet)
  assert _shard_bytes(two) == _shard_bytes(out)
  assert manifest['splits'] == json.load(open(os.path.join(out, 'manifest.json')))['splits']


def test_hosts_prepare_their_units_and_the_last_writes_the_manifest(reference, tmp_path):
  cfg, out, _ = reference
  split = str(tmp_path / 'split')
  with pytest.raises(ValueError, match=r'no tokenizer after 0 s; it is made by the host with '
                                       r'--shard=0'):
    prepare_lib.prepare(cfg, split, shard=1, num_shards=3, tokenizer_wait_s=0, say=quiet)
  assert prepare_lib.prepare(cfg, split, shard=0, num_shards=3, say=quiet) is None
  assert prepare_lib.prepare(cfg, split, shard=2, num_shards=3, say=quiet) is None
  assert not os.path.exists(os.path.join(split, 'manifest.json'))
  with pytest.raises(ValueError, match=r'units are not prepared yet \(the first is unit 1\)'):
    prepare_lib.finalize(split, say=quiet)
  manifest = prepare_lib.prepare(cfg, split, shard=1, num_shards=3, say=quiet)
  assert manifest is not None and _shard_bytes(split) == _shard_bytes(out)
  assert prepare_lib.finalize(split, say=quiet)['splits'] == manifest['splits']


def test_a_killed_prepare_resumes_and_matches(reference, tmp_path, monkeypatch):
  cfg, out, _ = reference
  killed = str(tmp_path / 'killed')
  real_read, real_call = sources.read_unit, prepare_lib.PrepareUnit.__call__
  running = threading.local()   # which unit this thread prepares

  def dies_in_unit_3(unit, cfg_, counts):
    for n, doc in enumerate(real_read(unit, cfg_, counts)):
      if getattr(running, 'index', None) == 3 and n == 2:
        raise KeyboardInterrupt   # killed while unit 3 has written part of its shards
      yield doc

  def call(self, job):
    running.index = job['index']
    return real_call(self, job)
  monkeypatch.setattr(sources, 'read_unit', dies_in_unit_3)
  monkeypatch.setattr(prepare_lib.PrepareUnit, '__call__', call)
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(cfg, killed, say=quiet)
  done = sorted(int(n[len('unit-'):-len('.json')])
                for n in os.listdir(os.path.join(killed, 'units')))
  assert done == [0, 1, 2]   # one worker: units run in order on this thread
  assert any('.tmp' in n for n in os.listdir(os.path.join(killed, 'train')))
  kept = {n: os.stat(os.path.join(killed, 'train', n)).st_mtime_ns
          for n in os.listdir(os.path.join(killed, 'train')) if '.tmp' not in n}
  monkeypatch.undo()

  redone = []
  monkeypatch.setattr(prepare_lib.PrepareUnit, '__call__',
                      lambda self, job: redone.append(job['index']) or real_call(self, job))
  manifest = prepare_lib.prepare(cfg, killed, say=quiet)
  m = json.load(open(os.path.join(out, 'manifest.json')))
  # Finished units are kept and skipped; the others are prepared.
  assert redone == [u for u in range(m['units']) if u not in done]
  assert all(os.stat(os.path.join(killed, 'train', n)).st_mtime_ns == t for n, t in kept.items())
  assert _shard_bytes(killed) == _shard_bytes(out) and manifest['splits'] == m['splits']
  assert not any('.tmp' in n for n in os.listdir(os.path.join(killed, 'train')))


def test_hf_source_streams_local_json_and_parquet(corpus, tmp_path):
  pytest.importorskip('datasets')
  import pyarrow as pa
  import pyarrow.parquet as pq
  a, b, docs = corpus
  pq.write_table(pa.table({'text': docs[:100]}), str(tmp_path / 'c.parquet'))
  for builder, paths, want in (('json', (a, b), docs), ('parquet', (str(tmp_path / 'c.parquet'),),
                                                        docs[:100])):
    cfg = _cfg(paths, source='hf', hf_path=builder)
    out = str(tmp_path / builder)
    m = prepare_lib.prepare(cfg, out, say=quiet)
    assert m['units'] == len(paths)    # one unit per file of the streaming dataset
    got = _documents(out)
    assert sorted(got['train'] + got['val']) == sorted(want) and got['val']
  capped = prepare_lib.prepare(_cfg((a, b), source='hf', hf_path='json', max_chars=5000),
                               str(tmp_path / 'capped'), say=quiet)
  chars = capped['splits']['train']['chars'] + capped['splits']['val']['chars']
  assert capped['units'] == 2 and 5000 <= chars < 5000 + 2 * max(len(d) for d in docs)
  with pytest.raises(ValueError, match='data.source=hf needs data.hf_path'):
    prepare_lib.prepare(_cfg((a,), source='hf'), str(tmp_path / 'none'), say=quiet)


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path, monkeypatch):
  """A unit tokenizes (and so holds) at most _ENCODE_CHARS plus one document at a time, and the
  BPE sample stops at bpe_train_chars: both the same at 4x the corpus."""
  monkeypatch.setattr(prepare_lib, '_ENCODE_CHARS', 5000)
  held = []
  real = tokenizer_lib.Tokenizer.encode_batch
  monkeypatch.setattr(tokenizer_lib.Tokenizer, 'encode_batch',
                      lambda self, texts: held.append(sum(map(len, texts))) or real(self, texts))
  sampled = []
  real_sample = prepare_lib.bpe_sample

  def counting_sample(cfg, units):
    for text in real_sample(cfg, units):
      sampled.append(len(text))
      yield text
  monkeypatch.setattr(prepare_lib, 'bpe_sample', counting_sample)
  peaks = []
  for n in (200, 800):
    docs = random_code_docs(n, seed=n)
    path = write_jsonl(tmp_path / f'{n}.jsonl', docs)
    held.clear()
    sampled.clear()
    cfg = _cfg((path,), unit_mib=64, tokenizer='bpe', vocab_size=300, bpe_train_chars=8000)
    m = prepare_lib.prepare(cfg, str(tmp_path / f'out{n}'), say=quiet)
    longest = max(len(d) for d in docs)
    assert m['units'] == 1 and len(held) > n // 100   # one unit, tokenized in many calls
    assert max(held) < 5000 + longest
    assert 8000 <= sum(sampled) < 8000 + longest
    peaks.append(max(held))
  assert abs(peaks[1] - peaks[0]) < 2 * max(len(d) for d in random_code_docs(800, seed=800))


def test_bad_input_errors_name_it_and_lose_nothing(reference, corpus, tmp_path):
  cfg, out, _ = reference
  with pytest.raises(ValueError, match=r'--shard=3 is out of range \[0, 3\)'):
    prepare_lib.prepare(cfg, str(tmp_path / 'x'), shard=3, num_shards=3, say=quiet)
  before = _shard_bytes(out)
  other = _cfg(corpus[:1], tokenizer='bpe', vocab_size=300, bpe_train_chars=20_000)
  with pytest.raises(ValueError, match=f'{out} holds another dataset'):
    prepare_lib.prepare(other, out, say=quiet)
  assert _shard_bytes(out) == before
  stranger = tmp_path / 'stranger'
  stranger.mkdir()
  (stranger / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='is not empty and holds no plan.json'):
    prepare_lib.prepare(cfg, str(stranger), say=quiet)
  assert os.listdir(stranger) == ['notes.txt']

  def build(prepared, workdir):
    c = data.default_data_config()
    c.prepared = prepared
    return data.build_data(c, seq_len=16, batch_size=2, seed=0, workdir=str(workdir))
  with pytest.raises(ValueError, match=f'{stranger}: no manifest.json; not a prepared data'):
    build(str(stranger), tmp_path / 'wd0')
  partial = str(tmp_path / 'partial')
  prepare_lib.prepare(cfg, partial, shard=0, num_shards=2, say=quiet)
  with pytest.raises(ValueError, match=r'no manifest.json.*run prepare_data --finalize'):
    build(partial, tmp_path / 'wd1')
  # A run whose workdir already has another tokenizer (byte) refuses shards made with the bpe.
  wd = tmp_path / 'wd_byte'
  tokenizer_lib.build_tokenizer('byte', workdir=str(wd))
  saved = (wd / 'tokenizer' / 'tokenizer.json').read_text()
  with pytest.raises(ValueError, match=r"its tokenizer \(sha256 \w+\) differs from the run's"):
    build(out, wd)
  assert (wd / 'tokenizer' / 'tokenizer.json').read_text() == saved
  assert _shard_bytes(out) == before
  with pytest.raises(ValueError, match='data.source=synthetic is generated on the fly'):
    prepare_lib.prepare(_cfg((), source='synthetic'), str(tmp_path / 'y'), say=quiet)


def test_prepared_data_in_a_gcs_bucket(gcs_bucket, corpus, tmp_path):
  """Source globs, the prepared shards and the tokenizer all in gs://; training reads the same
  batches as from a local copy."""
  prefix = f'{gcs_bucket}/{tmp_path.name}'
  for name, local in (('a.jsonl', corpus[0]), ('b.jsonl', corpus[1])):
    fileio.write_bytes(f'{prefix}/src/{name}', open(local, 'rb').read())
  cfg = _cfg((f'{prefix}/src/*.jsonl',))
  remote = prepare_lib.prepare(cfg, f'{prefix}/prepared', say=quiet)
  local_cfg = _cfg(corpus[:2])
  local = prepare_lib.prepare(local_cfg, str(tmp_path / 'local'), say=quiet)
  assert remote['splits']['train']['docs'] + remote['splits']['val']['docs'] == len(corpus[2])
  assert [s['records'] for s in remote['splits']['train']['shards']] == [
      s['records'] for s in local['splits']['train']['shards']]

  def batches(prepared):
    c = data.default_data_config()
    c.prepared, c.val_batches = prepared, 2
    b = data.build_data(c, seq_len=32, batch_size=4, seed=3, workdir=str(tmp_path / 'wd'))
    return [next(b.train_iter) for _ in range(5)], b.val_batches
  (train_r, val_r), (train_l, val_l) = batches(f'{prefix}/prepared'), batches(
      str(tmp_path / 'local'))
  for got, want in ((train_r, train_l), (val_r, val_l)):
    for x, y in zip(got, want):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
