"""Export to / import from Hugging Face: PyTorch parity, generation, round trips, refusals.

Tiny models with every parameter randomised (gates and norms included), float32, odd sizes
(vocab 263, sequences longer than the window). One export per configuration (module-scoped);
torch tests skip themselves where torch/transformers are absent.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.bench import torch_timing
from plt_jax import ModelConfig
from plt_jax import hf as hf_lib
from plt_jax.hf import convert
from plt_jax.tokenizer import build_tokenizer
from helpers import REPO, release_config

TINY = dict(vocab_size=263, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=80,
            window_size=4, rope_theta=10_000.0, max_seq_len=512)
SEQ = 43           # > window_size: the local window really slides
PROMPT = 11        # generation: PROMPT + NEW_TOKENS == SEQ, so one compiled forward serves all
NEW_TOKENS = 32
TOL = 1e-4

# name -> ModelConfig overrides. Together: R = 1..4, both gate modes, MHA / GQA / MQA, vanilla.
CONFIGS = {
    'r1': dict(num_loops=1),
    'r2_hidden': dict(num_loops=2),
    'r2_query': dict(num_loops=2, gate_mode='query', num_kv_heads=1),
    'r3_hidden': dict(num_loops=3, num_kv_heads=4, window_size=5, normalize_per_loop=False),
    'r3_query': dict(num_loops=3, gate_mode='query'),
    'r4_hidden': dict(num_loops=4, window_size=3, emb_scale=0.9, hidden_scale=0.4),
    'r4_query': dict(num_loops=4, gate_mode='query', num_kv_heads=1, window_size=1),
    'vanilla_r2': dict(num_loops=2, loop_mode='vanilla'),
}


def random_hf_tensors(cfg, seed):
  """Random weights under their HF names: norms 1 + 0.3 N, gates 0.5 N (far from g = 0.5),
  matrices 0.15 N (large enough to matter, small enough for float32 to agree to 1e-4)."""
  rng = np.random.RandomState(seed)
  out = {}
  for name, shape in convert.expected_hf_shapes(cfg).items():
    if name.endswith('norm.weight'):
      v = 1.0 + 0.3 * rng.randn(*shape)
    elif 'plt_gate' in name:
      v = 0.5 * rng.randn(*shape)
    else:
      v = 0.15 * rng.randn(*shape)
    out[name] = v.astype(np.float32)
  return out


def make_model(name, seed=0):
  """A random PLT, built straight from host arrays (no eager per-parameter init)."""
  cfg = ModelConfig(**{**TINY, **CONFIGS[name]})
  graphdef, state = hf_lib.hf_tensors_to_state(random_hf_tensors(cfg, 100 + seed), cfg)
  return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
  # Optimisation level 0 compiles these tiny graphs ~2x faster; numerics stay float32.
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens),
                 compiler_options={'xla_backend_optimization_level': 0})


def jax_logits(model, tokens):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef)(state, jnp.asarray(tokens, jnp.int32)))


def jax_greedy(model, prompts, n):
  """Reference greedy decoding: argmax of the full (pure-JAX) forward, one token at a time.

  prompts: 2 token lists. Rows live in one [2, SEQ] buffer; causality makes the zeros after a
  row's last token irrelevant to its logits. Returns tokens [2, n] and their logits [2, n, V].
  """
  buf = np.zeros((2, SEQ), np.int32)
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  tokens, logits = np.zeros((2, n), np.int64), []
  for i in range(n):
    full = jax_logits(model, buf)
    step = np.stack([full[b, len(p) + i - 1] for b, p in enumerate(prompts)])
    logits.append(step)
    for b, p in enumerate(prompts):
      tokens[b, i] = buf[b, len(p) + i] = int(np.argmax(step[b]))
  return tokens, np.stack(logits, 1)


def random_tokens(shape, seed=1, vocab=TINY['vocab_size']):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int64)


def params_equal(a, b):
  la = nnx.to_flat_state(nnx.state(a, nnx.Param))
  lb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(v.get_value()), np.asarray(lb[p].get_value())) for p, v in la)


@pytest.fixture(scope='module')
def tokenizer():
  return build_tokenizer('byte', workdir=None)


@pytest.fixture(scope='module')
def exports(tmp_path_factory, tokenizer):
  """name -> (jax model, export dir); R=2 hidden is forced into 3+ safetensors shards."""
  out = {}
  for name in CONFIGS:
    model = make_model(name)
    # Unique basenames: transformers caches remote code per directory name (xdist workers).
    d = str(tmp_path_factory.mktemp(f'hf_{name}_{os.getpid()}'))
    shard = 30_000 if name == 'r2_hidden' else '5GB'
    hf_lib.export_model(model, tokenizer, d, max_shard_size=shard, overwrite=True)
    out[name] = (model, d)
  return out


@pytest.fixture(scope='module')
def tc():
  """torch + transformers, offline; the tests that need them skip without them."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  os.environ['HF_HUB_OFFLINE'] = '1'
  # Tiny matmuls: one thread avoids OpenMP spin-waits that cost ~10 ms/op on a busy 2-core host.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  torch.manual_seed(0)
  yield torch, transformers
  torch.set_num_threads(threads)


