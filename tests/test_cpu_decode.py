"""kernels/cpu_decode.py: one layer's cached decode attention (XLA FFI) against float64 numpy.

The numpy reference below spells out the decode math of docs/model.md independently of plt_jax/infer/decode.py
(whose XLA path the decode parity tests pin to the full forward). Shapes are odd, positions sit
around the window (0, W-1, W, far beyond) and at the last cache slot, and GQA groups are 1, 3, 5.
"""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plt_jax.kernels import cpu_decode

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or shutil.which('g++') is None and shutil.which('c++') is None,
    reason='the kernel is built with the system C++ compiler for the CPU backend')


def _softmax_attend(q, keys, values):
  """q [E], keys/values [N, E] float64."""
  logits = keys @ q / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max())
  return (p / p.sum()) @ values


def reference(q, k_new, v_new, pos, k_full, v_full, gate=None, k_ring=None, v_ring=None):
  """float64 numpy: the caches after the writes and y [B, R, H, E]."""
  q, k_new, v_new = (np.asarray(x, np.float64) for x in (q, k_new, v_new))
  k_full, v_full = np.array(k_full, np.float64), np.array(v_full, np.float64)
  b_, r_, h_, _ = q.shape
  group = h_ // k_new.shape[2]
  if k_ring is not None:
    k_ring, v_ring = np.array(k_ring, np.float64), np.array(v_ring, np.float64)
    w = k_ring.shape[2]
  y = np.zeros(q.shape)
  for b in range(b_):
    p = int(pos[b])
    if p < k_full.shape[1]:  # past the end the write is dropped (XLA scatter semantics)
      k_full[b, p], v_full[b, p] = k_new[b, 0], v_new[b, 0]
    for r in range(1, r_):
      k_ring[b, r - 1, p % w], v_ring[b, r - 1, p % w] = k_new[b, r], v_new[b, r]
    for r in range(r_):
      for h in range(h_):
        kh = h // group
        y_glob = _softmax_attend(q[b, r, h], k_full[b, :p + 1, kh], v_full[b, :p + 1, kh])  # :T
        if r == 0:
          y[b, r, h] = y_glob
          continue
        # Positions p-W+1 .. p that exist, read from their ring slots.
        held = [t % w for t in range(max(0, p - w + 1), p + 1)]
        y_loc = _softmax_attend(q[b, r, h], k_ring[b, r - 1, held, kh], v_ring[b, r - 1, held, kh])
        g = float(gate[b, r - 1, h])
        y[b, r, h] = g * y_glob + (1 - g) * y_loc
  return y, k_full, v_full, k_ring, v_ring


def _inputs(seed, b, r, h, k, e, t, w, pos):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  gate = 1 / (1 + np.exp(-2 * f(b, max(r - 1, 1), h)))
  return dict(q=f(b, r, h, e), k_new=f(b, r, k, e), v_new=f(b, r, k, e),
              pos=np.asarray(pos, np.int32), k_full=f(b, t, k, e), v_full=f(b, t, k, e),
              gate=gate[:, :r - 1], k_ring=f(b, r - 1, w, k, e), v_ring=f(b, r - 1, w, k, e))


_gated = jax.jit(lambda q, k_new, v_new, pos, k_full, v_full, gate, k_ring, v_ring:
                 cpu_decode.decode_attention(q, k_new, v_new, pos, k_full, v_full, gate=gate,
                                             k_ring=k_ring, v_ring=v_ring))
_causal = jax.jit(cpu_decode.decode_attention, static_argnames='slab')


# (batch, rows R, heads, kv heads, head dim, cache slots T, window W, positions per sequence)
GATED_CASES = [
    (1, 2, 6, 2, 16, 41, 7, [0]),                 # first token: one key in each branch
    (3, 2, 6, 2, 19, 41, 7, [6, 7, 40]),          # W-1, W (the ring wraps), the last slot
    (2, 3, 5, 1, 8, 23, 9, [13, 22]),             # MQA (group 5), odd head dim
    (4, 4, 3, 3, 33, 70, 64, [1, 63, 64, 69]),    # group 1; a window around a 64 block
    (2, 4, 12, 4, 64, 165, 65, [64, 150]),        # the benchmark model's head shapes
]


