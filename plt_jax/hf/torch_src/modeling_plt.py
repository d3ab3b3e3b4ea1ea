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

Decoding (`generate`) keeps a `PLTCache`: loop 1's keys/values for every token, each later loop's last
W - 1 keys/values (all of them in vanilla mode), and the last token's hn_r of loops 1..R-1. A
one-token step runs the R loops of the new token side by side as R rows of one pass through the
layers (row r needs only hn_{r-1} of the previous token, and loop 1's keys of this token, which row 1
writes in the same layer), so a decode step reads every weight once, whatever R is.
"""
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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """Softmax attention in float32, GQA-aware; rows without a visible key give 0.

  q [B, H, S, E]; k, v [B, K, T, E]; mask bool [B, 1, 1, S, T] (True = visible). Query head h
  reads key/value head h // (H / K), as in HF Llama's repeat_kv.
  """
  b, h, s, e = q.shape
  kh = k.shape[1]
  qg = q.float().reshape(b, kh, h // kh, s, e)
  scores = torch.einsum("bkgse,bkte->bkgst", qg, k.float()) * (e ** -0.5)
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
class PLTCache:
  """Decoding state of a PLT (not a `transformers.Cache`: its layout is PLT's own).

  keys[r][j] / values[r][j]: loop r+1's keys/values of layer j, [B, K, T_r, E]. Loop 1 (and every
  loop in vanilla mode) keeps all tokens; G-SWA loops keep only their last W - 1 tokens.
  hidden[r]: Norm_f(h_{r+1}) of the last token, [B, 1, d], the CLP input of loop r+2's next token.
  """
  is_compileable = False
  is_croppable = False

  def __init__(self, config: PLTConfig):
    self.num_loops = config.plt_num_loops
    self.num_layers = config.num_hidden_layers
    self.local_window = config.plt_window - 1 if config.plt_uses_gswa else None
    self.keys = [[None] * self.num_layers for _ in range(self.num_loops)]
    self.values = [[None] * self.num_layers for _ in range(self.num_loops)]
    self.hidden = [None] * max(self.num_loops - 1, 0)
    self.seq_len = 0

  def get_seq_length(self, layer_idx: int = 0) -> int:
    return self.seq_len

  def __len__(self) -> int:
    return self.num_layers

  def local_len(self) -> int:
    return min(self.seq_len, self.local_window)

  def append(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
    """Concatenates new keys/values after the stored ones; returns the concatenation."""
    if self.keys[loop][layer] is not None:
      k = torch.cat([self.keys[loop][layer], k], dim=2)
      v = torch.cat([self.values[loop][layer], v], dim=2)
    keep = k.shape[2] if (loop == 0 or self.local_window is None) else self.local_window
    # Clamp at 0: a negative start would slice from the end and drop keys still in the window.
    start = max(k.shape[2] - keep, 0)
    self.keys[loop][layer] = k[:, :, start:] if keep else k[:, :, :0]
    self.values[loop][layer] = v[:, :, start:] if keep else v[:, :, :0]
    return k, v

  def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
    for store in (self.keys, self.values):
      for per_loop in store:
        for j, t in enumerate(per_loop):
          if t is not None:
            per_loop[j] = t.index_select(0, beam_idx.to(t.device))
    self.hidden = [None if t is None else t.index_select(0, beam_idx.to(t.device))
                   for t in self.hidden]


# --------------------------------------------------------------------------------------- the layers
class PLTDecoderLayer(nn.Module):
  """One shared layer. `forward` is the only entry, so device-placement hooks see every call."""

  def __init__(self, config: PLTConfig, layer_idx: int):
    super().__init__()
    self.layer_idx = layer_idx
    self.window = config.plt_window
    self.input_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = PLTAttention(config)
    self.post_attention_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = PLTMLP(config)

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PLTCache,
              loop: int, mode: str, full_mask: torch.Tensor,
              local_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mode 'causal': causal attention over this loop's own keys (loop 1, vanilla loops);
    'gswa': G-SWA of loop `loop` (>= 1, zero-based) over loop 1's keys and its own window;
    'rows': one decode token, loop r on rows [r*B, (r+1)*B) of x (see module docstring)."""
    j = self.layer_idx
    attn = self.self_attn
    u = self.input_layernorm(x)
    q, k, v = attn.project(u, cos, sin)
    if mode == "causal":
      k_all, v_all = cache.append(loop, j, k, v)
      y = attend(q, k_all, v_all, full_mask)
    elif mode == "gswa":
      k1, v1 = cache.keys[0][j], cache.values[0][j]   # loop 1 already appended this chunk
      k_loc, v_loc = cache.append(loop, j, k, v)
      g = attn.plt_gate(x, q)
      y = _mix(g, attend(q, k1, v1, full_mask), attend(q, k_loc, v_loc, local_mask))
    elif mode == "rows":
      y = self._rows_attention(x, q, k, v, cache, full_mask, local_mask)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    x = x + attn.out(y)
    return x + self.mlp(self.post_attention_layernorm(x))

  def _rows_attention(self, x, q, k, v, cache, full_mask, local_mask):
    j, r_total = self.layer_idx, cache.num_loops
    b = x.shape[0] // r_total
    k1, v1 = cache.append(0, j, k[:b], v[:b])
    y1 = attend(q[:b], k1, v1, full_mask)
    # Loops 2..R of one token share loop 1's keys: stack them as R-1 queries of one attention.
    h, e = q.shape[1], q.shape[3]
    q_rest = q[b:].reshape(r_total - 1, b, h, e).permute(1, 2, 0, 3)        # [B, H, R-1, E]
    y_glob = attend(q_rest, k1, v1, full_mask)
    y_glob = y_glob.permute(2, 0, 1, 3).reshape((r_total - 1) * b, h, 1, e)
    k_loc, v_loc = [], []
    for r in range(1, r_total):
      kr, vr = cache.append(r, j, k[r * b:(r + 1) * b], v[r * b:(r + 1) * b])
      k_loc.append(kr)
      v_loc.append(vr)
    y_loc = attend(q[b:], torch.cat(k_loc, 0), torch.cat(v_loc, 0),
                   local_mask.repeat(r_total - 1, 1, 1, 1, 1))
    g = self.self_attn.plt_gate(x[b:], q[b:])
    return torch.cat([y1, _mix(g, y_glob, y_loc)], dim=0)


