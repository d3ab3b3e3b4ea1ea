"""A training run with the per-loop loss (train.loop_loss_weights) against a plain one."""
from helpers import tiny_run_config
from plt_jax import train
from plt_jax.train import metrics as metrics_lib


def test_a_run_trains_with_it(tmp_path):
  """A run with the per-loop loss: its train loss is the weighted loss (so it differs from the
  plain run's at step 1, from the same init and batch) while its validation loss stays the last
  loop's (equal at step 0)."""
  def first_losses(workdir, **extra):
    train.train_and_evaluate(
        tiny_run_config(**{'train.steps': 2, 'eval.every': 2, **extra}), workdir)
    recs = metrics_lib.read_jsonl(f'{workdir}/{metrics_lib.JSONL}')
    val0 = next(r['loss'] for r in recs if r['split'] == 'val' and r['step'] == 0)
    return next(r['loss'] for r in recs if r['split'] == 'train' and r['step'] == 1), val0

  plain = first_losses(str(tmp_path / 'plain'))
  weighted = first_losses(str(tmp_path / 'll'), **{'train.loop_loss_weights': (1.0, 1.0)})
  assert weighted[1] == plain[1]
  assert abs(weighted[0] - plain[0]) > 1e-4
  # Zero weight on every loop but the last: the same training, bit for bit.
  assert first_losses(str(tmp_path / 'zero'), **{'train.loop_loss_weights': (0.0, 2.0)}) == plain