@pytest.mark.parametrize('case', GATED_CASES, ids=lambda c: 'B{}R{}H{}K{}E{}T{}W{}'.format(*c))
def test_gated_matches_float64(case):
  b, r, h, k, e, t, w, pos = case
  x = _inputs(sum(case[:7]), b, r, h, k, e, t, w, pos)
  got = _gated(**{n: jnp.asarray(v) for n, v in x.items()})
  want = reference(**x)
  names = ('y', 'k_full', 'v_full', 'k_ring', 'v_ring')
  for name, g, ref in zip(names, got, want):
    assert g.shape == ref.shape, name
    err = np.abs(np.asarray(g, np.float64) - ref).max()
    assert err <= (2e-6 if name == 'y' else 0.0), (name, err)  # writes are exact copies
  assert np.abs(want[0]).max() > 0.1


@pytest.mark.parametrize('case', [(1, 4, 4, 8, 9, [0]), (3, 6, 2, 24, 31, [5, 30, 17])],
                         ids=lambda c: 'B{}H{}K{}E{}T{}'.format(*c))
def test_causal_matches_float64_and_uses_only_its_slab(case):
  """The vanilla cache stacks its R loop caches [R, B, T, K, E]; slab r is read and written."""
  b, h, k, e, t, pos = case
  x = _inputs(7, b, 1, h, k, e, t, 1, pos)
  rng = np.random.default_rng(3)
  stack_k = rng.standard_normal((3, b, t, k, e)).astype(np.float32)
  stack_v = rng.standard_normal((3, b, t, k, e)).astype(np.float32)
  y, ks, vs = _causal(x['q'], x['k_new'], x['v_new'], x['pos'], stack_k, stack_v, slab=1)
  want_y, want_k, want_v, _, _ = reference(x['q'], x['k_new'], x['v_new'], x['pos'],
                                           stack_k[1], stack_v[1])
  assert np.abs(np.asarray(y) - want_y).max() <= 2e-6
  np.testing.assert_array_equal(np.asarray(ks)[1], want_k.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(vs)[1], want_v.astype(np.float32))
  for other in (0, 2):  # the other loops' caches are untouched
    np.testing.assert_array_equal(np.asarray(ks)[other], stack_k[other])
    np.testing.assert_array_equal(np.asarray(vs)[other], stack_v[other])
  # An unstacked [B, T, K, E] cache gives the same result.
  y2, k2, _ = _causal(x['q'], x['k_new'], x['v_new'], x['pos'], stack_k[1], stack_v[1])
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(k2), np.asarray(ks)[1])


def test_writes_in_place_when_donated():
  """Inside a jit with the caches donated, no cache buffer is copied: outputs alias inputs."""
  x = _inputs(5, 2, 3, 6, 2, 16, 40, 9, [3, 20])
  f = jax.jit(lambda *a: cpu_decode.decode_attention(*a[:6], gate=a[6], k_ring=a[7],
                                                     v_ring=a[8])[1:],
              donate_argnums=(4, 5, 7, 8))
  args = [jnp.asarray(x[n]) for n in ('q', 'k_new', 'v_new', 'pos', 'k_full', 'v_full', 'gate',
                                      'k_ring', 'v_ring')]
  compiled = f.lower(*args).compile()
  stats = compiled.memory_analysis()
  if stats is not None:
    cache_bytes = sum(x[n].nbytes for n in ('k_full', 'v_full', 'k_ring', 'v_ring'))
    assert stats.alias_size_in_bytes == cache_bytes
  text = compiled.as_text()
  assert 'plt_decode_attention' in text and ' copy(' not in text


def test_positions_past_the_cache_match_the_xla_path():
  """A finished sequence may keep stepping in a batch: its full-cache write is dropped and every
  slot stays visible, exactly as plt_jax.infer.decode's scatter-and-mask path behaves."""
  x = _inputs(11, 2, 3, 4, 2, 8, 6, 4, [6, 9])  # T = 6 slots: both positions are past the end
  got = _gated(**{n: jnp.asarray(v) for n, v in x.items()})
  want = reference(**x)
  for g, ref in zip(got, want):
    assert np.abs(np.asarray(g, np.float64) - ref).max() <= 2e-6
  np.testing.assert_array_equal(np.asarray(got[1]), x['k_full'])  # nothing written
  with pytest.raises(Exception, match='negative position'):
    x['pos'] = np.asarray([-1, 2], np.int32)
    jax.block_until_ready(_gated(**{n: jnp.asarray(v) for n, v in x.items()}))


def test_rejects_other_dtypes():
  x = _inputs(1, 1, 1, 2, 1, 8, 5, 3, [2])
  with pytest.raises(ValueError, match='float32'):
    cpu_decode.decode_attention(jnp.asarray(x['q'], jnp.bfloat16), x['k_new'], x['v_new'],
                                x['pos'], x['k_full'], x['v_full'])
