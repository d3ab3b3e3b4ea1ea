"""plt_jax.infer.loading: one model saved as a work dir and as an HF export loads back the same."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plt_jax.infer import loading

STEP = 3
TOKENS = np.random.default_rng(0).integers(0, 259, (2, 13)).astype(np.int32)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(model, tokenizer, work dir, HF dir): a random R=2 float32 PLT saved both ways."""
  pytest.importorskip('safetensors')
  from plt_jax import presets
  from helpers import randomized, tiny_model_config
  from plt_jax.hf import export_model
  from plt_jax.hf.importer import save_as_workdir
  from plt_jax.model import PLT
  from plt_jax.tokenizer import build_tokenizer
  tok = build_tokenizer('byte', workdir=None)
  cfg = tiny_model_config(vocab_size=tok.vocab_size, num_heads=2, num_kv_heads=1, window_size=3)
  model = randomized(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))), seed=5)
  root = tmp_path_factory.mktemp('loading')
  config = presets.get_config('default', num_loops=2)
  config.model = cfg.to_dict()
  workdir = save_as_workdir(model, tok, str(root / 'run'), config, step=STEP)
  hf_dir = export_model(model, tok, str(root / 'hf'))
  return model, tok, workdir, hf_dir


def logits(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
  return np.asarray(fn(state, jnp.asarray(TOKENS)))


@pytest.mark.parametrize('source', ['workdir', 'hf'])
def test_both_sources_give_the_original_logits(saved, source):
  model, tok, workdir, hf_dir = saved
  path = workdir if source == 'workdir' else hf_dir
  want = logits(model)
  for explicit in (source, None):   # named, and recognised from the directory
    loaded = loading.load_model(path, source=explicit)
    assert loaded.model.cfg == model.cfg and loaded.model.cfg.dtype == 'float32'
    np.testing.assert_allclose(logits(loaded.model), want, rtol=0, atol=1e-6)
    assert loaded.tokenizer.sha256 == tok.sha256
    info = loaded.info
    assert info['source'] == source and info['path'] == os.path.abspath(path)
    assert info['step'] == (STEP if source == 'workdir' else None)
    assert info['num_loops'] == 2 and info['vocab_size'] == tok.vocab_size
    assert info['params'] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if source == 'workdir':
      assert loaded.config.model.to_dict() == model.cfg.to_dict()
    else:
      assert loaded.config is None


def test_dtype_step_and_tokenizer_options(saved, tmp_path):
  model, tok, workdir, hf_dir = saved
  for path in (workdir, hf_dir):
    bf16 = loading.load_model(path, dtype='bfloat16')
    assert bf16.model.cfg.dtype == 'bfloat16' and bf16.info['dtype'] == 'bfloat16'
    a = jax.tree.leaves(nnx.state(bf16.model, nnx.Param))
    b = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
  assert loading.load_model(workdir, step=STEP).info['step'] == STEP
  with pytest.raises(ValueError, match='step 7 not found'):
    loading.load_model(workdir, step=7)
  from plt_jax.tokenizer import BOS, EOS, PAD, Tokenizer, train_bpe_tokenizer
  other = Tokenizer(train_bpe_tokenizer(['def f(x):\n    return x\n'] * 20, 270), bos_token=BOS,
                    eos_token=EOS, pad_token=PAD)
  other.save_pretrained(str(tmp_path / 'tok'))
  loaded = loading.load_model(hf_dir, tokenizer_path=str(tmp_path / 'tok'))
  assert loaded.tokenizer.sha256 == other.sha256 != tok.sha256


def test_a_path_that_is_neither_is_a_one_line_error(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text('{}')
  cases = [(tmp_path / 'empty', ValueError, 'neither'),
           (tmp_path / 'missing', FileNotFoundError, 'not a directory')]
  for path, kind, words in cases:
    with pytest.raises(kind, match=words) as e:
      loading.load_model(str(path))
    assert str(path) in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(FileNotFoundError, match='no complete checkpoint') as e:
    loading.load_model(str(tmp_path / 'missing'), source='workdir')
  assert str(tmp_path / 'missing') in str(e.value)
  with pytest.raises(ValueError, match='source='):
    loading.load_model(str(tmp_path / 'empty'), source='orbax')


def test_generate_command_on_a_work_dir(saved, capsys):
  from experiments.generate import load_model, main
  model, tok, workdir, hf_dir = saved
  m, t = load_model(workdir=workdir)
  np.testing.assert_allclose(logits(m), logits(model), rtol=0, atol=1e-6)
  assert t.sha256 == tok.sha256
  assert main(['--workdir', workdir, '--prompt', 'def', '--max_new_tokens', '3']) == 0
  assert 'tokens/s' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='error: no complete checkpoint'):
    main(['--workdir', os.path.join(workdir, 'nope'), '--prompt', 'x'])
  with pytest.raises(SystemExit, match='error: .* is not a Hugging Face model directory'):
    main(['--hf_dir', workdir + '-nope', '--prompt', 'x'])


def test_evaluate_scores_both_sources_the_same(saved, tmp_path):
  from plt_jax.evaluation import runner
  _, _, workdir, hf_dir = saved
  (tmp_path / 'a.py').write_text('def f(x):\n    return x + 1\n' * 4)
  common = dict(files=[str(tmp_path / '*.py')], seq_len=16, eval_batch_size=2,
                out_dir=str(tmp_path / 'eval'), progress=False)
  from_run = runner.run('perplexity', workdir=workdir, **common)
  from_hf = runner.run('perplexity', hf_dir=hf_dir, **common)
  assert from_run['model']['step'] == STEP and from_hf['model']['source'] == 'hf'
  assert from_run['nats_per_token'] == pytest.approx(from_hf['nats_per_token'], rel=1e-6)
  assert from_run['bytes'] == from_hf['bytes'] and from_run['byte_counts_agree']
  with pytest.raises(ValueError, match='give --workdir'):
    runner.run('perplexity', **common)