def load_remote(tc, directory):
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


def torch_logits(tc, model, tokens):
  torch, _ = tc
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


# ------------------------------------------------------------------------------- file format
def test_export_directory_layout(exports):
  model, d = exports['r2_hidden']
  files = set(os.listdir(d))
  for f in ('config.json', 'generation_config.json', 'configuration_plt.py', 'modeling_plt.py',
            'tokenizer.json', 'tokenizer_config.json', 'model.safetensors.index.json'):
    assert f in files, f
  shards = sorted(f for f in files if f.startswith('model-'))
  assert len(shards) >= 3 and 'model.safetensors' not in files
  index = json.load(open(os.path.join(d, 'model.safetensors.index.json')))
  assert set(index['weight_map'].values()) == set(shards)
  assert set(index['weight_map']) == set(convert.expected_hf_shapes(model.cfg))
  assert index['metadata']['total_size'] == 4 * sum(
      int(np.prod(s)) for s in convert.expected_hf_shapes(model.cfg).values())
  cfg = json.load(open(os.path.join(d, 'config.json')))
  assert cfg['plt_window_size'] == [TINY['window_size'] - 1, 0]
  assert cfg['plt_num_loops'] == 2 and cfg['plt_gate_use_hidden_states'] is True
  assert cfg['plt_emb_scale'] == 0.707 and cfg['plt_hidden_scale'] == 0.053
  assert cfg['plt_normalize_per_loop'] is True and cfg['head_dim'] == 12
  assert cfg['auto_map']['AutoModelForCausalLM'] == 'modeling_plt.PLTForCausalLM'
  gen = json.load(open(os.path.join(d, 'generation_config.json')))
  assert (gen['bos_token_id'], gen['eos_token_id'], gen['pad_token_id']) == (1, 2, 0)
  _, d1 = exports['r1']
  assert os.listdir(d1).count('model.safetensors') == 1


def test_release_keys_and_shapes(exports):
  """Gate tensors carry the release's names and shapes in both modes."""
  from safetensors.numpy import load_file
  _, d = exports['r4_query']
  t = load_file(os.path.join(d, 'model.safetensors'))
  assert t['model.layers.1.self_attn.plt_gate.weight'].shape == (4, 12)   # [n_heads, head_dim]
  assert t['model.layers.1.self_attn.plt_gate.bias'].shape == (4,)
  assert 'model.layers.1.self_attn.plt_gate.gate_norm.weight' not in t
  assert t['model.layers.0.self_attn.k_proj.weight'].shape == (12, 48)    # MQA, [out, in]
  assert t['lm_head.weight'].shape == (263, 48)
  _, d = exports['r1']
  assert not any('plt_gate' in k for k in load_file(os.path.join(d, 'model.safetensors')))


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize('name', ['r2_hidden', 'r3_query', 'vanilla_r2'])
def test_roundtrip_jax_hf_jax_exact(exports, name):
  model, d = exports[name]
  back, tok = hf_lib.load_hf_checkpoint(d)
  assert params_equal(model, back)
  want = {k: v for k, v in model.cfg.to_dict().items()}
  assert back.cfg.to_dict() == want
  assert tok is not None and tok.vocab_size == 259 and tok.eos_id == 2


def test_import_onto_mesh(exports):
  model, d = exports['r2_hidden']
  from plt_jax import sharding
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
  back, _ = hf_lib.load_hf_checkpoint(d, mesh=mesh)
  q = back.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert len(q.sharding.device_set) == 4
  assert params_equal(model, back)
  toks = random_tokens((2, SEQ))
  # sharded matmuls sum in another order: equal to float32 rounding only
  np.testing.assert_allclose(jax_logits(back, toks), jax_logits(model, toks), atol=TOL)


def test_bf16_export_rounds_once(tmp_path):
  model = make_model('r2_hidden')
  hf_lib.export_model(model, None, str(tmp_path), dtype='bf16')
  cfg = json.load(open(tmp_path / 'config.json'))
  assert cfg['torch_dtype'] == 'bfloat16'
  back, tok = hf_lib.load_hf_checkpoint(str(tmp_path), dtype='bf16')
  assert tok is None and back.cfg.dtype == 'bfloat16'
  import ml_dtypes
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(back, nnx.Param))):
    a = np.asarray(a.get_value())
    np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).astype(np.float32),
                                  np.asarray(b.get_value()), err_msg=str(p))


# ----------------------------------------------------------------------- PyTorch logits parity
@pytest.mark.parametrize('name', list(CONFIGS))
def test_pytorch_logits_match_jax(tc, exports, name):
  model, d = exports[name]
  tm = load_remote(tc, d)
  assert type(tm).__name__ == 'PLTForCausalLM'
  toks = random_tokens((2, SEQ), seed=len(name))
  want = jax_logits(model, toks)
  got = torch_logits(tc, tm, toks)
  assert np.abs(want).max() > 1.0  # not a trivially small output
  assert np.abs(got - want).max() < TOL


