"""PyTorch Parallel Loop Transformer (PLT, the LoopCoder-V2 architecture), exported from plt_jax.

Self-contained (torch + transformers only): it ships inside every exported model directory and is
loaded by `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Parameter names are
the LoopCoder-V2 release's checkpoint keys (the gate also under the release's `loop_gate_proj`), so
this file also loads the released weights.

The forward pass (R = plt_num_loops, L shared layers, E = embed(tokens)):
  loop 1:      h_1 = f(E), a plain causal Llama pass; each layer keeps its post-RoPE K1, V1
  loop r >= 2: x = a * E[i] + b * hn_{r-1}[i-1]   (CLP; hn = Norm_f(h) if plt_normalize_per_loop;
               the shifted term is 0 at each sequence's first token), then every layer runs G-SWA:
               y = g * Attn_causal(q, K1, V1) + (1 - g) * Attn_window(q, K_r, V_r)
               with the window holding keys i-W+1 .. i of this loop's own keys, and a
               per-head gate g
  logits = lm_head(Norm_f(h_R))
R = 1 is exactly Llama. plt_loop_mode='vanilla' feeds h_{r-1} to loop r unshifted, with full causal
attention over each loop's own keys and no gate.

Packed rows: where `position_ids` do not step by one (a restart), a new sequence begins; it attends
only to itself and its CLP shift starts from zero, as plt_jax does with segment ids.

Outputs on request:
  hidden_states  R * (L + 1) tensors [B, S, d], loop by loop: the loop's input (E for loop 1, the
                 CLP input for loops >= 2, h_{r-1} in vanilla mode), then each layer's output. As in
                 Llama, the last one is `last_hidden_state`, Norm_f(h_R).
  attentions     R * L tensors [B, H, S, keys so far], loop by loop, one per layer: the weight each
                 query gives each token. Loop 1 and vanilla loops: the causal softmax. G-SWA loops:
                 g * P_global + (1 - g) * P_window, both placed on the token index (the window's key
                 of token j is loop r's own key of j), so each row sums to 1.

Decoding (`generate`) keeps a `PLTCache`, preallocated: loop 1's keys/values for every token (all
loops' in vanilla mode), a W-slot ring per later loop, and the last token's hn_r of loops 1..R-1.
A one-token step runs the R loops of the new token side by side as R rows of one pass through the
layers (row r needs only hn_{r-1} of the previous token, and loop 1's keys of this token, which
row 1 writes in the same layer), so a decode step reads every weight once, whatever R is, and
issues about as many torch ops as a Llama step.

Not supported, refused with the reason: assisted and prompt-lookup decoding (they roll the cache
back after rejected draft tokens; PLT's window rings and loop hidden states cannot be rolled back),
transformers' own cache classes (PLT keeps its own), gradient checkpointing.

transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.24).
This file reads both names and returns the cache under the name the output class declares, so
`generate` threads it on either side of the rename. A call that could only be right with a cache it
did not get (one token at position > 0, or a mask longer than the tokens) raises instead of
decoding from nothing.
"""
import dataclasses
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_plt import PLTConfig


def _tracing() -> bool:
  """True under torch.compile / torch.export, where data-dependent Python branches must not run."""
  compiler = getattr(torch, "compiler", None)
  if compiler is None:
    return False
  exporting = getattr(compiler, "is_exporting", lambda: False)
  return bool(compiler.is_compiling() or exporting())


def _f32(x: torch.Tensor) -> torch.Tensor:
  return x if x.dtype == torch.float32 else x.float()


FEW_ROWS = 8


def _few_rows(x: torch.Tensor, rows: int, *layers: nn.Linear) -> bool:
  """Whether the products of `rows` rows of `x` with `layers` take the transposed path: W x^T
  instead of x W^T.

  A decode step of R loops multiplies R rows by each weight. For a few float32 rows on the CPU,
  BLAS reads W once as the left operand of W x^T, where x W^T repacks W for every product and
  costs about twice the one-row product. The right operand x^T is a transposed view of
  row-major rows: BLAS reads that layout several times faster than a row-major [features, rows]
  one. More rows, other dtypes or devices, and wrapped or hooked layers take the
  plain path."""
  return (2 <= rows <= FEW_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
          and all(type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32
                  and not (m._forward_hooks or m._forward_pre_hooks) for m in layers))


