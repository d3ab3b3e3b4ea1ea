"""Training-step benchmark: plt_jax against PyTorch, same model, batch and threads, interleaved.

  python -m experiments.bench_train                                   # default + 25m, R = 1, 2
  python -m experiments.bench_train --shapes default --loops 2 --steps 12
  python -m experiments.bench_train --attention_impl auto,xla         # both backends beside torch
  python -m experiments.bench_train --profile runs/bench_train_prof   # + top XLA ops per scope

What a step is and how it is timed: experiments/bench/train.py.
"""
from __future__ import annotations

import os
import sys


def _cores() -> int:
  return len(os.sched_getaffinity(0))


def _threads(argv) -> int:
  """--threads from the command line (read before argparse runs), else `_cores()`."""
  for i, a in enumerate(argv):
    value = argv[i + 1] if a == '--threads' and i + 1 < len(argv) else (
        a.split('=', 1)[1] if a.startswith('--threads=') else None)
    if value is not None:
      try:
        return int(value)
      except ValueError:
        break  # argparse reports it
  return _cores()


if __name__ == '__main__':
  # XLA:CPU sizes its intra-op pool from NPROC when its client starts, and torch's OpenMP reads
  # OMP_NUM_THREADS when it loads: both before jax or torch is imported. Set, not defaulted, so
  # both sides run the same count.
  os.environ['NPROC'] = os.environ['OMP_NUM_THREADS'] = str(_threads(sys.argv[1:]))
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the PyTorch side runs on the CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse

from experiments.bench import train as train_bench
from plt_jax.config import ATTENTION_IMPLS


def _list(text: str, kind=str) -> list:
  return [kind(x) for x in text.split(',') if x]


def parse_args(argv=None):
  # No abbreviations: `_threads` reads --threads before argparse, by its full name.
  p = argparse.ArgumentParser(description=__doc__, epilog=train_bench.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--shapes', default='default,25m',
                 help=f'comma list of {sorted(train_bench.SHAPES)}')
  p.add_argument('--loops', default='1,2', help='comma list of R')
  p.add_argument('--attention_impl', default='auto',
                 help=f"comma list of ModelConfig.attention_impl {ATTENTION_IMPLS} for plt_jax, "
                      "each timed as its own side ('xla': the pure-JAX reference)")
  p.add_argument('--threads', type=int, default=_cores(),
                 help='intra-op threads of each side (default: the cores this process may use); '
                      'sizes XLA when jax starts, so only the command line sets it')
  p.add_argument('--steps', type=int, default=8, help='timed steps per side')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per side (after compile)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_torch', action='store_true', help='time plt_jax alone')
  p.add_argument('--profile', default=None, metavar='DIR',
                 help='trace plt_jax steps with jax.profiler into DIR and print the top ops')
  p.add_argument('--profile_steps', type=int, default=3, help='traced steps per plt_jax side')
  p.add_argument('--top', type=int, default=25, help='ops printed per profile')
  p.add_argument('--out', default='runs/bench_train.json', help="JSON results ('' for none)")
  args = p.parse_args(argv)
  args.shapes, args.loops = _list(args.shapes), _list(args.loops, int)
  args.attention_impl = list(dict.fromkeys(_list(args.attention_impl)))
  for s in args.shapes:
    if s not in train_bench.SHAPES:
      p.error(f'unknown shape {s!r}; choose from {sorted(train_bench.SHAPES)}')
  for a in args.attention_impl:
    if a not in ATTENTION_IMPLS:
      p.error(f'unknown --attention_impl {a!r}; choose from {ATTENTION_IMPLS}')
  if not (args.shapes and args.loops and args.attention_impl):
    p.error('--shapes, --loops and --attention_impl need at least one value each')
  if min(args.loops) < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
    p.error('--loops, --steps and --threads must be >= 1, --warmup >= 0')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = train_bench.run(args)
  train_bench.write_json(out, args.out)
  return out


if __name__ == '__main__':
  main()
