"""tools/device_check.py without an accelerator: the report from fake step results, the decode
ratios, the step names. The orchestrator's keep-going, timeout and budget handling on stand-in
steps (fresh processes) is tested in tests/integration/test_device_check_orchestrator.py.

The real steps at tiny sizes are the dry run (`tools/device_check.py --dry_run`, run by CI).
"""

import pytest

from tools import device_check as dc


def _decode_results():
  ms = {('plt', 1): 10.0, ('plt', 2): 11.0, ('plt', 4): 13.0,
        ('vanilla', 1): 10.0, ('vanilla', 2): 20.0, ('vanilla', 4): 40.0}
  out = []
  for (mode, r), t in ms.items():
    for batch, scale in ((1, 1.0), (32, 2.0)):
      out.append(dict(mode=f'{mode}_stacked+xla', R=r, batch=batch, step_ms=t * scale,
                      tokens_per_s=batch / (t * scale / 1e3), prefill_s=0.01, kv_bytes=2**20))
  return out


def test_decode_ratios():
  ratios = dc.decode_ratios(_decode_results())
  assert set(ratios) == {'batch1', 'batch32'}
  assert ratios['batch1'] == pytest.approx({
      'plt_R2/plt_R1': 1.1, 'plt_R2/vanilla_R2': 0.55,
      'plt_R4/plt_R1': 1.3, 'plt_R4/vanilla_R4': 0.325})
  assert ratios['batch32'] == pytest.approx(ratios['batch1'])  # every time doubled


def _fake_report():
  meta = dict(jax='0.11.2', jaxlib='0.11.2', backend='gpu', device='NVIDIA H200',
              platform_version='cuda 13000', plugins={'jax-cuda13-plugin': '0.11.2'},
              python='3.12.3')
  kernels = dict(meta=dict(meta, interpret=False), cases=[
      dict(case='gswa float32 T=4096 W=65', max_err_fwd=2e-6, tol_fwd=1e-5, max_err_grads=3e-5,
           tol_grads=1e-4, worst_grad='near1 dgate', ok=True, seconds=4.2),
      dict(case='gswa bfloat16 T=4096 W=512', max_err_fwd=3e-2, tol_fwd=2e-2, max_err_grads=1e-2,
           tol_grads=5e-2, worst_grad='random dq', ok=False, seconds=3.0),
      dict(case='causal float32 T=1000 W=-', ok=False, error='ValueError: out of shared memory')])
  attn = dict(meta=meta, bench_args=dict(tokens=32768), records=[
      dict(op='gswa', impl='cudnn', T=4096, W=65, D=128, B=8, Hq=16, Hkv=4, dtype='bfloat16',
           fwd_ms=1.5, bwd_ms=2.5, fwd_bwd_ms=4.0, fwd_tflops=100.0, bwd_tflops=150.0,
           fwd_bwd_tflops=131.25),
      dict(op='gswa', impl='pallas', T=4096, W=65, D=128, B=8, Hq=16, Hkv=4, dtype='bfloat16',
           fwd_ms=1.0, bwd_ms=2.0, fwd_bwd_ms=3.0, fwd_tflops=150.0, bwd_tflops=187.5,
           fwd_bwd_tflops=175.0),
      dict(op='gswa', impl='cudnn', T=16384, W=512, D=128, B=2, Hq=16, Hkv=4, dtype='bfloat16',
           error='XlaRuntimeError: RESOURCE_EXHAUSTED')])
  train = dict(meta=meta, preset='125m', batch=32, seq_len=2048, steps=30, warmup=2,
               peak_flops_per_device=989e12, runs=[
                   dict(R=1, attention_impl='pallas', params=124_000_000, compile_s=31.0,
                        step_ms=120.0, tokens_per_s=546133.0, tflops_per_device=400.0,
                        mfu=0.4044, loss_first=10.41, loss_last=9.87,
                        memory=dict(peak_estimate=20 * 2**30)),
                   dict(R=2, attention_impl='cudnn', error='ValueError: cuDNN mask unsupported')])
  decode = dict(meta=meta, model=dict(d_model=768, num_layers=12, dtype='bfloat16'),
                modes=list(dc.DECODE_MODES), results=_decode_results(),
                ratios=dc.decode_ratios(_decode_results()),
                targets_batch1={'plt_R2/plt_R1': 1.25, 'plt_R4/plt_R1': 1.6,
                                'plt_R2/vanilla_R2': 0.65})
  memory = dict(meta=meta, preset='1b', batch=8, seq_len=4096,
                device_memory=dict(bytes_limit=100 * 2**30), runs=[
                    dict(R=2, attention_impl='auto', params=1_300_000_000, compile_s=70.0,
                         fits=True, memory=dict(argument=16 * 2**30, output=16 * 2**30,
                                                alias=16 * 2**30, temp=40 * 2**30,
                                                generated_code=0, peak_estimate=56 * 2**30))])
  step = lambda name, result, status='ok', error=None, seconds=10.0: dict(  # noqa: E731
      name=name, status=status, rc=0 if status == 'ok' else 1, seconds=seconds, timeout_s=90.0,
      error=error, log_tail=None, result=result)
  return dict(meta=dict(date='2026-12-01 12:00 UTC', dry_run=False,
                        gpu='NVIDIA H200, 580.159.04, 143771 MiB'),
              steps=dict(kernels=step('kernels', kernels, 'failed', 'exit 1: 1/3 kernel cases'),
                         attention=step('attention', attn),
                         train=step('train', train, 'failed', 'exit 1: ERROR'),
                         decode=step('decode', decode),
                         memory=step('memory', memory)))


