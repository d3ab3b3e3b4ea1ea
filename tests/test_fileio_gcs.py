"""fileio and the metrics writer against a real Cloud Storage server (fake-gcs-server, the
`gcs_bucket` fixture): round trips, one-line errors, TensorBoard chunks uploaded to a bucket.
Nothing of the project's own I/O is mocked: gcsfs talks HTTP to the emulator."""
import numpy as np
import pytest

from plt_jax import fileio
from plt_jax.train import metrics as metrics_lib


def test_fileio_round_trips_in_the_bucket(prefix):
  d = f'{prefix}/a'
  assert not fileio.exists(d) and fileio.listdir(d) == []
  fileio.write_json(f'{d}/x.json', {'loss': float('nan'), 'v': np.float32(1.5), 'n': [1, 2]})
  assert fileio.read_text(f'{d}/x.json') == (
      '{\n  "loss": null,\n  "v": 1.5,\n  "n": [\n    1,\n    2\n  ]\n}\n')
  fileio.write_bytes(f'{d}/sub/b.bin', bytes(range(256)))
  assert fileio.read_bytes(f'{d}/sub/b.bin') == bytes(range(256))
  assert fileio.isdir(d) and fileio.isdir(f'{d}/sub') and fileio.isfile(f'{d}/x.json')
  assert fileio.listdir(d) == ['sub', 'x.json']
  assert fileio.abspath(f'{d}/') == d and fileio.join(d, 'sub', 'b.bin') == f'{d}/sub/b.bin'
  fileio.check_access(d, 'workdir')          # an existing bucket: no error, nothing written
  assert fileio.listdir(d) == ['sub', 'x.json']


def test_a_missing_bucket_is_a_one_line_error(gcs_bucket):
  with pytest.raises(fileio.StorageError) as err:
    fileio.check_access('gs://no-such-bucket-plt/run', 'workdir')
  assert str(err.value) == ('workdir=gs://no-such-bucket-plt/run: bucket gs://no-such-bucket-plt '
                            'does not exist (create it: gcloud storage buckets create '
                            'gs://no-such-bucket-plt)')


def test_metrics_writer_in_the_bucket_uploads_jsonl_and_tensorboard_chunks(prefix):
  from tensorboardX.proto import event_pb2
  w = metrics_lib.MetricsWriter(prefix, sync_every_s=1e9)
  for step in range(1, 6):
    w.write(step, {'loss': 10.0 / step, 'lr': float('nan') if step == 3 else 1e-3})
  assert not fileio.exists(w.jsonl_path)                  # nothing uploaded before a flush
  assert [r['step'] for r in w.records()] == [1, 2, 3, 4, 5]
  w.flush()
  for step in range(6, 8):
    w.write(step, {'loss': 10.0 / step})
  w.close()
  records = metrics_lib.read_jsonl(w.jsonl_path)
  assert [r['step'] for r in records] == list(range(1, 8))
  assert [r['loss'] for r in records] == [10.0 / s for s in range(1, 8)]
  assert records[2]['lr'] is None                          # NaN -> null
  chunks = fileio.listdir(w.tb_dir)
  assert len(chunks) == 2 and all('tfevents' in c for c in chunks), chunks
  # The chunks, read in name order as TensorBoard does, are one valid event stream.
  scalars = {}
  for name in chunks:
    data, pos = fileio.read_bytes(f'{w.tb_dir}/{name}'), 0
    while pos < len(data):
      (n,) = np.frombuffer(data[pos:pos + 8], '<u8')
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + int(n)])
      pos += 16 + int(n)
      for v in ev.summary.value:
        scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  assert [s for s, _ in scalars['train/loss']] == list(range(1, 8))
  np.testing.assert_allclose([x for _, x in scalars['train/loss']],
                             [10.0 / s for s in range(1, 8)], rtol=1e-6)
  assert [s for s, _ in scalars['train/lr']] == [1, 2, 4, 5]  # NaN is not plotted
  # A resume from step 4 keeps only the records up to it.
  w2 = metrics_lib.MetricsWriter(prefix, resume_step=4)
  w2.close()
  assert [r['step'] for r in metrics_lib.read_jsonl(w.jsonl_path)] == [1, 2, 3, 4]


def test_directories_upload_and_download_whole(prefix, tmp_path):
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  (src / 'a.bin').write_bytes(bytes(range(7)) * 300)
  (src / 'sub' / 'b.json').write_text('{"x": 1}\n')
  fileio.upload_dir(src, f'{prefix}/d')
  assert sorted(fileio.listdir(f'{prefix}/d')) == ['a.bin', 'sub']
  back = fileio.download_dir(f'{prefix}/d', tmp_path / 'back')
  assert (tmp_path / 'back' / 'a.bin').read_bytes() == bytes(range(7)) * 300
  assert (tmp_path / 'back' / 'sub' / 'b.json').read_text() == '{"x": 1}\n'
  assert back == str(tmp_path / 'back')
  with pytest.raises(FileNotFoundError, match='no such directory'):
    fileio.download_dir(f'{prefix}/missing', tmp_path / 'x')
