"""Names, layouts and config.json between plt_jax and the Hugging Face (LoopCoder-V2) format.

Parameter names: a plt_jax path `layers.3.self_attn.q_proj.kernel` is the release's
`model.layers.3.self_attn.q_proj.weight`. Projection kernels are stored [in, out] in JAX and
[out, in] in PyTorch (transposed); embedding, norms and the gate keep their shapes
(gate weight [n_heads, d] in 'hidden' mode, [n_heads, head_dim] in 'query' mode; bias [n_heads]).
`lm_head.kernel` [d, V] is `lm_head.weight` [V, d] (untied).

config.json: the Llama fields plus the release's plt_* fields; `plt_window_size = [W - 1, 0]`
(FlashAttention's (left, right) window, W counting the token itself). One field is ours:
`plt_loop_mode` ('plt' | 'vanilla'); a config without it (the release) means 'plt'. A config
without any plt_* field is a plain Llama (R = 1), so Llama checkpoints import too.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from plt_jax.config import ModelConfig

MODEL_TYPE = 'plt_llama'
ARCHITECTURE = 'PLTForCausalLM'
CONFIG_FILE = 'configuration_plt.py'
MODELING_FILE = 'modeling_plt.py'
AUTO_MAP = {
    'AutoConfig': 'configuration_plt.PLTConfig',
    'AutoModel': 'modeling_plt.PLTModel',
    'AutoModelForCausalLM': 'modeling_plt.PLTForCausalLM',
}
DTYPE_NAMES = {'f32': 'float32', 'float32': 'float32', 'fp32': 'float32',
               'bf16': 'bfloat16', 'bfloat16': 'bfloat16'}

# HF keys that carry no parameter of ours and are safe to drop on import.
_IGNORED_HF_KEYS = re.compile(r'.*rotary_emb\.inv_freq$')


def canonical_dtype(dtype: Any) -> str:
  """'float32' or 'bfloat16' from 'f32' / 'bf16' / numpy or jax dtypes."""
  name = getattr(dtype, 'name', None) or getattr(dtype, '__name__', None) or str(dtype)
  name = name.lower()
  if name not in DTYPE_NAMES:
    raise ValueError(f'dtype {dtype!r}: expected one of f32, bf16 (float32, bfloat16)')
  return DTYPE_NAMES[name]


def numpy_dtype(dtype: Any):
  if canonical_dtype(dtype) == 'bfloat16':
    return ml_dtypes.bfloat16
  return np.float32


# ------------------------------------------------------------------------------------ names
def jax_to_hf_name(path: Iterable[Any]) -> tuple[str, bool]:
  """(HF key, whether the array is transposed) of a plt_jax parameter path."""
  parts = [str(p) for p in path]
  if parts == ['embed_tokens', 'embedding']:
    return 'model.embed_tokens.weight', False
  if parts == ['lm_head', 'kernel']:
    return 'lm_head.weight', True
  leaf = parts[-1]
  if leaf == 'kernel':
    return 'model.' + '.'.join(parts[:-1] + ['weight']), True
  if leaf in ('weight', 'bias'):
    return 'model.' + '.'.join(parts), False
  raise ValueError(f'no Hugging Face name for plt_jax parameter {".".join(parts)!r}')


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor a model of this config has, with its PyTorch shape, in file order."""
  d, e, h, k = cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  out = {'model.embed_tokens.weight': (cfg.vocab_size, d)}
  for j in range(cfg.num_layers):
    p = f'model.layers.{j}.'
    out[p + 'input_layernorm.weight'] = (d,)
    out[p + 'self_attn.q_proj.weight'] = (h * e, d)
    out[p + 'self_attn.k_proj.weight'] = (k * e, d)
    out[p + 'self_attn.v_proj.weight'] = (k * e, d)
    out[p + 'self_attn.o_proj.weight'] = (d, h * e)
    if cfg.plt_uses_gswa:
      if cfg.gate_mode == 'hidden':
        out[p + 'self_attn.plt_gate.weight'] = (h, d)
        out[p + 'self_attn.plt_gate.gate_norm.weight'] = (d,)
      else:
        out[p + 'self_attn.plt_gate.weight'] = (h, e)
      out[p + 'self_attn.plt_gate.bias'] = (h,)
    out[p + 'post_attention_layernorm.weight'] = (d,)
    out[p + 'mlp.gate_proj.weight'] = (cfg.ffn_dim, d)
    out[p + 'mlp.up_proj.weight'] = (cfg.ffn_dim, d)
    out[p + 'mlp.down_proj.weight'] = (d, cfg.ffn_dim)
  out['model.norm.weight'] = (d,)
  out['lm_head.weight'] = (cfg.vocab_size, d)
  return out


