"""Training runs in process and the entry point: overfitting a repeated text, every output a run
writes, NaN stop, errors that still close the outputs, resume across attention implementations,
entry-point errors in fresh processes. Tiny models on one device; the in-process runs share one
compiled program.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import REPO, tiny_run_config
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import metrics as metrics_lib
from plt_jax import data as data_lib
from plt_jax import train
from plt_jax.train import loop as train_loop

STEPS = 60


@pytest.fixture(scope='module')
def repeated_text_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('corpus')
  text = 'def add(a, b):\n    return a + b\n\n'
  for i in range(4):
    (d / f'f{i}.py').write_text(text * 40)
  return str(d)


def overfit_config(corpus):
  return tiny_run_config(**{
      'train.steps': STEPS, 'optimizer.peak_lr': 1e-2, 'checkpoint.every': 10,
      'checkpoint.max_to_keep': 2, 'eval.every': 30, 'data.source': 'files',
      'data.paths': (os.path.join(corpus, '*.py'),),
      'data.max_chars': data_lib.default_data_config().max_chars})


@pytest.fixture(scope='module')
def overfit_run(repeated_text_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('overfit'))
  summary = train.train_and_evaluate(overfit_config(repeated_text_dir), workdir)
  return workdir, summary


def test_overfits_a_repeated_text(overfit_run):
  """A 34-byte snippet repeated: after 60 steps the loss is a small fraction of log(vocab)."""
  _, s = overfit_run
  assert s['first_val_loss'] > 5.0                    # ~log(384) at init
  assert s['final_train_loss'] < 0.3, s
  assert s['final_val_loss'] < 0.3, s


def test_run_writes_every_output(overfit_run):
  workdir, s = overfit_run
  records = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == list(range(1, 61))
  assert [r['step'] for r in records if r['split'] == 'val'] == [0, 30, 60]
  assert all(np.isfinite(r['loss']) for r in records)
  assert {'lr', 'grad_norm', 'tokens_per_s', 'tflops_per_device'} <= set(records[-2])
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(e.startswith('events.out.tfevents') for e in events)
  with open(os.path.join(workdir, 'loss_curve.png'), 'rb') as f:
    png = f.read()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  saved = ckpt_lib.load_config(workdir)
  assert saved.model.vocab_size == 384 and saved.train.steps == 60   # 259 bytes -> x128
  assert s['checkpoint_steps'] == [50, 60]                            # max_to_keep=2
  # load_for_inference rebuilds the model + tokenizer from the work dir alone.
  model, cfg, tok = ckpt_lib.load_for_inference(workdir)
  assert cfg.model.to_dict() == saved.model.to_dict() and tok.vocab_size == 259
  ids = np.asarray([[tok.bos_id] + tok.encode('def add(a, b):\n    return a + b\n\n' * 2)])
  logits = jax.jit(lambda m, x: m(x))(model, ids[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  assert float(nll[0, 10:].mean()) < 0.3        # the restored weights are the trained ones


class TamperedIter:
  """The train iterator, with batch number `at` (1-based) passed through `fn`."""

  def __init__(self, it, at, fn):
    self.it, self.at, self.fn, self.n = it, at, fn, 0

  def __next__(self):
    b = dict(next(self.it))
    self.n += 1
    return self.fn(b) if self.n == self.at else b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    return self.it.set_state(s)


def tamper_train_batch(monkeypatch, at, fn):
  real_build = data_lib.build_data

  def build(*a, **k):
    bundle = real_build(*a, **k)
    bundle.train_iter = TamperedIter(bundle.train_iter, at, fn)
    return bundle

  monkeypatch.setattr(data_lib, 'build_data', build)


def poison(b):
  b['loss_mask'] = b['loss_mask'] * np.float32('nan')
  return b


@pytest.fixture
def closes(monkeypatch):
  """Counts close() of every checkpointer, metrics writer and progress bar (the real one runs)."""
  counts = {}
  for name, cls in (('checkpointer', ckpt_lib.Checkpointer),
                    ('writer', metrics_lib.MetricsWriter), ('progress', metrics_lib.Progress)):
    def close(self, _real=cls.close, _name=name):
      counts[_name] = counts.get(_name, 0) + 1
      return _real(self)
    monkeypatch.setattr(cls, 'close', close)
  return counts


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(repeated_text_dir, tmp_path,
                                                           monkeypatch):
  """A NaN in step 13's batch: the run stops naming step 13; checkpoint 10 is kept and finite."""
  tamper_train_batch(monkeypatch, 13, poison)
  with pytest.raises(train.NonFiniteLossError, match=r'step 13: loss=nan.*checkpoint is step 10'):
    train.train_and_evaluate(overfit_config(repeated_text_dir), str(tmp_path))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), read_only=True)
  assert ckpt.all_steps() == [10]
  ckpt.close()
  model, _, _ = ckpt_lib.load_for_inference(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(nnx.state(model)))
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert max(r['step'] for r in records if r['split'] == 'train') == 12


