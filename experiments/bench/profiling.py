"""Benchmark timing and XLA:CPU op profiles.

  time_interleaved(fns, steps=, warmup=)   wall seconds per call, the fns called in rounds
  summarize_times(seconds)                 median / min / quartiles in ms
  xla_pool_threads()                       threads of XLA:CPU's intra-op pool in this process
  parse_hlo(compiled.as_text())            instructions by name: opcode, shape, name stack, FLOPs
  op_scope(op_name, scopes)                '<named scope> fwd|bwd' of an op's name stack
  xla_op_profile(trace_dir, hlo_text=...)  per-op and per-scope time of a jax.profiler.trace
  format_op_profile(profile)               the same as a text table

The trace is read with `jax.profiler.ProfileData`. XLA:CPU records one event per executed
instruction (thunk), tagged with the `hlo_op` and `hlo_module` it ran; the compiled module's text
maps each instruction to its jax name stack (`jax.named_scope`s, jvp / transpose for backward) and
its matmul FLOPs.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence


# ---------------------------------------------------------------------------------- timing

def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, steps: int,
                     warmup: int = 1) -> dict[str, list[float]]:
  """Wall seconds of `steps` calls of each fn, after `warmup` untimed rounds.

  Every round calls each fn once, so load from other processes falls on all of them alike; the
  round's first fn rotates, so no fn always runs right after the same other one (cache and
  allocator state). Each fn must return only once its work is done (block on its results).
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      fns[name]()
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(steps):
    for name in names[i % len(names):] + names[:i % len(names)]:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def summarize_times(seconds: Sequence[float]) -> dict[str, float]:
  """median / min / p25 / p75 in milliseconds, and the count n."""
  if not seconds:
    raise ValueError('summarize_times: no times')
  ms = sorted(1e3 * x for x in seconds)
  q = statistics.quantiles(ms, n=4, method='inclusive') if len(ms) > 1 else [ms[0]] * 3
  return dict(median_ms=statistics.median(ms), min_ms=ms[0], p25_ms=q[0], p75_ms=q[2],
              n=len(ms))


def xla_pool_threads() -> int:
  """Threads of XLA:CPU's intra-op pool in this process, counted by thread name on Linux (-1
  where /proc cannot be read). The pool exists once jax has started its CPU client."""
  try:
    tasks = os.listdir('/proc/self/task')
  except OSError:
    return -1
  n = 0
  for t in tasks:
    try:
      with open(f'/proc/self/task/{t}/comm') as f:
        n += f.read().startswith('tf_XLAEigen')
    except OSError:
      pass  # the thread ended meanwhile
  return n


# -------------------------------------------------------------------------------- HLO text

@dataclasses.dataclass
class HloOp:
  """One instruction of a compiled HLO module."""
  name: str
  opcode: str
  shape: str
  computation: str
  op_name: str = ''          # jax's name stack (metadata op_name)
  calls: tuple = ()          # computations it calls (fusions, calls)
  operands: tuple = ()       # operand instruction names
  attrs: str = ''            # the text after the operand list
  flops: float = 0.0         # matmul FLOPs, 2 * output size * contracted size; fusions included


_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*'
    r'(\([^=]*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?|\w+)\s+([\w\-]+)\((.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$')
_MODULE = re.compile(r'^\s*HloModule\s+([\w.\-]+)')


def _dims(shape: str) -> list[int]:
  m = re.match(r'\w+\[([\d,]*)\]', shape)
  return [int(x) for x in m.group(1).split(',') if x] if m else []


