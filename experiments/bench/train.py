"""One training step of plt_jax against PyTorch on the same model, batch and threads.

The entry point is experiments/bench_train.py; `settings` below is its parsed flags (any object
with those attributes).

A step is forward, backward, global-norm clipping and AdamW (the default preset's optimizer
settings: b 0.9 / 0.95, eps 1e-15, decay 0.1 on matrices only) on random tokens, at a constant
learning rate (a schedule is one scalar per step: it does not change the work):
  * plt_jax: the trainer's compiled step, `train.Program.get(...).train_step`, on one device, with
    the config's attention backend (`attention_impl`; several are timed side by side);
  * PyTorch: transformers' `LlamaForCausalLM` for R = 1, the exported PLT modeling file
    (plt_jax/hf/torch_src/modeling_plt.py) for R >= 2, trained through its `labels` loss, then
    `torch.nn.utils.clip_grad_norm_` and `torch.optim.AdamW` (its default implementation).
Both start from the same weights (the plt_jax init, converted as the exporter does) and see the
same tokens, so their first-step losses agree, and after one identical update their second-step
losses too; both are recorded as the check that the two sides train one model. Steps of all
sides alternate in one process (`profiling.time_interleaved`), so load from other processes falls
on each alike; medians, minima and quartiles are reported. ratio = plt_jax ms / torch ms (median).

Threads: PyTorch gets `threads` intra-op threads; XLA:CPU sizes its intra-op pool when its client
starts (from the NPROC environment variable; the entry point sets it before jax starts). The
pool's real size is read back and recorded; a mismatch is reported.

With a profile directory, each plt_jax side traces a few more steps with `jax.profiler.trace`
into DIR/<shape>_r<R>_<impl> (open with TensorBoard / XProf), and the CPU time of its top XLA ops
and of each named scope (`train.PROFILE_SCOPES`, forward and backward apart) is printed and
recorded.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from plt_jax import attention as attention_lib
from plt_jax import presets
from experiments.bench import profiling
from plt_jax import sharding as sharding_lib
from plt_jax import train as train_lib
from plt_jax.config import ModelConfig

SHAPES = {
    # A few-second smoke test (the tests use it): 2 layers, a window shorter than the sequence.
    'tiny': dict(model=dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, ffn_dim=48, window_size=5, max_seq_len=64,
                            rope_theta=10_000.0),
                 batch=2, seq_len=24),
    # The default preset as `make train` runs it (the default BPE tokenizer's vocabulary).
    'default': dict(model=dict(presets.PRESETS['default'].model.to_dict(), vocab_size=2048),
                   batch=16, seq_len=128),
    # ~25M parameters: 23.6M in the layers, 32.0M with embedding and head.
    '25m': dict(model=dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, ffn_dim=1408,
                           vocab_size=8192, max_seq_len=2048, window_size=65),
                batch=8, seq_len=256),
}

# Program.get's total_steps: under the constant schedule it changes nothing.
_TOTAL_STEPS = 1000


def model_config(shape: str, loops: int, attention_impl: str = 'auto') -> ModelConfig:
  if shape not in SHAPES:
    raise ValueError(f'unknown shape {shape!r}; choose from {sorted(SHAPES)}')
  return ModelConfig(**{**SHAPES[shape]['model'], 'num_loops': loops,
                        'attention_impl': attention_impl})


def optimizer_config():
  """The default preset's optimizer at a constant learning rate (what the PyTorch side runs)."""
  opt = presets.get_config('default', num_loops=1).optimizer
  opt.schedule, opt.warmup_steps = 'constant', 0
  return opt


def random_batch(vocab: int, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """The trainer's batch layout on seq_len + 1 random tokens. The last position carries no loss,
  so the loss covers the same seq_len - 1 predictions as PyTorch's `labels` loss on `inputs`."""
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  loss_mask = np.ones((batch, seq_len), np.float32)
  loss_mask[:, -1] = 0.0
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions.copy(),
              segment_ids=np.ones((batch, seq_len), np.int32), loss_mask=loss_mask)


