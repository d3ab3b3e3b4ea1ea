"""Decoding tests: KV-cache decoding reproduces the full forward; generation; cache bytes; errors.

Tiny models with odd shapes (vocab 97, 6 query heads over 2 kv heads of width 8) and a window of
W = 3, so prompts below, at and far beyond W are cheap. Every parameter (gates included) is
randomised, so a gating or shift bug cannot hide behind zero-initialised weights.
"""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import DECODE_COMPILER_OPTIONS, DECODE_MAX_LEN, DECODE_MODEL, cached_decoder
from helpers import decode_model, decode_sequences, tiny_model_config
from plt_jax import attention as attn
from plt_jax.infer import decode
from plt_jax.infer.decode import Decoder, cache_nbytes, init_cache, kv_cache_bytes
from plt_jax.infer.generate import Generator, SamplingParams, sample_logits
from plt_jax.model import with_num_loops
from plt_jax.runtime import Runtime

TINY = DECODE_MODEL
W = TINY['window_size']
needs_cpu_kernel = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not (shutil.which('g++') or shutil.which('c++')),
    reason='kernels/cpu_rows.py builds with a C++ compiler, for the CPU backend')
MAX_LEN = DECODE_MAX_LEN          # cache slots; also the reference sequence length
LENGTHS = (1, 3, 4, 11)           # prompts below, at, just past and far beyond W = 3
FAST = DECODE_COMPILER_OPTIONS
TOL = 1e-4
make, decoder = decode_model, cached_decoder


def sequences(batch=len(LENGTHS), seed=1):
  return decode_sequences(batch, seed)


def reference_logits(dec, rows):
  """The model's full forward over right-padded rows of width MAX_LEN (float32 [B, S, V]).

  It is `model(tokens, return_loops=True)` inside the prefill executable, which saves a compile;
  `test_prefill_reference_is_the_forward` pins it to a plain `model(tokens)` call.
  """
  return np.asarray(dec.prefill(rows, width=MAX_LEN, return_all_logits=True)[2])


@functools.lru_cache(maxsize=None)
def parity_run(*key):
  """Prefill mixed-length prompts, then feed each sequence's true next tokens one at a time."""
  dec = decoder(*key)
  toks = sequences()
  ref = reference_logits(dec, list(toks))
  last, cache, pre = dec.prefill([toks[i, :n] for i, n in enumerate(LENGTHS)], width=MAX_LEN,
                                 return_all_logits=True)
  got = [np.asarray(last)]
  pos = np.array(LENGTHS)
  b = np.arange(len(LENGTHS))
  for _ in range(MAX_LEN - min(LENGTHS)):
    logits, cache = dec.step(cache, toks[b, np.minimum(pos, MAX_LEN - 1)])
    got.append(np.asarray(logits))
    pos += 1
  return ref, np.asarray(pre), np.stack(got, 1), cache


CONFIGS = [
    (1, 'plt', 'hidden', True),
    (2, 'plt', 'hidden', True),
    (2, 'plt', 'query', True),
    (3, 'plt', 'hidden', False),
    (3, 'plt', 'query', True),
    (4, 'plt', 'hidden', True),
    (4, 'plt', 'query', False),
    # On CPU 'auto' runs these batches' few-row products (B*R <= 8) through kernels/cpu_rows.py
    # and each layer's cached attention through kernels/cpu_decode.py; the accelerator paths
    # ('stacked' rows, 'xla' attention), 'per_row' and 'kernel' beyond 8 rows are checked too.
    # (Attention 'cpu' is the kernel, strictly.)
    (3, 'plt', 'hidden', True, 'per_row'),
    (3, 'plt', 'hidden', True, 'stacked'),
    (4, 'plt', 'query', True, 'stacked'),
    (4, 'plt', 'hidden', False, 'kernel'),   # 16 rows: two kernel calls of 8 per projection
    (1, 'plt', 'hidden', True, 'auto', 'xla'),
    (2, 'plt', 'query', True, 'auto', 'xla'),
    (4, 'plt', 'hidden', False, 'stacked', 'xla'),
    (2, 'plt', 'hidden', True, 'stacked', 'cpu'),
    (1, 'vanilla', 'hidden', True),
    (2, 'vanilla', 'hidden', True),
    (3, 'vanilla', 'hidden', True),
    (4, 'vanilla', 'hidden', True),
    (2, 'vanilla', 'hidden', True, 'stacked'),
    (3, 'vanilla', 'hidden', True, 'stacked', 'xla'),
]