def _split_operands(rest: str) -> tuple[str, str]:
  """(operand list, attributes) of the text after `opcode(`: up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ''


def hlo_module_name(hlo_text: str) -> Optional[str]:
  """The `HloModule` name (the profile's `hlo_module` stat), or None."""
  for line in hlo_text.splitlines():
    m = _MODULE.match(line)
    if m:
      return m.group(1)
  return None


def parse_hlo(hlo_text: str) -> dict[str, HloOp]:
  """Instructions of `compiled.as_text()` by name (unique in a module), with the matmul FLOPs of
  dots, and of fusions and calls as the sum over the computations they call."""
  ops: dict[str, HloOp] = {}
  members: dict[str, list[str]] = collections.defaultdict(list)
  # Operands printed with their shape ('f32[8,4]{1,0} %x'); newer XLA prints the name alone.
  inline_shape: dict[tuple[str, int], str] = {}
  comp = ''
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      comp = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    args, attrs = _split_operands(rest)
    operands = []
    for i, arg in enumerate(a.strip() for a in args.split(',') if '%' in a):
      operands.append(arg.rsplit('%', 1)[1].strip())
      inline = re.match(r'(\w+\[[\d,]*\])\S*\s+%', arg)
      if inline:
        inline_shape[(name, i)] = inline.group(1)
    meta = re.search(r'op_name="([^"]*)"', attrs)
    # Fusions (and `call`s) run their computations once per execution; reducers and loop bodies
    # are not followed (their trip counts are not in the text).
    calls = re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)' if opcode == 'call'
                       else r'calls=%?([\w.\-]+)', attrs)
    ops[name] = HloOp(name, opcode, shape, comp, meta.group(1) if meta else '', tuple(calls),
                      tuple(operands), attrs)
    members[comp].append(name)

  def flops(op: HloOp, depth: int = 0) -> float:
    if op.opcode == 'dot':
      lhs = inline_shape.get((op.name, 0))
      if lhs is None and op.operands and op.operands[0] in ops:
        lhs = ops[op.operands[0]].shape
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', op.attrs)
      k = 1
      if lhs is not None and contracting:
        d = _dims(lhs)
        k = math.prod(d[int(i)] for i in contracting.group(1).split(',') if i)
      return 2.0 * math.prod(_dims(op.shape)) * k
    if op.calls and depth < 8:
      return sum(flops(ops[n], depth + 1) for c in op.calls for n in members.get(c, ()))
    return 0.0

  for op in ops.values():
    op.flops = flops(op)
  return ops


def op_scope(op_name: str, scopes: Sequence[str]) -> str:
  """'<innermost of `scopes` in the name stack> fwd|bwd' ('other' where none is), from an op's
  metadata op_name: under `transpose(` it is backward, under `jvp(` forward; outside both (the
  optimizer update, say) the scope name alone."""
  stack = op_name.rsplit('/', 1)[0] if '/' in op_name else ''  # the last part is the primitive
  found = [p for p in re.split(r'[/()]', stack) if p in scopes]
  scope = found[-1] if found else 'other'
  if 'transpose(' in stack:
    return f'{scope} bwd'
  if 'jvp(' in stack:
    return f'{scope} fwd'
  return scope


# ------------------------------------------------------------------------------ op profile

