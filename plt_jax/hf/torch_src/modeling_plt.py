"""PyTorch Parallel Loop Transformer (PLT, the LoopCoder-V2 architecture), exported from plt_jax.

Self-contained (torch + transformers only): it ships inside every exported model directory and is
loaded by `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Parameter names are the
LoopCoder-V2 release's checkpoint keys, so this file also loads the released weights.

The forward pass (R = plt_num_loops, L shared layers, E = embed(tokens)):
  loop 1:      h_1 = f(E), a plain causal Llama pass; each layer keeps its post-RoPE K1, V1
  loop r >= 2: x = a * E[i] + b * hn_{r-1}[i-1]   (CLP; hn = Norm_f(h) if plt_normalize_per_loop;
               the shifted term is 0 at position 0), then every layer runs G-SWA:
               y = g * Attn_causal(q, K1, V1) + (1 - g) * Attn_window(q, K_r, V_r)
               with the window holding keys i-W+1 .. i of this loop's own keys, and a per-head gate g
  logits = lm_head(Norm_f(h_R))
R = 1 is exactly Llama. plt_loop_mode='vanilla' feeds h_{r-1} to loop r unshifted, with full causal
attention over each loop's own keys and no gate.

Decoding (`generate`) keeps a `PLTCache`, preallocated: loop 1's keys/values for every token (all
loops' in vanilla mode), a W-slot ring per later loop, and the last token's hn_r of loops 1..R-1.
A one-token step runs the R loops of the new token side by side as R rows of one pass through the
layers (row r needs only hn_{r-1} of the previous token, and loop 1's keys of this token, which row 1
writes in the same layer), so a decode step reads every weight once, whatever R is.

transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.24).
This file reads both names and returns the cache under the name the output class declares, so
`generate` threads it on either side of the rename. A call that could only be right with a cache it
did not get (one token at position > 0, or a mask longer than the tokens) raises instead of
decoding from nothing.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_plt import PLTConfig


# ----------------------------------------------------------------------------------- building blocks
class PLTRMSNorm(nn.Module):
  """y = x / rms(x) * w, computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.variance_epsilon = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
  """cos, sin [B, S, head_dim / 2] (float32) of the rotary angles pos * theta^(-2i / head_dim)."""
  inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                           device=positions.device) / head_dim))
  ang = positions.float()[..., None] * inv_freq
  return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """HF-Llama 'rotate_half' layout on x [B, heads, S, E]."""
  half = x.shape[-1] // 2
  xf = x.float()
  c, s = cos[:, None], sin[:, None]
  x1, x2 = xf[..., :half], xf[..., half:]
  return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: Optional[torch.Tensor]) -> torch.Tensor:
  """Softmax attention in float32, GQA-aware; rows without a visible key give 0.

  q [B, H, S, E]; k, v [B, K, T, E]; mask bool [B, 1, 1, S, T] (True = visible), or None when every
  key is visible. Query head h reads key/value head h // (H / K), as in HF Llama's repeat_kv.
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
  out = torch.einsum("bkgst,bkte->bkgse", p, v.float())
  return out.reshape(b, h, s, e).to(q.dtype)


class PLTMLP(nn.Module):
  def __init__(self, config: PLTConfig):
    super().__init__()
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
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
      u = self.gate_norm(x).float()
      logit = torch.einsum("bsd,hd->bhs", u, self.weight.float())
    else:
      logit = torch.einsum("bhse,he->bhs", q.float(), self.weight.float())
    return torch.sigmoid(logit + self.bias.float()[:, None])[..., None]


class PLTAttention(nn.Module):
  def __init__(self, config: PLTConfig):
    super().__init__()
    d, e = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_attention_heads, config.num_key_value_heads, e)
    self.rope_theta = config.rope_theta
    self.q_proj = nn.Linear(d, self.num_heads * e, bias=False)
    self.k_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
    self.v_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
    self.o_proj = nn.Linear(self.num_heads * e, d, bias=False)
    if config.plt_uses_gswa:
      self.plt_gate = PLTGate(config)

  def project(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Post-RoPE q [B, H, S, E], k [B, K, S, E] and v [B, K, S, E]."""
    b, s, _ = u.shape
    q = self.q_proj(u).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(u).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(u).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def out(self, y: torch.Tensor) -> torch.Tensor:
    b, h, s, e = y.shape
    return self.o_proj(y.transpose(1, 2).reshape(b, s, h * e))


def _mix(g: torch.Tensor, y_glob: torch.Tensor, y_loc: torch.Tensor) -> torch.Tensor:
  return (g * y_glob.float() + (1.0 - g) * y_loc.float()).to(y_glob.dtype)


