"""Model tests: tiny shapes, random weights, float32; every test asserts numbers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY_MODEL, randomized, tiny_model_config
from plt_jax import attention as attn
from plt_jax.config import ModelConfig
from plt_jax.presets import PRESETS
from plt_jax.model import PLT, abstract_param_count, param_count, shift_right

# Odd sizes on purpose (over helpers.TINY_MODEL): vocab 97, sequence 13, 4 heads of width 12
# over 2 kv heads, a window of 4.
TINY = dict(vocab_size=97, d_model=48, num_layers=2, ffn_dim=80, window_size=4)
SEQ = 13


def make(num_loops=2, **kw):
  model = PLT(tiny_model_config(**{**TINY, 'num_loops': num_loops, **kw}), nnx.Rngs(0))
  # Every parameter random (gates and norms included) so no test hides behind init values.
  return randomized(model, seed=42)


@functools.lru_cache(maxsize=None)
def forward_fn(graphdef):
  @jax.jit
  def f(state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)
  return f


def logits_of(model, tokens, positions=None, segment_ids=None):
  graphdef, state = nnx.split(model)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  return forward_fn(graphdef)(state, tokens, positions, segment_ids)


@functools.lru_cache(maxsize=None)
def loops_fn(graphdef):
  @jax.jit
  def f(state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions, return_loops=True)
  return f


def loops_of(model, tokens, positions=None):
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  graphdef, state = nnx.split(model)
  return loops_fn(graphdef)(state, tokens, positions)


def tokens(batch=2, seq=SEQ, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, TINY['vocab_size'])


# ------------------------------------------------------------------------------------------------
# R = 1 is exactly Llama: an independent, straightforward forward written here.
def llama_reference(params, cfg, toks):
  d, h, kvh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
  e = d // h
  s = toks.shape[1]

  def rms(x, w):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps) * w

  def rot(x):  # explicit rotation of pairs (i, i + e/2) by angle pos * theta^(-2i/e)
    pos = np.arange(s)[:, None]
    freq = cfg.rope_theta ** (-np.arange(e // 2) * 2.0 / e)
    c, sn = np.cos(pos * freq), np.sin(pos * freq)
    a, b = x[..., :e // 2], x[..., e // 2:]
    c, sn = c[:, None, :], sn[:, None, :]
    return np.concatenate([a * c - b * sn, a * sn + b * c], -1)

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x = p['embed_tokens']['embedding'][np.asarray(toks)]
  out = []
  for bi in range(x.shape[0]):
    hb = x[bi]
    for lp in p['layers'].values():
      u = rms(hb, lp['input_layernorm']['weight'])
      q = rot((u @ lp['self_attn']['q_proj']['kernel']).reshape(s, h, e))
      k = rot((u @ lp['self_attn']['k_proj']['kernel']).reshape(s, kvh, e))
      v = (u @ lp['self_attn']['v_proj']['kernel']).reshape(s, kvh, e)
      ys = []
      for head in range(h):
        kv = head // (h // kvh)
        sc = q[:, head] @ k[:, kv].T / np.sqrt(e)
        sc = np.where(np.tril(np.ones((s, s))) > 0, sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ys.append(pr @ v[:, kv])
      hb = hb + np.concatenate(ys, -1) @ lp['self_attn']['o_proj']['kernel']
      u = rms(hb, lp['post_attention_layernorm']['weight'])
      g = u @ lp['mlp']['gate_proj']['kernel']
      hb = hb + ((g / (1 + np.exp(-g))) * (u @ lp['mlp']['up_proj']['kernel'])) @ lp['mlp']['down_proj']['kernel']
    out.append(rms(hb, p['norm']['weight']) @ p['lm_head']['kernel'])
  return np.stack(out)


@pytest.mark.parametrize('loop_mode', ['plt', 'vanilla'])
def test_r1_equals_independent_llama(loop_mode):
  model = make(num_loops=1, loop_mode=loop_mode)
  toks = tokens()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ref = llama_reference(params, model.cfg, toks)
  got = np.asarray(logits_of(model, toks))
  assert np.abs(ref).max() > 1.0  # non-trivial logits
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('loop_mode', ['plt', 'vanilla'])
@pytest.mark.parametrize('num_loops', [1, 2, 3, 4])
def test_causality(num_loops, loop_mode):
  model = make(num_loops=num_loops, loop_mode=loop_mode)
  toks = tokens(batch=1)
  base = logits_of(model, toks)
  for t in (0, 6, SEQ - 1):
    changed = toks.at[0, t].set((toks[0, t] + 1) % TINY['vocab_size'])
    out = logits_of(model, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert float(jnp.abs(out[:, t:] - base[:, t:]).max()) > 1e-4  # and the future does move


@pytest.mark.parametrize('loop_mode,gate_mode', [('plt', 'hidden'), ('plt', 'query'),
                                                 ('vanilla', 'hidden')])
def test_packed_documents_equal_separate(loop_mode, gate_mode):
  model = make(num_loops=3, loop_mode=loop_mode, gate_mode=gate_mode)
  lens = (5, 1, 7)  # includes a 1-token document; total 13, a longer doc than the window
  toks = tokens(batch=1, seq=sum(lens), seed=3)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None]
  pos = np.concatenate([np.arange(n) for n in lens])[None]
  packed = logits_of(model, toks, jnp.asarray(pos), jnp.asarray(seg))
  start = 0
  for n in lens:
    alone = logits_of(model, toks[:, start:start + n])
    np.testing.assert_allclose(np.asarray(packed[:, start:start + n]), np.asarray(alone),
                               atol=2e-5, rtol=1e-5)
    start += n


def test_padding_segment_does_not_leak():
  model = make(num_loops=2)
  toks = tokens(batch=1, seq=9)
  seg = jnp.asarray([[1] * 6 + [0] * 3])
  pos = jnp.asarray([list(range(6)) + [0, 1, 2]])
  out = logits_of(model, toks, pos, seg)
  alone = logits_of(model, toks[:, :6])
  np.testing.assert_allclose(np.asarray(out[:, :6]), np.asarray(alone), atol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize('normalize', [True, False])
def test_loop_input_is_shifted_normalized_output(normalize):
  model = make(num_loops=3, normalize_per_loop=normalize)
  toks = tokens(batch=2)
  pos = jnp.asarray(np.tile(np.r_[np.arange(6), np.arange(7)], (2, 1)))
  _, loops = loops_of(model, toks, pos)
  e = model.embed_tokens(toks)
  a, b = model.cfg.emb_scale, model.cfg.hidden_scale
  for r in (1, 2):
    h = loops[r - 1].hidden
    hn = model.norm(h) if normalize else h
    expect = np.array(a * e)
    for i in range(SEQ):
      if int(pos[0, i]) > 0:
        expect[:, i] += b * np.asarray(hn[:, i - 1])
    np.testing.assert_allclose(np.asarray(loops[r].inputs), expect, atol=1e-5, rtol=1e-5)
  # Document starts (positions 0 and 6) get a*E only.
  np.testing.assert_allclose(np.asarray(loops[1].inputs[:, 6]), a * np.asarray(e[:, 6]), atol=1e-6)


def test_shift_right_masks_document_starts():
  hn = jax.random.normal(jax.random.key(0), (1, 5, 3))
  pos = jnp.asarray([[0, 1, 2, 0, 1]])
  out = np.asarray(shift_right(hn, pos))
  np.testing.assert_array_equal(out[0, [0, 3]], 0.0)
  np.testing.assert_array_equal(out[0, [1, 2, 4]], np.asarray(hn)[0, [0, 1, 3]])


@pytest.mark.parametrize('gate_mode', ['hidden', 'query'])
def test_fresh_gate_mixes_half_half(gate_mode):
  model = PLT(tiny_model_config(**TINY, num_loops=2, gate_mode=gate_mode), nnx.Rngs(0))  # init
  _, loops = loops_of(model, tokens())
  assert len(loops[1].layers) == TINY['num_layers']
  for lo in loops[1].layers:
    np.testing.assert_array_equal(np.asarray(lo.gate), 0.5)
  # The mix itself (g * global + (1 - g) * local, per head) is checked with random gates in
  # test_key_outside_window_changes_only_global_branch.


def _qkv(seed, s=11, hq=4, hkv=2, d=8):
  k = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(k[0], (2, s, hq, d))
  return (q,) + tuple(jax.random.normal(kk, (2, s, hkv, d)) for kk in k[1:])


@pytest.mark.parametrize('window', [11, 12, 40])
def test_window_ge_seq_equals_full_attention(window):
  q, _, _, kl, vl = _qkv(1)
  local = attn.reference_causal(q, kl, vl, window=window)
  full = attn.reference_causal(q, kl, vl)
  np.testing.assert_allclose(np.asarray(local), np.asarray(full), atol=1e-6)
  # And a window smaller than the sequence does differ.
  assert float(jnp.abs(attn.reference_causal(q, kl, vl, window=3) - full).max()) > 1e-3


def test_window_counts_the_token_itself():
  q, _, _, kl, vl = _qkv(2)
  # W = 1: each query sees only its own key, so the output is its own value.
  out = attn.reference_causal(q, kl, vl, window=1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.repeat(vl, 2, axis=2)), atol=1e-6)
  # W = 3: probs are nonzero exactly on keys i-2..i.
  _, p = attn.reference_causal(q, kl, vl, window=3, return_probs=True)
  nz = np.asarray(p[0, 0] > 0)
  i, j = np.indices(nz.shape)
  np.testing.assert_array_equal(nz, (j <= i) & (i - j < 3))


def test_key_outside_window_changes_only_global_branch():
  q, kg, vg, kl, vl = _qkv(3)
  g = jax.nn.sigmoid(jax.random.normal(jax.random.key(9), (2, 11, 4)))
  w, t, i = 3, 2, 8  # key 2 is outside query 8's window (keys 6..8)
  base, (pg, pl) = attn.reference_gswa(q, kg, vg, kl, vl, g, window=w, return_probs=True)
  # Changing the LOCAL k/v at t leaves query i untouched (outside its window) ...
  out_l = attn.reference_gswa(q, kg, vg, kl.at[:, t].add(3.0), vl.at[:, t].add(3.0), g, window=w)
  np.testing.assert_array_equal(np.asarray(out_l[:, i]), np.asarray(base[:, i]))
  assert float(jnp.abs(out_l[:, t] - base[:, t]).max()) > 1e-3
  # ... while changing loop 1's k/v at t changes query i through the global branch only.
  y_loc = attn.reference_causal(q, kl, vl, window=w)
  kg2, vg2 = kg.at[:, t].add(3.0), vg.at[:, t].add(3.0)
  out_g = attn.reference_gswa(q, kg2, vg2, kl, vl, g, window=w)
  y_glob2 = attn.reference_causal(q, kg2, vg2)
  gg = g[..., None]
  np.testing.assert_allclose(np.asarray(out_g), np.asarray(gg * y_glob2 + (1 - gg) * y_loc),
                             atol=1e-6)
  assert float(jnp.abs(out_g[:, i] - base[:, i]).max()) > 1e-3


def test_gate_modes_are_wired():
  for mode in ('hidden', 'query'):
    model = make(num_loops=2, gate_mode=mode)
    _, loops = loops_of(model, tokens())
    g = np.asarray(loops[1].layers[0].gate)
    assert g.shape == (2, SEQ, 4) and g.std() > 1e-3 and ((g > 0) & (g < 1)).all()


def test_vanilla_differs_from_plt_and_has_no_gate():
  toks = tokens()
  v = make(num_loops=2, loop_mode='vanilla')
  assert all(layer.self_attn.plt_gate is None for layer in v.layers)
  _, loops = loops_of(v, toks)
  np.testing.assert_array_equal(np.asarray(loops[1].inputs), np.asarray(loops[0].hidden))
  p = make(num_loops=2, loop_mode='plt')
  assert all(isinstance(layer.self_attn.plt_gate.weight, nnx.Param) for layer in p.layers)
  assert float(jnp.abs(logits_of(v, toks) - logits_of(p, toks)).max()) > 1e-3


def test_bfloat16_compute_tracks_float32():
  toks = tokens()
  f32 = make(num_loops=2)
  bf = make(num_loops=2, dtype='bfloat16')
  a, b = np.asarray(logits_of(f32, toks)), np.asarray(logits_of(bf, toks))
  assert b.dtype == np.float32
  assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf, nnx.Param)))


def _mean_square_grads(remat):
  def grads(model):
    return nnx.grad(lambda m: jnp.mean(m(tokens()) ** 2))(model)
  return jax.tree.leaves(nnx.jit(grads)(make(num_loops=2, remat=remat)))


@functools.lru_cache(maxsize=1)
def _grads_without_remat():
  return _mean_square_grads('none')


@pytest.mark.parametrize('policy', ['full', 'dots_no_batch', 'save_attention'])
def test_remat_policies_same_gradients(policy):
  g0 = _grads_without_remat()
  g1 = _mean_square_grads(policy)
  scale = max(float(jnp.abs(a).max()) for a in g0)
  assert scale > 1e-4
  # Recomputation may reorder float sums (newer XLA fuses the rematerialised graph differently):
  # equal to float32 rounding, relative to the largest gradient.
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(g0, g1)) < 1e-5 * scale


def test_param_count_and_7b_preset():
  model = make(num_loops=3)
  assert param_count(model) == model.cfg.param_count()
  cfg7 = PRESETS['7b'].model.replace(num_loops=2)
  n = abstract_param_count(cfg7)  # jax.eval_shape under the hood: no memory allocated
  assert abs(n - 7.62e9) / 7.62e9 < 0.005, n
  assert n == cfg7.param_count()


@pytest.mark.parametrize('field,value,match', [
    ('num_heads', 5, 'num_heads'),            # 48 % 5
    ('num_kv_heads', 3, 'num_kv_heads'),      # 4 % 3
    ('num_loops', 0, 'num_loops'),
    ('window_size', 0, 'window_size'),
    ('loop_mode', 'parallel', 'loop_mode'),
    ('gate_mode', 'key', 'gate_mode'),
    ('dtype', 'float16', 'dtype'),
    ('attention_impl', 'flash', 'attention_impl'),
    ('remat', 'some', 'remat'),
    ('vocab_size', -3, 'vocab_size'),
    ('rope_theta', 0.0, 'rope_theta'),
])
def test_invalid_config_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    tiny_model_config(**{**TINY, field: value})


def test_unknown_config_key_is_rejected():
  with pytest.raises(ValueError, match='num_loop'):
    ModelConfig.from_dict({**TINY_MODEL, **TINY, 'num_loop': 2})


def test_retired_param_dtype_is_read_only_at_its_value():
  fields = {**TINY_MODEL, **TINY}
  assert ModelConfig.from_dict({**fields, 'param_dtype': 'float32'}) == ModelConfig(**fields)
  with pytest.raises(ValueError, match="param_dtype must be 'float32'"):
    ModelConfig.from_dict({**fields, 'param_dtype': 'bfloat16'})


