"""Configuration of a Parallel Loop Transformer (PLT) exported from plt_jax.

Self-contained (torch + transformers only), so it can ship inside a model directory and be loaded by
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`. The field names are those of the
LoopCoder-V2 release's config.json: the Llama fields plus

  plt_num_loops               R, how many times the shared layer stack runs (1 = plain Llama)
  plt_window_size             [W - 1, 0]: FlashAttention-style (left, right) window of the local
                              branch of G-SWA; W counts the token itself
  plt_normalize_per_loop      apply the final RMSNorm (model.norm) between loops
  plt_emb_scale               a in the cross-loop input  a * E[i] + b * h_{r-1}[i-1]  (None = 1.0)
  plt_hidden_scale            b                                                       (None = 1.0)
  plt_gate_use_hidden_states  True: g = sigmoid(W RMSNorm_g(x) + b) on the residual, W [H, d];
                              False (the default, as in the release's configuration class):
                              g_h = sigmoid(q_h . w_h + b_h) on the post-RoPE query, w [H, E]
and one field of ours, absent from the release (which means 'plt'):
  plt_loop_mode               'plt' (CLP + G-SWA) or 'vanilla' (each loop feeds the next, no shift,
                              no gate, full causal attention over each loop's own keys)
"""
from transformers import PretrainedConfig


class PLTConfig(PretrainedConfig):
  model_type = "plt_llama"
  keys_to_ignore_at_inference = ["past_key_values", "cache"]

  def __init__(
      self,
      vocab_size=76800,
      hidden_size=5120,
      intermediate_size=27648,
      num_hidden_layers=14,
      num_attention_heads=40,
      num_key_value_heads=None,
      head_dim=None,
      hidden_act="silu",
      max_position_embeddings=131072,
      initializer_range=0.02,
      rms_norm_eps=1e-5,
      use_cache=True,
      pad_token_id=None,
      bos_token_id=1,
      eos_token_id=2,
      tie_word_embeddings=False,
      rope_theta=500000.0,
      attention_bias=False,
      attention_dropout=0.0,
      mlp_bias=False,
      plt_num_loops=2,
      plt_window_size=None,
      plt_normalize_per_loop=True,
      plt_emb_scale=None,
      plt_hidden_scale=None,
      plt_gate_use_hidden_states=False,
      plt_loop_mode="plt",
      **kwargs,
  ):
    # RoPE scaling is not part of PLT; refuse it rather than silently ignoring it.
    for key in ("rope_scaling", "rope_parameters"):
      rope = kwargs.pop(key, None)
      if rope:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
          raise ValueError(f"PLTConfig: {key} of type {rope_type!r} is not supported")
        rope_theta = rope.get("rope_theta", rope_theta)
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = (num_attention_heads if num_key_value_heads is None
                                else num_key_value_heads)
    self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
    self.hidden_act = hidden_act
    self.max_position_embeddings = max_position_embeddings
    self.initializer_range = initializer_range
    self.rms_norm_eps = rms_norm_eps
    self.use_cache = use_cache
    self.rope_theta = float(rope_theta)
    self.attention_bias = attention_bias
    self.attention_dropout = attention_dropout
    self.mlp_bias = mlp_bias
    self.plt_num_loops = int(plt_num_loops)
    self.plt_window_size = list(plt_window_size) if plt_window_size is not None else [64, 0]
    self.plt_normalize_per_loop = bool(plt_normalize_per_loop)
    self.plt_emb_scale = plt_emb_scale
    self.plt_hidden_scale = plt_hidden_scale
    self.plt_gate_use_hidden_states = bool(plt_gate_use_hidden_states)
    self.plt_loop_mode = plt_loop_mode
    self._check()
    super().__init__(
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **kwargs,
    )

  def _check(self):
    def bad(msg):
      raise ValueError(f"PLTConfig: {msg}")
    if self.plt_num_loops < 1:
      bad(f"plt_num_loops={self.plt_num_loops} must be >= 1")
    if self.plt_loop_mode not in ("plt", "vanilla"):
      bad(f"plt_loop_mode={self.plt_loop_mode!r} must be 'plt' or 'vanilla'")
    w = self.plt_window_size
    if len(w) != 2 or int(w[1]) != 0 or int(w[0]) < 0:
      bad(f"plt_window_size={w} must be [W - 1, 0] with W >= 1 (causal, no right context)")
    if self.hidden_act != "silu":
      bad(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
    if self.attention_bias or self.mlp_bias:
      bad("attention_bias / mlp_bias are not supported (PLT has no projection biases)")
    if self.num_attention_heads % self.num_key_value_heads:
      bad(f"num_key_value_heads={self.num_key_value_heads} must divide "
          f"num_attention_heads={self.num_attention_heads}")

  # Derived values the model uses.
  @property
  def plt_window(self) -> int:
    """W: local keys i-W+1 .. i, the query's own position included."""
    return int(self.plt_window_size[0]) + 1

  @property
  def plt_uses_gswa(self) -> bool:
    return self.plt_loop_mode == "plt" and self.plt_num_loops > 1


__all__ = ["PLTConfig"]
