"""Training tests: optimizer math, loss, gradient accumulation, FLOPs, overfitting, NaN stop,
entry-point errors. Tiny models on one device; one compiled program shared by the in-process runs.
"""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops as flops_lib
from plt_jax.train import metrics as metrics_lib
from plt_jax.train import optimizer as opt_lib
from plt_jax import sharding as sharding_lib
from plt_jax import train
from plt_jax.train import loop as train_loop
from plt_jax.config import ModelConfig
from plt_jax.model import PLT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=48,
                  window_size=5, max_seq_len=64, rope_theta=10_000.0)


def tiny_config(**train_kw) -> ml_collections.ConfigDict:
  cfg = base.get_config('default', num_loops=2)
  cfg.model.update(TINY_MODEL)
  cfg.train.update(dict(steps=40, batch_size=4, seq_len=24, progress=False), **train_kw)
  cfg.data.update(tokenizer='byte', val_batches=1)
  cfg.optimizer.peak_lr = 1e-2
  cfg.mesh.num_devices = 1
  cfg.checkpoint.update(every=10, max_to_keep=2)
  cfg.eval.every = 20
  return cfg


# ------------------------------------------------------------------------------ optimizer

def test_schedule_warmup_then_cosine():
  c = opt_lib.default_optimizer_config()
  c.peak_lr, c.final_lr_fraction = 1e-3, 0.1
  total = 100                                        # 5% warmup = 5 steps
  lr = opt_lib.learning_rate_schedule(c, total)
  got = np.asarray(jax.jit(jax.vmap(lr))(jnp.arange(total)))
  np.testing.assert_allclose(got[:5], 1e-3 * np.arange(1, 6) / 5, rtol=1e-6)
  decay = np.arange(95) / 95                         # cosine from peak to 0.1 * peak
  want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * decay)))
  np.testing.assert_allclose(got[5:], want, rtol=1e-5)
  assert got[-1] > 1e-4 and np.all(np.diff(got[5:]) < 0)
  c.warmup_steps = 0
  assert float(opt_lib.learning_rate_schedule(c, total)(0)) == pytest.approx(1e-3)


def test_adamw_matches_the_paper_formula():
  """Two updates against a hand-written AdamW: clip 1.0, b=(0.9,0.95), eps, decoupled wd on
  matrices only."""
  c = opt_lib.default_optimizer_config()
  c.warmup_steps, c.schedule, c.peak_lr, c.eps = 0, 'constant', 0.01, 1e-3  # eps visible
  tx = opt_lib.make_optimizer(c, 10)
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 5)).astype(np.float32),
            'norm': rng.normal(size=(5,)).astype(np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  cur = params
  for t in (1, 2):
    grads = {k: (3.0 * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
    gnorm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert gnorm > 1.0                                 # clipping is active
    upd, state = update(grads, state, cur)
    cur = optax.apply_updates(cur, upd)
    for k in p:
      g = grads[k] / gnorm
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.95 * v[k] + 0.05 * g * g
      step = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-3)
      wd = 0.1 * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - 0.01 * (step + wd)
    for k in p:
      np.testing.assert_allclose(cur[k], p[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_on_the_model():
  cfg = ModelConfig(**{**TINY_MODEL, 'vocab_size': 64})
  state = nnx.state(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))), nnx.Param)
  flat = {'/'.join(map(str, k)): bool(v) for k, v in nnx.traversals.flatten_mapping(
      opt_lib.decay_mask(nnx.to_pure_dict(state))).items()}
  decayed = sorted(k for k, v in flat.items() if v)
  kept = sorted(k for k, v in flat.items() if not v)
  assert all(k.endswith(('kernel', 'embedding', 'plt_gate/weight')) for k in decayed)
  assert all(k.endswith(('norm/weight', 'layernorm/weight', 'plt_gate/bias')) for k in kept)
  # per layer: 7 kernels + gate weight decayed; 2 norms + gate_norm + gate bias kept
  assert len(decayed) == 8 + 2 and len(kept) == 4 + 1


# ----------------------------------------------------------------------- loss / accumulation

STEPS = 60
VOCAB = 384  # the byte tokenizer's 259 ids rounded up to a multiple of 128


@functools.lru_cache(maxsize=None)
def program(grad_accum: int):
  """The same compiled program as the in-process runs below (same model, optimizer, mesh)."""
  cfg = tiny_config(steps=STEPS)
  mcfg = ModelConfig.from_dict({**cfg.model.to_dict(), 'vocab_size': VOCAB})
  mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return train.Program.get(mcfg, cfg.optimizer, STEPS, mesh, grad_accum=grad_accum)


def random_batch(b=4, s=24, vocab=VOCAB, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, s)).astype(np.int32)
  targets = rng.integers(0, vocab, (b, s)).astype(np.int32)
  # two packed documents per row at a random cut, some tokens masked out
  cut = rng.integers(2, s - 2, b)
  col = np.arange(s)[None]
  positions = np.where(col < cut[:, None], col, col - cut[:, None]).astype(np.int32)
  segment_ids = np.where(col < cut[:, None], 1, 2).astype(np.int32)
  loss_mask = (rng.random((b, s)) > 0.3).astype(np.float32)
  return dict(inputs=inputs, targets=targets, positions=positions, segment_ids=segment_ids,
              loss_mask=loss_mask)