def test_r1_loads_as_plain_llama(tc, exports):
  torch, transformers = tc
  model, d = exports['r1']
  llama = transformers.LlamaForCausalLM.from_pretrained(d).eval()
  assert type(llama) is transformers.LlamaForCausalLM
  assert llama.config.rope_parameters['rope_theta'] == TINY['rope_theta']
  toks = random_tokens((2, SEQ), seed=7)
  assert np.abs(torch_logits(tc, llama, toks) - jax_logits(model, toks)).max() < TOL


def test_causality_of_exported_model(tc, exports):
  """Changing token t leaves logits before t unchanged (through CLP and G-SWA)."""
  _, d = exports['r3_hidden']
  tm = load_remote(tc, d)
  toks = random_tokens((1, SEQ), seed=3)
  toks2 = toks.copy()
  toks2[0, 8] = (toks2[0, 8] + 1) % TINY['vocab_size']
  a, b = torch_logits(tc, tm, toks), torch_logits(tc, tm, toks2)
  np.testing.assert_array_equal(a[0, :8], b[0, :8])
  assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-3


# -------------------------------------------------------------------------------- generation
@pytest.mark.parametrize('name', ['r1', 'r2_hidden', 'r3_query', 'r4_hidden', 'vanilla_r2'])
def test_generate_matches_jax_greedy(tc, exports, name):
  torch, _ = tc
  model, d = exports[name]
  tm = load_remote(tc, d)
  prompts = random_tokens((2, PROMPT), seed=11)
  want_tokens, want_logits = jax_greedy(model, prompts, NEW_TOKENS)
  no_eos = dict(eos_token_id=TINY['vocab_size'], pad_token_id=0)  # an id never generated
  for parallel in (True, False):  # one-pass R-row decode step, and loop-by-loop
    tm.model.parallel_decode = parallel
    with torch.no_grad():
      out = tm.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape),
                        max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, **no_eos)
    np.testing.assert_array_equal(out.sequences[:, PROMPT:].numpy(), want_tokens)
    step_logits = torch.stack(out.logits, 1).float().numpy()
    assert np.abs(step_logits - want_logits).max() < TOL


@pytest.mark.parametrize('name', ['r2_hidden', 'r3_hidden'])
def test_generate_from_prompt_shorter_than_window(tc, exports, name):
  """Decoding grows the local rings from 2 tokens through W - 1 and beyond: every ring length
  between empty and full (where an off-by-slice trims keys still inside the window) is visited."""
  torch, _ = tc
  model, d = exports[name]
  tm = load_remote(tc, d)
  prompts = random_tokens((2, 2), seed=12)
  want_tokens, want_logits = jax_greedy(model, prompts, 12)
  with torch.no_grad():
    out = tm.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape),
                      max_new_tokens=12, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, eos_token_id=TINY['vocab_size'],
                      pad_token_id=0)
  np.testing.assert_array_equal(out.sequences[:, 2:].numpy(), want_tokens)
  assert np.abs(torch.stack(out.logits, 1).float().numpy() - want_logits).max() < TOL


def test_generate_left_padded_batch(tc, exports):
  """A left-padded batch decodes each row as if it were alone (padding masked, CLP reset)."""
  torch, _ = tc
  model, d = exports['r2_hidden']
  tm = load_remote(tc, d)
  long, short = random_tokens((9,), seed=5), random_tokens((6,), seed=6)
  ids = np.zeros((2, 9), np.int64)
  ids[0], ids[1, 3:] = long, short
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  with torch.no_grad():
    out = tm.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      max_new_tokens=8, do_sample=False, eos_token_id=TINY['vocab_size'],
                      pad_token_id=0)
  np.testing.assert_array_equal(out[:, 9:].numpy(), jax_greedy(model, [long, short], 8)[0])


def _no_eos():
  return dict(eos_token_id=TINY['vocab_size'], pad_token_id=0)  # an id never generated


def _cache_of(output):
  """The cache an output carries, under transformers' name for it (renamed in 5.24)."""
  return output.get('cache', output.get('past_key_values'))


@pytest.mark.parametrize('name,prompt_len', [('r2_hidden', 4), ('r2_hidden', 3),
                                             ('r3_hidden', 5), ('r4_hidden', 3),
                                             ('r4_query', 1)])
def test_generate_prompt_at_window_edges(tc, exports, name, prompt_len):
  """Prompts of exactly W and W - 1 tokens (and a 1-token prompt at W = 1) decode as JAX does."""
  torch, _ = tc
  model, d = exports[name]
  tm = load_remote(tc, d)
  prompts = random_tokens((2, prompt_len), seed=13 + prompt_len)
  want_tokens, want_logits = jax_greedy(model, prompts, 10)
  with torch.no_grad():
    out = tm.generate(torch.as_tensor(prompts), max_new_tokens=10, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, **_no_eos())
  np.testing.assert_array_equal(out.sequences[:, prompt_len:].numpy(), want_tokens)
  assert np.abs(torch.stack(out.logits, 1).float().numpy() - want_logits).max() < TOL


