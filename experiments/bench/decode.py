"""Decode benchmarks on one set of random weights: per-token latency, prefill time and KV-cache
bytes for R = 1..4, PLT vs vanilla (`run`), and a step against its weight projections alone
(`breakdown`). The entry points are experiments/bench_decode.py and bench_decode_breakdown.py;
`settings` below is their parsed flags (any object with those attributes).

Modes are LOOPMODE[_ROWMATMUL][+ATTENTION]: `plt` (the PLT step with row_matmul='auto' and
attention 'auto': on CPU its B*R rows go through each weight matrix with plt_jax/kernels/cpu_rows.py
and each layer's cached attention through plt_jax/kernels/cpu_decode.py where they build;
elsewhere one stacked XLA product and XLA attention), `plt_stacked+xla` (XLA only: one [B*R, D]
product per matrix and XLA's attention ops, what an accelerator runs), `plt_stacked`,
`plt_per_row`, `plt_kernel`, `plt+xla`, `plt+cpu`, and `vanilla` (R sequential passes of B rows,
'auto' as well; `vanilla_stacked+xla` etc.). Mixing XLA's products with the CPU kernels
(`plt_stacked`) is slower than either alone: the kernels' helper threads spin between calls, on the
cores XLA's pool uses. A variant that resolves like another at some batch size is listed once. The
`rows` and `attn` columns say how each configuration ran (`Decoder.step_runtime`: its matmul and
attention backend).
Every configuration uses the same weights (drawn once; the vanilla model is the PLT model without
its gates). Decode steps of all configurations are interleaved round by round, so load from other
processes hits them alike, and each reported latency is the median over all measured steps after
warm-up. One step = the jitted decode step (cache donated) + the argmax that feeds the next token.
KV bytes are measured from the cache arrays and checked against plt.md's formula
(`plt_jax.infer.decode.kv_cache_bytes`); `step_temp_bytes` is XLA's scratch allocation for one step,
which shows that the step does not copy the cache.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench import torch_timing
from plt_jax import loop_exit
from plt_jax.config import ModelConfig
from plt_jax.infer.decode import Decoder, cache_nbytes, kv_cache_bytes
from plt_jax.model import PLT
from plt_jax.runtime import decode_matmul

# About 101M parameters (75.5M in the 12 layers, 25.2M each in embedding and head): at batch 1 a
# decode step streams ~300 MB of float32 weights for a few hundred MFLOP, so it is memory-bound.
BENCH_MODEL = dict(vocab_size=16384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                   ffn_dim=2048, max_seq_len=4096, window_size=65)
SMALL_MODEL = dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_dim=384, max_seq_len=512, window_size=17)

# The exported PyTorch file against transformers' Llama at batch 1: step time, and torch ops per
# step (each op pays dispatch and, on several threads, a barrier that a busy core stretches).
TORCH_TARGETS = {
    'torch_plt_R2/torch_llama_R1': 1.3,
    'torch_plt_R2/torch_llama_R1_ops': 1.5,
}

TARGETS = {  # step-time ratios wanted at batch 1
    'plt_R2/plt_R1': 1.25,
    'plt_R4/plt_R1': 1.6,
    'plt_R2/vanilla_R2': 0.65,
}


def _param(name: str, shape, seed: int) -> np.ndarray:
  rng = np.random.default_rng(zlib.crc32(f'{seed}:{name}'.encode()))
  if 'layernorm' in name or 'norm.weight' in name or "['norm']" in name or 'gate_norm' in name:
    return np.ones(shape, np.float32)
  if 'plt_gate' in name:  # trained gates are not at their zero init; any values cost the same
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return (0.02 * rng.standard_normal(shape)).astype(np.float32)


class Weights:
  """One set of weights, shared (the same device arrays) by every model configuration."""

  def __init__(self, seed: int):
    self.seed, self.arrays = seed, {}

  def model(self, cfg: ModelConfig) -> PLT:
    model = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model))
    leaves = []
    for path, leaf in flat:
      name = jax.tree_util.keystr(path)
      key = (name, tuple(leaf.shape))
      if key not in self.arrays:
        self.arrays[key] = jnp.asarray(_param(name, leaf.shape, self.seed))
      leaves.append(self.arrays[key])
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@jax.jit
def _argmax(logits):
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class Run:
  """One (mode, R, batch) configuration: its decoder, live cache and measurements."""

  def __init__(self, weights: Weights, base: ModelConfig, mode: str, loops: int, batch: int,
               settings, max_len: int, rule: Optional[str] = None):
    self.mode, self.loops, self.batch = mode, loops, batch
    self.rule = loop_exit.ExitRule.parse(rule) if rule else None
    mode_rows, _, attention = mode.partition('+')
    loop_mode, _, row_matmul = mode_rows.partition('_')
    self.cfg = base.replace(loop_mode=loop_mode, num_loops=loops)
    self.model = weights.model(self.cfg)
    self.decoder = Decoder(self.model, max_len, row_matmul=row_matmul or 'auto',
                           attention=attention or 'auto', compiler_options=(
                               {'xla_backend_optimization_level': 0} if settings.small else None))
    step_rt = self.decoder.step_runtime(batch)
    self.row_matmul, self.attention = step_rt.matmul, step_rt.attention.name
    rng = np.random.default_rng(settings.seed + batch)
    self.prompts = [list(rng.integers(3, self.cfg.vocab_size, settings.prompt_len))
                    for _ in range(batch)]
    self.step_times: list[float] = []
    self.result: dict = {'mode': mode, 'R': loops, 'batch': batch, 'row_matmul': self.row_matmul,
                         'attention': self.attention, 'exit': str(self.rule or '')}
    self.rows_run: list[int] = []
    self.loops_used: list[float] = []

  @property
  def name(self) -> str:
    return f'{self.mode}_R{self.loops}' + (f'@{self.rule}' if self.rule else '')

  def prefill(self, reps: int):
    t0 = time.perf_counter()
    logits, cache = self.decoder.prefill(self.prompts)
    jax.block_until_ready(logits)
    self.result['prefill_compile_s'] = time.perf_counter() - t0
    times = []
    for _ in range(reps):
      del cache
      t0 = time.perf_counter()
      logits, cache = self.decoder.prefill(self.prompts)
      jax.block_until_ready((logits, cache))
      times.append(time.perf_counter() - t0)
    self.result['prefill_s'] = statistics.median(times)
    self.cache, self.tok = cache, _argmax(logits)
    measured = cache_nbytes(cache)
    analytic = kv_cache_bytes(self.cfg, self.batch, self.decoder.max_len)
    if measured != analytic:
      raise AssertionError(f'{self.name}: cache bytes {measured} != plt.md formula {analytic}')
    self.result.update(kv_bytes=measured['kv_total'], kv_bytes_formula=analytic['kv_total'],
                       kv_breakdown={k: measured[k] for k in ('kv_full', 'kv_window', 'hidden')})
    # Compile the step ahead of time once, and step with that executable (cache still donated).
    t0 = time.perf_counter()
    if self.rule is not None:   # the adaptive-exit step, compiled on its first call
      logp, _, _, self.cache = self.decoder.exit_step(self.cache, self.tok, self.rule)
      self.tok = _argmax(logp)
      self.tok.block_until_ready()
      self.result['step_compile_s'] = time.perf_counter() - t0
      return
    self.step_fn = self.decoder.compile_step(self.cache, self.tok)
    self.result['step_compile_s'] = time.perf_counter() - t0
    stats = self.step_fn.memory_analysis()
    if stats is not None:
      self.result['step_temp_bytes'] = int(stats.temp_size_in_bytes)
      self.result['step_alias_bytes'] = int(stats.alias_size_in_bytes)

  def steps(self, n: int, record: bool):
    for _ in range(n):
      t0 = time.perf_counter()
      if self.rule is None:
        logits, self.cache = self.step_fn(self.decoder.state, self.cache, self.tok)
      else:
        logits, exits, rows, self.cache = self.decoder.exit_step(self.cache, self.tok, self.rule)
      self.tok = _argmax(logits)
      self.tok.block_until_ready()
      if record:
        self.step_times.append(time.perf_counter() - t0)
        if self.rule is not None:
          self.rows_run.append(int(rows))
          self.loops_used.append(float(np.mean(np.asarray(exits) + 1)))

  def finish(self):
    t = np.asarray(self.step_times)
    self.result.update(step_ms=float(np.median(t) * 1e3),
                       step_p10_ms=float(np.percentile(t, 10) * 1e3),
                       step_p90_ms=float(np.percentile(t, 90) * 1e3), steps_measured=len(t),
                       tokens_per_s=float(self.batch / np.median(t)))
    if self.rule is not None:
      self.result.update(mean_rows=float(np.mean(self.rows_run)),
                         mean_loops=float(np.mean(self.loops_used)))
    del self.cache
    return self.result


def torch_baseline(weights: Weights, base: ModelConfig, settings, batch: int) -> dict:
  """PyTorch generate() on the same weights: the exported PLT R=2 file, and transformers' own
  LlamaForCausalLM on the R=1 export (what a PLT decode step should cost about as much as)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from plt_jax import hf  # pylint: disable=g-import-not-at-top
  from plt_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(settings.seed)
  prompts = rng.integers(3, base.vocab_size, (batch, settings.prompt_len)).tolist()
  out = {'batch': batch, 'torch_threads': settings.torch_threads}
  with tempfile.TemporaryDirectory() as d:
    tok = tok_lib.build_tokenizer('byte', workdir=d)
    models = {}
    for key, loops, model_class in (('llama_R1', 1, 'llama'), ('plt_R2', 2, 'auto')):
      models[key] = (hf.export_model(weights.model(base.replace(num_loops=loops)), tok,
                                     os.path.join(d, key), dtype=settings.dtype), model_class)
    timed = torch_timing.torch_generate_timings(models, prompts, settings.steps + 1,
                                      repeats=settings.torch_repeats,
                                      threads=settings.torch_threads, count_ops=True)
  for key, t in timed.items():
    out[f'torch_{key}_step_ms'] = 1e3 * t['decode_s_per_token']
    out[f'torch_{key}_prefill_s'] = t['prefill_s']
    out[f'torch_{key}_step_ops'] = t['decode_step_ops']
    out[f'torch_{key}_step_ops_total'] = t['decode_step_ops_total']
    out['transformers'] = t['transformers']
  out['torch_plt_R2/torch_llama_R1'] = out['torch_plt_R2_step_ms'] / out['torch_llama_R1_step_ms']
  out['torch_plt_R2/torch_llama_R1_ops'] = (out['torch_plt_R2_step_ops']
                                            / out['torch_llama_R1_step_ops'])
  return out