# ---------------------------------------------------------------------------------------- the models
class PLTPreTrainedModel(PreTrainedModel):
  config_class = PLTConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["PLTDecoderLayer"]
  _skip_keys_device_placement = ["past_key_values"]

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

  def forward(self, input_ids: Optional[torch.LongTensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.LongTensor] = None,
              past_key_values: Optional[PLTCache] = None,
              inputs_embeds: Optional[torch.Tensor] = None,
              use_cache: Optional[bool] = None,
              **kwargs) -> BaseModelOutputWithPast:
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if past_key_values is not None and not isinstance(past_key_values, PLTCache):
      raise ValueError(f"PLT keeps its own PLTCache; got past_key_values of type "
                       f"{type(past_key_values).__name__}")
    use_cache = c.use_cache if use_cache is None else use_cache
    e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    bsz, t = e.shape[:2]
    cache = past_key_values if past_key_values is not None else PLTCache(c)
    p = cache.seq_len
    dev = e.device

    # Key validity (padding) over the whole sequence so far, and positions of the new tokens.
    if attention_mask is not None:
      if attention_mask.dim() != 2 or attention_mask.shape[1] != p + t:
        raise ValueError(f"attention_mask must be 2-D [batch, past + new = {p + t}], "
                         f"got {tuple(attention_mask.shape)}")
      valid = attention_mask.to(dev).bool()
    else:
      valid = torch.ones(bsz, p + t, dtype=torch.bool, device=dev)
    if position_ids is None:
      if attention_mask is not None:
        position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)[:, p:]
      else:
        position_ids = torch.arange(p, p + t, device=dev)[None].expand(bsz, t)
    position_ids = position_ids.to(dev)
    cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta)

    # Masks in one index space: query i of this chunk is token p + i; keys are tokens 0 .. p+t-1.
    q_idx = torch.arange(p, p + t, device=dev)[:, None]
    k_idx = torch.arange(p + t, device=dev)[None, :]
    full_mask = ((k_idx <= q_idx)[None] & valid[:, None, :])[:, None, None]
    local_mask = None
    if c.plt_uses_gswa:
      lp = cache.local_len()
      kl = k_idx[:, p - lp:]
      local_mask = (((kl <= q_idx) & (q_idx - kl < c.plt_window))[None]
                    & valid[:, None, p - lp:])[:, None, None]

    r_total = c.plt_num_loops
    if t == 1 and c.plt_uses_gswa and self.parallel_decode:
      rows = [e] + [self._clp(e, cache.hidden[r - 1] if p > 0 else torch.zeros_like(e),
                              position_ids) for r in range(1, r_total)]
      x = torch.cat(rows, dim=0)
      cos_r, sin_r = cos.repeat(r_total, 1, 1), sin.repeat(r_total, 1, 1)
      for layer in self.layers:
        x = layer(x, cos_r, sin_r, cache, 0, "rows", full_mask, local_mask)
      for r in range(r_total - 1):
        cache.hidden[r] = self._between_loops(x[r * bsz:(r + 1) * bsz])
      h = x[(r_total - 1) * bsz:]
    else:
      h = e
      for layer in self.layers:
        h = layer(h, cos, sin, cache, 0, "causal", full_mask)
      for r in range(1, r_total):
        if c.plt_loop_mode == "vanilla":
          x = h
          for layer in self.layers:
            x = layer(x, cos, sin, cache, r, "causal", full_mask)
        else:
          hn = self._between_loops(h)
          prev = cache.hidden[r - 1] if p > 0 else torch.zeros_like(hn[:, :1])
          x = self._clp(e, torch.cat([prev.to(hn.device, hn.dtype), hn[:, :-1]], dim=1),
                        position_ids)
          cache.hidden[r - 1] = hn[:, -1:]
          for layer in self.layers:
            x = layer(x, cos, sin, cache, r, "gswa", full_mask, local_mask)
        h = x
    cache.seq_len = p + t
    return BaseModelOutputWithPast(last_hidden_state=self.norm(h),
                                   past_key_values=cache if use_cache else None)


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
              **kwargs):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, past_key_values=past_key_values,
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
    result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
    if return_dict is False:
      return result.to_tuple()
    return result


__all__ = ["PLTCache", "PLTForCausalLM", "PLTModel", "PLTPreTrainedModel"]
