"""The Pallas attention kernels compiled for the GPU, against the float32 XLA reference.

The compiled counterpart of tests/test_kernels.py, which runs the kernels in Pallas interpret mode
on the CPU with 8-wide blocks. Here the kernels run with their production block sizes
(plt_jax.kernels.common.KernelConfig defaults: 128 x 64 forward, 64 x 64 backward), windows on either side
of those edges, GQA groups 1 to 5, T up to 4096 (also not a block multiple), packed segments,
gates near 0 and 1, float32 and bfloat16, forward and every gradient.

  python tools/device_kernel_check.py --json kernels.json            # on a GPU, compiled
  python tools/device_kernel_check.py --dry_run --json kernels.json  # tiny cases, interpret mode

(tools/device_check.py runs it as its step a; the project must be importable: PYTHONPATH=.)

Error measure and tolerances as in tests/test_kernels.py: max |got - want| / (1 + |want|).
float32 matmuls run at 'highest' precision on both sides (IEEE in Triton, not TF32), so the float32
tolerance checks the algorithm rather than TF32 rounding. Writes the JSON after every case and
exits 1 when any case fails or errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from plt_jax import attention as attn
from plt_jax.kernels import ops
from plt_jax.kernels.common import KernelConfig
try:
  from device_check import Sink, env_info, one_line  # run as a script, beside it
except ImportError:
  from tools.device_check import Sink, env_info, one_line

# (forward, gradients), the same as tests/test_kernels.py.
TOL = {'float32': (1e-5, 1e-4), 'bfloat16': (2e-2, 5e-2)}
GATES = ('random', 'near0', 'near1')
GRAD_NAMES = {'gswa': ('dq', 'dk_glob', 'dv_glob', 'dk_loc', 'dv_loc', 'dgate'),
              'causal': ('dq', 'dk', 'dv')}


@dataclasses.dataclass(frozen=True)
class Case:
  op: str                  # 'gswa' or 'causal'
  window: Optional[int]    # None: plain causal (causal op only)
  groups: int              # query heads per kv head
  t: int
  segments: bool
  dtype: str
  head_dim: int = 128
  kv_heads: int = 2
  batch: int = 1

  @property
  def name(self) -> str:
    w = '-' if self.window is None else self.window
    return (f'{self.op} {self.dtype} T={self.t} W={w} Hq/Hkv={self.groups * self.kv_heads}/'
            f'{self.kv_heads} D={self.head_dim}{" seg" if self.segments else ""}')


# Default blocks: forward bq=128, bk=64; backward 64 x 64. Windows 1, 64/65, 127..129 and >= T
# sit on the block edges; T = 517, 1000 and 4000 are not block multiples (padded inside ops.py).
# bf16 first (what training runs), so a step cut short has checked those.
DEVICE_CASES = (
    Case('gswa', 65, 4, 4096, True, 'bfloat16'),
    Case('gswa', 512, 2, 4096, True, 'bfloat16'),
    Case('causal', None, 4, 4096, True, 'bfloat16'),
    Case('gswa', 127, 5, 1000, True, 'bfloat16'),
    Case('gswa', 128, 2, 2048, False, 'bfloat16'),
    Case('gswa', 1, 1, 1000, True, 'float32'),
    Case('gswa', 64, 4, 517, True, 'float32', head_dim=64),
    Case('gswa', 65, 2, 4096, False, 'float32'),
    Case('gswa', 129, 4, 4000, True, 'float32'),
    Case('gswa', 5000, 2, 4096, False, 'float32', head_dim=64),
    Case('causal', 192, 2, 1000, False, 'float32'),
)
# Interpret mode on the CPU: 16-wide blocks (the Triton minimum), windows around them.
DRY_CONFIG = KernelConfig(16, 16, 16, 16)
DRY_CASES = (
    Case('gswa', 15, 2, 45, True, 'float32', head_dim=16),
    Case('gswa', 17, 1, 40, False, 'bfloat16', head_dim=16),
    Case('causal', None, 2, 37, True, 'float32', head_dim=16),
)


def make_segments(rng, b: int, t: int) -> np.ndarray:
  """Packed documents 1, 2, 3, ... of random lengths, and a little trailing padding (0)."""
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    pos, doc = 0, 1
    end = t - int(rng.integers(0, 4))
    while pos < end:
      n = int(rng.integers(3, max(4, t // 3)))
      seg[i, pos:min(end, pos + n)] = doc
      pos, doc = pos + n, doc + 1
  return seg


def make_inputs(case: Case, gate_kind: str, seed: int = 0):
  """Host-side normal inputs (no per-shape device RNG compiles), the gate and a cotangent."""
  rng = np.random.default_rng(seed)
  b, t, hkv, d = case.batch, case.t, case.kv_heads, case.head_dim
  hq = case.groups * hkv
  dtype = jnp.dtype(case.dtype)
  q = jnp.asarray(rng.standard_normal((b, t, hq, d), np.float32), dtype)
  n_kv = 4 if case.op == 'gswa' else 2
  kv = [jnp.asarray(rng.standard_normal((b, t, hkv, d), np.float32), dtype) for _ in range(n_kv)]
  cot = jnp.asarray(rng.standard_normal((b, t, hq, d), np.float32))
  seg = jnp.asarray(make_segments(rng, b, t)) if case.segments else None
  if case.op == 'causal':
    return (q, *kv), seg, cot
  shift = {'random': 0.0, 'near0': -9.0, 'near1': 9.0}[gate_kind]
  gate = 1.0 / (1.0 + np.exp(-(rng.standard_normal((b, t, hq)).astype(np.float32) + shift)))
  return (q, *kv, jnp.asarray(gate, jnp.float32)), seg, cot


def loss_fns(case: Case, config: Optional[KernelConfig], interpret: bool, compiler_options):
  """Jitted grad-with-output of the kernel and of the float32 reference for one static case."""
  kernel = ops.gswa if case.op == 'gswa' else ops.causal
  reference = attn.reference_gswa if case.op == 'gswa' else attn.reference_causal

  def kernel_loss(args, seg, cot):
    out = kernel(*args, seg, window=case.window, config=config, interpret=interpret)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  def ref_loss(args, seg, cot):
    out = reference(*[a.astype(jnp.float32) for a in args], seg, window=case.window)
    return jnp.sum(out * cot), out

  grad = lambda f: jax.jit(jax.grad(f, has_aux=True), compiler_options=compiler_options)
  return grad(kernel_loss), grad(ref_loss)


def rel_err(got, want) -> float:
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  if not np.all(np.isfinite(got)):
    return float('inf')
  return float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))


def check_case(case: Case, config, interpret: bool, compiler_options) -> dict:
  tol_f, tol_g = TOL[case.dtype]
  rec = dict(case=case.name, **dataclasses.asdict(case), tol_fwd=tol_f, tol_grads=tol_g)
  t0 = time.perf_counter()
  kern, ref = loss_fns(case, config, interpret, compiler_options)
  err_f, err_g, worst = 0.0, 0.0, None
  for i, gate_kind in enumerate(GATES if case.op == 'gswa' else GATES[:1]):
    args, seg, cot = make_inputs(case, gate_kind, seed=i)
    g_k, out_k = jax.block_until_ready(kern(args, seg, cot))
    if i == 0:
      rec['first_call_s'] = time.perf_counter() - t0  # compile + one run
    g_r, out_r = ref(args, seg, cot)
    if out_k.dtype != args[0].dtype or out_k.shape != out_r.shape:
      raise AssertionError(f'output {out_k.dtype}{out_k.shape}, expected '
                           f'{args[0].dtype}{out_r.shape}')
    err_f = max(err_f, rel_err(out_k, out_r))
    for name, a, r, x in zip(GRAD_NAMES[case.op], g_k, g_r, args):
      if a.dtype != x.dtype or a.shape != r.shape:
        raise AssertionError(f'{name}: {a.dtype}{a.shape}, expected {x.dtype}{r.shape}')
      e = rel_err(a, r)
      if e >= err_g:
        err_g, worst = e, f'{gate_kind} {name}'
  rec.update(max_err_fwd=err_f, max_err_grads=err_g, worst_grad=worst,
             ok=err_f <= tol_f and err_g <= tol_g, seconds=time.perf_counter() - t0)
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--json', required=True, help='where to write the results')
  p.add_argument('--dry_run', action='store_true', help='tiny cases in interpret mode (CPU)')
  args = p.parse_args(argv)
  platform = jax.default_backend()
  if not args.dry_run and platform != 'gpu':
    print(f'device_kernel_check: error: no GPU (JAX backend is {platform!r}); use --dry_run',
          file=sys.stderr)
    return 2
  jax.config.update('jax_default_matmul_precision', 'highest')
  cases, config = (DRY_CASES, DRY_CONFIG) if args.dry_run else (DEVICE_CASES, None)
  # Interpret-mode kernels are big HLO programs: XLA's backend optimisations only cost time.
  copts = {'xla_backend_optimization_level': 0} if args.dry_run else None
  meta = dict(env_info(), interpret=args.dry_run, matmul_precision='highest',
              kernel_config=dataclasses.asdict(config or KernelConfig()))
  sink = Sink(args.json, meta=meta, cases=[])
  out = sink.data
  n_bad = 0
  for case in cases:
    try:
      rec = check_case(case, config, args.dry_run, copts)
    except Exception as e:  # pylint: disable=broad-except
      rec = dict(case=case.name, **dataclasses.asdict(case), ok=False,
                 error=one_line(e),
                 traceback=traceback.format_exc()[-2000:])
    n_bad += not rec['ok']
    out['cases'].append(rec)
    if 'error' in rec:
      print(f'  {case.name}: ERROR {rec["error"]}', flush=True)
    else:
      print(f'  {case.name}: fwd {rec["max_err_fwd"]:.1e} grads {rec["max_err_grads"]:.1e} '
            f'({rec["worst_grad"]}) {"ok" if rec["ok"] else "FAIL"} in {rec["seconds"]:.1f}s',
            flush=True)
    sink.write()
  print(f'{len(cases) - n_bad}/{len(cases)} kernel cases passed', flush=True)
  return 1 if n_bad else 0


if __name__ == '__main__':
  sys.exit(main())