def test_generate_threads_the_cache(tc, exports):
  """After the prefill, every forward call of generate() gets one new token and the cache of all
  tokens before it: this fails if transformers stops handing our cache back to us."""
  torch, _ = tc
  _, d = exports['r3_query']
  tm = load_remote(tc, d)
  calls = []

  def record(module, args, kwargs):
    cache = kwargs.get('cache', kwargs.get('past_key_values'))
    ids = kwargs.get('input_ids', args[0] if args else None)
    calls.append((ids.shape[1], None if cache is None else cache.get_seq_length()))

  hook = tm.register_forward_pre_hook(record, with_kwargs=True)
  try:
    with torch.no_grad():
      tm.generate(torch.as_tensor(random_tokens((2, 9), seed=21)), max_new_tokens=6,
                  do_sample=False, **_no_eos())
  finally:
    hook.remove()
  assert calls == [(9, None)] + [(1, 9 + i) for i in range(5)], calls


def test_generate_left_padded_rows_match_alone(tc, exports):
  """Three rows of different lengths, left-padded: each gets the tokens it gets alone, R = 3."""
  torch, _ = tc
  _, d = exports['r3_hidden']
  tm = load_remote(tc, d)
  rows = [random_tokens((n,), seed=30 + n) for n in (10, 4, 7)]
  ids = np.zeros((3, 10), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):
    ids[b, 10 - len(r):], mask[b, 10 - len(r):] = r, 1
  with torch.no_grad():
    batch = tm.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                        max_new_tokens=9, do_sample=False, **_no_eos())[:, 10:].numpy()
    for b, r in enumerate(rows):
      alone = tm.generate(torch.as_tensor(r[None]), max_new_tokens=9, do_sample=False,
                          **_no_eos())[0, len(r):].numpy()
      np.testing.assert_array_equal(batch[b], alone, err_msg=f'row {b}')


@pytest.mark.parametrize('name', ['r2_hidden', 'vanilla_r2'])
def test_generate_without_cache_matches_cached(tc, exports, name):
  torch, _ = tc
  _, d = exports[name]
  tm = load_remote(tc, d)
  prompts = torch.as_tensor(random_tokens((2, 6), seed=22))
  with torch.no_grad():
    cached = tm.generate(prompts, max_new_tokens=12, do_sample=False, **_no_eos())
    uncached = tm.generate(prompts, max_new_tokens=12, do_sample=False, use_cache=False,
                           **_no_eos())
  assert cached.shape == (2, 18)
  np.testing.assert_array_equal(cached.numpy(), uncached.numpy())


def _sequence_logprob(torch, tm, seq, prompt_len):
  with torch.no_grad():
    logp = torch.log_softmax(tm(seq[None], use_cache=False).logits[0].float(), -1)
  return float(sum(logp[i - 1, seq[i]] for i in range(prompt_len, len(seq))))


def test_beam_search_reorders_the_cache(tc, exports):
  """num_beams=3: the top beam's score is the full forward's log-probability of its tokens (a
  cache left in the wrong beam order scores other prefixes), and equals the uncached search."""
  torch, _ = tc
  _, d = exports['r2_query']
  tm = load_remote(tc, d)
  prompt = torch.as_tensor(random_tokens((1, 7), seed=23))
  kw = dict(num_beams=3, max_new_tokens=10, do_sample=False, length_penalty=0.0,
            output_scores=True, return_dict_in_generate=True, **_no_eos())
  with torch.no_grad():
    out = tm.generate(prompt, **kw)
    ref = tm.generate(prompt, use_cache=False, **kw)
  seq = out.sequences[0]
  assert len(seq) == 17
  np.testing.assert_array_equal(seq.numpy(), ref.sequences[0].numpy())
  want = _sequence_logprob(torch, tm, seq, 7)
  assert want < -1.0  # a real sum of log-probabilities, not ~0
  assert abs(float(out.sequences_scores[0]) - want) < 1e-3


def test_sampling_is_reproducible_and_matches_uncached(tc, exports):
  torch, _ = tc
  _, d = exports['r4_hidden']
  tm = load_remote(tc, d)
  prompt = torch.as_tensor(random_tokens((2, 5), seed=24))
  kw = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=16, **_no_eos())
  runs = []
  for seed, use_cache in ((7, True), (7, True), (7, False), (8, True)):
    torch.manual_seed(seed)
    with torch.no_grad():
      runs.append(tm.generate(prompt, use_cache=use_cache, **kw)[:, 5:].numpy())
  np.testing.assert_array_equal(runs[0], runs[1])
  np.testing.assert_array_equal(runs[0], runs[2])
  assert (runs[0] != runs[3]).any()


