"""Parallel Loop Transformer (PLT) in Flax NNX: the math, and nothing else.

A Llama/Qwen2-style decoder whose L shared layers run R times (docs/model.md states it in full):
  loop 1:      h_1 = f(E)                              plain causal Llama pass, keeps K1/V1 per layer
  loop r >= 2: B_r[i] = a*E[i] + b*Norm_f(h_{r-1})[i-1]  cross-loop shift (CLP), 0 at document starts
               each layer mixes global attention over K1/V1 with windowed attention over its own K/V
               through a per-head sigmoid gate (G-SWA)
  logits = Head(Norm_f(h_R))
`loop_mode='vanilla'` is the sequential baseline: h_{r-1} is the next loop's input, with full causal
attention over each loop's own keys/values. R = 1 is exactly a standard Llama in both modes.

Parameters carry *logical* axis names (e.g. ('embed', 'mlp')); `plt_jax.sharding` maps them to mesh
axes. Shape suffixes: B batch, S sequence, D model width, H heads, K kv-heads, E head_dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from plt_jax import attention as attn_lib
from plt_jax.config import ModelConfig
from plt_jax.runtime import Runtime
from plt_jax.sharding import constrain

Array = jax.Array

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _init(std: float, axes: tuple[Optional[str], ...]):
  # eager_sharding=False: modules build unsharded anywhere; sharding.py places them on a mesh.
  return nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)


def _const_init(fn, axes):
  return nnx.with_partitioning(fn, axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * w, computed in float32 (as HF Llama), returned in x's dtype."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(_const_init(nnx.initializers.ones, ('norm',))(None, (dim,)))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...]).astype(x.dtype)


def rope(x_BSHE: Array, positions_BS: Array, theta: float) -> Array:
  """Rotary embedding, HF-Llama 'rotate_half' layout (first half / second half of head_dim)."""
  e = x_BSHE.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  ang = positions_BS.astype(jnp.float32)[..., None] * inv_freq  # [B, S, E/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x = x_BSHE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BSHE.dtype)


class Linear(nnx.Module):
  """Bias-free projection; kernel stored [in, out] with logical axis names."""

  def __init__(self, d_in: int, d_out: int, axes, cfg: ModelConfig, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_init(cfg.init_std, axes)(rngs.params(), (d_in, d_out)))
    self.dtype = _DTYPES[cfg.dtype]

  def __call__(self, x: Array, rt: Runtime) -> Array:
    return rt.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Gate(nnx.Module):
  """G-SWA per-head gate, one per layer and shared by loops 2..R; zero init -> g = 0.5.

  'hidden': g = sigmoid(W RMSNorm_g(x) + b), W [H, D] reads the pre-norm residual x (release).
  'query':  g_h = sigmoid(q_h . w_h + b_h), w [H, E] reads the post-RoPE query.
  """

  def __init__(self, cfg: ModelConfig):
    self.mode = cfg.gate_mode
    zeros = nnx.initializers.zeros
    if self.mode == 'hidden':
      self.gate_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
      self.weight = nnx.Param(_const_init(zeros, ('gate_heads', 'embed'))(
          None, (cfg.num_heads, cfg.d_model)))
    else:
      self.weight = nnx.Param(_const_init(zeros, ('gate_heads', 'head_dim'))(
          None, (cfg.num_heads, cfg.head_dim)))
    self.bias = nnx.Param(_const_init(zeros, ('gate_heads',))(None, (cfg.num_heads,)))

  def __call__(self, x_BSD: Array, q_BSHE: Array) -> Array:
    w = self.weight[...]
    if self.mode == 'hidden':
      u = self.gate_norm(x_BSD).astype(jnp.float32)
      logit = jnp.einsum('bsd,hd->bsh', u, w)
    else:
      logit = jnp.einsum('bshe,he->bsh', q_BSHE.astype(jnp.float32), w)
    return jax.nn.sigmoid(logit + self.bias[...])  # [B, S, H] float32


class Attention(nnx.Module):
  """GQA projections + RoPE. The attention math itself lives in `plt_jax.attention`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, with_gate: bool):
    d, e = cfg.d_model, cfg.head_dim
    self.cfg = cfg
    self.q_proj = Linear(d, cfg.num_heads * e, ('embed', 'heads'), cfg, rngs)
    self.k_proj = Linear(d, cfg.num_kv_heads * e, ('embed', 'kv_heads'), cfg, rngs)
    self.v_proj = Linear(d, cfg.num_kv_heads * e, ('embed', 'kv_heads'), cfg, rngs)
    self.o_proj = Linear(cfg.num_heads * e, d, ('heads', 'embed'), cfg, rngs)
    self.plt_gate = Gate(cfg) if with_gate else None

  def qkv(self, u_BSD: Array, positions_BS: Array, rt: Runtime):
    """Post-RoPE q [B,S,H,E], k [B,S,K,E] and v [B,S,K,E]."""
    c, shd = self.cfg, rt.sharding
    b, s, _ = u_BSD.shape
    q = self.q_proj(u_BSD, rt).reshape(b, s, c.num_heads, c.head_dim)
    k = self.k_proj(u_BSD, rt).reshape(b, s, c.num_kv_heads, c.head_dim)
    v = self.v_proj(u_BSD, rt).reshape(b, s, c.num_kv_heads, c.head_dim)
    q = constrain(rope(q, positions_BS, c.rope_theta), ('batch', 'seq', 'act_heads', None), shd)
    k = constrain(rope(k, positions_BS, c.rope_theta), ('batch', 'seq', 'act_kv_heads', None),
                  shd)
    v = constrain(v, ('batch', 'seq', 'act_kv_heads', None), shd)
    return q, k, v

  def out(self, y_BSHE: Array, rt: Runtime) -> Array:
    b, s = y_BSHE.shape[:2]
    return self.o_proj(y_BSHE.reshape(b, s, -1), rt)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate_proj = Linear(cfg.d_model, cfg.ffn_dim, ('embed', 'mlp'), cfg, rngs)
    self.up_proj = Linear(cfg.d_model, cfg.ffn_dim, ('embed', 'mlp'), cfg, rngs)
    self.down_proj = Linear(cfg.ffn_dim, cfg.d_model, ('mlp', 'embed'), cfg, rngs)

  def __call__(self, x: Array, rt: Runtime) -> Array:
    h = jax.nn.silu(self.gate_proj(x, rt)) * self.up_proj(x, rt)
    return self.down_proj(constrain(h, ('batch', 'seq', 'act_mlp'), rt.sharding), rt)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['k', 'v', 'gate', 'probs'], meta_fields=[])