def test_loss_is_masked_next_token_cross_entropy():
  batch = random_batch()
  logits = 4.0 * np.random.default_rng(2).normal(size=(*batch['inputs'].shape, VOCAB))

  def model(inputs, positions, segment_ids, runtime=None):  # stands in for the PLT
    assert runtime is None  # loss_sums passes its runtime through
    assert inputs is batch['inputs'] and positions is batch['positions']
    assert segment_ids is batch['segment_ids']
    return jnp.asarray(logits, jnp.float32)
  loss_sum, count = train.loss_sums(model, batch)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  want = float((nll * batch['loss_mask']).sum())
  assert float(count) == batch['loss_mask'].sum()
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)


def test_grad_accumulation_is_the_same_math_as_one_batch():
  """4 rows as 2 microbatches of 2 rows (strided) == one batch of 4."""
  batch = random_batch(seed=1)
  init = jax.device_get(program(1).init(5)['model'])
  out = {}
  for n in (1, 2):
    state, metrics = program(n).train_step(program(1).init(5), batch)
    out[n] = (jax.device_get(state['model']), jax.device_get(metrics))
  (p1, m1), (p3, m3) = out[1], out[2]
  for k in ('loss', 'grad_norm', 'loss_tokens', 'lr'):
    np.testing.assert_allclose(m3[k], m1[k], rtol=2e-6, err_msg=k)
  assert float(m1['loss_tokens']) == batch['loss_mask'].sum()
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                            jax.tree.leaves(init)))
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                           jax.tree.leaves(p3)))
  assert moved > 1e-4 and diff < 1e-6 * max(1.0, moved * 100), (moved, diff)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  base_prog = program(1)
  mcfg = ModelConfig.from_dict({**tiny_config().model.to_dict(), 'vocab_size': VOCAB,
                                'dtype': 'bfloat16'})
  bf16 = train.Program.get(mcfg, tiny_config(steps=STEPS).optimizer, STEPS, base_prog.mesh)
  state = base_prog.init(5)
  assert {x.dtype for x in jax.tree.leaves(state['model'])} == {jnp.dtype('float32')}
  batch = random_batch(seed=3)
  l32, n32 = base_prog.eval_step(state, batch)
  l16, n16 = bf16.eval_step(state, batch)
  rel = abs(float(l16) / float(l32) - 1)
  assert float(n16) == float(n32) and 0 < rel < 2e-2, rel


# ------------------------------------------------------------------------------------ FLOPs