@pytest.mark.parametrize('key', CONFIGS, ids=lambda k: '-'.join(
    [f'R{k[0]}', k[1], k[2], f'norm{int(k[3])}', *k[4:]]))
def test_decoding_matches_full_forward(key):
  ref, pre, got, cache = parity_run(*key)
  assert np.abs(ref).max() > 1.0  # the logits are not trivially small
  worst = 0.0
  for i, n in enumerate(LENGTHS):
    # Prefill: every prompt position, although the row was padded after n tokens.
    worst = max(worst, np.abs(pre[i, :n] - ref[i, :n]).max())
    # Then position n-1 (from prefill) and n, n+1, ... (one decode step each).
    steps = MAX_LEN - n
    worst = max(worst, np.abs(got[i, :steps] - ref[i, n - 1:MAX_LEN - 1]).max())
  assert worst <= TOL, f'max |decode - forward| = {worst:.2e}'
  assert list(np.asarray(cache.lengths)) == [MAX_LEN + n - min(LENGTHS) for n in LENGTHS]


@pytest.mark.parametrize('trained,run,mode', [(2, 1, 'plt'), (2, 3, 'plt'), (3, 4, 'plt'),
                                               (4, 2, 'plt'), (2, 4, 'vanilla')])
def test_test_time_loop_count_prefill_and_decoding(trained, run, mode):
  """A model trained at R run at R' (shared weights): its forward is the R'-loop model's, and
  prefill + cached steps at R' reproduce that forward."""
  model = with_num_loops(make(trained, mode), run)
  assert model.cfg.num_loops == run and make(trained, mode).cfg.num_loops == trained
  toks = sequences()
  # make() draws each weight from its name, so make(run) holds exactly the same parameters.
  want = np.asarray(make(run, mode)(jnp.asarray(toks)))
  got_fwd = np.asarray(model(jnp.asarray(toks)))
  np.testing.assert_allclose(got_fwd, want, rtol=0, atol=1e-5)
  if run != trained:
    assert np.abs(got_fwd - np.asarray(make(trained, mode)(jnp.asarray(toks)))).max() > 1e-2
  dec = Decoder(model, MAX_LEN, compiler_options=FAST)
  last, cache, pre = dec.prefill([toks[i, :n] for i, n in enumerate(LENGTHS)], width=MAX_LEN,
                                 return_all_logits=True)
  worst = max(np.abs(np.asarray(pre)[i, :n] - want[i, :n]).max() for i, n in enumerate(LENGTHS))
  pos = np.array(LENGTHS)
  b = np.arange(len(LENGTHS))
  got = [np.asarray(last)]
  for _ in range(MAX_LEN - min(LENGTHS)):
    logits, cache = dec.step(cache, toks[b, np.minimum(pos, MAX_LEN - 1)])
    got.append(np.asarray(logits))
    pos += 1
  got = np.stack(got, 1)
  for i, n in enumerate(LENGTHS):
    worst = max(worst, np.abs(got[i, :MAX_LEN - n] - want[i, n - 1:MAX_LEN - 1]).max())
  assert worst <= TOL, f'max |decode at R={run} - forward at R={run}| = {worst:.2e}'


def test_test_time_loop_count_shares_weights_and_refuses_missing_gates():
  model = make(2)
  other = with_num_loops(model, 3)
  assert other.lm_head.kernel[...] is model.lm_head.kernel[...]
  assert with_num_loops(model, 2) is model
  with pytest.raises(ValueError, match='num_loops=1 has no G-SWA gates'):
    with_num_loops(make(1), 2)
  with pytest.raises(ValueError, match='integer >= 1'):
    with_num_loops(model, 0)