# ---------------------------------------------------------------------------------- building blocks
class PLTRMSNorm(nn.Module):
  """y = x / rms(x) * w, computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.variance_epsilon = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
      return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)  # one op
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (y * self.weight.float()).to(x.dtype)


class Rope:
  """Rotary embedding of positions [B, S] in HF Llama's 'rotate_half' layout, for x [B, H, S, E]:
  x * cos + roll(x, E/2) * sin_signed, where sin_signed = (-sin, sin) makes the roll rotate_half."""

  def __init__(self, positions: torch.Tensor, head_dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    ang = positions.float()[:, None, :, None] * inv_freq        # [B, 1, S, E/2]
    cos, sin = ang.cos(), ang.sin()
    self.cos = torch.cat([cos, cos], dim=-1)
    self.sin = torch.cat([-sin, sin], dim=-1)
    self.half = head_dim // 2

  def __call__(self, x: torch.Tensor) -> torch.Tensor:
    xf = _f32(x)
    y = xf * self.cos + xf.roll(self.half, dims=-1) * self.sin
    return y if y.dtype == x.dtype else y.to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           return_probs: bool = False):
  """Softmax attention in float32, GQA-aware; rows without a visible key give 0.

  q [B, H, S, E]; k, v [B, K, T, E]; mask bool [B, 1, 1, S, T] (True = visible), or None when every
  key is visible. Query head h reads key/value head h // (H / K), as in HF Llama's repeat_kv.
  With return_probs, also the probabilities [B, H, S, T] (float32).
  """
  b, h, s, e = q.shape
  kh = k.shape[1]
  qg = q.float().reshape(b, kh, h // kh, s, e)
  scores = torch.einsum("bkgse,bkte->bkgst", qg, k.float()) * (e ** -0.5)
  if mask is None:
    row_max = scores.amax(dim=-1, keepdim=True)
  else:
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
  p = torch.exp(scores - row_max)
  p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
  probs = None
  if return_probs:  # the returned tensor is the one the output is computed from (for its grad)
    probs = p.reshape(b, h, s, -1)
    p = probs.view(b, kh, h // kh, s, -1)
  out = torch.einsum("bkgst,bkte->bkgse", p, v.float()).reshape(b, h, s, e).to(q.dtype)
  return (out, probs) if return_probs else out


class PLTMLP(nn.Module):
  def __init__(self, config: PLTConfig):
    super().__init__()
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if _few_rows(x, x.numel() // max(1, x.shape[-1]), self.gate_proj, self.up_proj, self.down_proj):
      xt = x.reshape(-1, x.shape[-1]).t()
      ht = F.silu(torch.mm(self.gate_proj.weight, xt)) * torch.mm(self.up_proj.weight, xt)
      ht = ht.t().contiguous().t()  # column-major, as BLAS reads a right operand fastest
      return torch.mm(self.down_proj.weight, ht).t().reshape(x.shape)
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PLTGate(nn.Module):
  """Per-head G-SWA gate of one layer, shared by loops 2..R.

  hidden mode (release): g = sigmoid(W RMSNorm_g(x) + b), W [H, d], on the pre-norm residual x.
  query mode:            g_h = sigmoid(q_h . w_h + b_h), w [H, head_dim], on the post-RoPE query.
  """

  def __init__(self, config: PLTConfig):
    super().__init__()
    self.use_hidden_states = config.plt_gate_use_hidden_states
    h = config.num_attention_heads
    if self.use_hidden_states:
      self.gate_norm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
      self.weight = nn.Parameter(torch.zeros(h, config.hidden_size))
    else:
      self.weight = nn.Parameter(torch.zeros(h, config.head_dim))
    self.bias = nn.Parameter(torch.zeros(h))

  def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """g [B, H, S, 1] in float32; x [B, S, d], q [B, H, S, E]."""
    if self.use_hidden_states:
      logit = F.linear(_f32(self.gate_norm(x)), _f32(self.weight), _f32(self.bias))  # [B, S, H]
      return torch.sigmoid(logit.transpose(1, 2).unsqueeze(-1))
    logit = torch.einsum("bhse,he->bhs", _f32(q), _f32(self.weight))
    return torch.sigmoid(logit + _f32(self.bias)[:, None]).unsqueeze(-1)


class PLTAttention(nn.Module):
  def __init__(self, config: PLTConfig):
    super().__init__()
    d, e = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_attention_heads, config.num_key_value_heads, e)
    self.q_proj = nn.Linear(d, self.num_heads * e, bias=False)
    self.k_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
    self.v_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
    self.o_proj = nn.Linear(self.num_heads * e, d, bias=False)
    if config.plt_uses_gswa:
      self.plt_gate = PLTGate(config)

  def project(self, u: torch.Tensor, rope: Rope):
    """Post-RoPE q [B, H, S, E], k [B, K, S, E] and v [B, K, S, E]."""
    b, s, _ = u.shape
    h, kh, e = self.num_heads, self.num_kv_heads, self.head_dim
    if _few_rows(u, b * s, self.q_proj, self.k_proj, self.v_proj):
      ut = u.reshape(b * s, -1).t()
      q, k, v = (torch.mm(m.weight, ut).view(n, e, b, s).permute(2, 0, 3, 1)
                 for m, n in ((self.q_proj, h), (self.k_proj, kh), (self.v_proj, kh)))
    else:
      q = self.q_proj(u).view(b, s, h, e).transpose(1, 2)
      k = self.k_proj(u).view(b, s, kh, e).transpose(1, 2)
      v = self.v_proj(u).view(b, s, kh, e).transpose(1, 2)
    return rope(q), rope(k), v

  def out(self, y: torch.Tensor) -> torch.Tensor:
    b, h, s, e = y.shape
    if _few_rows(y, b * s, self.o_proj):
      yt = y.transpose(1, 2).reshape(b * s, h * e).t()
      return torch.mm(self.o_proj.weight, yt).t().reshape(b, s, -1)
    return self.o_proj(y.transpose(1, 2).reshape(b, s, h * e))


def _mix(g: torch.Tensor, y_glob: torch.Tensor, y_loc: torch.Tensor) -> torch.Tensor:
  """g * y_glob + (1 - g) * y_loc in float32."""
  return (g * y_glob.float() + (1.0 - g) * y_loc.float()).to(y_glob.dtype)


# ---------------------------------------------------------------------------------------- the cache
def _cache_field(output_cls) -> str:
  """The field under which transformers' output classes carry the cache: `cache` from 5.24 on,
  `past_key_values` before. Filling the declared field lets `generate` find the cache and keeps the
  renaming shim (and its deprecation warning) out of every call."""
  fields = getattr(output_cls, "__dataclass_fields__", {})
  return "cache" if "cache" in fields else "past_key_values"


def _output(output_cls, cache, **fields):
  return output_cls(**fields, **{_cache_field(output_cls): cache})


def _given_cache(cache, past_key_values) -> Optional["PLTCache"]:
  """The cache of a forward call, under either of transformers' names for it."""
  if cache is not None and past_key_values is not None and cache is not past_key_values:
    raise ValueError("PLT: got both `cache` and `past_key_values`; pass the cache once")
  got = cache if cache is not None else past_key_values
  if got is not None and not isinstance(got, PLTCache):
    raise ValueError(f"PLT keeps its own PLTCache, but got a {type(got).__name__}: this model "
                     "declines transformers' standard caches (_supports_default_dynamic_cache)")
  return got


