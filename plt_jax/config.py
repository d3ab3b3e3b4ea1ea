"""Model configuration: one frozen dataclass, validated before anything is traced.

The experiment presets (`plt_jax.presets`, which the `configs/` files call) hold experiment
settings; `ModelConfig.from_dict` turns their `model` section into this typed, checked object
that the model consumes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

LOOP_MODES = ('plt', 'vanilla')
GATE_MODES = ('hidden', 'query')
DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = ('auto', 'xla', 'pallas', 'cudnn', 'cpu')  # plt_jax.attention.BACKENDS
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_attention')


# Fields that earlier versions saved in config.json, with the one value they could hold.
_RETIRED_FIELDS = {'param_dtype': 'float32'}  # parameters are always float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of a (parallel) looped Llama-style decoder."""
  vocab_size: int = 512
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  ffn_dim: int = 384
  rope_theta: float = 500_000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048
  # Looping.
  num_loops: int = 2                 # R; R == 1 is a plain Llama.
  loop_mode: str = 'plt'             # 'plt' (CLP + G-SWA) or 'vanilla' (sequential baseline).
  window_size: int = 65              # W, local window INCLUDING the token itself (release: [64, 0] -> 65).
  emb_scale: float = 0.707           # a in  a*E[i] + b*Norm(h)[i-1]
  hidden_scale: float = 0.053        # b
  normalize_per_loop: bool = True    # apply Norm_f between loops (release: true)
  gate_mode: str = 'hidden'          # 'hidden' (release) or 'query' (IQuest-Coder-V1-Loop)
  # Numerics and implementation.
  dtype: str = 'float32'             # compute dtype; params are always float32
  init_std: float = 0.02
  remat: str = 'none'
  # The attention backend (plt_jax.attention.get_backend). 'auto': Pallas on GPU / TPU, else the
  # reference with the CPU decode kernel. Every backend computes the same math.
  attention_impl: str = 'auto'

  def __post_init__(self):
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def plt_uses_gswa(self) -> bool:
    """Whether loops 2..R read loop 1's keys through G-SWA (and the layers carry gates)."""
    return self.loop_mode == 'plt' and self.num_loops > 1

  def validate(self) -> None:
    def bad(field, msg):
      raise ValueError(f'ModelConfig.{field}={getattr(self, field)!r}: {msg}')

    for f in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
              'ffn_dim', 'max_seq_len'):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(f, 'must be a positive integer')
    if self.d_model % self.num_heads:
      bad('num_heads', f'must divide d_model={self.d_model}')
    if self.num_heads % self.num_kv_heads:
      bad('num_kv_heads', f'must divide num_heads={self.num_heads}')
    if self.head_dim % 2:
      bad('num_heads', f'head_dim=d_model/num_heads={self.head_dim} must be even for RoPE')
    if not isinstance(self.num_loops, int) or self.num_loops < 1:
      bad('num_loops', 'must be an integer >= 1')
    if not isinstance(self.window_size, int) or self.window_size < 1:
      bad('window_size', 'must be an integer >= 1 (it counts the token itself)')
    if self.loop_mode not in LOOP_MODES:
      bad('loop_mode', f'must be one of {LOOP_MODES}')
    if self.gate_mode not in GATE_MODES:
      bad('gate_mode', f'must be one of {GATE_MODES}')
    if self.dtype not in DTYPES:
      bad('dtype', f'must be one of {DTYPES}')
    if self.attention_impl not in ATTENTION_IMPLS:
      bad('attention_impl', f'must be one of {ATTENTION_IMPLS}')
    if self.remat not in REMAT_POLICIES:
      bad('remat', f'must be one of {REMAT_POLICIES}')
    if not self.rope_theta > 0:
      bad('rope_theta', 'must be > 0')
    if not self.norm_eps > 0:
      bad('norm_eps', 'must be > 0')
    if not self.init_std > 0:
      bad('init_std', 'must be > 0')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Builds from a mapping (e.g. an ml_collections ConfigDict), rejecting unknown keys."""
    if hasattr(d, 'to_dict'):
      d = d.to_dict()
    d = dict(d)
    for name, only in _RETIRED_FIELDS.items():  # configs saved by earlier versions
      if name in d and d.pop(name) != only:
        raise ValueError(f'ModelConfig: {name} must be {only!r} (the field is retired)')
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'ModelConfig: unknown field(s) {unknown}; known fields are {sorted(names)}')
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def param_count(self) -> int:
    """Analytic parameter count (tested against the real module tree)."""
    d, hd = self.d_model, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * d * self.ffn_dim
    norms = 2 * d
    gate = 0
    if self.plt_uses_gswa:
      gate = (self.num_heads * d + self.num_heads + d if self.gate_mode == 'hidden'
              else self.num_heads * hd + self.num_heads)
    per_layer = attn + mlp + norms + gate
    return self.num_layers * per_layer + 2 * self.vocab_size * d + d