def test_one_token_without_cache_is_an_error(tc, exports):
  """The failure a cache-API change causes, a token decoded from nothing, raises instead."""
  torch, _ = tc
  _, d = exports['r2_hidden']
  tm = load_remote(tc, d)
  ids = torch.as_tensor(random_tokens((1, 6), seed=25))
  with torch.no_grad():
    with pytest.raises(ValueError, match='position 5 with no cache'):
      tm(ids[:, 5:], position_ids=torch.tensor([[5]]))
    with pytest.raises(ValueError, match='covers 6 tokens.*no cache'):
      tm(ids[:, 5:], attention_mask=torch.ones(1, 6))
    cache = _cache_of(tm(ids[:, :5], use_cache=True))
    assert cache.get_seq_length() == 5
    with pytest.raises(ValueError, match='covers 3 tokens.*cache holds 5.*whole sequence'):
      tm(ids[:, 5:], attention_mask=torch.ones(1, 3), past_key_values=cache)
    # the same call with the full mask continues the sequence as the uncached forward does
    step = tm(ids[:, 5:], attention_mask=torch.ones(1, 6), past_key_values=cache).logits
    full = tm(ids, use_cache=False).logits
  assert np.abs(step[0, -1].numpy() - full[0, -1].numpy()).max() < TOL