class PLTCache:
  """Decoding state of a PLT, preallocated (not a `transformers.Cache`: its layout is PLT's own).

  Cache indices count the tokens fed so far (left padding included); `seq_len` is how many.
  full[r][j]: (K, V) of layer j, [B, K, capacity, E], index i at [:, :, i]: every token of loop 1
    (of every loop in vanilla mode). Capacity doubles when it runs out, so a decode step writes one
    token in place instead of copying the whole cache.
  ring[j]: (K, V) [B, K, R-1, W, E], the G-SWA loops' own keys/values of the last W tokens, index i
    in slot i % W: a fixed W-token window per loop and sequence.
  hidden: [B, R-1, d], Norm_f(h_r) of the last token for r = 1..R-1, the CLP input of loop r+1's
    next token.
  The attributes transformers' `generate` reads of a cache it is handed back (`is_linear`,
  `is_compileable`, `is_croppable`, `get_seq_length`) say: attention layers, neither compileable
  nor croppable.
  """
  is_compileable = False
  is_croppable = False

  def __init__(self, config: PLTConfig):
    self.num_loops = config.plt_num_loops
    self.num_layers = config.num_hidden_layers
    self.window = config.plt_window if config.plt_uses_gswa else None
    num_full = 1 if config.plt_uses_gswa else self.num_loops
    self.full = [[None] * self.num_layers for _ in range(num_full)]
    self.ring = [None] * self.num_layers
    self.hidden = None
    self.seq_len = 0
    self.batch_size = None

  @property
  def is_linear(self) -> list:
    """Per layer: whether it is a linear-attention (recurrent) layer. None of PLT's is."""
    return [False] * self.num_layers

  def get_seq_length(self, layer_idx: int = 0) -> int:
    return self.seq_len

  def __len__(self) -> int:
    return self.num_layers

  def write_full(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
    """Stores k, v [B, K, t, E] at indices start .. start+t-1; returns views of 0 .. start+t-1."""
    end = start + k.shape[2]
    buf = self.full[loop][layer]
    if buf is None or buf[0].shape[2] < end:
      cap = max(64, end, 2 * buf[0].shape[2] if buf is not None else 0)
      grown = tuple(x.new_empty(x.shape[0], x.shape[1], cap, x.shape[3]) for x in (k, v))
      if buf is not None:
        for new, old in zip(grown, buf):
          new.narrow(2, 0, start).copy_(old.narrow(2, 0, start))
      buf = self.full[loop][layer] = grown
    buf[0].narrow(2, start, k.shape[2]).copy_(k)
    buf[1].narrow(2, start, k.shape[2]).copy_(v)
    return buf[0].narrow(2, 0, end), buf[1].narrow(2, 0, end)

  def read_full(self, loop: int, layer: int, end: int):
    buf = self.full[loop][layer]
    return buf[0].narrow(2, 0, end), buf[1].narrow(2, 0, end)

  def _ring(self, layer: int, like: torch.Tensor):
    if self.ring[layer] is None:  # zeros: empty slots are masked, and must not hold NaN bits
      shape = (like.shape[0], like.shape[1], self.num_loops - 1, self.window, like.shape[3])
      self.ring[layer] = (like.new_zeros(shape), like.new_zeros(shape))
    return self.ring[layer]

  def write_ring(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
    """Stores loop `loop`'s (1-based index >= 1) k, v [B, K, t, E] at indices start .. start+t-1;
    only the last W stay."""
    rk, rv = self._ring(layer, k)
    t = k.shape[2]
    keep = min(t, self.window)
    slots = torch.arange(start + t - keep, start + t, device=k.device) % self.window
    rk[:, :, loop - 1].index_copy_(2, slots, k[:, :, t - keep:])
    rv[:, :, loop - 1].index_copy_(2, slots, v[:, :, t - keep:])

  def read_ring(self, loop: int, layer: int, start: int, count: int, like: torch.Tensor):
    """Loop `loop`'s keys/values of indices start-count .. start-1, in order, [B, K, count, E]."""
    rk, rv = self._ring(layer, like)
    slots = torch.arange(start - count, start, device=like.device) % self.window
    return rk[:, :, loop - 1].index_select(2, slots), rv[:, :, loop - 1].index_select(2, slots)

  def write_ring_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: int):
    """One token of every G-SWA loop: k, v [B, K, R-1, E] at `index`; returns the rings
    [B, K * (R-1), W, E]."""
    rk, rv = self._ring(layer, k)
    slot = index % self.window
    rk.select(3, slot).copy_(k)
    rv.select(3, slot).copy_(v)
    return rk.flatten(1, 2), rv.flatten(1, 2)

  def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
    """Beam search: row b of every state becomes row beam_idx[b]."""
    def pick(t):
      return None if t is None else t.index_select(0, beam_idx.to(t.device))
    self.full = [[None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in per_loop]
                 for per_loop in self.full]
    self.ring = [None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in self.ring]
    self.hidden = pick(self.hidden)


@dataclasses.dataclass
class _Masks:
  """Visibility of one forward call's keys (True = visible; None = all visible).

  full:  [B, 1, 1, t, start + t] over indices 0 .. start+t-1 (causal, padding, packed sequences);
         on one-token row steps [B, 1, 1, start + 1], as scaled_dot_product_attention takes it.
  local: [B, 1, 1, t, n + t] over the n = min(start, W - 1) ring tokens before the chunk and the
         chunk itself (window, causal, padding, packed sequences); chunk calls only.
  ring:  [B, 1, 1, W] over the ring slots after this token's write; one-token row steps only.
  """
  start: int
  full: Optional[torch.Tensor]
  local: Optional[torch.Tensor] = None
  ring: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------- the layers
class PLTDecoderLayer(nn.Module):
  """One shared layer. `forward` is the only entry, so device-placement hooks see every call."""

  def __init__(self, config: PLTConfig, layer_idx: int):
    super().__init__()
    self.layer_idx = layer_idx
    self.input_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = PLTAttention(config)
    self.post_attention_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = PLTMLP(config)

  def forward(self, x: torch.Tensor, rope: Rope, cache: PLTCache, loop: int, mode: str,
              masks: _Masks, want_probs: bool = False):
    """(new x, attention probabilities [B, H, t, start + t] or None).

    mode 'causal': causal attention over loop `loop`'s own keys (loop 1, vanilla loops);
    'gswa': G-SWA of loop `loop` (>= 1, zero-based) over loop 1's keys and its own window;
    'rows': one decode token, loop r on row r of x [B, R, d] (see module docstring)."""
    j, attn, start = self.layer_idx, self.self_attn, masks.start
    u = self.input_layernorm(x)
    q, k, v = attn.project(u, rope)
    probs = None
    if mode == "causal":
      k_all, v_all = cache.write_full(loop, j, k, v, start)
      y = attend(q, k_all, v_all, masks.full, return_probs=want_probs)
      if want_probs:
        y, probs = y
    elif mode == "gswa":
      t = k.shape[2]
      k1, v1 = cache.read_full(0, j, start + t)   # loop 1 already wrote this chunk
      n = min(start, cache.window - 1)
      old_k, old_v = cache.read_ring(loop, j, start, n, k)
      cache.write_ring(loop, j, k, v, start)
      loc = attend(q, torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), masks.local, want_probs)
      glob = attend(q, k1, v1, masks.full, want_probs)
      g = attn.plt_gate(x, q)
      if want_probs:
        (y_glob, p_glob), (y_loc, p_loc) = glob, loc
        probs = g * p_glob
        probs[..., start - n:] += (1.0 - g) * p_loc
      else:
        y_glob, y_loc = glob, loc
      y = _mix(g, y_glob, y_loc)
    elif mode == "rows":
      y = self._rows_attention(x, q, k, v, cache, masks)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    x = x + attn.out(y)
    return x + self.mlp(self.post_attention_layernorm(x)), probs

  def _rows_attention(self, x, q, k, v, cache, masks):
    """Row 0 (loop 1) and rows 1..R-1 (the G-SWA loops) of one token; y [B, H, R, E]."""
    b, h, r_total, e = q.shape
    kh = k.shape[1]
    g_size = h // kh
    k1, v1 = cache.write_full(0, self.layer_idx, k[:, :, :1], v[:, :, :1], masks.start)
    # Every loop's query reads loop 1's keys: the R rows are R queries of one attention, grouped by
    # key/value head (head h reads kv head h // (H / K)) so no key is repeated.
    y_glob = F.scaled_dot_product_attention(
        q.reshape(b, kh, g_size * r_total, e), k1, v1, attn_mask=masks.full)
    y_glob = y_glob.view(b, h, r_total, e)
    rk, rv = cache.write_ring_rows(self.layer_idx, k[:, :, 1:], v[:, :, 1:], masks.start)
    # Loop r's query reads its own ring only: the R-1 loops become R-1 key/value heads per head.
    q_loc = q[:, :, 1:].reshape(b, kh, g_size, r_total - 1, e).transpose(2, 3)
    y_loc = F.scaled_dot_product_attention(q_loc.reshape(b, kh * (r_total - 1), g_size, e),
                                           rk, rv, attn_mask=masks.ring)
    y_loc = y_loc.view(b, kh, r_total - 1, g_size, e).transpose(2, 3).reshape(b, h, r_total - 1, e)
    g = self.self_attn.plt_gate(x[:, 1:], q[:, :, 1:])            # [B, H, R-1, 1], float32
    y_rest = y_glob[:, :, 1:]
    if y_rest.dtype == torch.float32:
      mixed = torch.lerp(y_loc, y_rest, g)
    else:
      mixed = torch.lerp(y_loc.float(), y_rest.float(), g).to(y_rest.dtype)
    return torch.cat([y_glob[:, :, :1], mixed], dim=2)