def jax_to_hf_tensors(model, dtype: Any = 'float32') -> dict[str, np.ndarray]:
  """The model's parameters as HF-named host arrays (in file order), cast to `dtype`."""
  np_dtype = numpy_dtype(dtype)
  order = list(expected_hf_shapes(model.cfg))
  found = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transpose = jax_to_hf_name(path)
    arr = np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
    found[name] = np.ascontiguousarray(arr.T if transpose else arr).astype(np_dtype)
  missing, extra = sorted(set(order) - set(found)), sorted(set(found) - set(order))
  if missing or extra:
    raise ValueError(f'model parameters do not match its config: missing {missing}, '
                     f'unexpected {extra}')
  return {name: found[name] for name in order}


# ------------------------------------------------------------------------------- config.json
def hf_config_dict(cfg: ModelConfig, *, dtype: Any = 'float32', bos_token_id: Optional[int] = 1,
                   eos_token_id: Optional[int] = 2, pad_token_id: Optional[int] = None) -> dict:
  """config.json of an export: the release's fields (Llama + plt_*), our auto_map."""
  return {
      'architectures': [ARCHITECTURE],
      'auto_map': dict(AUTO_MAP),
      'model_type': MODEL_TYPE,
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.ffn_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_seq_len,
      'initializer_range': cfg.init_std,
      'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_scaling': None,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'tie_word_embeddings': False,
      'use_cache': True,
      'bos_token_id': bos_token_id,
      'eos_token_id': eos_token_id,
      'pad_token_id': pad_token_id,
      'torch_dtype': canonical_dtype(dtype),
      'plt_num_loops': cfg.num_loops,
      'plt_window_size': [cfg.window_size - 1, 0],
      'plt_normalize_per_loop': cfg.normalize_per_loop,
      'plt_emb_scale': cfg.emb_scale,
      'plt_hidden_scale': cfg.hidden_scale,
      'plt_gate_use_hidden_states': cfg.gate_mode == 'hidden',
      'plt_loop_mode': cfg.loop_mode,
  }


def model_config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig of an HF config.json (ours, the LoopCoder-V2 release's, or a plain Llama's).

  overrides: ModelConfig fields that config.json does not decide (dtype, attention_impl, remat,
  ...) or that you deliberately change (e.g. num_loops to run a checkpoint with another R).
  """
  def get(key, default=None):
    value = hf.get(key, default)
    return default if value is None else value

  def refuse(msg):
    raise ValueError(f'config.json: {msg}')

  for key in ('hidden_size', 'num_attention_heads', 'num_hidden_layers', 'intermediate_size',
              'vocab_size'):
    if key not in hf:
      refuse(f'missing required field {key!r}')
  d, h = int(hf['hidden_size']), int(hf['num_attention_heads'])
  head_dim = get('head_dim', d // h)
  if d % h or head_dim != d // h:
    refuse(f'head_dim={head_dim} with hidden_size={d}, num_attention_heads={h}: plt_jax needs '
           'head_dim = hidden_size / num_attention_heads')
  act = get('hidden_act', get('hidden_activation', 'silu'))
  if act != 'silu':
    refuse(f'hidden_act={act!r}: only SwiGLU (silu) is supported')
  for key in ('attention_bias', 'mlp_bias'):
    if get(key, False):
      refuse(f'{key}=true is not supported (PLT projections have no bias)')
  theta = get('rope_theta')
  for key in ('rope_parameters', 'rope_scaling'):
    rope = hf.get(key)
    if rope:
      rope_type = rope.get('rope_type', rope.get('type', 'default'))
      if rope_type != 'default':
        refuse(f'{key} of type {rope_type!r} is not supported (plain RoPE only)')
      theta = rope.get('rope_theta', theta)
  window = get('plt_window_size', [64, 0])
  if (not isinstance(window, (list, tuple)) or len(window) != 2 or int(window[1]) != 0
      or int(window[0]) < 0):
    refuse(f'plt_window_size={window!r}: expected [W - 1, 0] (causal window, no right context)')
  emb_scale, hidden_scale = hf.get('plt_emb_scale'), hf.get('plt_hidden_scale')
  fields = dict(
      vocab_size=int(hf['vocab_size']),
      d_model=d,
      num_layers=int(hf['num_hidden_layers']),
      num_heads=h,
      num_kv_heads=int(get('num_key_value_heads', h)),
      ffn_dim=int(hf['intermediate_size']),
      rope_theta=float(10_000.0 if theta is None else theta),
      norm_eps=float(get('rms_norm_eps', 1e-6)),
      max_seq_len=int(get('max_position_embeddings', 2048)),
      num_loops=int(get('plt_num_loops', 1)),
      loop_mode=str(get('plt_loop_mode', 'plt')),
      window_size=int(window[0]) + 1,
      emb_scale=1.0 if emb_scale is None else float(emb_scale),
      hidden_scale=1.0 if hidden_scale is None else float(hidden_scale),
      normalize_per_loop=bool(get('plt_normalize_per_loop', True)),
      # absent: the release's configuration class default, the query gate
      gate_mode='hidden' if get('plt_gate_use_hidden_states', False) else 'query',
      init_std=float(get('initializer_range', 0.02)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def is_ignored_hf_key(name: str) -> bool:
  return bool(_IGNORED_HF_KEYS.match(name))