def test_prefill_reference_is_the_forward():
  model = make(2)
  toks = sequences()
  plain = jax.jit(lambda s, t: nnx.merge(*s)(t), compiler_options=FAST)(
      nnx.split(model), jnp.asarray(toks))
  # Same math; only XLA's fusion of the two executables differs.
  np.testing.assert_allclose(reference_logits(decoder(2, 'plt', 'hidden', True), list(toks)),
                             np.asarray(plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize('attention', ['auto', 'xla'])  # on CPU 'auto' is kernels/cpu_decode.py
def test_each_row_reads_exactly_its_state(attention):
  """Edit one piece of the decode state and watch the next two steps' logits (R = 3).

  The logits come from row 3 (loop 3), which reads loop 1's cache, loop 3's ring and the saved
  loop-2 output hn_2[t-1]. Loop 2's ring and the saved hn_1[t-1] feed only row 2, so they may
  change the logits one step later, never now: the rows of one step are independent. Slots that
  causality or the window hide must never matter.
  """
  dec = decoder(3, 'plt', 'query', True, 'auto', attention)
  toks = sequences()
  prompts = [toks[i, :n] for i, n in enumerate(LENGTHS)]
  pos = np.array(LENGTHS)
  feed = [toks[np.arange(4), pos], toks[np.arange(4), pos + 1]]

  def run(edit=None):
    cache = dec.prefill(prompts, width=MAX_LEN)[1]
    if edit is not None:
      field, layer, fn = edit
      if field == 'hidden':
        cache.hidden = fn(cache.hidden)
      else:
        arrays = list(getattr(cache, field))
        arrays[layer] = fn(arrays[layer])
        setattr(cache, field, tuple(arrays))
    out = []
    for tok in feed:
      logits, cache = dec.step(cache, tok)
      out.append(np.asarray(logits))
    return out

  base = run()
  cases = {  # name: (edit, changes step 1, changes step 2)
      'loop-1 K, position 0': (('k1', 0, lambda a: a.at[:, 0].add(1.0)), True, True),
      'loop-1 V, a future slot': (('v1', 1, lambda a: a.at[:, MAX_LEN - 1].add(1.0)), False, False),
      'loop-3 ring K': (('k_loc', 1, lambda a: a.at[:, 1].add(1.0)), True, True),
      'loop-2 ring V': (('v_loc', 1, lambda a: a.at[:, 0].add(1.0)), False, True),
      'saved hn_1': (('hidden', None, lambda a: a.at[0].add(1.0)), False, True),
      'saved hn_2': (('hidden', None, lambda a: a.at[1].add(1.0)), True, True),
      # Sequence 0 has one token, so after writing position 1 its ring slot 2 is still empty.
      'empty ring slot': (('k_loc', 0, lambda a: a.at[0, :, 2].add(1.0)), False, False),
  }
  for name, (edit, now, later) in cases.items():
    out = run(edit)
    for step, (changes, got, want) in enumerate(zip((now, later), out, base)):
      diff = np.abs(got - want).max()
      assert (diff > 1e-3) if changes else (diff == 0.0), f'{name}, step {step + 1}: {diff}'


def _count_dots(jaxpr, primitive: str = 'dot_general', target: str = '') -> int:
  """`primitive` equations (matmuls by default), nested jaxprs (jit-wrapped helpers) included.
  target: for ffi_call, count only custom calls whose target name starts with it."""
  n = 0
  for eqn in jaxpr.eqns:
    n += (eqn.primitive.name == primitive
          and str(eqn.params.get('target_name', '')).startswith(target))
    for p in eqn.params.values():
      if hasattr(p, 'eqns'):
        n += _count_dots(p, primitive, target)
      elif hasattr(p, 'jaxpr') and hasattr(p.jaxpr, 'eqns'):
        n += _count_dots(p.jaxpr, primitive, target)
  return n


@pytest.mark.parametrize('loop_mode', ['plt', 'vanilla'])
def test_plt_step_is_one_pass_of_r_rows(loop_mode):
  """PLT's step has as many matmuls at R=4 as at R=2 (rows are batched); vanilla's doubles."""
  counts = {}
  for r in (2, 4):
    model = make(r, loop_mode)
    cache = init_cache(model.cfg, 2, 8)
    counts[r] = _count_dots(jax.make_jaxpr(
        lambda c, t, m=model: decode.decode_step(m, c, t, Runtime(attn.XLA(), 'stacked')))(
            cache, jnp.zeros(2, jnp.int32)).jaxpr)
  if loop_mode == 'plt':
    assert counts[4] == counts[2]
  else:
    assert counts[4] - 1 == 2 * (counts[2] - 1)  # R x (layers' matmuls) + one LM head


@needs_cpu_kernel
def test_cpu_kernel_step_is_one_pass_of_r_rows():
  """With the CPU rows kernel every projection is one kernel call (<= 8 rows) whatever R is."""
  calls = {}
  for r in (2, 4):
    model = make(r)
    cache = init_cache(model.cfg, 2, 8)
    jaxpr = jax.make_jaxpr(lambda c, t, m=model: decode.decode_step(
        m, c, t, Runtime(attn.CPU(), 'kernel')))(cache, jnp.zeros(2, jnp.int32)).jaxpr
    calls[r] = (_count_dots(jaxpr, 'ffi_call', 'plt_rows_matmul'),
                _count_dots(jaxpr, 'ffi_call', 'plt_decode_attention'))
  layers = make(2).cfg.num_layers
  # 7 projections per layer; the LM head reads 1 row per sequence (2 rows: the kernel too).
  # And one attention call per layer for all R rows (cache writes included).
  assert calls[2] == calls[4] == (7 * layers + 1, layers)


# ------------------------------------------------------------------------------------------------
# KV bytes
def test_cache_bytes_match_plt_md_formula():
  measured = {}
  for key in (k for k in CONFIGS if len(k) == 4):  # the default paths: every R in both modes
    r, mode = key[0], key[1]
    cache = parity_run(*key)[3]               # the cache the decode steps actually produced
    got = cache_nbytes(cache)
    want = kv_cache_bytes(make(*key[:4]).cfg, len(LENGTHS), MAX_LEN)
    assert got == want, key
    measured[(r, mode)] = got['kv_total']
  b, cfg = len(LENGTHS), make(1).cfg
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
  assert measured[(1, 'plt')] == b * MAX_LEN * per_token
  # PLT at R=4 costs exactly 3 windows of W tokens plus 3 saved hidden vectors more than R=1 ...
  extra = measured[(4, 'plt')] - measured[(1, 'plt')]
  assert extra == b * (3 * W * per_token + 3 * cfg.d_model * 4)
  # ... while the vanilla looped model keeps R full caches.
  for r in (2, 3, 4):
    assert measured[(r, 'vanilla')] == r * measured[(1, 'vanilla')]
  # bfloat16 halves everything.
  bf = tiny_model_config(**TINY, num_loops=4, dtype='bfloat16')
  assert cache_nbytes(init_cache(bf, 3, 7)) == kv_cache_bytes(bf, 3, 7)
  f32 = bf.replace(dtype='float32')
  assert kv_cache_bytes(bf, 3, 7)['kv_total'] * 2 == kv_cache_bytes(f32, 3, 7)['kv_total']


def test_step_donates_and_updates_the_cache_in_place():
  dec = decoder(2, 'plt', 'hidden', True)
  _, cache = dec.prefill([[5, 6, 7], [8]], width=MAX_LEN)
  tok = jnp.array([1, 2], jnp.int32)
  compiled = dec.compile_step(cache, tok)
  stats = compiled.memory_analysis()
  if stats is not None:  # every cache output aliases its (donated) input buffer
    assert stats.alias_size_in_bytes == sum(cache_nbytes(cache)[k] for k in ('kv_total', 'index'))
  old = cache
  _, cache = dec.step(cache, tok)
  assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert list(np.asarray(cache.lengths)) == [4, 2]


# ------------------------------------------------------------------------------------------------
# Generation
@functools.lru_cache(maxsize=None)
def generator():
  return Generator(make(2, 'plt', 'hidden', True), max_len=MAX_LEN, compiler_options=FAST)


PROMPTS = [list(sequences(seed=7)[i, :n]) for i, n in enumerate(LENGTHS)]
NEW = MAX_LEN - max(LENGTHS) + 1   # fills the cache exactly


@functools.lru_cache(maxsize=None)
def greedy_run():
  return generator().generate(PROMPTS, max_new_tokens=NEW)


def _teacher_forced(prompts, outs):
  """Full-forward logits over prompt + output (its last token is never fed back)."""
  rows = [list(p) + list(o[:-1]) for p, o in zip(prompts, outs)]
  return reference_logits(decoder(2, 'plt', 'hidden', True), rows)


def test_greedy_generation_is_repeated_argmax_of_full_forward():
  res = greedy_run()
  assert [len(t) for t in res.tokens] == [NEW] * len(PROMPTS)
  assert res.finish_reasons == ['length'] * len(PROMPTS)
  ref = _teacher_forced(PROMPTS, res.tokens)
  for i, (p, out) in enumerate(zip(PROMPTS, res.tokens)):
    n = len(p)
    np.testing.assert_array_equal(out, ref[i, n - 1:n - 1 + NEW].argmax(-1))
  assert len({tuple(t) for t in res.tokens}) > 1  # the rows really are different


def _compiled_sizes(gen):
  """How many executables the prefill and the step of `gen`'s decoder hold."""
  dec = gen.decoder(MAX_LEN)
  return dec._prefill._cache_size(), dec._step_fn(len(PROMPTS))._cache_size()


def test_no_retrace_per_token_and_batch_composition_does_not_matter():
  greedy_run()
  gen = generator()
  before = _compiled_sizes(gen)
  assert before[0] >= 1 and before[1] >= 1
  # Different prompts of the same bucket: nothing is compiled again.
  other = [list(sequences(seed=9)[i, :n]) for i, n in enumerate((2, 5, 9, 3))]
  res = gen.generate(other, max_new_tokens=NEW)
  assert _compiled_sizes(gen) == before
  assert res.num_steps == NEW - 1
  # Each row's greedy output does not depend on its neighbours (per-sequence positions).
  alone = generator().generate([PROMPTS[3]] * 4, max_new_tokens=NEW)
  assert alone.tokens[0] == greedy_run().tokens[3]


def test_stop_tokens_and_streaming():
  full = greedy_run().tokens
  stop = full[0][2]
  assert stop not in full[0][:2]
  streamed = [[] for _ in PROMPTS]
  calls = []

  def callback(step, toks, emitted):
    calls.append(step)
    for i in np.flatnonzero(emitted):
      streamed[i].append(int(toks[i]))

  res = generator().generate(PROMPTS, max_new_tokens=NEW, stop_tokens=[stop], callback=callback)
  for i, out in enumerate(full):
    want = out[:out.index(stop)] if stop in out else out
    assert res.tokens[i] == want
    assert res.finish_reasons[i] == ('stop' if stop in out else 'length')
  assert streamed == res.tokens
  assert calls == list(range(len(calls)))
  # Once every sequence has stopped, generation ends early.
  first = [o[0] for o in full]
  res = generator().generate(PROMPTS, max_new_tokens=NEW, stop_tokens=first)
  assert res.tokens == [[]] * len(PROMPTS) and res.finish_reasons == ['stop'] * len(PROMPTS)
  assert res.num_steps <= 1


def test_sampling_is_seeded_and_respects_top_k():
  params = SamplingParams(temperature=1.5, top_k=3)
  a = generator().generate(PROMPTS, max_new_tokens=NEW, sampling=params, seed=3)
  b = generator().generate(PROMPTS, max_new_tokens=NEW, sampling=params, seed=3)
  c = generator().generate(PROMPTS, max_new_tokens=NEW, sampling=params, seed=4)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  assert a.tokens != greedy_run().tokens
  ref = _teacher_forced(PROMPTS, a.tokens)
  for i, (p, out) in enumerate(zip(PROMPTS, a.tokens)):
    top3 = np.argsort(-ref[i, len(p) - 1:len(p) - 1 + NEW], axis=-1)[:, :3]
    assert all(t in row for t, row in zip(out, top3))


_sample_fast = jax.jit(sample_logits, static_argnums=2, compiler_options=FAST)


def _draws(logits, params, n=20000, seed=0):
  x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  out = _sample_fast(x, jax.random.key(seed), params)
  return np.bincount(np.asarray(out), minlength=len(logits)) / n


def test_sample_logits_distributions():
  logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
  x = jnp.asarray(np.stack([logits, logits[::-1]]), jnp.float32)
  np.testing.assert_array_equal(sample_logits(x, jax.random.key(0), SamplingParams()), [1, 3])
  # Temperature 1: the softmax itself; temperature 2: softmax(logits / 2).
  np.testing.assert_allclose(_draws(logits, SamplingParams(1.0)), np.exp(logits), atol=0.015)
  p2 = np.exp(logits / 2) / np.exp(logits / 2).sum()
  np.testing.assert_allclose(_draws(logits, SamplingParams(2.0)), p2, atol=0.015)
  # top_k = 2: only the two largest, renormalised.
  np.testing.assert_allclose(_draws(logits, SamplingParams(1.0, top_k=2)),
                             [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.015)
  # top_p: the smallest set with mass >= p (0.4 + 0.3 >= 0.65; 0.4 + 0.3 + 0.15 >= 0.75).
  np.testing.assert_allclose(_draws(logits, SamplingParams(1.0, top_p=0.65)),
                             [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.015)
  np.testing.assert_allclose(_draws(logits, SamplingParams(1.0, top_p=0.75)),
                             [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.015)
  # A tiny top_p is greedy; top_k and top_p combine (top_k first).
  assert _draws(logits, SamplingParams(1.0, top_p=1e-6))[1] == 1.0
  assert _draws(logits, SamplingParams(3.0, top_k=3, top_p=0.5))[[0, 2]].sum() == 0


# ------------------------------------------------------------------------------------------------
# Errors
def test_bad_requests_raise_clear_errors():
  gen, dec = generator(), decoder(2, 'plt', 'hidden', True)
  ok = [[1, 2, 3]]
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    gen.generate([[4, 5], []], max_new_tokens=2)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    dec.prefill([[4, 5], []])
  with pytest.raises(ValueError, match='batch is empty'):
    gen.generate([], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'needs 21 cache slots, more than max_len=19'):
    gen.generate([list(range(20))], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'more than the cache holds \(max_len=19\)'):
    dec.prefill([list(range(20))])
  with pytest.raises(ValueError, match="max_seq_len=64"):
    Generator(make(2)).generate([[1] * 60], max_new_tokens=10)
  with pytest.raises(ValueError, match=r'token ids must lie in \[0, 97\)'):
    gen.generate([[1, 97]], max_new_tokens=2)
  with pytest.raises(ValueError, match='max_new_tokens'):
    gen.generate(ok, max_new_tokens=0)
  with pytest.raises(ValueError, match='stop tokens'):
    gen.generate(ok, max_new_tokens=2, stop_tokens=[-1])
  bad = [(dict(temperature=-0.5), 'temperature'), (dict(temperature=float('nan')), 'temperature'),
         (dict(temperature=1.0, top_k=-1), 'top_k'), (dict(temperature=1.0, top_k=1.5), 'top_k'),
         (dict(temperature=1.0, top_k=98), 'exceeds the vocabulary'),
         (dict(temperature=1.0, top_p=0.0), 'top_p'), (dict(temperature=1.0, top_p=1.5), 'top_p')]
  for kw, match in bad:
    with pytest.raises(ValueError, match=match):
      gen.generate(ok, max_new_tokens=2, sampling=SamplingParams(**kw))
  with pytest.raises(ValueError, match='max_len'):
    Decoder(make(2), max_len=65)
  with pytest.raises(ValueError, match='row_matmul'):
    Decoder(make(2), max_len=8, row_matmul='rows')


# ------------------------------------------------------------------------------------------------
# experiments/generate.py (its core takes a model and a tokenizer; the loaders are separate)
class _CharTokenizer:
  """ids 3..96 <-> the printable characters ' '..'~'; 0-2 are pad/bos/eos."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [3 + ord(c) - 32 for c in text]

  def decode(self, ids):
    return ''.join(chr(32 + i - 3) for i in ids if i >= 3)


def test_generate_entry_point_on_an_exported_checkpoint(tmp_path):
  """Export the model, load it back as `--hf_dir` does, and generate with streaming."""
  import ast
  import io
  from experiments.generate import load_model, run_generation
  from plt_jax.hf import export_model, load_hf_checkpoint
  export_model(make(2, 'plt', 'hidden', True), None, str(tmp_path / 'hf'))
  with pytest.raises(ValueError, match='pass --tokenizer'):
    load_model(hf_dir=str(tmp_path / 'hf'))
  loaded, _ = load_hf_checkpoint(str(tmp_path / 'hf'))
  out = io.StringIO()
  prompts = ['hi', 'a longer', 'x', 'seven!']
  res, texts = run_generation(
      loaded, _CharTokenizer(), prompts, max_new_tokens=6, out=out,
      generator=Generator(loaded, max_len=MAX_LEN, compiler_options=FAST))
  want = generator().generate([[1] + _CharTokenizer().encode(p) for p in prompts],
                              max_new_tokens=6, stop_tokens=[2])
  assert res.tokens == want.tokens
  assert texts == [_CharTokenizer().decode(t) for t in want.tokens]
  streamed = [''] * len(prompts)
  for line in out.getvalue().splitlines():
    if line.startswith('[') and '] ' in line:
      i, piece = line.split('] ', 1)
      streamed[int(i[1:])] += ast.literal_eval(piece)
  assert streamed == texts
  assert 'tokens/s' in out.getvalue()


def test_generate_entry_point_rejects_bad_flags():
  from experiments.generate import main
  with pytest.raises(SystemExit, match='--prompt'):
    main(['--random_init', 'default'])
  with pytest.raises(SystemExit, match='top_p'):
    main(['--random_init', 'default', '--prompt', 'x', '--temperature', '1', '--top_p', '2'])
  with pytest.raises(SystemExit, match='exactly one of'):
    main(['--prompt', 'x'])