def test_pipeline_streamer_bf16_and_save_pretrained(tc, exports, tmp_path):
  torch, transformers = tc
  import threading
  _, d = exports['r2_hidden']
  tm = load_remote(tc, d)
  tok = transformers.AutoTokenizer.from_pretrained(d)
  text = 'def f(x):'
  ids = tok(text, return_tensors='pt')
  with torch.no_grad():
    greedy = tm.generate(**ids, max_new_tokens=12, do_sample=False, **_no_eos())
  want = tok.decode(greedy[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)
  assert greedy.shape[1] == ids['input_ids'].shape[1] + 12

  pipe = transformers.pipeline('text-generation', model=tm, tokenizer=tok)
  got = pipe(text, max_new_tokens=12, do_sample=False, return_full_text=False, **_no_eos())
  assert got[0]['generated_text'] == want

  streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
  worker = threading.Thread(target=tm.generate, kwargs=dict(
      **ids, max_new_tokens=12, do_sample=False, streamer=streamer, **_no_eos()))
  worker.start()
  streamed = ''.join(streamer)
  worker.join()
  assert streamed == want

  bf16 = transformers.AutoModelForCausalLM.from_pretrained(
      d, trust_remote_code=True, dtype=torch.bfloat16).eval()
  assert next(bf16.parameters()).dtype == torch.bfloat16
  toks = random_tokens((1, SEQ), seed=26)
  ref = torch_logits(tc, tm, toks)
  low = torch_logits(tc, bf16, toks)
  rel_rms = np.sqrt(np.mean((low - ref) ** 2) / np.mean(ref ** 2))
  assert rel_rms < 0.1, rel_rms  # bf16 weights and activations (measured 0.031), float32 softmax
  with torch.no_grad():
    out = bf16.generate(**ids, max_new_tokens=8, do_sample=False, **_no_eos())
  assert out.shape[1] == ids['input_ids'].shape[1] + 8

  saved = tmp_path / f'saved_{os.getpid()}'
  tm.save_pretrained(saved)
  tok.save_pretrained(saved)
  again = load_remote(tc, str(saved))
  np.testing.assert_array_equal(torch_logits(tc, again, toks), ref)


def test_safetensors_readable_like_the_other_files(exports):
  _, d = exports['r1']
  modes = {f: os.stat(os.path.join(d, f)).st_mode & 0o777 for f in os.listdir(d)}
  umask = os.umask(0)
  os.umask(umask)
  assert modes['model.safetensors'] == modes['config.json'] == 0o666 & ~umask, modes


def test_import_accepts_loop_gate_proj_spelling(exports, tmp_path):
  """The authors' inference code also names the gate `self_attn.loop_gate_proj`."""
  from safetensors.numpy import load_file, save_file
  model, src = exports['r3_hidden']
  d = tmp_path / 'alias'
  shutil.copytree(src, d)
  tensors = load_file(str(d / 'model.safetensors'))
  renamed = {k.replace('.self_attn.plt_gate.', '.self_attn.loop_gate_proj.'): v
             for k, v in tensors.items()}
  assert sum('loop_gate_proj' in k for k in renamed) == 3 * TINY['num_layers']
  save_file(renamed, str(d / 'model.safetensors'), metadata={'format': 'pt'})
  back, _ = hf_lib.load_hf_checkpoint(str(d))
  assert params_equal(model, back)


# --------------------------------------------------------------------- HF -> JAX -> HF (Levanter)
@pytest.mark.parametrize('num_loops,gate_hidden,kv_heads', [(2, True, 2), (3, False, 1),
                                                            (1, True, 4)])
def test_torch_random_model_roundtrip(tc, tmp_path, num_loops, gate_hidden, kv_heads):
  torch, transformers = tc
  from plt_jax.hf.torch_src.configuration_plt import PLTConfig
  from plt_jax.hf.torch_src.modeling_plt import PLTForCausalLM
  from safetensors.numpy import load_file
  config = PLTConfig(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, plt_num_loops=num_loops,
                     plt_window_size=[2, 0], plt_gate_use_hidden_states=gate_hidden,
                     plt_emb_scale=0.8, plt_hidden_scale=0.25, rope_theta=1000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=64)
  torch.manual_seed(num_loops)
  tm = PLTForCausalLM(config).eval()
  with torch.no_grad():  # matrices at 0.15 N, as random_hf_tensors: float32 agrees to 1e-4
    for p in tm.parameters():
      p.add_((0.15 if p.dim() > 1 else 0.3) * torch.randn_like(p))
  src, dst = tmp_path / 'torch', tmp_path / f'again_{os.getpid()}_{num_loops}'
  tm.save_pretrained(src)
  jm, _ = hf_lib.load_hf_checkpoint(str(src))
  assert jm.cfg.num_loops == num_loops and jm.cfg.window_size == 3
  assert jm.cfg.gate_mode == ('hidden' if gate_hidden else 'query')
  toks = random_tokens((2, SEQ), seed=2, vocab=101)
  want = torch_logits(tc, tm, toks)
  assert np.abs(jax_logits(jm, toks) - want).max() < TOL
  hf_lib.export_model(jm, None, str(dst))
  back = load_file(str(dst / 'model.safetensors'))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert np.abs(torch_logits(tc, load_remote(tc, str(dst)), toks) - want).max() < TOL


# -------------------------------------------------------------- the release's config.json
RELEASE_LIKE = release_config()


def _release_like_dir(path, seed=0):
  import ml_dtypes
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(RELEASE_LIKE, f)
  cfg = convert.model_config_from_hf(RELEASE_LIKE)
  rng = np.random.RandomState(seed)
  tensors = {}
  for name, shape in convert.expected_hf_shapes(cfg).items():
    base = 1.0 if name.endswith('norm.weight') else 0.0
    tensors[name] = (base + 0.2 * rng.randn(*shape)).astype(ml_dtypes.bfloat16)
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  return tensors


def test_import_release_format(tmp_path):
  d = str(tmp_path / 'release')
  tensors = _release_like_dir(d)
  jm, tok = hf_lib.load_hf_checkpoint(d)
  c = jm.cfg
  assert tok is None
  assert (c.num_loops, c.window_size, c.gate_mode, c.loop_mode) == (2, 65, 'hidden', 'plt')
  assert (c.emb_scale, c.hidden_scale, c.normalize_per_loop) == (0.707, 0.053, True)
  assert (c.rope_theta, c.norm_eps, c.head_dim, c.num_kv_heads) == (5e5, 1e-5, 16, 2)
  np.testing.assert_array_equal(
      np.asarray(jm.layers[1].self_attn.plt_gate.weight.get_value()),
      tensors['model.layers.1.self_attn.plt_gate.weight'].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(jm.lm_head.kernel.get_value()),
                                tensors['lm_head.weight'].astype(np.float32).T)


def test_modeling_file_loads_release_format(tc, tmp_path):
  """Our modeling file, dropped next to the release's weights, reproduces JAX (W = 65 < seq)."""
  torch, _ = tc
  from plt_jax.hf.torch_src.configuration_plt import PLTConfig
  from plt_jax.hf.torch_src.modeling_plt import PLTForCausalLM
  d = str(tmp_path / 'release')
  _release_like_dir(d, seed=1)
  jm, _ = hf_lib.load_hf_checkpoint(d)
  config = PLTConfig.from_pretrained(d)
  assert config.plt_window == 65
  tm = PLTForCausalLM.from_pretrained(d, config=config, dtype=torch.float32).eval()
  toks = random_tokens((1, 70), seed=4, vocab=97)
  assert np.abs(torch_logits(tc, tm, toks) - jax_logits(jm, toks)).max() < TOL


def test_import_plain_llama(tc, tmp_path):
  """A transformers LlamaForCausalLM directory imports as R = 1 and matches."""
  torch, transformers = tc
  config = transformers.LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=56,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, rope_theta=20000.0)
  torch.manual_seed(5)
  llama = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in llama.parameters():
      p.add_(0.3 * torch.randn_like(p))
  llama.save_pretrained(tmp_path)
  jm, _ = hf_lib.load_hf_checkpoint(str(tmp_path))
  assert jm.cfg.num_loops == 1 and jm.cfg.rope_theta == 20000.0 and jm.cfg.norm_eps == 1e-6
  toks = random_tokens((2, SEQ), seed=8, vocab=89)
  assert np.abs(jax_logits(jm, toks) - torch_logits(tc, llama, toks)).max() < TOL


