"""Attention benchmark: fused Pallas G-SWA (and causal) vs the XLA reference and the cuDNN pair.

    python -m experiments.bench_attention                  # full grid (GPU/TPU)
    python -m experiments.bench_attention --quick          # tiny grid; runs on CPU (interpret mode)
    python -m experiments.bench_attention --seq_lens 4096,8192 --head_dims 128 --out bench.json

For each op ('gswa': loop r >= 2 attention; 'causal': the loop-1 pass), each (T, W, head_dim) and
each implementation ('xla' reference, 'cudnn' = jax.nn.dot_product_attention(implementation=
'cudnn') per branch + XLA gating, 'pallas' = the fused kernel), it times forward, forward+backward
(grads of all inputs, the gate included) and reports backward = (fwd+bwd) - fwd, as milliseconds
and TFLOP/s, with FLOPs 4*B*H*D*(T^2/2 + T*W) for G-SWA forward (causal: 4*B*H*D*T^2/2), backward
2.5x that. Batch = max(1, tokens // T) so every T does the same number of tokens; heads = width //
head_dim with `groups` query heads per kv head. The XLA reference is skipped where its T x T
logits would not fit (--xla_max_gib). Off GPU, 'cudnn' runs its XLA implementation and 'pallas'
runs in interpret mode: those timings only show that the code runs.
Each output is checked against the XLA reference (or cuDNN when the reference is skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from plt_jax import attention as attn_lib
from plt_jax.kernels import ops
from plt_jax.kernels.common import KernelConfig, attention_flops


def _ints(s: str):
  return [int(x) for x in s.split(',') if x]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='tiny grid that runs on CPU')
  p.add_argument('--seq_lens', type=_ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument('--windows', type=_ints, default=[65, 512])
  p.add_argument('--head_dims', type=_ints, default=[64, 128])
  p.add_argument('--ops', default='gswa,causal')
  p.add_argument('--impls', default='xla,cudnn,pallas')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--tokens', type=int, default=32768, help='batch * T per measurement')
  p.add_argument('--width', type=int, default=2048, help='query heads * head_dim')
  p.add_argument('--groups', type=int, default=4, help='query heads per kv head (GQA)')
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--xla_max_gib', type=float, default=24.0)
  p.add_argument('--block_q', type=int, default=None)
  p.add_argument('--block_k', type=int, default=None)
  p.add_argument('--block_q_bwd', type=int, default=None)
  p.add_argument('--block_k_bwd', type=int, default=None)
  p.add_argument('--num_warps', type=int, default=None)
  p.add_argument('--num_stages', type=int, default=None)
  p.add_argument('--out', default='runs/bench_attention.json')
  args = p.parse_args(argv)
  if args.quick:
    args.seq_lens, args.windows, args.head_dims = [96], [9, 65], [32]
    args.tokens, args.width, args.groups, args.iters, args.warmup = 96, 64, 2, 2, 1
  return args


def kernel_config(args):
  base = (ops._backend_module(ops.default_backend())).DEFAULT_CONFIG  # pylint: disable=protected-access
  kw = {k: getattr(args, k) for k in ('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd',
                                      'num_warps', 'num_stages') if getattr(args, k) is not None}
  return KernelConfig(**{**base.__dict__, **kw})


def implementations(config: KernelConfig):
  """The attention interface's backends, each as (causal, gswa)."""
  backends = {'xla': attn_lib.XLA(), 'cudnn': attn_lib.CuDNN(), 'pallas': attn_lib.Pallas(config)}
  return {name: (b.causal, b.gswa) for name, b in backends.items()}


def make_inputs(op, b, t, hq, hkv, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (b, t, hq, d), dtype)
  kv = [jax.random.normal(keys[i], (b, t, hkv, d), dtype) for i in range(1, 5)]
  cot = jax.random.normal(keys[6], (b, t, hq, d), dtype)
  if op == 'causal':
    return (q, kv[0], kv[1]), cot
  gate = jax.nn.sigmoid(jax.random.normal(keys[5], (b, t, hq), jnp.float32))
  return (q, *kv, gate), cot