# --------------------------------------------------------------------------------------- the models
class PLTPreTrainedModel(PreTrainedModel):
  config_class = PLTConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["PLTDecoderLayer"]
  _skip_keys_device_placement = ["past_key_values", "cache"]
  # Checkpoints of the release may name the gate `loop_gate_proj` (the authors' inference code).
  GATE_ALIASES = {r"\.self_attn\.loop_gate_proj\.": ".self_attn.plt_gate."}

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """transformers' from_pretrained, reading a gate stored as `loop_gate_proj` as `plt_gate` (and
    saving it back under the name it was read by)."""
    if kwargs.get("key_mapping") is None and _names_gate_alias(pretrained_model_name_or_path):
      kwargs["key_mapping"] = dict(cls.GATE_ALIASES)
    return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

  @classmethod
  def _supports_default_dynamic_cache(cls) -> bool:
    return False  # generate() must not hand us a DynamicCache: PLT builds its own PLTCache

  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, PLTRMSNorm):
      nn.init.ones_(module.weight)
    elif isinstance(module, PLTGate):  # zero gate: g = 0.5 at init
      nn.init.zeros_(module.weight)
      nn.init.zeros_(module.bias)


def _safetensors_names(directory: str) -> list:
  """Tensor names of a local checkpoint directory, from its index or its file header."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      return list(json.load(f).get("weight_map", {}))
  single = os.path.join(directory, "model.safetensors")
  if os.path.isfile(single):
    with open(single, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
  return []


def _names_gate_alias(name_or_path) -> bool:
  """Whether a checkpoint stores the gate as `loop_gate_proj`. A hub name (not a local directory)
  is read with the alias mapping, which leaves `plt_gate` names as they are."""
  if not isinstance(name_or_path, (str, os.PathLike)) or not os.path.isdir(name_or_path):
    return True
  return any(".loop_gate_proj." in k for k in _safetensors_names(os.fspath(name_or_path)))


def _key_validity(attention_mask, bsz: int, past: int, new: int, has_cache: bool, device):
  """Which of the past + new keys are real tokens [B, past + new] (None: all of them)."""
  if attention_mask is None:
    return None
  if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz:
    raise ValueError(f"PLT: attention_mask must be 2-D [batch={bsz}, tokens so far], got "
                     f"{tuple(attention_mask.shape)}")
  n = attention_mask.shape[1]
  if n != past + new:
    if not has_cache and n > new:
      raise ValueError(
          f"PLT: attention_mask covers {n} tokens, but this call has {new} new token(s) and no "
          f"cache of the {n - new} before them. Pass the cache returned by the previous call (as "
          "`past_key_values`, or `cache` from transformers 5.24 on), or all tokens with "
          "use_cache=False.")
    raise ValueError(f"PLT: attention_mask covers {n} tokens, but the cache holds {past} and this "
                     f"call adds {new}: the mask must cover the whole sequence so far "
                     f"({past + new})")
  valid = attention_mask.to(device).bool()
  # An all-ones mask hides nothing: drop it so attention runs unmasked. Under torch.export /
  # torch.compile the check would be a data-dependent branch, so there the mask is always applied.
  if not _tracing() and bool(valid.all()):
    return None
  return valid


def _sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
  """[B, t] bool: where a new sequence begins in a row, i.e. position_ids do not step by one (the
  first token included). Packed rows restart their positions at each sequence."""
  prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
  return position_ids != prev + 1


def _positions(position_ids, valid, has_cache: bool, bsz: int, p: int, t: int, device):
  """(position ids [B, T], where a sequence starts (no CLP shift into it), packed segment ids or
  None). Without position ids they count the valid keys (or p..p+T-1); given ids that restart at 0
  inside a row mark packed sequences, each attending to itself only."""
  segments = None
  if position_ids is None:
    if valid is not None:
      position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)[:, p:]
    else:
      position_ids = torch.arange(p, p + t, device=device)[None].expand(bsz, t)
    starts = position_ids == 0
  else:
    position_ids = position_ids.to(device)
    if position_ids.dim() == 1:
      position_ids = position_ids[None]
    position_ids = position_ids.expand(bsz, t)
    starts = position_ids == 0
    if t > 1:
      restarts = _sequence_starts(position_ids)
      if p == 0:  # packed sequences: each attends to itself and starts its own CLP shift
        segments = restarts.long().cumsum(-1)
        starts = starts | restarts
      elif not _tracing() and bool(restarts[:, 1:].any()):
        raise ValueError("PLT: position_ids restart inside a chunk that continues a cache; "
                         "packed sequences are supported in calls without a cache only")
  if not has_cache and t == 1 and not _tracing() and bool((position_ids > 0).any()):
    raise ValueError(
        f"PLT: one token at position {int(position_ids.max())} with no cache: its loops need the "
        "cached keys, values and hidden states of the tokens before it. Pass the cache returned "
        "by the previous call (as `past_key_values`, or `cache` from transformers 5.24 on), or "
        "the whole sequence with use_cache=False.")
  return position_ids, starts, segments


def _tupled(output, return_dict: bool):
  return output if return_dict else output.to_tuple()


class PLTModel(PLTPreTrainedModel):
  """Embeddings, the shared layers run R times, and the final norm (hidden states out)."""

  def __init__(self, config: PLTConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(
        [PLTDecoderLayer(config, j) for j in range(config.num_hidden_layers)])
    self.norm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.parallel_decode = True  # one-token steps run the R loops as R rows of one pass
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def _between_loops(self, h: torch.Tensor) -> torch.Tensor:
    return self.norm(h) if self.config.plt_normalize_per_loop else h

  def _clp(self, e: torch.Tensor, shifted: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """a * e + b * shifted, the shifted term zeroed where `keep` [B, t] is False."""
    c = self.config
    a = 1.0 if c.plt_emb_scale is None else float(c.plt_emb_scale)
    b = 1.0 if c.plt_hidden_scale is None else float(c.plt_hidden_scale)
    # .to(e.device): with a multi-device device_map the saved states live where the last layer ran
    shifted = torch.where(keep[..., None].to(e.device), _f32(shifted.to(e.device)),
                          torch.zeros((), device=e.device))
    e32 = _f32(e)
    out = (e32 if a == 1.0 else a * e32) + (shifted if b == 1.0 else b * shifted)
    return out if out.dtype == e.dtype else out.to(e.dtype)

  def _masks(self, valid, segments, bsz: int, p: int, t: int, rows: bool, device) -> _Masks:
    c = self.config
    if rows:
      return self._row_masks(valid, bsz, p, device)
    if t == 1:  # every earlier key is causally visible: only padding can hide one
      full = None if valid is None else valid[:, None, None, None, :]
    else:
      q_idx = torch.arange(p, p + t, device=device)[:, None]
      k_idx = torch.arange(p + t, device=device)[None, :]
      full = (k_idx <= q_idx)[None]
      if segments is not None:  # p == 0 here: the keys are this chunk's tokens
        full = full & (segments[:, :, None] == segments[:, None, :])
      full = (full if valid is None else full & valid[:, None, :])[:, None, None]
    masks = _Masks(start=p, full=full)
    if not c.plt_uses_gswa:
      return masks
    w = c.plt_window
    n = min(p, w - 1)
    q_idx = torch.arange(p, p + t, device=device)[:, None]
    k_idx = torch.arange(p - n, p + t, device=device)[None, :]
    local = ((k_idx <= q_idx) & (q_idx - k_idx < w))[None]
    if segments is not None:
      local = local & (segments[:, :, None] == segments[:, None, :])
    masks.local = (local if valid is None else local & valid[:, None, p - n:])[:, None, None]
    return masks

  def _row_masks(self, valid, bsz: int, p: int, device) -> _Masks:
    """One-token row step at index p. The token always sees its own keys, so no query row of
    scaled_dot_product_attention is fully masked."""
    w = self.config.plt_window
    if valid is not None:
      valid = torch.cat([valid[:, :p], torch.ones_like(valid[:, p:])], dim=1)
    masks = _Masks(start=p, full=None if valid is None else valid[:, None, None, :])
    if p + 1 >= w and valid is None:
      return masks
    slot_idx = p - torch.remainder(p - torch.arange(w, device=device), w)  # index held by slot s
    ring = (slot_idx >= 0)[None].expand(bsz, w)
    if valid is not None:
      ring = ring & valid.gather(1, slot_idx.clamp_min(0)[None].expand(bsz, w))
    masks.ring = ring[:, None, None, :]
    return masks

  def _sequential_loops(self, e, rope, cache, masks, keep_shift, p: int,
                        all_hidden: Optional[list], all_attn: Optional[list]) -> torch.Tensor:
    """Loops 1..R one after another over every token (prefill, training, and decoding when rows
    cannot be batched); appends each layer's input and output to `all_hidden` and the attention
    probabilities to `all_attn` where those are lists. Returns h_R."""
    c = self.config
    x = h = e
    hidden_next = []
    for r in range(c.plt_num_loops):
      if r > 0:
        if c.plt_loop_mode == "vanilla":
          x = h
        else:
          hn = self._between_loops(h)
          if p > 0:
            prev = cache.hidden[:, r - 1:r].to(hn.device, hn.dtype)
          else:
            prev = torch.zeros_like(hn[:, :1])
          x = self._clp(e, torch.cat([prev, hn[:, :-1]], dim=1), keep_shift)
          hidden_next.append(hn[:, -1:])
      # loop 1 and vanilla loops: causal over their own keys; later PLT loops: G-SWA
      mode = "gswa" if r > 0 and c.plt_uses_gswa else "causal"
      if all_hidden is not None:
        all_hidden.append(x)
      for layer in self.layers:
        x, probs = layer(x, rope, cache, r, mode, masks, want_probs=all_attn is not None)
        if all_hidden is not None:
          all_hidden.append(x)
        if all_attn is not None:
          all_attn.append(probs)
      h = x
    if hidden_next:
      cache.hidden = torch.cat(hidden_next, dim=1)
    return h

  def forward(self, input_ids: Optional[torch.LongTensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.LongTensor] = None,
              past_key_values: Optional[PLTCache] = None,
              inputs_embeds: Optional[torch.Tensor] = None,
              use_cache: Optional[bool] = None,
              output_attentions: Optional[bool] = None,
              output_hidden_states: Optional[bool] = None,
              return_dict: Optional[bool] = None,
              cache: Optional[PLTCache] = None,
              **kwargs):
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("PLT: pass exactly one of input_ids and inputs_embeds")
    output_attentions = bool(c.output_attentions if output_attentions is None
                             else output_attentions)
    output_hidden_states = bool(c.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
    return_dict = getattr(c, "return_dict", True) if return_dict is None else return_dict
    given = _given_cache(cache, past_key_values)
    use_cache = c.use_cache if use_cache is None else use_cache
    e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    bsz, t = e.shape[:2]
    dev = e.device
    p = 0 if given is None else given.seq_len
    if given is not None and given.batch_size not in (None, bsz):
      raise ValueError(f"PLT: the cache holds {given.batch_size} sequences, this call {bsz}")
    valid = _key_validity(attention_mask, bsz, p, t, given is not None, dev)
    position_ids, starts, segments = _positions(position_ids, valid, given is not None, bsz, p, t,
                                                dev)
    cache = given if given is not None else PLTCache(c)
    rope = Rope(position_ids, c.head_dim, c.rope_theta)
    keep_shift = ~starts

    r_total = c.plt_num_loops
    rows = (t == 1 and c.plt_uses_gswa and self.parallel_decode and not output_attentions
            and not output_hidden_states)
    masks = self._masks(valid, segments, bsz, p, t, rows, dev)
    all_hidden, all_attn = [], []
    if rows:
      prev = cache.hidden if cache.hidden is not None else e.new_zeros(bsz, r_total - 1, e.shape[2])
      x = torch.cat([e, self._clp(e, prev, keep_shift.expand(bsz, r_total - 1))], dim=1)
      for layer in self.layers:
        x, _ = layer(x, rope, cache, 0, "rows", masks)
      cache.hidden = self._between_loops(x[:, :r_total - 1])
      h = x[:, r_total - 1:]
    else:
      h = self._sequential_loops(e, rope, cache, masks, keep_shift, p,
                                 all_hidden if output_hidden_states else None,
                                 all_attn if output_attentions else None)
    cache.seq_len = p + t
    cache.batch_size = bsz
    last = self.norm(h)
    if output_hidden_states:
      all_hidden[-1] = last
    out = _output(BaseModelOutputWithPast, cache if use_cache else None, last_hidden_state=last,
                  hidden_states=tuple(all_hidden) if output_hidden_states else None,
                  attentions=tuple(all_attn) if output_attentions else None)
    return _tupled(out, return_dict)


def causal_lm_loss(logits: torch.Tensor, labels: Optional[torch.Tensor],
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   ignore_index: int = -100) -> torch.Tensor:
  """Next-token cross-entropy in float32, as transformers' causal LMs compute it.

  labels [B, S] are shifted here (the target of position i is labels[i + 1]); `shift_labels`, when
  given, are already aligned with the logits (context-parallel training shifts before sharding) and
  replace them. `num_items_in_batch` (the Trainer's count of targets over all accumulated
  micro-batches): the loss is the sum over this micro-batch divided by it, so accumulated
  gradients equal those of one large batch; without it, the mean over this call's targets.
  """
  if shift_labels is None:
    if labels is None:
      raise ValueError("PLT: the loss needs `labels` or `shift_labels`")
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
  flat_logits = logits.float().reshape(-1, logits.shape[-1])
  targets = shift_labels.reshape(-1).to(flat_logits.device)
  if num_items_in_batch is None:
    return F.cross_entropy(flat_logits, targets, ignore_index=ignore_index)
  total = F.cross_entropy(flat_logits, targets, ignore_index=ignore_index, reduction="sum")
  if torch.is_tensor(num_items_in_batch):
    num_items_in_batch = num_items_in_batch.to(total.device)
  return total / num_items_in_batch


_DRAFT_DECODING_REFUSAL = (
    "PLT does not support assisted or prompt-lookup decoding: they verify draft tokens and then "
    "roll the cache back past the rejected ones, and PLT's decoding state (each loop's window ring "
    "and the last token's per-loop hidden state, which feed the next token) cannot be rolled back. "
    "Use greedy, sampling or beam search.")


class PLTForCausalLM(PLTPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config: PLTConfig):
    super().__init__(config)
    self.model = PLTModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def _validate_generation_mode(self, generation_mode, *args, **kwargs):
    if str(getattr(generation_mode, "value", generation_mode)) == "assisted_generation":
      raise NotImplementedError(_DRAFT_DECODING_REFUSAL)
    generation_config = args[0] if args else kwargs.get("generation_config")
    impl = getattr(generation_config, "cache_implementation", None)
    if impl not in (None, "dynamic"):
      # transformers would warn and drop the request; a user asking for a static or quantized
      # cache (for torch.compile, or memory) should know it is not there.
      raise ValueError(f"PLT does not support cache_implementation={impl!r}: it keeps its own "
                       "cache (loop 1's keys and values, one window ring per later loop and the "
                       "loop states); leave cache_implementation unset")
    return super()._validate_generation_mode(generation_mode, *args, **kwargs)

  def forward(self, input_ids: Optional[torch.LongTensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.LongTensor] = None,
              past_key_values: Optional[PLTCache] = None,
              inputs_embeds: Optional[torch.Tensor] = None,
              labels: Optional[torch.LongTensor] = None,
              use_cache: Optional[bool] = None,
              output_attentions: Optional[bool] = None,
              output_hidden_states: Optional[bool] = None,
              logits_to_keep=0,
              return_dict: Optional[bool] = None,
              cache: Optional[PLTCache] = None,
              shift_labels: Optional[torch.LongTensor] = None,
              num_items_in_batch=None,
              **kwargs):
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=_given_cache(cache, past_key_values),
                     inputs_embeds=inputs_embeds, use_cache=use_cache,
                     output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, return_dict=True)
    hidden = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
      hidden = hidden[:, -logits_to_keep:]
    elif not isinstance(logits_to_keep, int):
      hidden = hidden[:, logits_to_keep]
    logits = self.lm_head(hidden)
    loss = None
    if labels is not None or shift_labels is not None:
      loss = causal_lm_loss(logits, labels, shift_labels, num_items_in_batch)
    result = _output(CausalLMOutputWithPast, getattr(out, _cache_field(type(out))),
                     loss=loss, logits=logits, hidden_states=out.hidden_states,
                     attentions=out.attentions)
    return _tupled(result, return_dict)


__all__ = ["PLTCache", "PLTForCausalLM", "PLTModel", "PLTPreTrainedModel", "causal_lm_loss"]
