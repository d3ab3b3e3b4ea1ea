"""Decode benchmark: per-token latency, prefill time and KV-cache bytes, R = 1..4, PLT vs vanilla.

  python -m experiments.bench_decode --out bench_decode.json           # ~100M params, batch 1 and 8
  python -m experiments.bench_decode --small                           # a quick run on a tiny model

The modes and how they are timed: experiments/bench/decode.py (below).
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.bench import decode as decode_bench


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, epilog=decode_bench.__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--small', action='store_true', help='tiny model and few steps (smoke test)')
  p.add_argument('--loops', default='1,2,3,4', help='R values')
  p.add_argument('--modes', default='plt,plt_stacked+xla,vanilla',
                 help="LOOPMODE[_ROWMATMUL][+ATTENTION]: plt, plt_stacked, plt_per_row, "
                      "plt_kernel, plt+xla, plt+cpu, vanilla, vanilla_stacked, vanilla+xla; a "
                      "variant resolving like another is run once")
  p.add_argument('--batch_sizes', default='1,8')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--warmup', type=int, default=4, help='decode steps before measuring')
  p.add_argument('--rounds', type=int, default=8, help='interleaved measuring rounds')
  p.add_argument('--steps', type=int, default=12, help='measured decode steps per round')
  p.add_argument('--prefill_reps', type=int, default=1, help='timed prefills after the compile')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--gate_mode', default='hidden', choices=['hidden', 'query'])
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--exit_rules', default='',
                 help='adaptive-exit rules timed beside the plt mode at R > 1, e.g. '
                      'confidence:1e-9,confidence:0.999999 (every token exits at loop 1 / almost '
                      'none does: the best and the worst case)')
  p.add_argument('--out', default=None, help='write the results as JSON here')
  p.add_argument('--torch_baseline', action='store_true',
                 help="also time PyTorch generate() on the same weights: the exported PLT R=2 "
                      "file and transformers' LlamaForCausalLM (R=1)")
  p.add_argument('--torch_threads', type=int, default=None,
                 help="torch threads for the baseline (default: the cores this process may use, "
                      "as XLA's CPU thread pool does)")
  p.add_argument('--torch_repeats', type=int, default=5,
                 help='interleaved generate() repeats per PyTorch model (medians reported)')
  args = p.parse_args(argv)
  if args.torch_threads is None:
    args.torch_threads = len(os.sched_getaffinity(0))
  if args.small:  # a smoke test: tiny model, batch 1, fast compiles (timings mean little)
    args.rounds, args.steps, args.warmup, args.prompt_len = 3, 5, 2, 24
    if args.batch_sizes == p.get_default('batch_sizes'):
      args.batch_sizes = '1'
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  decode_bench.write_json(decode_bench.run(args), args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
