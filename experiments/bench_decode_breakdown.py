"""Where a batch-1 decode step's time goes: the whole step vs its weight projections alone.

  python -m experiments.bench_decode_breakdown --out breakdown.json      # ~100M model, R = 1, 2, 4
  python -m experiments.bench_decode_breakdown --small                   # tiny model, quick

For each R it times, interleaved round by round, (a) the jitted PLT decode step and (b) a jitted
chain of the same weight matrices multiplied by the same number of rows through the same
`row_matmul` path (kernel or XLA dot), with nothing else, each product reading the previous one's output as in the step. (a) - (b) is
the rest of the step:
attention over the caches, gates, norms, RoPE, cache writes and per-op overhead. (b) also gives the
effective bandwidth at which the weights are streamed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_decode import BENCH_MODEL, SMALL_MODEL, Weights, write_json
from plt_jax.config import ModelConfig
from plt_jax.decode import Decoder, resolve_row_matmul


def projections_only(mode: str):
  """f(x [R, D], matrices, head) multiplying every matrix by R rows like the decode step does."""
  from kernels import cpu_rows  # pylint: disable=import-outside-toplevel

  def mm(x, w):
    return cpu_rows.rows_matmul(x, w) if mode == 'kernel' else x @ w

  def chain(x, mats, head):
    # Each product reads the previous one's output, as in the step: no two run concurrently.
    h = x
    for w in mats:
      h = mm(jnp.resize(h, (h.shape[0], w.shape[0])), w)
    return mm(jnp.resize(h[-1:], (1, head.shape[0])), head)[:, :8].sum()  # the head: 1 row
  return jax.jit(chain)


def run(args) -> dict:
  base = ModelConfig(**(SMALL_MODEL if args.small else BENCH_MODEL))
  weights = Weights(args.seed)
  runs = {}
  for r in [int(x) for x in args.loops.split(',')]:
    cfg = base.replace(num_loops=r)
    model = weights.model(cfg)
    dec = Decoder(model, args.prompt_len + args.rounds + 8)
    logits, cache = dec.prefill([list(range(3, 3 + args.prompt_len))])
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    mats = [leaf[...] for path, leaf in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
            if 'kernel' in jax.tree_util.keystr(path)]
    head = [m for m in mats if m.shape[1] == cfg.vocab_size][0]
    body = [m for m in mats if m.shape[1] != cfg.vocab_size]
    mode = resolve_row_matmul('auto', r, cfg.dtype)
    x = jnp.asarray(np.random.default_rng(r).standard_normal((r, cfg.d_model), np.float32))
    runs[r] = dict(step=dec.compile_step(cache, tok), state=dec.state, cache=cache, tok=tok,
                   chain=projections_only(mode), x=x, body=body, head=head, mode=mode,
                   weight_bytes=sum(m.size * m.dtype.itemsize for m in mats), t_step=[], t_mm=[])
    runs[r]['chain'](x, body, head).block_until_ready()
  for i in range(args.rounds):
    for r, d in runs.items():
      t0 = time.perf_counter()
      logits, d['cache'] = d['step'](d['state'], d['cache'], d['tok'])
      d['tok'] = jnp.argmax(logits, -1).astype(jnp.int32)
      d['tok'].block_until_ready()
      t1 = time.perf_counter()
      d['chain'](d['x'], d['body'], d['head']).block_until_ready()
      t2 = time.perf_counter()
      if i >= args.warmup:
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
  write_json(run(args), args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
