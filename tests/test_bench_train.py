"""The train-step benchmark: interleaved timing, the HLO parser and op profile (experiments.bench.profiling),
and a profiled train step (experiments.bench.train). A tiny benchmark run of plt_jax against PyTorch
(experiments.bench_train) is tested in tests/integration/test_bench_train_run.py."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_train
from experiments.bench import profiling
from experiments.bench import train as train_bench

# A hand-written module in XLA's text form: a fused [M, K] x [K, N] dot whose operands are
# fusion parameters (named without shapes, as XLA:CPU prints them now), a batched dot in the
# entry with operand shapes inline (the older form), and an elementwise op.
M, K, N, BATCH = 6, 5, 7, 3
HLO = f"""HloModule jit_toy, is_scheduled=true, entry_computation_layout={{(f32[{M},{K}]{{1,0}})->f32[]}}

%fused_dot (param_0: f32[{M},{K}], param_1: f32[{K},{N}]) -> f32[{M},{N}] {{
  %param_0 = f32[{M},{K}]{{1,0}} parameter(0)
  %param_1 = f32[{K},{N}]{{1,0}} parameter(1)
  ROOT %dot_general.0 = f32[{M},{N}]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}, metadata={{op_name="jit(toy)/jvp(mlp)/dot_general"}}
}}

