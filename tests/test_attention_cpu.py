"""The CPU backend's blockwise training attention against the XLA reference (float32): values and
gradients, odd shapes, GQA, windows around the block size, packed documents; the whole model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_model_config
from plt_jax import attention as attn
from plt_jax.config import ModelConfig
from plt_jax.model import PLT
from plt_jax.runtime import Runtime


def segments(rng, b, s, pad=True):
  """Packed rows: 1-4 documents at random cuts, and (pad) a padding tail of segment 0."""
  seg = np.zeros((b, s), np.int32)
  for i in range(b):
    n_docs = int(rng.integers(1, 5))
    cuts = np.sort(rng.choice(np.arange(1, s), size=min(n_docs - 1, s - 1), replace=False))
    ids = np.searchsorted(cuts, np.arange(s), side='right') + 1
    end = s - int(rng.integers(0, max(1, s // 4))) if pad and s > 4 else s
    ids[end:] = 0
    seg[i] = ids
  return jnp.asarray(seg)


def inputs(seed, b, s, hq, hkv, e):
  ks = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(ks[0], (b, s, hq, e))
  kv = [jax.random.normal(ks[i], (b, s, hkv, e)) for i in range(1, 5)]
  gate = jax.nn.sigmoid(2.0 * jax.random.normal(ks[5], (b, s, hq)))
  cot = jax.random.normal(ks[6], (b, s, hq, e))
  return q, kv, gate, cot


def assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f'{what}: max error {err:.3g} (scale {scale:.3g})'


# (b, s, hq, hkv, e, window, block): blocks smaller than S so every case has several blocks;
# windows below, at and above the block size, and W = 1 (only the token itself).
CASES = [
    (2, 29, 4, 2, 16, 5, 8),
    (1, 33, 3, 1, 8, 8, 8),
    (2, 33, 4, 4, 8, 9, 8),
    (2, 40, 6, 2, 16, 7, 16),
    (1, 64, 4, 2, 32, 1, 16),
    (2, 65, 2, 1, 16, 64, 32),
    (1, 100, 8, 2, 16, 33, 32),
    (1, 7, 2, 1, 4, 3, 32),       # one block shorter than the block size
]


@pytest.mark.parametrize('b,s,hq,hkv,e,window,block', CASES)
@pytest.mark.parametrize('packed', [False, True])
def test_blockwise_matches_reference_values_and_grads(b, s, hq, hkv, e, window, block, packed):
  seed = (1000 * s + 100 * window + 10 * block + packed) % 2**31
  q, (k1, v1, kl, vl), gate, cot = inputs(seed, b, s, hq, hkv, e)
  seg = segments(np.random.default_rng(seed), b, s) if packed else None
  args = (q, k1, v1, kl, vl, gate)

  def value_and_grads(gswa, args, seg):
    """G-SWA's output and its gradients with respect to all six inputs. Its gate lies strictly
    inside (0, 1), so the output and the query's gradient carry both branches, the full causal
    one (gradients of k1, v1) and the windowed one (gradients of kl, vl)."""
    g = lambda *a: jnp.sum(gswa(*a, seg, window=window) * cot)
    return gswa(*args, seg, window=window), jax.grad(g, argnums=range(6))(*args)

  want = jax.jit(lambda a, sg: value_and_grads(attn.reference_gswa, a, sg))(args, seg)
  got = jax.jit(lambda a, sg: value_and_grads(
      lambda *x, **kw: attn.blockwise_gswa(*x, block=block, **kw), a, sg))(args, seg)
  assert_close(got[0], want[0], 2e-6, 'gswa')
  for i, (a, c) in enumerate(zip(got[1], want[1])):
    assert_close(a, c, 1e-5, f'gswa grad of input {i}')
  # The causal branch alone (training's loop 1 and vanilla loops), values.
  for win in (None, window):
    assert_close(jax.jit(lambda q, k, v, sg, win=win: attn.blockwise_causal(
                     q, k, v, sg, window=win, block=block))(q, k1, v1, seg),
                 attn.reference_causal(q, k1, v1, seg, window=win), 2e-6, f'causal window={win}')


def test_every_block_size_gives_the_same_result():
  """The default block and blocks of 1, 5, 16, S: one answer (up to float rounding)."""
  q, (k1, v1, kl, vl), gate, _ = inputs(11, 2, 23, 4, 2, 8)
  seg = segments(np.random.default_rng(11), 2, 23)
  want = attn.reference_gswa(q, k1, v1, kl, vl, gate, seg, window=6)
  fn = jax.jit(attn.blockwise_gswa, static_argnames=('window', 'block'))
  for block in (None, 1, 5, 16, 23):
    got = fn(q, k1, v1, kl, vl, gate, seg, window=6, block=block)
    assert_close(got, want, 2e-6, f'block={block}')


def test_rows_of_other_documents_and_padding_do_not_leak():
  """Changing the keys of another document (or of padding) leaves a document's outputs alone."""
  b, s = 1, 24
  q, (k, v, _, _), _, _ = inputs(5, b, s, 2, 1, 8)
  seg = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4], jnp.int32)
  causal = jax.jit(functools.partial(attn.blockwise_causal, block=8))
  base = causal(q, k, v, seg)
  k2 = k.at[:, 10:].add(3.0)
  v2 = v.at[:, 10:].add(3.0)
  moved = causal(q, k2, v2, seg)
  np.testing.assert_array_equal(np.asarray(moved[:, :10]), np.asarray(base[:, :10]))
  assert float(jnp.max(jnp.abs(moved[:, 10:] - base[:, 10:]))) > 0.1