def test_markdown_tables():
  md = dc.markdown(_fake_report())
  lines = md.splitlines()
  assert lines[0] == '# plt_jax device check'
  assert ('device NVIDIA H200 (gpu, cuda 13000); jax 0.11.2, jaxlib 0.11.2, jax-cuda13-plugin '
          '0.11.2; Python 3.12.3.') in md
  assert 'nvidia-smi: NVIDIA H200, 580.159.04, 143771 MiB.' in md
  assert '| kernels | failed | 10 | exit 1: 1/3 kernel cases |' in lines
  # a. the failing tolerance, the error case and the pass count
  assert '1/3 cases pass (compiled;' in md
  assert ('| gswa float32 T=4096 W=65 | 2.0e-06 / 1e-05 | 3.0e-05 / 1e-04 | near1 dgate | pass '
          '| 4.2 |') in lines
  assert ('| gswa bfloat16 T=4096 W=512 | 3.0e-02 / 2e-02 | 1.0e-02 / 5e-02 | random dq | FAIL '
          '| 3.0 |') in lines
  assert ('| causal float32 T=1000 W=- | - | - | - | ERROR: ValueError: out of shared memory '
          '| - |') in lines
  # b. cuDNN / Pallas speed ratios on the Pallas row, and an errored row
  assert ('| 4096 | 65 | pallas | 1.000 | 2.000 | 3.000 | 150.0 | 187.5 | 175.0 | '
          '1.50x / 1.25x / 1.33x |') in lines
  assert '| 4096 | 65 | cudnn | 1.500 | 2.500 | 4.000 | 100.0 | 150.0 | 131.2 |  |' in lines
  assert ('| 16384 | 512 | cudnn | - | - | - | - | - | - | XlaRuntimeError: RESOURCE_EXHAUSTED |'
          in lines)
  # c. MFU in percent, peak memory in GiB, and the failed variant
  assert 'Preset 125m (124.0M parameters), batch 32 x 2048' in md
  assert 'datasheet peak of 989 TFLOP/s' in md
  assert ('| 1 | pallas | 31.0 | 120.0 | 546,133 | 400.0 | 40.4% | 20.00 | 10.410 -> 9.870 |'
          in lines)
  assert '| 2 | cudnn | - | - | - | - | - | - | ValueError: cuDNN mask unsupported |' in lines
  # d. ratios per batch and the batch-1 targets
  assert '| 1 | 1.10 | 1.30 | 0.55 | 0.33 |' in lines
  assert '| 32 | 1.10 | 1.30 | 0.55 | 0.33 |' in lines
  assert '| target at batch 1 | <= 1.25 | <= 1.60 | <= 0.65 | - |' in lines
  assert '| 32 | plt_stacked+xla | 4 | 26.00 | 1,231 | 0.010 | 1.0 |' in lines
  # e. memory in GiB against the allocator limit
  assert "allocator limit of 100.0 GiB." in md
  assert '| 2 | auto | 16.00 | 16.00 | 16.00 | 40.00 | 56.00 | yes | 70.0 |' in lines


def test_markdown_without_results():
  report = dict(meta=dict(date='d', dry_run=True), steps=dict(
      train=dict(name='train', status='timeout', seconds=180.0, error='stopped after 180 s',
                 result=None),
      memory=dict(name='memory', status='skipped', seconds=0.0, error='budget spent (540 s)',
                  result=None)))
  md = dc.markdown(report)
  assert md.splitlines()[0] == '# plt_jax device check (dry run, CPU)'
  assert 'no results (timeout: stopped after 180 s)' in md
  assert '| memory | skipped | 0 | budget spent (540 s) |' in md


def test_parse_args_steps():
  args = dc.parse_args(['--steps', 'a,train,e', '--timeouts', 'c=200,memory=30'])
  assert args.steps == ['kernels', 'train', 'memory']
  assert args.timeouts == {'train': 200.0, 'memory': 30.0}
  with pytest.raises(SystemExit):
    dc.parse_args(['--steps', 'kernels,nope'])
