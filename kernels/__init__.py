"""Pallas kernels behind plt_jax.attention (registered on import).

  'pallas': fused G-SWA + causal flash attention (kernels/ops.py): Pallas-Triton on GPU,
            Pallas-Mosaic (splash style) on TPU, Pallas interpret mode elsewhere (tests only).
  'cudnn':  jax.nn.dot_product_attention(implementation='cudnn') per branch + XLA gating
            (the baseline; XLA implementation off GPU).
"""
from plt_jax import attention as _attention


def _pallas_impl() -> '_attention.AttentionImpl':
  from kernels import ops  # pylint: disable=import-outside-toplevel
  return _attention.AttentionImpl('pallas', ops.causal, ops.gswa)


def _cudnn_impl() -> '_attention.AttentionImpl':
  from kernels import cudnn  # pylint: disable=import-outside-toplevel
  return _attention.AttentionImpl('cudnn', cudnn.causal, cudnn.gswa)


_attention.register('pallas', _pallas_impl)
_attention.register('cudnn', _cudnn_impl)