def trace_file(trace_dir: str) -> str:
  """The newest *.xplane.pb that `jax.profiler.trace(trace_dir)` wrote."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir} (was jax.profiler.trace used?)')
  return files[-1]


def xla_op_profile(trace_dir: str, *, hlo_text: Optional[str] = None,
                   scopes: Sequence[str] = ()) -> dict[str, Any]:
  """Per-op CPU time of the newest `jax.profiler.trace` in `trace_dir`, per run of the module.

  An op's time is the sum of its events over all threads (CPU time: ops that XLA runs
  concurrently both count). With the compiled module's `hlo_text`, only that module's events are
  read and each op gets its opcode, shape, scope (`op_scope` over `scopes`) and matmul FLOPs;
  an op missing from the text is kept, in scope 'unmatched'. Returns
    ops              rows sorted by time: op, ms_per_step, events_per_step (+ the HLO fields)
    scopes           per-scope ms_per_step, gflop, gflops_per_s
    op_ms_per_step   sum of all ops
    wall_ms_per_step mean over runs of first op start to last op end
    steps            runs of the module in the trace (distinct run_id)
  """
  import jax  # pylint: disable=import-outside-toplevel
  data = jax.profiler.ProfileData.from_file(trace_file(trace_dir))
  hlo = parse_hlo(hlo_text) if hlo_text else {}
  module = hlo_module_name(hlo_text) if hlo_text else None
  ns: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  spans: dict[Any, list[float]] = {}
  for plane in data.planes:
    if not plane.name.startswith('/host:'):
      continue
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        name = stats.get('hlo_op')
        if name is None or (module is not None and stats.get('hlo_module') != module):
          continue
        ns[name] += ev.duration_ns
        count[name] += 1
        run = stats.get('run_id')
        lo, hi = spans.get(run, (math.inf, -math.inf))
        spans[run] = [min(lo, ev.start_ns), max(hi, ev.start_ns + ev.duration_ns)]
  steps = max(len(spans), 1)
  rows = []
  by_scope: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for name, total in ns.most_common():
    ms = total / 1e6 / steps
    row = dict(op=name, ms_per_step=ms, events_per_step=count[name] / steps)
    op = hlo.get(name)
    if op is not None:
      scope = op_scope(op.op_name, scopes)
      row.update(opcode=op.opcode, shape=op.shape, scope=scope, op_name=op.op_name,
                 gflop=op.flops / 1e9,
                 gflops_per_s=op.flops / (ms / 1e3) / 1e9 if op.flops and ms else None)
    elif hlo:
      scope = row['scope'] = 'unmatched'
    else:
      scope = None
    if scope is not None:
      by_scope[scope][0] += ms
      by_scope[scope][1] += row.get('gflop', 0.0)
    rows.append(row)
  scope_rows = [dict(scope=k, ms_per_step=v[0], gflop=v[1],
                     gflops_per_s=v[1] / (v[0] / 1e3) if v[0] and v[1] else None)
                for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1][0])]
  wall = [hi - lo for lo, hi in spans.values()]
  return dict(ops=rows, scopes=scope_rows, op_ms_per_step=sum(r['ms_per_step'] for r in rows),
              wall_ms_per_step=statistics.mean(wall) / 1e6 if wall else 0.0,
              steps=len(spans), module=module)


def format_op_profile(profile: Mapping[str, Any], top: int = 25) -> str:
  """The scope totals and the `top` ops of `xla_op_profile` as text."""
  op_ms = profile['op_ms_per_step'] or 1.0

  def rate(x):
    return f'{x:8.1f}' if x else '       -'
  lines = [f'{profile["module"] or "all modules"}, {profile["steps"]} steps: op time '
           f'{profile["op_ms_per_step"]:.2f} ms/step (summed over threads), wall '
           f'{profile["wall_ms_per_step"]:.2f} ms/step (first op to last)']
  if profile['scopes']:
    lines.append(f'{"scope":18s} {"ms/step":>8s} {"share":>6s} {"GFLOP":>8s} {"GFLOP/s":>8s}')
    for r in profile['scopes']:
      lines.append(f'{r["scope"]:18s} {r["ms_per_step"]:8.2f} {r["ms_per_step"] / op_ms:6.1%} '
                   f'{r["gflop"]:8.3f} {rate(r["gflops_per_s"])}')
  lines.append(f'{"op":30s} {"ms/step":>8s} {"share":>6s} {"GFLOP/s":>8s}  {"scope":16s} shape')
  for r in profile['ops'][:top]:
    lines.append(f'{r["op"][:30]:30s} {r["ms_per_step"]:8.2f} {r["ms_per_step"] / op_ms:6.1%} '
                 f'{rate(r.get("gflops_per_s"))}  {r.get("scope", "")[:16]:16s} '
                 f'{r.get("shape", "")[:40]}')
  return '\n'.join(lines)