def test_flops_per_token_counts_every_loop_and_the_window():
  assert flops_lib.mean_window_keys(10, 3) == pytest.approx((1 + 2 + 3 * 8) / 10)
  assert flops_lib.mean_window_keys(10, 50) == pytest.approx(5.5)
  cfg = ModelConfig(**{**TINY_MODEL, 'vocab_size': 61})
  T = 24
  f = flops_lib.flops_per_token(cfg, T)
  # Dense part from the real parameter shapes: 2 FLOPs per kernel weight, every layer, R loops.
  state = nnx.state(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))), nnx.Param)
  per_layer = sum(v.size for k, v in nnx.to_flat_state(state)
                  if k[0] == 'layers' and k[1] == 0 and k[-1] == 'kernel')
  assert f['dense'] == 2 * per_layer * cfg.num_layers * 2
  hd = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
  assert f['attention_global'] == pytest.approx(hd * (T + 1) / 2 * 2)    # loop 1 + K1 branch
  assert f['attention_window'] == pytest.approx(hd * flops_lib.mean_window_keys(T, 5))
  assert f['gate'] == 2 * cfg.d_model * cfg.num_heads * cfg.num_layers
  assert f['head'] == 2 * cfg.d_model * 61
  assert f['train'] == pytest.approx(3 * f['forward'])
  r4 = flops_lib.flops_per_token(cfg.replace(num_loops=4), T)
  assert r4['attention_window'] == pytest.approx(3 * f['attention_window'])
  assert r4['dense'] == 2 * f['dense']
  van = flops_lib.flops_per_token(cfg.replace(loop_mode='vanilla'), T)
  assert van['attention_window'] == 0 and van['gate'] == 0
  assert van['attention_global'] == f['attention_global']
  one = flops_lib.flops_per_token(cfg.replace(num_loops=1), T)
  assert one['dense'] * 2 == f['dense'] and one['attention_window'] == 0
  thr = flops_lib.throughput(1000.0, f['train'], 2, 1e12)
  assert thr['mfu'] == pytest.approx(1000.0 * f['train'] / 2 / 1e12)


# ------------------------------------------------------------------------- in-process runs

@pytest.fixture(scope='module')
def repeated_text_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('corpus')
  text = 'def add(a, b):\n    return a + b\n\n'
  for i in range(4):
    (d / f'f{i}.py').write_text(text * 40)
  return str(d)


def overfit_config(corpus):
  cfg = tiny_config(steps=STEPS)
  cfg.data.update(source='files', paths=(os.path.join(corpus, '*.py'),))
  cfg.eval.every = 30
  return cfg


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
  from plt_jax import data as data_lib
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


def test_hooks_run_in_order_at_their_cadence_and_a_reason_stops_the_loop():
  calls = []

  def steps(n):
    for s in range(1, n + 1):
      calls.append(('step', s))   # a step draws its batch only when it runs
      yield train_loop.StepInfo(s, None, {})

  def record(name):
    return lambda info: calls.append((name, info.step))

  hooks = [train_loop.Hook(record('every')),
           train_loop.Hook(record('third'), every=3, last=7),
           train_loop.Hook(record('off'), every=0, last=7)]
  last, reason = train_loop.run_hooks(steps(7), hooks)
  assert (last.step, reason) == (7, None)
  assert [c for c in calls if c[0] == 'third'] == [('third', 3), ('third', 6), ('third', 7)]
  assert [c for c in calls if c[0] == 'every'] == [('every', s) for s in range(1, 8)]
  assert not [c for c in calls if c[0] == 'off']
  assert calls[calls.index(('step', 6)):calls.index(('step', 7))] == [
      ('step', 6), ('every', 6), ('third', 6)]

  calls.clear()
  stop = train_loop.Hook(lambda info: 'enough' if info.step == 4 else None, every=2)
  last, reason = train_loop.run_hooks(
      steps(9), [train_loop.Hook(record('before')), stop, train_loop.Hook(record('after'))])
  assert (last.step, reason) == (4, 'enough')
  # The hooks after the one that stopped do not run, and no further step draws a batch.
  assert calls[-2:] == [('step', 4), ('before', 4)]
  assert ('after', 3) in calls and ('step', 5) not in calls
  assert train_loop.run_hooks(iter(()), hooks) == (None, None)