def test_bfloat16_is_close_to_the_float32_reference():
  q, (k1, v1, kl, vl), gate, _ = inputs(3, 2, 48, 4, 2, 16)
  want = attn.reference_gswa(q, k1, v1, kl, vl, gate, window=9)
  bf = [x.astype(jnp.bfloat16) for x in (q, k1, v1, kl, vl)]
  got = jax.jit(functools.partial(attn.blockwise_gswa, window=9, block=16))(*bf, gate)
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(jnp.float32), want, 3e-2, 'bf16 gswa')


def test_needs_the_training_layout():
  q, (k, v, _, _), _, _ = inputs(0, 1, 8, 2, 1, 4)
  with pytest.raises(ValueError, match='S == T'):
    attn.blockwise_causal(q, k[:, :5], v[:, :5])


def test_block_size_and_backend():
  assert [attn.block_size(s) for s in (1, 16, 128, 200, 256, 512, 4096)] == [
      32, 32, 32, 64, 64, 128, 128]
  backend = attn.get_backend('cpu')
  assert backend.name == 'cpu' and not backend.supports_probs
  assert jax.default_backend() == 'cpu'
  assert attn.get_backend('auto').name == 'cpu'
  assert ModelConfig().attention_impl == 'auto'


@pytest.mark.parametrize('loops', [1, 2])
def test_model_with_blockwise_equals_the_reference_model(loops):
  """Whole-model logits and parameter gradients (packed documents): blockwise == xla."""
  cfg = tiny_model_config(num_layers=2, num_loops=loops, attention_impl='xla')
  b, s = 2, 37
  rng = np.random.default_rng(7 + loops)
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s)), jnp.int32)
  seg = segments(rng, b, s, pad=False)
  starts = np.concatenate([np.ones((b, 1), bool), np.asarray(seg[:, 1:] != seg[:, :-1])], 1)
  pos = np.zeros((b, s), np.int32)
  for i in range(b):
    for t in range(1, s):
      pos[i, t] = 0 if starts[i, t] else pos[i, t - 1] + 1
  pos = jnp.asarray(pos)
  ref = PLT(cfg, nnx.Rngs(0))
  # Gate weights away from their zero init, so both G-SWA branches and the gate matter.
  graphdef, params = nnx.split(ref, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)

  def loss(params, backend):
    logits = nnx.merge(graphdef, params)(tok, pos, seg, runtime=Runtime(backend))
    return jnp.mean(jax.nn.logsumexp(logits, -1) * 0.1 + logits[..., 3]), logits

  def run(backend):
    return jax.jit(jax.value_and_grad(lambda p: loss(p, backend), has_aux=True))(params)

  (lr, logits_r), gr = run(attn.XLA())
  (lb, logits_b), gb = run(attn.CPU())
  assert_close(logits_b, logits_r, 1e-5, 'logits')
  assert abs(float(lb) - float(lr)) < 1e-5
  for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(gb), jax.tree.leaves(gr)):
    assert_close(a, c, 1e-5, jax.tree_util.keystr(path))