# ------------------------------------------------------------------------------------ refusals
def test_refuses_non_empty_output_and_overwrite_cleans_shards(tmp_path):
  model = make_model('r2_hidden')
  d = tmp_path / 'out'
  d.mkdir()
  (d / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='not empty.*--overwrite'):
    hf_lib.export_model(model, None, str(d))
  hf_lib.export_model(model, None, str(d), overwrite=True, max_shard_size=30_000)
  assert len([f for f in os.listdir(d) if f.startswith('model-')]) >= 3
  hf_lib.export_model(model, None, str(d), overwrite=True)
  files = os.listdir(d)
  assert 'model.safetensors' in files and 'notes.txt' in files
  assert not [f for f in files if f.startswith('model-') or f.endswith('index.json')]
  back, _ = hf_lib.load_hf_checkpoint(str(d))
  assert params_equal(model, back)


def test_refuses_missing_workdir_and_bad_dtype(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf_lib.export_workdir(str(tmp_path / 'nope'), str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='dtype'):
    hf_lib.export_workdir(str(tmp_path), str(tmp_path / 'out'), dtype='fp8')
  (tmp_path / 'run').mkdir()
  with pytest.raises(FileNotFoundError):  # no config.json / checkpoints: not a training run
    hf_lib.export_workdir(str(tmp_path / 'run'), str(tmp_path / 'out'))


def test_refuses_non_finite_parameters(tmp_path):
  model = make_model('r1')
  k = model.layers[1].mlp.up_proj.kernel
  k.set_value(k.get_value().at[3, 4].set(jnp.nan))
  with pytest.raises(ValueError, match='non-finite.*model.layers.1.mlp.up_proj.weight'):
    hf_lib.export_model(model, None, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_import_refuses_inconsistent_directories(exports, tmp_path):
  _, src = exports['r2_hidden']
  d = tmp_path / 'broken'
  shutil.copytree(src, d)
  cfg = json.load(open(d / 'config.json'))
  json.dump({**cfg, 'plt_num_loops': 1}, open(d / 'config.json', 'w'))
  with pytest.raises(ValueError, match='no place for.*plt_gate'):
    hf_lib.load_hf_checkpoint(str(d))
  json.dump({**cfg, 'plt_gate_use_hidden_states': False}, open(d / 'config.json', 'w'))
  with pytest.raises(ValueError, match='plt_gate.weight: shape'):
    hf_lib.load_hf_checkpoint(str(d))
  json.dump({**cfg, 'plt_window_size': [3, 2]}, open(d / 'config.json', 'w'))
  with pytest.raises(ValueError, match='plt_window_size'):
    hf_lib.load_hf_checkpoint(str(d))
  json.dump(cfg, open(d / 'config.json', 'w'))
  os.remove(d / 'model-00002-of-{:05d}.safetensors'.format(
      len([f for f in os.listdir(src) if f.startswith('model-')])))
  with pytest.raises(FileNotFoundError, match='missing'):
    hf_lib.load_hf_checkpoint(str(d))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    hf_lib.load_hf_checkpoint(str(tmp_path))


# --------------------------------------------------------------- work dirs and the CLI path
def _reader_tensors(directory):
  from plt_jax.hf.importer import SafetensorsReader
  r = SafetensorsReader(directory)
  return {k: np.asarray(r.get(k)) for k in r.keys()}


def test_import_to_workdir_then_export_workdir(exports, tmp_path):
  """HF -> trainer work dir (Orbax) -> load_for_inference -> HF again: bit-exact."""
  from plt_jax.hf.importer import import_as_workdir as import_hf
  from plt_jax.train import checkpoint
  model, src = exports['r2_hidden']
  run = import_hf(src, str(tmp_path / 'run'))
  loaded, config, tok = checkpoint.load_for_inference(run)
  assert params_equal(model, loaded)
  assert config.model.num_loops == 2 and config.data.tokenizer == 'hf'
  assert tok.sha256 == hf_lib.load_hf_checkpoint(src)[1].sha256
  out = hf_lib.export_workdir(run, str(tmp_path / 'out'), dtype='f32')
  a, b = _reader_tensors(src), _reader_tensors(out)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert json.load(open(os.path.join(src, 'config.json'))) == json.load(
      open(os.path.join(out, 'config.json')))
  with pytest.raises(FileExistsError, match='already holds a run'):
    import_hf(src, run)
  with pytest.raises(FileExistsError, match='not empty'):
    hf_lib.export_workdir(run, out)
  with pytest.raises(ValueError, match='step 7 not found'):
    hf_lib.export_workdir(run, str(tmp_path / 'out2'), step=7)


# ------------------------------------------------------------------ the seed's quick-start
SEED_PROMPT = 'Write a Python function that returns the n-th Fibonacci number.'


def run_seed_snippet(model_id):
  """The seed's quick-start, verbatim except for model_id."""
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
  model = AutoModelForCausalLM.from_pretrained(
      model_id, trust_remote_code=True, device_map="auto"
  )
  prompt = "Write a Python function that returns the n-th Fibonacci number."
  inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
  outputs = model.generate(**inputs, max_new_tokens=256)
  print(tokenizer.decode(outputs[0], skip_special_tokens=True))
  return tokenizer, inputs, outputs


def check_seed_snippet(model_id, jax_tokenizer, jax_model=None):
  """Runs the snippet; its greedy tokens must be the argmax of an uncached forward over its own
  output (the cache path agrees with the full forward, which matches JAX), and, with
  `jax_model`, equal plt_jax's own generation."""
  import torch
  tokenizer, inputs, outputs = run_seed_snippet(model_id)
  prompt_ids = [jax_tokenizer.bos_id] + jax_tokenizer.encode(SEED_PROMPT)
  assert inputs['input_ids'][0].tolist() == prompt_ids  # <s> + the text, as in training
  new = outputs[0, len(prompt_ids):].tolist()
  assert 1 <= len(new) <= 256
  assert tokenizer.decode(outputs[0], skip_special_tokens=True).startswith(SEED_PROMPT)
  if len(new) < 256:
    assert new[-1] == jax_tokenizer.eos_id
  model = load_remote((torch, None), model_id)
  with torch.no_grad():
    logits = model(outputs).logits[0, len(prompt_ids) - 1:-1]
  assert logits.argmax(-1).tolist() == new
  if jax_model is not None:
    from plt_jax.infer.generate import generate
    want = generate(jax_model, [prompt_ids], max_new_tokens=256,
                    stop_tokens=[jax_tokenizer.eos_id]).tokens[0]
    assert (new[:-1] if new[-1] == jax_tokenizer.eos_id else new) == want


def test_seed_snippet_on_exported_model(tc, exports, tokenizer):
  _, d = exports['r2_hidden']
  check_seed_snippet(d, tokenizer)


def test_torch_generate_timing(tc, exports):
  _, d = exports['r3_query']
  r = torch_timing.torch_generate_timing(d, random_tokens((2, 9), seed=3).tolist(), 5, repeats=1,
                                   threads=1)
  assert r['batch'] == 2 and r['prompt_len'] == 9 and r['new_tokens'] == 5
  assert 0 < r['prefill_s'] < r['total_s'] and r['tokens_per_s'] > 0


@pytest.mark.slow
def test_seed_snippet_on_trained_and_cli_exported_model(tc, tmp_path):
  """A real (tiny) training run, exported by the CLI, runs the seed's snippet unchanged."""
  import subprocess
  import sys
  from configs import r2
  from plt_jax.train import checkpoint
  from plt_jax import train
  config = r2.get_config('default')
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                      window_size=5, max_seq_len=512)
  config.train.update(steps=2, batch_size=4, seq_len=32, vocab_multiple=8, progress=False)
  config.data.update(tokenizer='byte', max_chars=200_000, val_batches=1)
  config.checkpoint.update(every=2, async_save=False)
  config.eval.update(every=2, at_start=False)
  config.mesh.update(num_devices=1, data=1)
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  out = str(tmp_path / 'hf')
  root = REPO
  proc = subprocess.run([sys.executable, '-m', 'experiments.export', f'--workdir={run}',
                         f'--out={out}', '--dtype=f32'], cwd=root, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  model, _, tok = checkpoint.load_for_inference(run)
  check_seed_snippet(out, tok, model)
  proc = subprocess.run([sys.executable, '-m', 'experiments.export', f'--workdir={run}',
                         f'--out={out}'], cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and 'not empty' in proc.stderr


def test_bench_decode_torch_baseline_small(tc, tmp_path):
  """bench_decode --torch_baseline: HF Llama R=1 and the exported PLT R=2 on the same weights and
  threads, beside plt_jax's R=1 and R=2."""
  from experiments import bench_decode  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'bench.json'
  assert bench_decode.main(['--small', '--loops', '1,2', '--modes', 'plt', '--torch_baseline',
                            '--torch_repeats', '1', '--torch_threads', '1', '--out',
                            str(out)]) == 0
  tb = json.load(open(out))['torch_baseline'][0]
  for key in ('torch_llama_R1_step_ms', 'torch_plt_R2_step_ms', 'jax_plt_R1_step_ms',
              'jax_plt_R2_step_ms'):
    assert tb[key] > 0, key
  assert tb['torch_threads'] == 1 and tb['batch'] == 1
  assert tb['torch_plt_R2/torch_llama_R1'] == pytest.approx(
      tb['torch_plt_R2_step_ms'] / tb['torch_llama_R1_step_ms'])
  # op counts from the torch profiler: the PLT step batches its R loops through each layer
  assert tb['torch_llama_R1_step_ops'] > 50
  assert tb['torch_llama_R1_step_ops_total'] >= tb['torch_llama_R1_step_ops']
  assert tb['torch_plt_R2/torch_llama_R1_ops'] <= 1.5
  targets = json.load(open(out))['targets']
  assert targets['torch_plt_R2/torch_llama_R1_ops']['met']
