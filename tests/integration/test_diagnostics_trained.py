"""Loop diagnostics on trained tiny models (30 Adam steps each, so with the training runs): every
metric finite and shaped, the fixed-point gap equal to the next loop's step size, the report's
JSON and plots. The metrics' math on hand-made states is in tests/test_diagnostics.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import tiny_model_config
from plt_jax.model import PLT
from plt_jax.study import diagnostics as dg
from test_diagnostics import CFG, _batches


def _train_tiny(num_loops, loop_mode, steps=30):
  model = PLT(tiny_model_config(**CFG, num_loops=num_loops, loop_mode=loop_mode), nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  batch = {k: jnp.asarray(v) for k, v in _batches(n=1, seed=5)[0].items()}

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      lp = jax.nn.log_softmax(m(batch['inputs'], batch['positions'], batch['segment_ids']))
      nll = -jnp.take_along_axis(lp, batch['targets'][..., None], -1)[..., 0]
      return jnp.sum(nll * batch['loss_mask']) / jnp.sum(batch['loss_mask'])
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(steps)]
  assert losses[-1] < losses[0] - 0.5
  return model


@pytest.mark.parametrize('num_loops,loop_mode', [(1, 'plt'), (3, 'plt'), (2, 'vanilla')])
def test_trained_model_metrics_finite_and_shaped(num_loops, loop_mode, tmp_path):
  model = _train_tiny(num_loops, loop_mode)
  res = dg.diagnose(model, _batches(n=2))
  R = num_loops
  for key in ('step_size', 'effective_rank', 'fixed_point_gap', 'attn_entropy', 'lens_entropy',
              'lens_rank', 'lens_top1', 'lens_perplexity'):
    assert len(res[key]) == R and np.isfinite(res[key]).all(), key
  for key in ('alignment', 'offset_cost', 'attn_kl', 'lens_kl'):
    assert len(res[key]) == R and np.isnan(res[key][0]) and np.isfinite(res[key][1:]).all(), key
  assert np.asarray(res['gate']).shape == (R, CFG['num_layers'])
  if loop_mode == 'plt' and R > 1:
    g = np.asarray(res['gate'])[1:]
    assert np.isfinite(g).all() and ((g > 0) & (g < 1)).all()
  # For r < R the fixed-point gap is the next loop's step size (F(h_r) = h_{r+1}).
  np.testing.assert_allclose(res['fixed_point_gap'][:-1], res['step_size'][1:], rtol=1e-4)
  assert all(0 < e <= 17 for e in res['effective_rank'])
  assert res['tokens'] == 2 * 2 * 15
  paths = dg.write_report(res, str(tmp_path), title=f'R={R}')
  assert len(paths) == 1 + len(dg.FAMILIES)
  assert all((tmp_path / p.split('/')[-1]).stat().st_size > 5000 for p in paths[1:])  # PNGs
  saved = json.loads((tmp_path / 'diagnostics.json').read_text())
  assert saved['alignment'][0] is None and saved['step_size'] == pytest.approx(res['step_size'])
  assert 'step_size' in dg.format_table(res)
