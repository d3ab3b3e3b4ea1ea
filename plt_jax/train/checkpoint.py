"""Orbax checkpoints of a training run, and `load_for_inference` for decoding/export.

The directory may be local or a gs:// URL: Orbax and tensorstore write the arrays there
themselves, and every other file of a work dir goes through `plt_jax.fileio`.

A checkpoint step directory holds four items:
  params     the model parameters (float32), sharded arrays
  opt_state  the optimizer (AdamW moments, its step counter)
  data       the grain iterator position (one JSON file per process)
  meta       {'step', 'config'} as JSON
Orbax writes each step into a temporary directory and renames it when every item is written,
so a step directory without the temporary suffix is complete; in object storage, which has no
rename, it writes the step in place and marks it complete with a commit_success.txt written
last. `all_steps()` lists only complete steps; an unfinished one (a killed save) is ignored and
cleaned up by the next writer. Restores take abstract arrays
carrying the *target* sharding, so a checkpoint written on one mesh loads onto any other.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any, Optional

from flax import nnx
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from plt_jax import fileio
from plt_jax import sharding as sharding_lib
from plt_jax.config import ModelConfig
from plt_jax.model import PLT
from plt_jax.tokenizer import Tokenizer

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
TOKENIZER_DIR = 'tokenizer'


# ------------------------------------------------------------------------- state <-> trees

def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def state_to_tree(state: nnx.State) -> dict:
  """Plain nested dict of arrays with string keys (what Orbax stores)."""
  return _str_keys(nnx.to_pure_dict(state))


def abstract_tree(abstract_state: nnx.State, shardings) -> dict:
  """ShapeDtypeStructs carrying the target shardings: the restore target."""
  flat_state = dict(nnx.to_flat_state(abstract_state))
  flat_shard = dict(nnx.to_flat_state(shardings))
  out = {}
  for path, var in flat_state.items():
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    sharding = flat_shard[path]
    if isinstance(sharding, nnx.Variable):
      sharding = sharding.get_value()
    out[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
  return _str_keys(nnx.traversals.unflatten_mapping(out))


def tree_into_state(abstract_state: nnx.State, tree: dict) -> nnx.State:
  """Returns a copy of `abstract_state` holding the restored arrays of `tree`."""
  state = jax.tree.map(lambda x: x, abstract_state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.replace_by_pure_dict(state, tree)
  return state


class _FrozenIteratorState:
  """The grain iterator's position captured at save time.

  grain's handler calls `get_state()` when the save runs; with async saves that could be after
  the loop has already drawn more batches, so we hand it a snapshot. It returns the same JSON
  the handler writes for a live `DatasetIterator`, and restores go to the live iterator.
  """

  def __init__(self, state: Any):
    self._json = json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._json


# --------------------------------------------------------------------------- the manager

class _DropReadOnlyNotice(logging.Filter):
  """Orbax warns whenever a manager is opened read-only (the directory 'is read only', the save
  interval set to 0); for a reader that is the intended mode, not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return 'read only' not in msg and 'read_only=True' not in msg


@contextlib.contextmanager
def _quiet_read_only():
  absl_logger = logging.getLogger('absl')
  notice = _DropReadOnlyNotice()
  absl_logger.addFilter(notice)
  try:
    yield
  finally:
    absl_logger.removeFilter(notice)