# ------------------------------------------------------------------------------------ sides
class JaxSide:
  """The trainer's compiled step on one device. `step()` runs one and returns its loss once the
  new state is ready."""

  def __init__(self, model_cfg: ModelConfig, opt_cfg, batch: dict, seed: int):
    self.cfg = model_cfg
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.program = train_lib.Program.get(model_cfg, opt_cfg, _TOTAL_STEPS, mesh)
    self.batch = train_lib.device_batch(batch, sharding_lib.batch_sharding(mesh))
    self.seed = seed
    self.state = self.program.init(seed)
    self.backend = attention_lib.get_backend(model_cfg.attention_impl).name
    t0 = time.perf_counter()
    self.first_loss = self.step()
    self.compile_s = time.perf_counter() - t0  # compile + first step

  def step(self) -> float:
    self.state, m = self.program.train_step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return float(m['loss'])

  def initial_hf_tensors(self) -> dict[str, np.ndarray]:
    """The initial weights (the seed's), named and laid out as the exporter writes them."""
    from plt_jax.hf import convert  # pylint: disable=import-outside-toplevel
    model = nnx.merge(self.program.graphdef, self.program.init(self.seed)).model
    return convert.jax_to_hf_tensors(model)

  def compiled(self):
    """The step's compiled executable (its HLO names the ops of a profile)."""
    return self.program.train_step.lower(self.state, self.batch).compile()