ENTRY %main.1 (x.1: f32[{M},{K}], w.1: f32[{K},{N}], a.1: f32[{BATCH},{M},{K}], b.1: f32[{BATCH},{K},{N}]) -> f32[{M},{N}] {{
  %x.1 = f32[{M},{K}]{{1,0}} parameter(0), metadata={{op_name="x"}}
  %w.1 = f32[{K},{N}]{{1,0}} parameter(1), metadata={{op_name="w"}}
  %a.1 = f32[{BATCH},{M},{K}]{{2,1,0}} parameter(2)
  %b.1 = f32[{BATCH},{K},{N}]{{2,1,0}} parameter(3)
  %ynn_fusion.1 = f32[{M},{N}]{{1,0}} fusion(%x.1, %w.1), kind=kCustom, calls=%fused_dot, metadata={{op_name="jit(toy)/jvp(mlp)/dot_general"}}
  %dot.2 = f32[{BATCH},{M},{N}]{{2,1,0}} dot(f32[{BATCH},{M},{K}]{{2,1,0}} %a.1, f32[{BATCH},{K},{N}]{{2,1,0}} %b.1), lhs_batch_dims={{0}}, lhs_contracting_dims={{2}}, rhs_batch_dims={{0}}, rhs_contracting_dims={{1}}, metadata={{op_name="jit(toy)/transpose(jvp(attention))/dot_general"}}
  ROOT %tanh.3 = f32[{M},{N}]{{1,0}} tanh(%ynn_fusion.1), metadata={{op_name="jit(toy)/optimizer/tanh"}}
}}
"""


def test_parse_hlo_matmul_flops_and_scopes():
  ops = profiling.parse_hlo(HLO)
  assert profiling.hlo_module_name(HLO) == 'jit_toy'
  assert ops['dot_general.0'].flops == 2 * M * N * K
  assert ops['dot_general.0'].operands == ('param_0', 'param_1')
  assert ops['ynn_fusion.1'].calls == ('fused_dot',)
  assert ops['ynn_fusion.1'].flops == 2 * M * N * K        # the dot it fuses
  assert ops['dot.2'].flops == 2 * BATCH * M * N * K       # batch dims are in the output
  assert ops['dot.2'].operands == ('a.1', 'b.1')
  assert ops['tanh.3'].flops == 0 and ops['tanh.3'].shape == f'f32[{M},{N}]{{1,0}}'
  assert ops['x.1'].computation == 'main.1' and ops['param_0'].computation == 'fused_dot'
  scopes = ('mlp', 'attention', 'optimizer')
  assert [profiling.op_scope(ops[n].op_name, scopes) for n in ('ynn_fusion.1', 'dot.2', 'tanh.3')
          ] == ['mlp fwd', 'attention bwd', 'optimizer']


def test_op_scope_takes_the_innermost_scope_not_the_primitive():
  scopes = ('mlp', 'head', 'attention')
  assert profiling.op_scope('jit(step)/jvp(head)/mlp/dot_general', scopes) == 'mlp fwd'
  assert profiling.op_scope('jit(step)/transpose(jvp(attention))/exp', scopes) == 'attention bwd'
  assert profiling.op_scope('jit(step)/jvp()/head', scopes) == 'other fwd'  # 'head' is the op
  assert profiling.op_scope('reduce_sum', scopes) == 'other'


def test_time_interleaved_rotates_and_skips_warmup():
  calls = []
  fns = {'a': lambda: calls.append('a'), 'b': lambda: (calls.append('b'), time.sleep(0.02))}
  times = profiling.time_interleaved(fns, steps=3, warmup=2)
  assert calls == ['a', 'b'] * 2 + ['a', 'b', 'b', 'a', 'a', 'b']
  assert [len(times['a']), len(times['b'])] == [3, 3]
  assert min(times['b']) >= 0.02 > max(times['a'])


def test_summarize_times():
  st = profiling.summarize_times([0.004, 0.001, 0.003, 0.002])
  assert st == dict(median_ms=pytest.approx(2.5), min_ms=pytest.approx(1.0),
                    p25_ms=pytest.approx(1.75), p75_ms=pytest.approx(3.25), n=4)
  assert profiling.summarize_times([0.005])['p75_ms'] == pytest.approx(5.0)
  with pytest.raises(ValueError):
    profiling.summarize_times([])


def test_op_profile_of_a_traced_jit(tmp_path):
  """The trace's op events map onto the compiled HLO: time and matmul FLOPs per named scope,
  forward and backward apart, and the FLOPs agree with 2 * M * N * K per dot."""
  m, k, n = 96, 80, 112

  def loss(x, w):
    with jax.named_scope('proj'):
      y = x @ w
    return jnp.sum(jnp.tanh(y))

  fn = jax.jit(jax.value_and_grad(loss, argnums=1))
  x = jax.random.normal(jax.random.key(0), (m, k))
  w = jax.random.normal(jax.random.key(1), (k, n))
  compiled = fn.lower(x, w).compile()
  ops = profiling.parse_hlo(compiled.as_text())
  dot_flops = sorted(op.flops for op in ops.values() if op.opcode == 'dot')
  assert dot_flops and dot_flops[-1] == 2 * m * k * n
  assert sum(dot_flops) == 2 * (2 * m * k * n)          # forward y and the weight gradient
  jax.block_until_ready(compiled(x, w))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      jax.block_until_ready(compiled(x, w))
  prof = profiling.xla_op_profile(str(tmp_path), hlo_text=compiled.as_text(), scopes=('proj',))
  assert prof['steps'] == 2 and prof['module'] == profiling.hlo_module_name(compiled.as_text())
  assert prof['ops'] and all(r['ms_per_step'] > 0 for r in prof['ops'])
  assert all(r['op'] in ops for r in prof['ops'])       # nothing unmatched
  assert 0 < prof['wall_ms_per_step']
  scopes = {r['scope']: r for r in prof['scopes']}
  assert scopes['proj fwd']['gflop'] == pytest.approx(2 * m * k * n / 1e9)
  assert scopes['proj bwd']['gflop'] == pytest.approx(2 * m * k * n / 1e9)
  assert sum(r['ms_per_step'] for r in prof['scopes']) == pytest.approx(prof['op_ms_per_step'])
  text = profiling.format_op_profile(prof, top=3)
  assert 'proj fwd' in text and len(text.splitlines()) >= 5


def test_random_batch_matches_the_torch_label_loss():
  b = train_bench.random_batch(vocab=50, batch=3, seq_len=9, seed=1)
  assert b['inputs'].shape == (3, 9) and b['targets'].shape == (3, 9)
  np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
  assert b['loss_mask'].sum() == 3 * 8 and np.all(b['loss_mask'][:, -1] == 0)
  assert b['inputs'].max() < 50 and b['positions'][2].tolist() == list(range(9))


def test_parse_args_checks_values():
  args = bench_train.parse_args(['--shapes', 'tiny', '--attention_impl', 'auto,xla,auto'])
  assert args.attention_impl == ['auto', 'xla'] and args.loops == [1, 2]
  assert args.threads == len(os.sched_getaffinity(0))
  for bad in (['--shapes', 'huge'], ['--attention_impl', 'flash'], ['--loops', '0']):
    with pytest.raises(SystemExit):
      bench_train.parse_args(bad)