# ----------------------------------------------------------------------------------------- the cache
def _cache_field(output_cls) -> str:
  """The field under which transformers' output classes carry the cache: `cache` from 5.24 on,
  `past_key_values` before. Filling the declared field lets `generate` find the cache and keeps the
  renaming shim (and its deprecation warning) out of every call."""
  return "cache" if "cache" in getattr(output_cls, "__dataclass_fields__", {}) else "past_key_values"


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
  ring[j]: (K, V) [R-1, B, K, W, E], the G-SWA loops' own keys/values of the last W tokens, index i
    in slot i % W: a fixed W-token window per loop and sequence.
  hidden[r]: Norm_f(h_{r+1}) of the last token, [B, 1, d], the CLP input of loop r+2's next token.
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
    self.hidden = [None] * max(self.num_loops - 1, 0)
    self.seq_len = 0
    self.batch_size = None

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
          new[:, :, :start] = old[:, :, :start]
      buf = self.full[loop][layer] = grown
    buf[0][:, :, start:end] = k
    buf[1][:, :, start:end] = v
    return buf[0][:, :, :end], buf[1][:, :, :end]

  def read_full(self, loop: int, layer: int, end: int):
    buf = self.full[loop][layer]
    return buf[0][:, :, :end], buf[1][:, :, :end]

  def _ring(self, layer: int, like: torch.Tensor):
    if self.ring[layer] is None:  # zeros: empty slots are masked, and must not hold NaN bits
      shape = (self.num_loops - 1, like.shape[0], like.shape[1], self.window, like.shape[3])
      self.ring[layer] = (like.new_zeros(shape), like.new_zeros(shape))
    return self.ring[layer]

  def write_ring(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
    """Stores loop `loop`'s (1-based index >= 1) k, v [B, K, t, E] at indices start .. start+t-1;
    only the last W stay."""
    rk, rv = self._ring(layer, k)
    t = k.shape[2]
    keep = min(t, self.window)
    slots = torch.arange(start + t - keep, start + t, device=k.device) % self.window
    rk[loop - 1].index_copy_(2, slots, k[:, :, t - keep:])
    rv[loop - 1].index_copy_(2, slots, v[:, :, t - keep:])

  def read_ring(self, loop: int, layer: int, start: int, count: int, like: torch.Tensor):
    """Loop `loop`'s keys/values of indices start-count .. start-1, in order, [B, K, count, E]."""
    rk, rv = self._ring(layer, like)
    slots = torch.arange(start - count, start, device=like.device) % self.window
    return rk[loop - 1].index_select(2, slots), rv[loop - 1].index_select(2, slots)

  def write_ring_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: int):
    """One token of every G-SWA loop: k, v [R-1, B, K, E] at `index`; returns the rings
    [(R-1) * B, K, W, E]."""
    rk, rv = self._ring(layer, k[0, :, :, None])
    slot = index % self.window
    rk[:, :, :, slot] = k
    rv[:, :, :, slot] = v
    return rk.flatten(0, 1), rv.flatten(0, 1)

  def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
    """Beam search: row b of every state becomes row beam_idx[b]."""
    def pick(t, dim):
      return None if t is None else t.index_select(dim, beam_idx.to(t.device))
    self.full = [[None if kv is None else (pick(kv[0], 0), pick(kv[1], 0)) for kv in per_loop]
                 for per_loop in self.full]
    self.ring = [None if kv is None else (pick(kv[0], 1), pick(kv[1], 1)) for kv in self.ring]
    self.hidden = [pick(t, 0) for t in self.hidden]