class TorchSide:
  """The PyTorch model of `model_cfg` with `tensors` as weights, AdamW as plt_jax's optimizer."""

  def __init__(self, model_cfg: ModelConfig, opt_cfg, tensors: dict, batch: dict, threads: int):
    # pylint: disable=import-outside-toplevel
    import torch
    import transformers
    from plt_jax.hf import convert
    from plt_jax.hf.torch_src import configuration_plt, modeling_plt
    # pylint: enable=import-outside-toplevel
    self.torch = torch
    torch.set_num_threads(threads)
    hf = {k: v for k, v in convert.hf_config_dict(model_cfg).items()
          if k not in ('architectures', 'auto_map', 'model_type', 'torch_dtype')}
    if model_cfg.num_loops == 1:
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          **{k: v for k, v in hf.items() if not k.startswith('plt_')}))
    else:
      model = modeling_plt.PLTForCausalLM(configuration_plt.PLTConfig(**hf))
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}, strict=False)
    if unexpected or [k for k in missing if not k.endswith('inv_freq')]:
      raise ValueError(f'weights do not match the PyTorch model: missing {missing}, '
                       f'unexpected {unexpected}')
    model.train()
    self.model, self.clip_norm = model, opt_cfg.clip_norm
    self.model_name = type(model).__name__
    self.attention = getattr(model.config, '_attn_implementation', None)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # as plt_jax.train.optimizer.decay_mask
    keep = [p for p in model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=opt_cfg.weight_decay),
                                  dict(params=keep, weight_decay=0.0)],
                                 lr=opt_cfg.peak_lr, betas=(opt_cfg.b1, opt_cfg.b2),
                                 eps=opt_cfg.eps)
    self.ids = torch.from_numpy(batch['inputs'].astype(np.int64))
    self.first_loss = self.step()

  def step(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
    loss.backward()
    if self.clip_norm > 0:
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.opt.step()
    return float(loss.detach())


def jax_name(impl: str) -> str:
  return f'plt_jax:{impl}'


# ------------------------------------------------------------------------------------ cases
def run_case(shape: str, loops: int, *, attention_impls: Sequence[str] = ('auto',),
             steps: int = 8, warmup: int = 2, seed: int = 0, threads: int = 1,
             with_torch: bool = True, profile_dir: Optional[str] = None,
             profile_steps: int = 3, top: int = 25) -> dict[str, Any]:
  """Times every plt_jax attention_impl and PyTorch at one (shape, R), interleaved. The record:
  shape, R, batch, seq_len, tokens_per_step, params; attention_impls and attention_backend (the
  backend each resolved to); torch_model, torch_attention; per side ('plt_jax:<impl>', 'torch'):
  compile_s (plt_jax: compile + first step), first_loss, second_loss, sides (summarize_times +
  tokens_per_s); ratio and ratio_min per impl (plt_jax / torch, median and min ms); loadavg_1min
  before and after; with profile_dir, profile per impl (`profile_case`)."""
  spec = SHAPES[shape]
  b, s = spec['batch'], spec['seq_len']
  opt_cfg = optimizer_config()
  base = model_config(shape, loops)
  batch = random_batch(base.vocab_size, b, s, seed)
  jsides = {jax_name(i): JaxSide(base.replace(attention_impl=i), opt_cfg, batch, seed)
            for i in attention_impls}
  sides: dict[str, Any] = dict(jsides)
  rec: dict[str, Any] = dict(
      shape=shape, R=loops, batch=b, seq_len=s, tokens_per_step=b * s,
      params=base.param_count(), attention_impls=list(attention_impls),
      attention_backend={i: jsides[jax_name(i)].backend for i in attention_impls},
      compile_s={k: v.compile_s for k, v in jsides.items()})
  if with_torch:
    ref = next(iter(jsides.values()))
    sides['torch'] = TorchSide(base, opt_cfg, ref.initial_hf_tensors(), batch, threads)
    rec.update(torch_model=sides['torch'].model_name, torch_attention=sides['torch'].attention)
  rec['first_loss'] = {k: v.first_loss for k, v in sides.items()}
  rec['second_loss'] = {k: v.step() for k, v in sides.items()}  # after one identical update
  load0 = os.getloadavg()[0]
  times = profiling.time_interleaved({k: v.step for k, v in sides.items()}, steps=steps,
                                     warmup=warmup)
  rec['loadavg_1min'] = [load0, os.getloadavg()[0]]
  rec['sides'] = {}
  for name, ts in times.items():
    st = profiling.summarize_times(ts)
    st['tokens_per_s'] = b * s / (st['median_ms'] / 1e3)
    rec['sides'][name] = st
  if with_torch:
    t = rec['sides']['torch']
    rec['ratio'] = {i: rec['sides'][jax_name(i)]['median_ms'] / t['median_ms']
                    for i in attention_impls}
    rec['ratio_min'] = {i: rec['sides'][jax_name(i)]['min_ms'] / t['min_ms']
                        for i in attention_impls}
  if profile_dir:
    rec['profile'] = {i: profile_case(jsides[jax_name(i)], os.path.join(
        profile_dir, f'{shape}_r{loops}_{i}'), steps=profile_steps, top=top)
                      for i in attention_impls}
  return rec


def profile_case(side: JaxSide, trace_dir: str, *, steps: int = 3, top: int = 25) -> dict:
  """Traces `steps` steps of `side` into trace_dir; the op profile (top ops only) and XLA's own
  FLOP count of the step (`cost_analysis`)."""
  os.makedirs(trace_dir, exist_ok=True)
  compiled = side.compiled()
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      side.step()
  prof = profiling.xla_op_profile(trace_dir, hlo_text=compiled.as_text(),
                                  scopes=train_lib.PROFILE_SCOPES)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
  prof['xla_gflop_per_step'] = float(cost.get('flops', float('nan'))) / 1e9
  prof['ops'] = prof['ops'][:top]
  prof['trace_dir'] = trace_dir
  return prof


# ------------------------------------------------------------------------------------ output
def format_table(records: list[dict]) -> str:
  """ms/step and tokens/s of every side, and each plt_jax side's ratio to torch."""
  names = []
  for r in records:
    names += [n for n in r['sides'] if n not in names]
  names.sort(key=lambda n: n == 'torch')  # plt_jax sides first
  ratios = [n for n in names if n != 'torch' and any(n.split(':', 1)[1] in r.get('ratio', {})
                                                     for r in records)]
  head = f'{"shape":8s} {"R":>2s} {"params":>7s}'
  for n in names:
    head += f' {n + " ms":>16s} {"tok/s":>8s}'
  for n in ratios:
    head += f' {n.split(":", 1)[1] + "/torch":>11s}'
  lines = [head, '-' * len(head)]
  for r in records:
    line = f'{r["shape"]:8s} {r["R"]:2d} {r["params"] / 1e6:6.2f}M'
    for n in names:
      st = r['sides'].get(n)
      line += (f' {st["median_ms"]:16.1f} {st["tokens_per_s"]:8.0f}' if st else
               f' {"-":>16s} {"-":>8s}')
    for n in ratios:
      x = r.get('ratio', {}).get(n.split(':', 1)[1])
      line += f' {x:11.2f}' if x is not None else f' {"-":>11s}'
    lines.append(line)
  return '\n'.join(lines)


def environment(threads: int, with_torch: bool) -> dict[str, Any]:
  jax.devices()  # start the backend, so its thread pool exists
  env = dict(jax=jax.__version__, backend=jax.default_backend(),
             python=platform.python_version(), threads=threads,
             nproc_env=os.environ.get('NPROC'),
             omp_num_threads_env=os.environ.get('OMP_NUM_THREADS'),
             xla_pool_threads=profiling.xla_pool_threads(),
             cpu=platform.processor() or platform.machine(),
             cpus_usable=len(os.sched_getaffinity(0)), xla_flags=os.environ.get('XLA_FLAGS', ''))
  if with_torch:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    env.update(torch=torch.__version__, transformers=transformers.__version__)
  return env


def run(settings) -> dict[str, Any]:
  """Every (shape, R) of `settings`: prints progress, the table and the profiles; returns
  {'env', 'steps', 'warmup', 'records'}."""
  with_torch = not settings.no_torch
  env = environment(settings.threads, with_torch)
  print(f'threads: torch {settings.threads}, XLA:CPU pool {env["xla_pool_threads"]} '
        f'(NPROC={env["nproc_env"]}); jax backend {env["backend"]}', flush=True)
  if env['xla_pool_threads'] not in (-1, settings.threads):
    warnings.warn(f'XLA:CPU runs {env["xla_pool_threads"]} intra-op threads, not '
                  f'{settings.threads}: its pool is sized when jax starts (NPROC), so set '
                  '--threads on the command line of experiments.bench_train', stacklevel=2)
  records = []
  for shape in settings.shapes:
    for loops in settings.loops:
      rec = run_case(shape, loops, attention_impls=settings.attention_impl,
                     steps=settings.steps, warmup=settings.warmup, seed=settings.seed,
                     threads=settings.threads, with_torch=with_torch,
                     profile_dir=settings.profile, profile_steps=settings.profile_steps,
                     top=settings.top)
      records.append(rec)
      losses = ', '.join(f'{k} {v:.5f}/{rec["second_loss"][k]:.5f}'
                         for k, v in rec['first_loss'].items())
      times = ', '.join(f'{k} {v["median_ms"]:.1f} ms' for k, v in rec['sides'].items())
      print(f'{shape} R={loops}: losses (step 1/2) {losses}; {times}', flush=True)
      for impl, prof in rec.get('profile', {}).items():
        print(f'\n--- profile {shape} R={loops} {jax_name(impl)} ({prof["trace_dir"]}); '
              f'XLA cost analysis {prof["xla_gflop_per_step"]:.3f} GFLOP/step', flush=True)
        print(profiling.format_op_profile(prof, settings.top), flush=True)
  print('\n' + format_table(records), flush=True)
  return dict(env=env, steps=settings.steps, warmup=settings.warmup, records=records)


def write_json(out: dict, path: Optional[str]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(out, f, indent=1, default=float)
  print(f'wrote {path}', flush=True)