def _fmt_bytes(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return str(n)


def _exit_rules(settings) -> list[str]:
  return [x for x in (getattr(settings, 'exit_rules', '') or '').split(',') if x]


def run(settings) -> dict:
  """Every (mode, R) per batch size, interleaved; prints the table, returns the results.

  settings: small, loops, modes, batch_sizes (comma-separated strings), prompt_len, warmup,
  rounds, steps, prefill_reps, dtype, gate_mode, seed, torch_baseline, torch_threads,
  torch_repeats; all of them are recorded under 'args'."""
  base = ModelConfig(**(SMALL_MODEL if settings.small else BENCH_MODEL), dtype=settings.dtype,
                     gate_mode=settings.gate_mode)
  loops = [int(x) for x in settings.loops.split(',')]
  modes = settings.modes.split(',')
  batches = [int(x) for x in settings.batch_sizes.split(',')]
  max_len = settings.prompt_len + settings.warmup + settings.rounds * settings.steps + 1
  weights = Weights(settings.seed)
  out = {
      'device': str(jax.devices()[0]), 'backend': jax.default_backend(),
      'jax': jax.__version__, 'python': platform.python_version(),
      'model': base.to_dict(), 'params_R1': int(base.replace(num_loops=1).param_count()),
      'args': vars(settings), 'max_len': max_len, 'results': [], 'ratios': {}, 'targets': {},
  }
  print(f'model: {out["params_R1"] / 1e6:.1f}M parameters (R=1), d={base.d_model}, '
        f'L={base.num_layers}, W={base.window_size}, {settings.dtype}; prompt '
        f'{settings.prompt_len}, cache {max_len} slots; device {out["device"]}', flush=True)
  for batch in batches:
    runs, seen = [], set()
    for m in modes:
      for r in loops:
        run_ = Run(weights, base, m, r, batch, settings, max_len)
        same = (run_.cfg.loop_mode, r, run_.row_matmul, run_.attention)
        if same not in seen:
          seen.add(same)
          runs.append(run_)
        if m == 'plt' and r > 1:   # adaptive exit beside the plain step it changes
          runs += [Run(weights, base, m, r, batch, settings, max_len, rule=rule)
                   for rule in _exit_rules(settings)]
    for r in runs:
      r.prefill(settings.prefill_reps)
      r.steps(settings.warmup, record=False)
      print(f'  batch {batch} {r.name}: prefill {r.result["prefill_s"]:.3f}s', flush=True)
    for i in range(settings.rounds):  # interleaved, and the starting config rotates
      for r in runs[i % len(runs):] + runs[:i % len(runs)]:
        r.steps(settings.steps, record=True)
    by_name = {r.name: r.finish() for r in runs}
    out['results'].extend(by_name.values())
    ratios = {}
    pairs = [('vanilla_R2', 'vanilla_R1'), ('vanilla_R4', 'vanilla_R1')]
    for p in (m for m in modes if m.startswith('plt')):
      pairs += [(f'{p}_R{r}', 'plt_R1') for r in (2, 3, 4)]
      pairs += [(f'{p}_R{r}', f'vanilla_R{r}') for r in (2, 3, 4)]
    pairs += [(n, n.split('@')[0]) for n in by_name if '@' in n]
    for a, b in pairs:
      if a in by_name and b in by_name:
        ratios[f'{a}/{b}'] = by_name[a]['step_ms'] / by_name[b]['step_ms']
    out['ratios'][f'batch{batch}'] = ratios
    if settings.torch_baseline and 'plt_R2' in by_name:
      tb = torch_baseline(weights, base, settings, batch)
      for name in ('plt_R1', 'plt_R2'):
        if name in by_name:
          tb[f'jax_{name}_step_ms'] = by_name[name]['step_ms']
      out.setdefault('torch_baseline', []).append(tb)
    if batch == 1:
      out['targets'] = {k: {'ratio': ratios[k], 'target': v, 'met': ratios[k] <= v}
                        for k, v in TARGETS.items() if k in ratios}
      if settings.torch_baseline and 'plt_R2' in by_name:
        tb = out['torch_baseline'][-1]
        out['targets'].update({k: {'ratio': tb[k], 'target': v, 'met': tb[k] <= v}
                               for k, v in TORCH_TARGETS.items()})
    del runs
  print_table(out)
  return out


def print_table(out: dict) -> None:
  hdr = (f'{"batch":>5} {"mode":>15} {"rows":>7} {"attn":>6} {"R":>2} {"step ms":>9} '
         f'{"p10-p90 ms":>15} '
         f'{"tok/s":>8} {"prefill s":>9} {"KV bytes":>11} {"= formula":>9} {"step temp":>10}')
  print('\n' + hdr + '\n' + '-' * len(hdr))
  for r in out['results']:
    print(f'{r["batch"]:>5} {r["mode"]:>15} {r["row_matmul"]:>7} {r["attention"]:>6} {r["R"]:>2} '
          f'{r["step_ms"]:>9.2f} '
          f'{r["step_p10_ms"]:>7.2f}-{r["step_p90_ms"]:<7.2f} {r["tokens_per_s"]:>8.1f} '
          f'{r["prefill_s"]:>9.3f} {_fmt_bytes(r["kv_bytes"]):>11} '
          f'{str(r["kv_bytes"] == r["kv_bytes_formula"]):>9} '
          f'{_fmt_bytes(r.get("step_temp_bytes", 0)):>10}'
          + (f'  exit {r["exit"]}: {r["mean_loops"]:.2f} loops/token, {r["mean_rows"]:.2f} rows/step'
             if r.get('exit') else ''))
  for batch, ratios in out['ratios'].items():
    print(f'\n{batch} latency ratios: ' + ', '.join(f'{k} {v:.2f}' for k, v in ratios.items()))
  for tb in out.get('torch_baseline', []):
    rows = [('PyTorch, transformers LlamaForCausalLM, R=1', tb['torch_llama_R1_step_ms']),
            ('PyTorch, exported PLT file, R=2', tb['torch_plt_R2_step_ms'])]
    rows += [(f'plt_jax, PLT R={n[-1]}', tb[f'jax_{n}_step_ms']) for n in ('plt_R1', 'plt_R2')
             if f'jax_{n}_step_ms' in tb]
    print(f"\nbatch {tb['batch']}, decode ms/token (torch {tb['torch_threads']} thread(s), "
          f"transformers {tb['transformers']}):")
    for label, ms in rows:
      print(f'  {label:<46} {ms:8.2f}')
    print(f"  exported PLT R=2 / HF Llama R=1 = {tb['torch_plt_R2/torch_llama_R1']:.2f}")
    if 'torch_plt_R2_step_ops' in tb:
      print(f"  torch ops per decode step (torch profiler; called from Python / all): HF Llama "
            f"R=1 {tb['torch_llama_R1_step_ops']} / {tb['torch_llama_R1_step_ops_total']}, "
            f"exported PLT R=2 {tb['torch_plt_R2_step_ops']} / "
            f"{tb['torch_plt_R2_step_ops_total']}, ratio "
            f"{tb['torch_plt_R2/torch_llama_R1_ops']:.2f}")
  if out['targets']:
    print('targets at batch 1: ' + ', '.join(
        f'{k} {t["ratio"]:.2f} <= {t["target"]} {"met" if t["met"] else "MISSED"}'
        for k, t in out['targets'].items()))


def projections_only(mode: str):
  """f(x [R, D], matrices, head) multiplying every matrix by R rows like the decode step does."""
  from plt_jax.kernels import cpu_rows  # pylint: disable=import-outside-toplevel

  def mm(x, w):
    return cpu_rows.rows_matmul(x, w) if mode == 'kernel' else x @ w

  def chain(x, mats, head):
    # Each product reads the previous one's output, as in the step: no two run concurrently.
    h = x
    for w in mats:
      h = mm(jnp.resize(h, (h.shape[0], w.shape[0])), w)
    return mm(jnp.resize(h[-1:], (1, head.shape[0])), head)[:, :8].sum()  # the head: 1 row
  return jax.jit(chain)


def breakdown(settings) -> dict:
  """Where a batch-1 decode step's time goes: the whole step vs its weight projections alone.

  For each R it times, interleaved round by round, (a) the jitted PLT decode step and (b) a jitted
  chain of the same weight matrices multiplied by the same number of rows through the same
  `row_matmul` path (kernel or XLA dot), with nothing else, each product reading the previous
  one's output as in the step. (a) - (b) is the rest of the step: attention over the caches,
  gates, norms, RoPE, cache writes and per-op overhead. (b) also gives the effective bandwidth at
  which the weights are streamed. Prints the table, returns the results.

  settings: small, loops (a comma-separated string), prompt_len, rounds, warmup, seed."""
  base = ModelConfig(**(SMALL_MODEL if settings.small else BENCH_MODEL))
  weights = Weights(settings.seed)
  runs = {}
  for r in [int(x) for x in settings.loops.split(',')]:
    cfg = base.replace(num_loops=r)
    model = weights.model(cfg)
    dec = Decoder(model, settings.prompt_len + settings.rounds + 8)
    logits, cache = dec.prefill([list(range(3, 3 + settings.prompt_len))])
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    mats = [leaf[...] for path, leaf in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
            if 'kernel' in jax.tree_util.keystr(path)]
    head = [m for m in mats if m.shape[1] == cfg.vocab_size][0]
    body = [m for m in mats if m.shape[1] != cfg.vocab_size]
    mode = decode_matmul('auto', r, cfg.dtype)
    x = jnp.asarray(np.random.default_rng(r).standard_normal((r, cfg.d_model), np.float32))
    runs[r] = dict(step=dec.compile_step(cache, tok), state=dec.state, cache=cache, tok=tok,
                   chain=projections_only(mode), x=x, body=body, head=head, mode=mode,
                   weight_bytes=sum(m.size * m.dtype.itemsize for m in mats), t_step=[], t_mm=[])
    runs[r]['chain'](x, body, head).block_until_ready()
  for i in range(settings.rounds):
    for r, d in runs.items():
      t0 = time.perf_counter()
      logits, d['cache'] = d['step'](d['state'], d['cache'], d['tok'])
      d['tok'] = jnp.argmax(logits, -1).astype(jnp.int32)
      d['tok'].block_until_ready()
      t1 = time.perf_counter()
      d['chain'](d['x'], d['body'], d['head']).block_until_ready()
      t2 = time.perf_counter()
      if i >= settings.warmup:
        d['t_step'].append(t1 - t0)
        d['t_mm'].append(t2 - t1)
  out = {'device': str(jax.devices()[0]), 'jax': jax.__version__, 'model': base.to_dict(),
         'results': []}
  r1 = None
  print(f'{"R":>2} {"rows":>7} {"step ms":>8} {"proj ms":>8} {"rest ms":>8} {"GB/s":>6} '
        f'{"step/R1":>8} {"proj/R1":>8}')
  for r, d in runs.items():
    s, m = statistics.median(d['t_step']) * 1e3, statistics.median(d['t_mm']) * 1e3
    r1 = r1 or (s, m)
    res = dict(R=r, row_matmul=d['mode'], step_ms=s, projections_ms=m, rest_ms=s - m,
               weight_gb_per_s=d['weight_bytes'] / m / 1e6, step_over_r1=s / r1[0],
               projections_over_r1=m / r1[1])
    out['results'].append(res)
    print(f'{r:>2} {d["mode"]:>7} {s:>8.2f} {m:>8.2f} {s - m:>8.2f} '
          f'{res["weight_gb_per_s"]:>6.1f} {res["step_over_r1"]:>8.2f} '
          f'{res["projections_over_r1"]:>8.2f}')
  return out


def write_json(out: dict, path) -> None:
  """Writes `out` to `path` (nothing when path is empty)."""
  if path:
    from plt_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_json(path, out)
    print(f'wrote {path}')