def _time(fn, *args, iters, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_one(op, impl_name, fn, inputs, cot, window, iters, warmup):
  kw = {} if op == 'causal' else {'window': window}

  def fwd(*a):
    return fn(*a, **kw)

  def fwd_bwd(cot, *a):
    out, vjp = jax.vjp(fwd, *a)
    return out, vjp(cot)

  fwd_j = jax.jit(fwd)
  fb_j = jax.jit(fwd_bwd)
  t_f = _time(fwd_j, *inputs, iters=iters, warmup=warmup)
  t_fb = _time(fb_j, cot, *inputs, iters=iters, warmup=warmup)
  out, grads = fb_j(cot, *inputs)
  return t_f, t_fb, out, grads


def max_err(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(args):
  dtype = jnp.dtype(args.dtype)
  impls = implementations(kernel_config(args))
  wanted = [x for x in args.impls.split(',') if x]
  platform = jax.default_backend()
  records = []
  for op in [x for x in args.ops.split(',') if x]:
    for d in args.head_dims:
      hq = max(1, args.width // d)
      hkv = max(1, hq // args.groups)
      for t in args.seq_lens:
        b = max(1, args.tokens // t)
        for w in (args.windows if op == 'gswa' else [None]):
          inputs, cot = make_inputs(op, b, t, hq, hkv, d, dtype)
          flops_f = attention_flops(b, hq, t, d, w, gswa=(op == 'gswa'))
          results = {}
          for name in wanted:
            rec = dict(op=op, impl=name, T=t, W=w, D=d, B=b, Hq=hq, Hkv=hkv, dtype=args.dtype,
                       platform=platform)
            xla_gib = (2 if op == 'gswa' else 1) * 3 * b * hq * t * t * 4 / 2**30
            if name == 'xla' and xla_gib > args.xla_max_gib:
              rec['skipped'] = f'XLA reference needs ~{xla_gib:.0f} GiB of logits'
              records.append(rec)
              continue
            try:
              fn = impls[name][0 if op == 'causal' else 1]
              t_f, t_fb, out, grads = bench_one(op, name, fn, inputs, cot, w, args.iters,
                                                args.warmup)
            except Exception as e:  # pylint: disable=broad-except
              rec['error'] = f'{type(e).__name__}: {str(e)[:300]}'
              records.append(rec)
              continue
            t_b = t_fb - t_f if t_fb > t_f else float('nan')  # nan: timing noise
            rec.update(fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_bwd_ms=t_fb * 1e3,
                       fwd_tflops=flops_f / t_f / 1e12, bwd_tflops=2.5 * flops_f / t_b / 1e12,
                       fwd_bwd_tflops=3.5 * flops_f / t_fb / 1e12)
            results[name] = (out, grads)
            records.append(rec)
          base = 'xla' if 'xla' in results else ('cudnn' if 'cudnn' in results else None)
          for rec in records[-len(wanted):]:
            if base and rec['impl'] in results and rec['impl'] != base:
              out, grads = results[rec['impl']]
              rec['max_err_out_vs_' + base] = max_err(out, results[base][0])
              rec['max_err_grads_vs_' + base] = max_err(grads, results[base][1])
          print_rows(records[-len(wanted):])
  return records


_HEADER = (f"{'op':6} {'T':>6} {'W':>4} {'D':>4} {'impl':7} {'fwd ms':>9} {'bwd ms':>9} "
           f"{'f+b ms':>9} {'fwd TF':>7} {'bwd TF':>7} {'f+b TF':>7}  note")
_printed_header = []


def print_rows(rows):
  if not _printed_header:
    print(_HEADER)
    _printed_header.append(True)
  by_impl = {r['impl']: r for r in rows}
  for r in rows:
    head = f"{r['op']:6} {r['T']:>6} {str(r['W'] or '-'):>4} {r['D']:>4} {r['impl']:7}"
    if 'fwd_ms' not in r:
      print(f"{head} {r.get('skipped') or r.get('error')}")
      continue
    note = ''
    if r['impl'] == 'pallas' and 'fwd_ms' in by_impl.get('cudnn', {}):
      ratio = by_impl['cudnn']['fwd_bwd_ms'] / r['fwd_bwd_ms']
      r['speed_vs_cudnn_fwd_bwd'] = ratio
      note = f'{ratio:.2f}x cuDNN f+b'
    errs = [f'{k.split("_vs_")[0].replace("max_err_", "err_")}={v:.1e}' for k, v in r.items()
            if k.startswith('max_err')]
    note = ' '.join([note] + errs).strip()
    print(f"{head} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
          f"{r['fwd_tflops']:7.2f} {r['bwd_tflops']:7.2f} {r['fwd_bwd_tflops']:7.2f}  {note}")
  sys.stdout.flush()


def main(argv=None):
  args = parse_args(argv)
  dev = jax.devices()[0]
  print(f'jax {jax.__version__} on {dev.platform} ({dev.device_kind}); dtype {args.dtype}; '
        f'pallas backend {ops.default_backend()}'
        f'{" (interpret mode)" if ops.default_interpret() else ""}')
  records = run(args)
  meta = dict(jax=jax.__version__, device=dev.device_kind, platform=dev.platform,
              interpret=ops.default_interpret(), args=vars(args),
              kernel_config=kernel_config(args).__dict__)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'meta': meta, 'records': records}, f, indent=1, default=str)
  print(f'wrote {args.out}')
  return records


if __name__ == '__main__':
  main()
