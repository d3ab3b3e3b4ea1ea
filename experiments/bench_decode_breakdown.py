"""Where a batch-1 decode step's time goes: the whole step vs its weight projections alone.

  python -m experiments.bench_decode_breakdown --out breakdown.json      # ~100M model, R = 1, 2, 4
  python -m experiments.bench_decode_breakdown --small                   # tiny model, quick

What is timed against what: experiments.bench.decode.breakdown (below).
"""
from __future__ import annotations

import argparse
import inspect
import sys

from experiments.bench import decode as decode_bench


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              epilog=inspect.cleandoc(decode_bench.breakdown.__doc__),
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--small', action='store_true', help='tiny model (smoke test)')
  p.add_argument('--loops', default='1,2,4')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--rounds', type=int, default=40)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='write the results as JSON here')
  args = p.parse_args(argv)
  if args.small:
    args.rounds, args.warmup, args.prompt_len = 6, 2, 16
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  decode_bench.write_json(decode_bench.breakdown(args), args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
