"""Pretraining: `train_and_evaluate(config, workdir)`, the one entry point of a run.

The absl launcher (experiments/pretrain.py) and the notebooks call it. It checks the config,
builds the mesh, the data and the train state (`step.Program`), restores the latest complete
checkpoint or initialises, and runs the loop (`loop.py`). The step math lives in `step.py`,
multi-process set-up in `distributed.py`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from plt_jax import data as data_lib
from plt_jax import fileio
from plt_jax import sharding as sharding_lib
from plt_jax.config import ModelConfig
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import flops as flops_lib
from plt_jax.train import metrics as metrics_lib
from plt_jax.train import optimizer as opt_lib
from plt_jax.train.step import Program, build_mesh, device_batch, normalized_loop_weights
from plt_jax.train.loop import Checkpoints, Evaluator, StepReporter, Throughput, run_steps

# ----------------------------------------------------------------------------- config checks

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def validate_config(config, mesh, process_count: int) -> None:
  t = config.train

  def bad(field, msg):
    raise ValueError(f'{field}: {msg}')
  for f in ('steps', 'batch_size', 'seq_len', 'grad_accum'):
    v = t[f]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      bad(f'train.{f}={v!r}', 'must be a positive integer')
  if t.seq_len > config.model.max_seq_len:
    bad(f'train.seq_len={t.seq_len}', f'exceeds model.max_seq_len={config.model.max_seq_len}')
  if t.batch_size % process_count:
    bad(f'train.batch_size={t.batch_size}', f'must be divisible by the {process_count} processes')
  if t.batch_size % t.grad_accum:
    bad(f'train.batch_size={t.batch_size}', f'must be divisible by train.grad_accum={t.grad_accum}')
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = t.batch_size // t.grad_accum
  if micro % shards:
    bad(f'train.batch_size={t.batch_size}',
        f'each microbatch ({micro} rows = batch_size / grad_accum) must split evenly over '
        f'mesh data x fsdp = {shards} devices')
  for f in ('every', 'max_to_keep'):
    if config.checkpoint[f] < 1:
      bad(f'checkpoint.{f}={config.checkpoint[f]!r}', 'must be >= 1')
  if config.eval.every < 0:
    bad(f'eval.every={config.eval.every!r}', 'must be >= 1, or 0 for no evaluation')


_IMPLEMENTATION_FIELDS = ('model.attention_impl:', 'model.remat:')


def _config_diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<missing>'), new.get(k, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f'{prefix}{k}.')
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f'{prefix}{k}: saved {a!r}, now {b!r}')
  return out


def _build_data(config: ml_collections.ConfigDict, workdir: str):
  """The data bundle; its tokenizer lands in workdir/tokenizer. With several processes, process 0
  prepares the source into shards (and makes the tokenizer) when they are not there yet, and the
  others then read them."""
  t = config.train
  build = lambda: data_lib.build_data(  # pylint: disable=g-long-lambda
      config.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed,
      workdir=workdir, process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() == 1:
    return build()
  is_main = jax.process_index() == 0
  data = build() if is_main else None
  multihost_utils.sync_global_devices('plt_jax: data ready')
  return data if is_main else build()


def _model_config(config: ml_collections.ConfigDict, tok) -> ModelConfig:
  """The model config with its vocabulary fitted to the tokenizer (written back into config)."""
  t = config.train
  if t.vocab_from_tokenizer:
    config.model.vocab_size = _round_up(tok.vocab_size, max(1, t.vocab_multiple))
  elif config.model.vocab_size < tok.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tok.vocab_size})')
  return ModelConfig.from_dict(config.model)


def _check_saved_config(config: ml_collections.ConfigDict, workdir: str, say) -> str:
  """Refuses a workdir that holds another model; notes other differences. Returns its path."""
  config_path = fileio.join(workdir, ckpt_lib.CONFIG_FILE)
  if fileio.exists(config_path):
    saved = ckpt_lib.load_config(workdir).to_dict()
    diff = _config_diff(saved, config.to_dict())
    # How attention is computed or what is rematerialised leaves the model itself unchanged: a
    # resume with other choices is allowed (with the note below), if not bit for bit.
    model_diff = [d for d in diff if d.startswith('model.')
                  and not d.startswith(_IMPLEMENTATION_FIELDS)]
    if model_diff:
      raise ValueError(f'{workdir} holds a run with a different model; use a new --workdir. '
                       f'Differences: {"; ".join(model_diff)}')
    if diff:
      logging.warning('config differs from the saved run: %s', '; '.join(diff))
      say(f'note: config differs from {config_path}: {"; ".join(diff)}')
  return config_path


def _restore_or_init(program: Program, ckpt: ckpt_lib.Checkpointer, data, seed: int, say):
  """(state, start step, whether it was restored): the latest complete checkpoint (with the data
  iterator's position, where saved), else a fresh init."""
  latest = ckpt.latest_step()
  if latest is None:
    return program.init(seed), 0, False
  abstract, shardings = program.abstract, program.shardings
  restored = ckpt.restore(
      latest, params_target=ckpt_lib.abstract_tree(abstract['model'], shardings['model']),
      opt_target=ckpt_lib.abstract_tree(abstract['optimizer'], shardings['optimizer']))
  # Read directly rather than through grain, so that a run may resume on another process count.
  data_state = ckpt.data_state(latest, jax.process_index(), jax.process_count())
  if data_state is not None:
    data.train_iter.set_state(data_state)
  state = ckpt_lib.tree_into_state(
      abstract, {'model': restored['params'], 'optimizer': restored['opt_state']})
  say(f'resumed from {ckpt.directory}/{latest}')
  return state, int(latest), True


def _val_record(records: list[dict], step: int, *, last: bool = False) -> Optional[dict]:
  """The first (or last) validation record of `step` among the metrics records."""
  records = [r for r in records if r.get('split') == 'val' and r.get('step') == step]
  if not records:
    return None
  return records[-1] if last else records[0]


def _checked_mesh(config: ml_collections.ConfigDict):
  """The device mesh, once the config passed every check (before any work)."""
  ModelConfig.from_dict(config.model)
  mesh = build_mesh(config.mesh)
  validate_config(config, mesh, jax.process_count())
  opt_lib.validate(config.optimizer, config.train.steps)
  return mesh


def _peak_flops(t: ml_collections.ConfigDict) -> Optional[float]:
  """Peak FLOP/s per device: train.peak_tflops_per_device where set, else the datasheet's."""
  if t.peak_tflops_per_device > 0:
    return t.peak_tflops_per_device * 1e12
  return flops_lib.peak_flops_per_device()


def _describe(say, model_cfg: ModelConfig, config, mesh, n_params: int, fpt: dict,
              stats: dict) -> None:
  """The run's model, mesh and data, in three lines."""
  t = config.train
  say(f'model: {n_params / 1e6:.2f}M params, R={model_cfg.num_loops} ({model_cfg.loop_mode}), '
      f'L={model_cfg.num_layers}, d={model_cfg.d_model}, vocab={model_cfg.vocab_size}, '
      f'dtype={model_cfg.dtype}; {fpt["train"] / 1e6:.1f} MFLOP/token (train)')
  say(f'mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} '
      f'device(s); batch {t.batch_size} x {t.seq_len} ({t.grad_accum} microbatch(es)); '
      f'steps {t.steps}')
  st = stats
  size = (f'{st["train_tokens"]:,} train / {st["val_tokens"]:,} val tokens, {st["train_rows"]:,} '
          f'rows (~{st["train_rows"] // max(1, t.batch_size)} steps per epoch)'
          if st['train_rows'] else
          f'training rows generated without end, {st["val_tokens"]:,} val tokens')
  say(f'data: {st["source"]}, {st["tokenizer"]} tokenizer ({st["vocab_size"]}), {size}')


def _first_evaluation(evaluator: Evaluator, state, start_step: int, at_start: bool, say):
  """The validation loss the run starts from: evaluated now for a new run (eval.at_start), read
  from the metrics of a resumed one."""
  if start_step == 0 and at_start:
    first_val = evaluator(state, 0)
    say(f'step 0: val loss {first_val["loss"]:.4f}')
    return first_val
  if start_step > 0:
    return _val_record(evaluator.writer.records(), 0)
  return None


def _program(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh):
  """(the compiled Program, the normalised per-loop loss weights or None)."""
  t = config.train
  loop_weights = normalized_loop_weights(t.get('loop_loss_weights', ()), model_cfg.num_loops)
  program = Program.get(model_cfg, config.optimizer, t.steps, mesh, grad_accum=t.grad_accum,
                        loop_weights=loop_weights)
  return program, loop_weights


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary of the run and its outputs.

  The checkpointer, the metric writers and the progress bar are closed on every exit, an error
  included, so a checkpoint being written asynchronously is always finished.
  """
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked private copy
  workdir = fileio.abspath(workdir)
  fileio.check_access(workdir, 'workdir')  # an unusable URL fails here, before any work
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  mesh = _checked_mesh(config)
  fileio.makedirs(workdir)
  say(f'workdir {workdir}')

  data = _build_data(config, workdir)
  model_cfg = _model_config(config, data.tokenizer)
  config_path = _check_saved_config(config, workdir, say)
  t = config.train
  program, loop_weights = _program(config, model_cfg, mesh)
  end_step = t.steps if t.stop_at_step < 0 else min(t.steps, t.stop_at_step)

  with contextlib.ExitStack() as cleanup:
    ckpt = ckpt_lib.Checkpointer(fileio.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                                 max_to_keep=config.checkpoint.max_to_keep,
                                 async_save=config.checkpoint.async_save)
    cleanup.callback(ckpt.close)  # waits for a save in flight
    state, start_step, restored = _restore_or_init(program, ckpt, data, config.seed, say)
    if is_main:
      ckpt_lib.save_config(workdir, config)

    n_params = sum(x.size for x in jax.tree.leaves(state['model']))
    fpt = flops_lib.flops_per_token(model_cfg, t.seq_len, loop_weights)
    _describe(say, model_cfg, config, mesh, n_params, fpt, data.stats)

    bsh = sharding_lib.batch_sharding(mesh)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main)
    cleanup.callback(writer.close)
    title = (f'R={model_cfg.num_loops} {model_cfg.loop_mode}, {n_params / 1e6:.1f}M params, '
             f'{config.preset}')
    evaluator = Evaluator(program.eval_step, [device_batch(b, bsh) for b in data.val_batches],
                          data.stats, writer=writer, title=title, is_main=is_main)
    first_val = _first_evaluation(evaluator, state, start_step,
                                  config.eval.at_start and config.eval.every > 0, say)
    checkpoints = Checkpoints(ckpt, last_saved=start_step if restored else None,
                              data_iter=data.train_iter, config=config)
    throughput = Throughput(t.batch_size * t.seq_len, fpt['train'], mesh.devices.size,
                            _peak_flops(t))
    progress = metrics_lib.Progress(t.steps, start_step, enabled=is_main and t.progress)
    reporter = StepReporter(writer, progress, throughput, checkpoints)
    with contextlib.closing(progress):
      state, step, stop, last_val = run_steps(
          state, start_step, end_step=end_step, train_step=program.train_step,
          train_iter=data.train_iter, batch_sharding=bsh, reporter=reporter,
          evaluator=evaluator, eval_every=config.eval.every, checkpoints=checkpoints,
          checkpoint_every=config.checkpoint.every)
    if stop:
      say(f'{stop}: saved a checkpoint at step {step}; run the same command to resume.')
    writer.flush()
    png = (metrics_lib.plot_loss_curve(writer.records(), writer.png_path, title) if is_main
           else None)

  if last_val is None and is_main:  # nothing left to train: report the saved one
    last_val = _val_record(metrics_lib.read_jsonl(writer.jsonl_path), step, last=True)
  steady_tps = throughput.steady
  summary = dict(
      workdir=workdir, start_step=start_step, step=step, steps=t.steps, stopped_by=stop,
      wall_seconds=time.time() - t_start, params=n_params,
      first_val_loss=first_val['loss'] if first_val else None,
      final_val_loss=last_val['loss'] if last_val else None,
      final_train_loss=reporter.last.get('loss'), tokens_per_s=steady_tps,
      tflops_per_device=throughput.rates(steady_tps)['tflops_per_device'] if steady_tps else None,
      checkpoints=ckpt.directory, checkpoint_steps=ckpt.all_steps() if is_main else None,
      metrics=writer.jsonl_path, tensorboard=writer.tb_dir, loss_curve=png,
      config=config_path, tokenizer=fileio.join(workdir, ckpt_lib.TOKENIZER_DIR),
      data_cache=data.stats.get('cache_dir'))
  if is_main:
    _print_summary(summary)
  return summary


def _print_summary(s: dict) -> None:
  def f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else 'n/a'
  lines = [
      '',
      f'done: step {s["step"]}/{s["steps"]} in {s["wall_seconds"] / 60:.1f} min'
      + (f' (stopped by {s["stopped_by"]})' if s['stopped_by'] else ''),
      f'  val loss      {f(s["first_val_loss"], ".4f")} -> {f(s["final_val_loss"], ".4f")}'
      f'   (train loss {f(s["final_train_loss"], ".4f")})',
      f'  throughput    {f(s["tokens_per_s"], ",.0f")} tokens/s, '
      f'{f(s["tflops_per_device"], ".3f")} TFLOP/s per device',
      f'  workdir       {s["workdir"]}',
      f'  checkpoints   {s["checkpoints"]}  steps {s["checkpoint_steps"]}',
      f'  metrics       {s["metrics"]}',
      f'  tensorboard   tensorboard --logdir {s["tensorboard"]}',
      f'  loss curve    {s["loss_curve"]}',
      f'  config        {s["config"]}',
      f'  tokenizer     {s["tokenizer"]}',
  ]
  print('\n'.join(lines), flush=True)