@dataclasses.dataclass
class LayerOut:
  """What one layer application exposes besides its output (for decoding and diagnostics)."""
  k: Array
  v: Array
  gate: Optional[Array] = None   # [B, S, H] for G-SWA layers
  probs: Any = None              # attention probabilities (reference path, when captured)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.window = cfg.window_size
    self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.self_attn = Attention(cfg, rngs, cfg.plt_uses_gswa)
    self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BSD: Array, positions_BS: Array, segment_ids_BS: Optional[Array],
               global_kv: Optional[tuple[Array, Array]], *, rt: Runtime, capture: bool = False):
    """One layer. `global_kv=None`: causal self-attention; otherwise G-SWA over (K1, V1).
    capture: the reference attention, also returning its probabilities."""
    # Named scopes (NAMED_SCOPES) label the ops in profiles; they do not change the math.
    with jax.named_scope('qkv'):
      q, k, v = self.project(x_BSD, positions_BS, rt)
    backend = attn_lib.XLA() if capture else rt.attention
    kw = dict(return_probs=True) if capture else dict(sharding=rt.sharding)
    gate = probs = None
    with jax.named_scope('attention'):
      if global_kv is None:
        y = backend.causal(q, k, v, segment_ids_BS, **kw)
      else:
        gate = self.self_attn.plt_gate(x_BSD, q)
        k1, v1 = global_kv
        y = backend.gswa(q, k1, v1, k, v, gate, segment_ids_BS, window=self.window, **kw)
    if capture:
      y, probs = y
    y = checkpoint_name(y, 'attention_out')
    x = constrain(self.finish(x_BSD, y, rt), ('batch', 'seq', 'act_embed'), rt.sharding)
    return x, LayerOut(k, v, gate, probs)

  # The layer around its attention, in two halves (cached decoding calls the attention's cached
  # operations between them).
  def project(self, x_BSD: Array, positions_BS: Array, rt: Runtime):
    """Pre-attention norm, then the post-RoPE q [B,S,H,E], k, v [B,S,K,E]."""
    return self.self_attn.qkv(self.input_layernorm(x_BSD), positions_BS, rt)

  def finish(self, x_BSD: Array, y_BSHE: Array, rt: Runtime) -> Array:
    """Output projection and residual, then the MLP block and its residual."""
    with jax.named_scope('attn_out'):
      x = x_BSD + self.self_attn.out(y_BSHE, rt)
    with jax.named_scope('mlp'):
      return x + self.mlp(self.post_attention_layernorm(x), rt)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['inputs', 'hidden', 'layers'], meta_fields=[])