class Checkpointer:
  """An async Orbax CheckpointManager keeping the last `max_to_keep` complete steps.

  read_only: for readers (inference, evaluation, export) that may run while training writes
  to the same directory; they neither save nor delete, in particular not the temporary
  directory of a save in flight (a writer removes stale ones when it starts).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = fileio.abspath(directory)
    if read_only:
      with _quiet_read_only():
        options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save)
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def has_item(self, step: int, name: str) -> bool:
    """Whether complete step `step` holds item `name` (an imported checkpoint has no 'data')."""
    return fileio.isdir(fileio.join(self.directory, str(step), name))

  def save(self, step: int, params: nnx.State, opt_state: nnx.State, data_state: Any,
           meta: dict, *, force: bool = True) -> bool:
    items = dict(
        params=ocp.args.StandardSave(state_to_tree(params)),
        opt_state=ocp.args.StandardSave(state_to_tree(opt_state)),
        meta=ocp.args.JsonSave({'step': int(step), **meta}),
    )
    if data_state is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, *, params_target: Optional[dict] = None,
              opt_target: Optional[dict] = None, data_iter: Any = None,
              meta: bool = False) -> dict:
    """Restores the named items of `step` (targets from `abstract_tree`)."""
    items = {}
    if params_target is not None:
      items['params'] = ocp.args.StandardRestore(params_target)
    if opt_target is not None:
      items['opt_state'] = ocp.args.StandardRestore(opt_target)
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    if meta:
      items['meta'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {k: restored[k] for k in items}

  def data_state(self, step: int, process_index: int, process_count: int) -> Optional[dict]:
    """This process's data iterator state in complete step `step` (None without a 'data' item),
    also when the checkpoint was written by another number of processes.

    Each process saved its own file. With the same count this process reads its own; with
    another count, iterator states made of lanes of the global batch ({'lanes', 'first_lane',
    'batch_size'}, plt_jax.data) are merged and cut into this process's lanes, and states that
    are the same on every process (a synthetic task's batch count) are used as they are.
    """
    d = fileio.join(self.directory, str(step), 'data')
    names = [n for n in fileio.listdir(d) if re.fullmatch(r'process_\d+-of-\d+\.json', n)]
    if not names:
      return None
    own = f'process_{process_index}-of-{process_count}.json'
    if own in names:
      return fileio.read_json(fileio.join(d, own))
    states = [fileio.read_json(fileio.join(d, n)) for n in sorted(names)]
    if all(isinstance(s, dict) and {'lanes', 'first_lane', 'batch_size'} <= set(s)
           for s in states):
      batch = int(states[0]['batch_size'])
      lanes = {int(s['first_lane']) + j: lane for s in states for j, lane in enumerate(s['lanes'])}
      if sorted(lanes) != list(range(batch)) or batch % process_count:
        raise ValueError(f'{d}: the data iterator states of {names} do not cover a batch of '
                         f'{batch} rows that {process_count} processes can split')
      local = batch // process_count
      first = process_index * local
      return dict(lanes=[lanes[first + j] for j in range(local)], first_lane=first,
                  batch_size=batch)
    if all(s == states[0] for s in states):
      return states[0]
    raise ValueError(f'{d}: checkpoint step {step} was written by {len(names)} processes '
                     f'({names}); its data iterator states cannot be split over '
                     f'{process_count}')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------- config.json

def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  path = fileio.join(workdir, CONFIG_FILE)
  fileio.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = fileio.join(workdir, CONFIG_FILE)
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a training work dir')
  return ml_collections.ConfigDict(fileio.read_json(path))


# ---------------------------------------------------------------------- inference

def load_for_inference(workdir: str, step: Optional[int] = None, mesh=None):
  """(model, config, tokenizer) from a training work dir; parameters only, no optimizer.

  step: a checkpoint step (default: the latest complete one). mesh: parameters are sharded on
  it by `plt_jax.sharding` rules; None puts them on the first device.
  """
  workdir = fileio.abspath(workdir)
  fileio.check_access(workdir, 'workdir')
  config = load_config(workdir)
  model_cfg = ModelConfig.from_dict(config.model)
  tokenizer = Tokenizer.from_pretrained(fileio.join(workdir, TOKENIZER_DIR))
  ckpt_dir = fileio.join(workdir, CHECKPOINT_DIR)
  if not fileio.isdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoints in {workdir!r} (expected {ckpt_dir})')
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f'{ckpt_dir} holds no complete checkpoint')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f'checkpoint step {step} not found in {ckpt_dir}; complete steps: {steps}')
    if mesh is None:
      mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract = nnx.eval_shape(lambda: PLT(model_cfg, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    shardings = sharding_lib.param_shardings(abstract_params, mesh)
    restored = ckpt.restore(step, params_target=abstract_tree(abstract_params, shardings))
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, tree_into_state(abstract_params, restored['params']))
  return model, config, tokenizer