def test_nan_loss_before_any_checkpoint_says_none_was_saved(repeated_text_dir, tmp_path,
                                                            monkeypatch, closes):
  tamper_train_batch(monkeypatch, 3, poison)
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train_and_evaluate(overfit_config(repeated_text_dir), str(tmp_path))
  msg = str(err.value)
  assert msg.startswith('non-finite training loss at step 3: loss=nan'), msg
  assert (f'Training stopped; no checkpoint was saved yet in {tmp_path / "checkpoints"}, so '
          'running again starts from step 0. Lower optimizer.peak_lr') in msg, msg
  assert 'None' not in msg and 'last good checkpoint' not in msg, msg
  assert closes == {'checkpointer': 1, 'writer': 1, 'progress': 1}
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2]
  assert os.listdir(tmp_path / 'checkpoints') == []


class Boom(RuntimeError):
  pass


def explode_in_data(monkeypatch):
  """Step 11's batch fails: the checkpoint of step 10 was just handed to the async writer."""
  def fn(b):
    raise Boom('the data source went away at batch 11')
  tamper_train_batch(monkeypatch, 11, fn)
  return 10, [10], list(range(1, 11))


def explode_in_eval(monkeypatch):
  """The evaluation at step 30 fails (the one at step 0 runs); checkpoints 10 and 20 exist."""
  real, calls = train_loop.evaluate, []

  def evaluate(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise Boom('evaluation failed at step 30')
    return real(*a, **k)

  monkeypatch.setattr(train_loop, 'evaluate', evaluate)
  return 20, [10, 20], list(range(1, 31))


@pytest.mark.parametrize('explode', [explode_in_data, explode_in_eval])
def test_any_error_still_closes_the_checkpointer_and_the_writers(
    explode, repeated_text_dir, tmp_path, monkeypatch, closes):
  """Not only a NaN: every error closes the outputs, and the save in flight completes."""
  last, steps, train_steps = explode(monkeypatch)
  with pytest.raises(Boom):
    train.train_and_evaluate(overfit_config(repeated_text_dir), str(tmp_path))
  assert closes == {'checkpointer': 1, 'writer': 1, 'progress': 1}
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == [str(s) for s in steps]  # no tmp dirs
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), read_only=True)
  assert ckpt.all_steps() == steps
  assert ckpt.restore(last, meta=True)['meta']['step'] == last
  ckpt.close()
  model, cfg, _ = ckpt_lib.load_for_inference(str(tmp_path))
  assert cfg.train.steps == STEPS
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(nnx.state(model)))
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in records if r['split'] == 'train'] == train_steps
  assert [r['step'] for r in records if r['split'] == 'val'] == [0]


# ---------------------------------------------------------------------------- entry point

def test_entry_point_reports_bad_config_and_bad_data(tmp_path):
  """Run in parallel: each is a fresh process that fails before compiling anything."""
  cases = {
      'heads': (['--config.model.num_heads=5'], 'ModelConfig.num_heads=5: must divide d_model'),
      'accum': (['--config.train.grad_accum=3'], 'train.batch_size=16: must be divisible by '
                                                 'train.grad_accum=3'),
      'glob': (['--config.data.source=files', f'--config.data.paths={tmp_path}/none/*.txt'],
               'matched no files'),
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = {}
  for name, (args, _) in cases.items():
    cmd = [sys.executable, '-m', 'experiments.pretrain', '--config=configs/r2.py',
           f'--workdir={tmp_path / name}', *args]
    procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, p in procs.items():
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0, (name, out, err)
    assert cases[name][1] in err, (name, err[-2000:])
    assert 'Traceback' not in err and 'pretrain: error:' in err, (name, err[-2000:])


def test_resume_accepts_another_attention_impl_but_not_another_model(repeated_text_dir, tmp_path):
  """attention_impl / remat only choose how the same model is computed: a run started with the
  reference attention resumes under 'auto'; a different width is still refused."""
  workdir = str(tmp_path / 'run')
  cfg = overfit_config(repeated_text_dir)
  cfg.train.update(steps=4)
  cfg.eval.every = 0
  cfg.model.attention_impl = 'xla'
  first = train.train_and_evaluate(cfg, workdir)
  assert first['step'] == 4
  cfg.train.steps = 6
  cfg.model.attention_impl, cfg.model.remat = 'auto', 'full'
  again = train.train_and_evaluate(cfg, workdir)
  assert again['start_step'] == 4 and again['step'] == 6
  cfg.model.ffn_dim = 64
  with pytest.raises(ValueError, match='different model.*ffn_dim'):
    train.train_and_evaluate(cfg, workdir)