@dataclasses.dataclass
class LoopOut:
  """Per-loop results. hidden: the loop's output h_r; layers: one LayerOut per layer."""
  inputs: Array
  hidden: Array
  layers: list[LayerOut]


def shift_right(hn_BSD: Array, positions_BS: Array) -> Array:
  """hn[i-1], zero where positions == 0 (each document's first token): CLP's one-token offset."""
  prev = jnp.pad(hn_BSD, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  return jnp.where((positions_BS > 0)[..., None], prev, jnp.zeros_like(prev))


# The jax.named_scope names the forward pass puts on its ops (they label profiles).
NAMED_SCOPES = ('embed', 'loop_input', 'qkv', 'attention', 'attn_out', 'mlp', 'head')

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'save_attention': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


class PLT(nnx.Module):
  """The parallel loop transformer. Parameter names follow the Llama checkpoint layout."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.d_model, dtype=_DTYPES[cfg.dtype], param_dtype=jnp.float32,
        embedding_init=_init(cfg.init_std, ('vocab', 'embed')), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.lm_head = Linear(cfg.d_model, cfg.vocab_size, ('embed', 'vocab'), cfg, rngs)

  # --- pieces, public so decoding and diagnostics can reuse them -------------------------------
  # Each takes the Runtime (how the math runs); None: the config's attention backend, XLA's dot
  # and no mesh.
  def runtime(self, rt: Optional[Runtime] = None) -> Runtime:
    return rt if rt is not None else Runtime.for_model(self.cfg)

  def embed(self, tokens_BS: Array, rt: Optional[Runtime] = None) -> Array:
    return constrain(self.embed_tokens(tokens_BS), ('batch', 'seq', 'act_embed'),
                     self.runtime(rt).sharding)

  def between_loops(self, h_BSD: Array) -> Array:
    """Norm_f(h) (release) or h itself, as fed to the next loop's shift."""
    return self.norm(h_BSD) if self.cfg.normalize_per_loop else h_BSD

  def loop_input(self, e_BSD: Array, h_prev_BSD: Array, positions_BS: Array) -> Array:
    """Input of loop r >= 2: CLP for 'plt', the previous output itself for 'vanilla'."""
    c = self.cfg
    if c.loop_mode == 'vanilla':
      return h_prev_BSD
    return self.clp(e_BSD, shift_right(self.between_loops(h_prev_BSD), positions_BS))

  def clp(self, e: Array, shifted: Array) -> Array:
    """a*E + b*shifted (shifted = Norm_f(h_{r-1}) one token back); shared with decoding."""
    c = self.cfg
    return (c.emb_scale * e.astype(jnp.float32)
            + c.hidden_scale * shifted.astype(jnp.float32)).astype(e.dtype)

  def run_loop(self, x_BSD: Array, positions_BS: Array, segment_ids_BS: Optional[Array],
               global_kv: Optional[list[tuple[Array, Array]]], *, rt: Optional[Runtime] = None,
               capture: bool = False) -> LoopOut:
    """Applies the L shared layers once. global_kv: loop 1's per-layer (K, V) for G-SWA loops."""
    c, rt = self.cfg, self.runtime(rt)

    def fn(layer, x, positions, segment_ids, kv):
      return layer(x, positions, segment_ids, kv, rt=rt, capture=capture)

    if c.remat != 'none' and not capture:
      fn = nnx.remat(fn, policy=_REMAT_POLICIES[c.remat], prevent_cse=True)
    x = x_BSD
    outs = []
    for j, layer in enumerate(self.layers):
      x, lo = fn(layer, x, positions_BS, segment_ids_BS,
                 None if global_kv is None else global_kv[j])
      outs.append(lo)
    return LoopOut(x_BSD, x, outs)

  def head(self, h_BSD: Array, rt: Optional[Runtime] = None) -> Array:
    """Logits in float32: Head(Norm_f(h))."""
    return self.lm_head(self.norm(h_BSD), self.runtime(rt)).astype(jnp.float32)

  # --- the forward pass ----------------------------------------------------------------------
  def __call__(self, tokens_BS: Array, positions_BS: Optional[Array] = None,
               segment_ids_BS: Optional[Array] = None, *, runtime: Optional[Runtime] = None,
               return_loops: bool = False, capture_attention: bool = False):
    """Logits [B, S, V] (float32). With return_loops, also the list of R LoopOut.

    positions: per-document positions (restart at 0 at each packed document); defaults to 0..S-1.
    segment_ids: document ids within the row (0 = padding); defaults to one document.
    runtime: how the math runs (attention backend, matmul, mesh); see `plt_jax.runtime`.
    capture_attention: record attention probabilities (reference path only; for diagnostics).
    """
    c, rt = self.cfg, self.runtime(runtime)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1], dtype=jnp.int32),
                                      tokens_BS.shape)
    with jax.named_scope('embed'):
      e = self.embed(tokens_BS, rt)
    loops = [self.run_loop(e, positions_BS, segment_ids_BS, None, rt=rt,
                           capture=capture_attention)]
    for _ in range(1, c.num_loops):
      with jax.named_scope('loop_input'):
        x = self.loop_input(e, loops[-1].hidden, positions_BS)
      global_kv = None
      if c.plt_uses_gswa:
        global_kv = [(lo.k, lo.v) for lo in loops[0].layers]
      loops.append(self.run_loop(x, positions_BS, segment_ids_BS, global_kv, rt=rt,
                                 capture=capture_attention))
    with jax.named_scope('head'):
      logits = self.head(loops[-1].hidden, rt)
    return (logits, loops) if return_loops else logits


def with_num_loops(model: PLT, num_loops: int) -> PLT:
  """The same weights run with `num_loops` loops (a test-time loop count R').

  The returned model shares every parameter array with `model`; only the loop count in its config
  differs, so the forward pass, prefill and cached decoding all run R' loops. A PLT trained with
  R = 1 has no G-SWA gates, so it can only run one loop (a vanilla looped model runs any count).
  """
  c = model.cfg
  if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
    raise ValueError(f'num_loops={num_loops!r}: must be an integer >= 1')
  if num_loops == c.num_loops:
    return model
  new_cfg = c.replace(num_loops=num_loops)
  if new_cfg.plt_uses_gswa and not c.plt_uses_gswa:
    raise ValueError(f'a PLT model trained with num_loops={c.num_loops} has no G-SWA gates, so it '
                     f'cannot run {num_loops} loops')
  out = nnx.clone(model)   # new Variables over the same (immutable) arrays
  out.cfg = new_cfg
  return out


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_param_count(cfg: ModelConfig) -> int:
  """Parameter count from shapes only (jax.eval_shape: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