@dataclasses.dataclass
class _Masks:
  """Visibility of one forward call's keys (True = visible; None = all visible).

  full:  [B, 1, 1, t, start + t] over indices 0 .. start+t-1 (causal, padding).
  local: [B, 1, 1, t, n + t] over the n = min(start, W - 1) ring tokens before the chunk and the
         chunk itself (window, causal, padding); chunk calls only.
  ring:  [B, 1, 1, 1, W] over the ring slots after this token's write; one-token row steps only.
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

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PLTCache,
              loop: int, mode: str, masks: _Masks) -> torch.Tensor:
    """mode 'causal': causal attention over loop `loop`'s own keys (loop 1, vanilla loops);
    'gswa': G-SWA of loop `loop` (>= 1, zero-based) over loop 1's keys and its own window;
    'rows': one decode token, loop r on rows [r*B, (r+1)*B) of x (see module docstring)."""
    j, attn, start = self.layer_idx, self.self_attn, masks.start
    u = self.input_layernorm(x)
    q, k, v = attn.project(u, cos, sin)
    if mode == "causal":
      k_all, v_all = cache.write_full(loop, j, k, v, start)
      y = attend(q, k_all, v_all, masks.full)
    elif mode == "gswa":
      t = k.shape[2]
      k1, v1 = cache.read_full(0, j, start + t)   # loop 1 already wrote this chunk
      n = min(start, cache.window - 1)
      old_k, old_v = cache.read_ring(loop, j, start, n, k)
      cache.write_ring(loop, j, k, v, start)
      y_loc = attend(q, torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), masks.local)
      y = _mix(attn.plt_gate(x, q), attend(q, k1, v1, masks.full), y_loc)
    elif mode == "rows":
      y = self._rows_attention(x, q, k, v, cache, masks)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    x = x + attn.out(y)
    return x + self.mlp(self.post_attention_layernorm(x))

  def _rows_attention(self, x, q, k, v, cache, masks):
    j, r_total = self.layer_idx, cache.num_loops
    b = x.shape[0] // r_total
    h, kh, e = q.shape[1], k.shape[1], q.shape[3]
    k1, v1 = cache.write_full(0, j, k[:b], v[:b], masks.start)
    y1 = attend(q[:b], k1, v1, masks.full)
    # Loops 2..R of one token share loop 1's keys: stack them as R-1 queries of one attention.
    q_rest = q[b:].reshape(r_total - 1, b, h, e).permute(1, 2, 0, 3)        # [B, H, R-1, E]
    y_glob = attend(q_rest, k1, v1, masks.full)
    y_glob = y_glob.permute(2, 0, 1, 3).reshape((r_total - 1) * b, h, 1, e)
    rk, rv = cache.write_ring_rows(j, k[b:].reshape(r_total - 1, b, kh, e),
                                   v[b:].reshape(r_total - 1, b, kh, e), masks.start)
    ring_mask = None if masks.ring is None else masks.ring.repeat(r_total - 1, 1, 1, 1, 1)
    y_loc = attend(q[b:], rk, rv, ring_mask)
    g = self.self_attn.plt_gate(x[b:], q[b:])
    return torch.cat([y1, _mix(g, y_glob, y_loc)], dim=0)


# ---------------------------------------------------------------------------------------- the models
class PLTPreTrainedModel(PreTrainedModel):
  config_class = PLTConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["PLTDecoderLayer"]
  _skip_keys_device_placement = ["past_key_values", "cache"]

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
  return None if bool(valid.all()) else valid


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

  def _clp(self, e: torch.Tensor, shifted: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = self.config
    a = 1.0 if c.plt_emb_scale is None else c.plt_emb_scale
    b = 1.0 if c.plt_hidden_scale is None else c.plt_hidden_scale
    # .to(e.device): with a multi-device device_map the saved states live where the last layer ran
    shifted = torch.where((positions > 0)[..., None].to(e.device), shifted.to(e.device).float(),
                          torch.zeros((), device=e.device))
    return (a * e.float() + b * shifted).to(e.dtype)

  def _masks(self, valid, bsz: int, p: int, t: int, rows: bool, device) -> _Masks:
    c = self.config
    if t == 1:  # every earlier key is causally visible: only padding can hide one
      full = None if valid is None else valid[:, None, None, None, :]
    else:
      q_idx = torch.arange(p, p + t, device=device)[:, None]
      k_idx = torch.arange(p + t, device=device)[None, :]
      full = (k_idx <= q_idx)[None]
      full = (full if valid is None else full & valid[:, None, :])[:, None, None]
    masks = _Masks(start=p, full=full)
    if not c.plt_uses_gswa:
      return masks
    w = c.plt_window
    if rows:  # slot s holds index p - ((p - s) mod W) once this token is written
      slot_idx = p - torch.remainder(p - torch.arange(w, device=device), w)
      if p + 1 >= w and valid is None:
        return masks
      ring = (slot_idx >= 0)[None].expand(bsz, w)
      if valid is not None:
        ring = ring & valid.gather(1, slot_idx.clamp_min(0)[None].expand(bsz, w))
      masks.ring = ring[:, None, None, None, :]
    else:
      n = min(p, w - 1)
      q_idx = torch.arange(p, p + t, device=device)[:, None]
      k_idx = torch.arange(p - n, p + t, device=device)[None, :]
      local = ((k_idx <= q_idx) & (q_idx - k_idx < w))[None]
      masks.local = (local if valid is None else local & valid[:, None, p - n:])[:, None, None]
    return masks

  def forward(self, input_ids: Optional[torch.LongTensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.LongTensor] = None,
              past_key_values: Optional[PLTCache] = None,
              inputs_embeds: Optional[torch.Tensor] = None,
              use_cache: Optional[bool] = None,
              cache: Optional[PLTCache] = None,
              **kwargs) -> BaseModelOutputWithPast:
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    given = _given_cache(cache, past_key_values)
    use_cache = c.use_cache if use_cache is None else use_cache
    e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    bsz, t = e.shape[:2]
    dev = e.device
    p = 0 if given is None else given.seq_len
    if given is not None and given.batch_size not in (None, bsz):
      raise ValueError(f"PLT: the cache holds {given.batch_size} sequences, this call {bsz}")
    valid = _key_validity(attention_mask, bsz, p, t, given is not None, dev)
    if position_ids is None:
      if valid is not None:
        position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)[:, p:]
      else:
        position_ids = torch.arange(p, p + t, device=dev)[None].expand(bsz, t)
    position_ids = position_ids.to(dev)
    if position_ids.dim() == 1:
      position_ids = position_ids[None]
    position_ids = position_ids.expand(bsz, t)
    if given is None and t == 1 and bool((position_ids > 0).any()):
      raise ValueError(
          f"PLT: one token at position {int(position_ids.max())} with no cache: its loops need the "
          "cached keys, values and hidden states of the tokens before it. Pass the cache returned "
          "by the previous call (as `past_key_values`, or `cache` from transformers 5.24 on), or "
          "the whole sequence with use_cache=False.")
    cache = given if given is not None else PLTCache(c)
    cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta)

    r_total = c.plt_num_loops
    rows = t == 1 and c.plt_uses_gswa and self.parallel_decode
    masks = self._masks(valid, bsz, p, t, rows, dev)
    if rows:
      rows_in = [e] + [self._clp(e, cache.hidden[r - 1] if p > 0 else torch.zeros_like(e),
                                 position_ids) for r in range(1, r_total)]
      x = torch.cat(rows_in, dim=0)
      cos_r, sin_r = cos.repeat(r_total, 1, 1), sin.repeat(r_total, 1, 1)
      for layer in self.layers:
        x = layer(x, cos_r, sin_r, cache, 0, "rows", masks)
      for r in range(r_total - 1):
        cache.hidden[r] = self._between_loops(x[r * bsz:(r + 1) * bsz])
      h = x[(r_total - 1) * bsz:]
    else:
      h = e
      for layer in self.layers:
        h = layer(h, cos, sin, cache, 0, "causal", masks)
      for r in range(1, r_total):
        if c.plt_loop_mode == "vanilla":
          x = h
          for layer in self.layers:
            x = layer(x, cos, sin, cache, r, "causal", masks)
        else:
          hn = self._between_loops(h)
          prev = cache.hidden[r - 1] if p > 0 else torch.zeros_like(hn[:, :1])
          x = self._clp(e, torch.cat([prev.to(hn.device, hn.dtype), hn[:, :-1]], dim=1),
                        position_ids)
          cache.hidden[r - 1] = hn[:, -1:]
          for layer in self.layers:
            x = layer(x, cos, sin, cache, r, "gswa", masks)
        h = x
    cache.seq_len = p + t
    cache.batch_size = bsz
    return _output(BaseModelOutputWithPast, cache if use_cache else None,
                   last_hidden_state=self.norm(h))


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

  def forward(self, input_ids: Optional[torch.LongTensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.LongTensor] = None,
              past_key_values: Optional[PLTCache] = None,
              inputs_embeds: Optional[torch.Tensor] = None,
              labels: Optional[torch.LongTensor] = None,
              use_cache: Optional[bool] = None,
              logits_to_keep: int = 0,
              return_dict: Optional[bool] = None,
              cache: Optional[PLTCache] = None,
              **kwargs):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=_given_cache(cache, past_key_values),
                     inputs_embeds=inputs_embeds, use_cache=use_cache)
    hidden = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
      hidden = hidden[:, -logits_to_keep:]
    elif not isinstance(logits_to_keep, int):
      hidden = hidden[:, logits_to_keep]
    logits = self.lm_head(hidden)
    loss = None
    if labels is not None:  # next-token cross-entropy; -100 marks ignored targets
      loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
    result = _output(CausalLMOutputWithPast, getattr(out, _cache_field(type(out))),
                     loss=loss, logits=logits)
    if return_dict is False:
      return result.to_tuple()
    return result


__all__ = ["PLTCache", "PLTForCausalLM", "PLTModel", "PLTPreTrainedModel"]
