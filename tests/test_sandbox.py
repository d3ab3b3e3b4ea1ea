"""The sandbox's filesystem view, its secrets and its verdict, each shown by a program run through
the real sandbox: nothing written survives, tmpfs sizes hold, a root-only file stays unread,
and forged verdicts (walked frames, gc, inherited fds, /proc, ctypes, os._exit, rigged __eq__)
never pass. The programs of a fixture run side by side on one worker pool, once with each engine
(bubblewrap, and the sandbox's own namespace code, its fallback).
"""
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import textwrap

import pytest

from plt_jax.evaluation import humaneval, runner, sandbox
from plt_jax.evaluation.sandbox import api, launch, wire

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='the sandbox is Linux-only')
ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = sandbox.Limits(timeout=10.0, nproc=6, memory_bytes=512 << 20, file_bytes=1 << 20)
# A HumanEval-shaped problem; the marker in its tests shows where the test code is held.
_PROBLEM = dict(
    prompt='def has_close_elements(numbers, threshold):\n    """Two closer than threshold?"""\n',
    test=textwrap.dedent('''
        # JUDGEONLY1f2e3d4c5b6a7988 (in the judge only)
        def check(candidate):
            assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
            assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
            assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    '''),
    entry_point='has_close_elements')


@pytest.fixture(scope='module', params=sandbox.ENGINES)
def view(request):
  """The isolation of `request.param`: bubblewrap, or the builtin fallback."""
  if request.param == 'bubblewrap' and launch.bubblewrap()[0] is None:
    pytest.skip(f'no bubblewrap: {launch.bubblewrap()[1]}')
  iso = sandbox.describe_isolation(LIMITS, engine=request.param)
  assert iso['works'], iso
  if iso['filesystem'] != 'private':
    pytest.skip(f'no private filesystem view on this machine: {iso.get("filesystem_error")}')
  return iso


def _everything(result) -> str:
  return json.dumps(dataclasses.asdict(result))


def _run_all(jobs: dict, **kwargs) -> dict:
  """{name: (program, judge or None, limits)} -> {name: ExecResult}, all at once."""
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futs = {name: pool.submit(sandbox.run_program, prog, lim, judge=judge, **kwargs)
            for name, (prog, judge, lim) in jobs.items()}
    return {name: f.result() for name, f in futs.items()}


# --------------------------------------------------------------- filesystem and secrets

MARK = 'plt-leftover-' + secrets.token_hex(6)

LEFTOVERS = textwrap.dedent(f'''
    import os
    for d in ('/tmp', '/var/tmp', '/dev/shm', os.getcwd()):
        p = os.path.join(d, {MARK!r})
        with open(p, 'wb') as f:
            f.write(b'x' * (256 << 10))
        assert os.path.getsize(p) == 256 << 10, p
    print('CWD', os.getcwd())
    print('CAPEFF', [ln.split()[1] for ln in open('/proc/self/status')
                     if ln.startswith('CapEff')][0])
    print('ROOT', sorted(os.listdir('/')))
''')

FILL = textwrap.dedent('''
    import os
    for d in ('/dev/shm', '/tmp', '/var/tmp', os.getcwd()):
        total, err = 0, None
        try:
            for i in range(16):  # up to 16 MiB, in files the 1 MiB file-size limit allows
                with open(f'{d}/fill{i}', 'wb', buffering=0) as f:
                    for _ in range(4):
                        total += f.write(b'x' * (256 << 10))
        except OSError as e:
            err = e.errno
        print('FILL', d, total, err)
''')


def _secret_probe(path):
  return textwrap.dedent(f'''
      import os
      for p in ({path!r}, '/proc/1/root' + {path!r}, {os.path.dirname(path)!r}):
          try:
              if os.path.isdir(p):
                  print('LISTED', p, os.listdir(p))
              else:
                  print('READ', open(p).read())
          except OSError as e:
              print('DENIED', type(e).__name__)
      print('HOME', sorted(os.listdir('/root')) if os.path.isdir('/root') else None)
      print('SEEN', [p for p in ({REPO!r}, '/home', '/work', '/proc/self/root' + {REPO!r})
                     if os.path.exists(p)])
      raise RuntimeError(open({path!r}).read())
  ''')


@pytest.fixture(scope='module')
def fs_runs(view, tmp_path_factory):
  home = tempfile.mkdtemp(prefix='plt-secret-', dir=os.path.expanduser('~'))
  os.chmod(home, 0o700)
  secret_text = 'SECRET-' + secrets.token_hex(16)
  secret = os.path.join(home, 'credentials')
  with open(secret, 'w') as f:
    f.write(secret_text)
  os.chmod(secret, 0o600)
  base = tmp_path_factory.mktemp('fs-sandboxes')
  small = dataclasses.replace(LIMITS, tmpfs_bytes=2 << 20)
  # The secret read inside the function the judge calls: its reply, exception or output.
  candidate = ('def has_close_elements(numbers, threshold):\n'
               f'    text = open({secret!r}).read()\n    print(text)\n    return text\n')
  try:
    res = _run_all(dict(
        leftovers=(LEFTOVERS, None, LIMITS),
        fill=(FILL, None, small),
        secret=(_secret_probe(secret), None, LIMITS),
        secret_judged=(candidate, humaneval.build_job(_PROBLEM, '')[1], LIMITS),
    ), base_dir=str(base), engine=view['engine'])
  finally:
    leftover = {d: os.path.exists(os.path.join(d, MARK)) for d in ('/tmp', '/var/tmp', '/dev/shm')}
  yield res, dict(secret=secret, secret_text=secret_text, base=base, leftover=leftover)
  shutil.rmtree(home, ignore_errors=True)


def test_nothing_written_in_tmp_var_tmp_dev_shm_or_the_work_dir_survives(fs_runs):
  res, info = fs_runs
  r = res['leftovers']
  assert r.passed, r                           # every write succeeded inside
  assert f'CWD {sandbox.VIEW_WORKDIR}' in r.output
  assert 'CAPEFF 0000000000000000' in r.output   # no capability at all
  assert info['leftover'] == {'/tmp': False, '/var/tmp': False, '/dev/shm': False}
  assert os.listdir(info['base']) == []       # the host-side work dir is gone too
  with open('/proc/self/mountinfo') as f:      # and none of the view's mounts reached the host
    assert [ln for ln in f if 'plt-sandbox-' in ln] == []
  assert r.isolation['filesystem'] == 'private' and r.isolation['capabilities'] == 'none'
  # The root holds only the system directories, the prefix's path, /etc, /dev, /proc and tmp.
  root = eval(r.output.split('ROOT ', 1)[1].splitlines()[0])  # pylint: disable=eval-used
  assert 'home' not in root and 'work' not in root and 'mnt' not in root, root
  assert {'usr', 'tmp', 'var', 'dev', 'proc', 'etc', 'sandbox'} <= set(root), root


def test_tmpfs_writes_beyond_the_size_limit_fail_inside(fs_runs):
  r = fs_runs[0]['fill']
  assert r.passed, r
  rows = [ln.split() for ln in r.output.splitlines() if ln.startswith('FILL ')]
  assert [row[1] for row in rows] == ['/dev/shm', '/tmp', '/var/tmp', sandbox.VIEW_WORKDIR]
  for _, d, total, err in rows:
    # 16 MiB attempted, 2 MiB (the limit) accepted at most, then "no space left".
    assert int(err) == errno.ENOSPC, (d, err)
    assert (1 << 20) <= int(total) <= (2 << 20), (d, total)


def test_a_root_only_file_outside_cannot_be_opened_and_leaks_nowhere(fs_runs):
  res, info = fs_runs
  r = res['secret']
  assert not r.passed
  # The file and its directory are not in the view; init's root link is not the program's.
  denied = [ln.split()[1] for ln in r.output.splitlines() if ln.startswith('DENIED ')]
  assert denied == ['FileNotFoundError', 'PermissionError', 'FileNotFoundError'], r.output
  assert 'READ' not in r.output and 'LISTED' not in r.output
  assert "SEEN []" in r.output, r.output                 # no checkout, no /home, no /work
  home = eval(r.output.split('HOME ', 1)[1].splitlines()[0])  # pylint: disable=eval-used
  assert os.path.basename(os.path.dirname(info['secret'])) not in (home or [])
  assert r.reason.startswith('FileNotFoundError'), r.reason
  for name in ('secret', 'secret_judged'):
    assert info['secret_text'] not in _everything(res[name]), name
  assert not res['secret_judged'].passed
  assert res['secret_judged'].reason.startswith('FileNotFoundError')


# ------------------------------------------------------------------------------ verdicts

HONEST = ('    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n'
          '               for j, b in enumerate(numbers) if i != j)\n')
TOKEN = 'c0ffee' + secrets.token_hex(13)
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()

# Each attack looks for the token (recognised here by its hash, a stand-in for however an
# attacker would tell it apart) and for descriptors, then writes what it found (or a guess) to
# every descriptor it has. Without a judge the same code does forge a pass (the control test).
_WRITE_EVERYWHERE = '''
    import os, sys
    sys.stdout.flush()   # the judge may end the sandbox at the first bytes written below
    tokens = {t.encode() if isinstance(t, str) else t for t in tokens} or {b'f' * 32}
    for fd in sorted(set(range(1024)) | set(fds)):
        for t in sorted(tokens):
            try:
                os.write(fd, t)
            except OSError:
                pass
'''
ATTACKS = {
    'frames': '''
        import sys
        tokens, fds = set(), set()
        f = sys._getframe()
        while f is not None:
            for k, v in list(f.f_locals.items()):
                if 'token' in k and isinstance(v, (str, bytes)):
                    tokens.add(v)
                if k.endswith('fd') and isinstance(v, int):
                    fds.add(v)
                if isinstance(v, dict):   # e.g. a job description
                    for k2, w in list(v.items()):
                        if 'token' in str(k2) and isinstance(w, (str, bytes)):
                            tokens.add(w)
                        if 'fd' in str(k2) and isinstance(w, int):
                            fds.add(w)
            f = f.f_back
        print('FRAMES FOUND', len(tokens))
    ''',
    'gc': f'''
        import gc, hashlib
        tokens, fds = set(), set()
        for o in gc.get_objects():
            items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()
            for v in list(items):
                if isinstance(v, (str, bytes)) and len(v) == 32:
                    b = v.encode() if isinstance(v, str) else v
                    if hashlib.sha256(b).hexdigest() == {TOKEN_SHA!r}:
                        tokens.add(b)
        print('GC FOUND', len(tokens))
    ''',
    'memory': f'''
        import ctypes, hashlib, re
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: open its own /proc/self/mem
        found = tests = 0
        tokens, fds = set(), set()
        pat, mark = re.compile(rb'[0-9a-f]{{32}}'), re.compile(rb'JUDGE' rb'ONLY[0-9a-f]{{16}}')
        with open('/proc/self/mem', 'rb', buffering=0) as mem:
            for line in open('/proc/self/maps').read().splitlines():
                addr, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in addr.split('-'))
                if not perms.startswith('r') or hi - lo > 64 << 20:
                    continue
                try:
                    mem.seek(lo)
                    data = mem.read(hi - lo)
                except (OSError, ValueError, OverflowError):
                    continue
                tests += len(mark.findall(data))
                for m in pat.finditer(data):
                    if hashlib.sha256(m.group()).hexdigest() == {TOKEN_SHA!r}:
                        found += 1
                        tokens.add(m.group())
        print('TOKEN IN MEMORY', found)
        print('TESTS IN MEMORY', tests)
    ''',
    'proc_fds': '''
        import os
        tokens, fds, opened = {'0' * 32}, set(), 0
        for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:
            try:
                names = os.listdir(f'/proc/{pid}/fd')
            except OSError:
                continue
            for n in names:
                try:
                    fd = os.open(f'/proc/{pid}/fd/{n}', os.O_WRONLY)
                    opened += 1
                    fds.add(fd)
                except OSError:
                    pass
        print('OTHER FDS OPENED', opened)
    ''',
    'ctypes': '''
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        traced = 0
        for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
            if pid != os.getpid() and libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
                traced += 1
        print('TRACED', traced)
        sys.stdout.flush()
        tokens, fds = set(), set()
        for fd in range(1024):
            libc.write(fd, b'0' * 32, 32)
    ''',
}


def _attack(name, ending):
  body = textwrap.indent(textwrap.dedent(ATTACKS[name]) + textwrap.dedent(_WRITE_EVERYWHERE),
                         '    ')
  tail = ('    import sys\n    sys.stdout.flush()\n    os._exit(0)\n' if ending == 'exit'
          else '    return True\n')
  return ('def has_close_elements(numbers, threshold):\n' + body + tail)


ALWAYS_EQUAL = textwrap.dedent('''
    class AlwaysEqual:
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __bool__(self): return True
        __hash__ = object.__hash__
''')


RIGGED = {
    'always_equal': ALWAYS_EQUAL + (
        'def has_close_elements(numbers, threshold):\n    return AlwaysEqual()\n'),
    'rigged_int': ('class B(int):\n    def __eq__(self, other): return True\n'
                   'def has_close_elements(numbers, threshold):\n    return B(0)\n'),
    'rigged_str': ('class S(str):\n    def __eq__(self, other): return True\n'
                   'def has_close_elements(numbers, threshold):\n    return S("x")\n'),
    'rigged_list': (ALWAYS_EQUAL + 'def has_close_elements(numbers, threshold):\n'
                    '    return [AlwaysEqual()]\n'),
}


@pytest.fixture(scope='module')
def forgeries(view):
  judge = humaneval.build_job(_PROBLEM, '')[1]
  jobs = {'honest': (_PROBLEM['prompt'] + HONEST, judge, LIMITS)}
  for name in ATTACKS:
    for ending in ('exit', 'return'):
      jobs[f'{name}-{ending}'] = (_attack(name, ending), judge, LIMITS)
  for name, prog in RIGGED.items():
    jobs[name] = (prog, judge, LIMITS)
  with pytest.MonkeyPatch.context() as mp:  # a token the attacks can recognise by its hash
    mp.setattr(api, '_new_token', lambda: TOKEN)
    res = _run_all(jobs, engine=view['engine'])
    # The same attacks without any namespace: the verdict must not depend on them.
    bare = _run_all({k: v for k, v in jobs.items() if k in (
        'honest', 'frames-exit', 'gc-exit', 'proc_fds-exit', 'ctypes-exit')}, namespaces=False)
  return res, bare


def test_the_honest_candidate_passes_through_the_judge(forgeries):
  res, bare = forgeries
  for r in (res['honest'], bare['honest']):
    assert r.passed and r.status == 'passed', r
    assert r.isolation['verdict'] == 'judge'


@pytest.mark.parametrize('name', [f'{a}-{e}' for a in ATTACKS for e in ('exit', 'return')])
def test_forged_verdicts_never_pass(forgeries, name):
  res, bare = forgeries
  r = res[name]
  assert not r.passed and r.status == 'failed', (name, r)
  # What it wrote to its reply pipe is not a reply: the judge stops at the first bytes.
  assert r.reason.startswith('ValueError: the program sent '), r.reason
  assert TOKEN not in r.output
  if name in bare:
    assert not bare[name].passed, (name, bare[name])
  out = r.output
  if name.startswith('frames'):
    assert 'FRAMES FOUND 0' in out, out
  if name.startswith('gc'):
    assert 'GC FOUND 0' in out, out
  if name.startswith('memory'):  # neither the token nor the test code is in its memory
    assert 'TOKEN IN MEMORY 0' in out and 'TESTS IN MEMORY 0' in out, out
  if name.startswith('proc_fds'):
    assert 'OTHER FDS OPENED 0' in out, out
  if name.startswith('ctypes'):
    assert 'TRACED 0' in out, out


def test_without_a_judge_the_same_attacks_do_forge_a_pass():
  # The control: the attack code works where the token is within reach (a program with no
  # judge writes its own end-of-program token), so its failures above are the judge's doing.
  jobs = {name: (_attack(name, 'exit') + '\nhas_close_elements([], 0)\n', None, LIMITS)
          for name in ('frames', 'memory')}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(api, '_new_token', lambda: TOKEN)
    res = _run_all(jobs)
  assert res['frames'].passed and 'FRAMES FOUND 1' in res['frames'].output, res['frames']
  assert res['memory'].passed, res['memory']
  found = int(res['memory'].output.split('TOKEN IN MEMORY ')[1].split()[0])
  assert found >= 1, res['memory'].output


@pytest.mark.parametrize('name', list(RIGGED))
def test_objects_with_a_rigged_eq_never_pass(forgeries, name):
  r = forgeries[0][name]
  assert not r.passed and r.status == 'failed', (name, r)
  if name in ('always_equal', 'rigged_list'):  # an unknown type does not cross to the judge
    assert r.reason == ('TypeError: a AlwaysEqual cannot be passed between the program and '
                        'its tests'), r.reason
  else:  # a subclass of a built-in crosses as the built-in value, which compares honestly
    assert r.reason == 'AssertionError', r.reason


# ---------------------------------------------------------------------- values and layers

def test_values_cross_as_plain_built_ins():
  values = [None, True, False, 0, -3, 10 ** 40, -2.5, float('inf'), -0.0, 'é\n', '', b'\x00\xff',
            1 + 2j, [1, [2]], (1, (2,)), {'a': 1, 2: (3,)}, {1, 2}, frozenset({3}), range(1, 7, 2),
            (), [None, 'x', 1.5]]
  for v in values:
    back = wire.loads(wire.dumps(v))
    assert back == v and type(back) is type(v), (v, back)
  assert str(wire.loads(wire.dumps(-0.0))) == '-0.0'
  nan = wire.loads(wire.dumps(float('nan')))
  assert nan != nan
  back = wire.loads(wire.dumps(x * x for x in range(4)))
  assert type(back) is type(iter([])) and list(back) == [0, 1, 4, 9]

  class Sub(int):
    def __eq__(self, other):
      return True
  assert type(wire.loads(wire.dumps(Sub(5)))) is int
  assert wire.dumps([True, 'ab']) == b'l2:Ts2:ab'
  for bad in (b'', b'x', b'i12', b'i1 2;', b'i 1;', b's5:ab', b's-1:', b'l3:N', b'N N', b'fzz;',
              b'S1:l0:', b'd1:l0:N', b'r i1;i2;i3;', b'rs1:ai2;i3;', b's2:\xff\xfe',
              b'l99999999999:'):
    with pytest.raises(ValueError):
      wire.loads(bad)
  deep = b'l1:' * 100 + b'N'
  with pytest.raises(ValueError, match='nested too deeply'):
    wire.loads(deep)
  with pytest.raises(TypeError, match='cannot be passed'):
    wire.dumps(object())


def test_the_judge_sees_the_types_the_candidate_returned(view):
  program = textwrap.dedent('''
      import collections
      def f(kind):
          return {'tuple': (1, 2), 'dict': {'a': [1]}, 'set': {3}, 'none': None, 'float': 0.5,
                  'named': collections.namedtuple('P', 'x y')(1, 2),
                  'counter': collections.Counter('aab'), 'gen': (i for i in range(3)),
                  'bool': False}[kind]
  ''')
  test = textwrap.dedent('''
      def check(candidate):
          assert type(candidate('tuple')) is tuple and candidate('tuple') == (1, 2)
          assert candidate('dict') == {'a': [1]} and candidate('set') == {3}
          assert candidate('none') is None and abs(candidate('float') - 0.5) < 1e-12
          assert type(candidate('named')) is tuple and candidate('named') == (1, 2)
          assert type(candidate('counter')) is dict and candidate('counter') == {'a': 2, 'b': 1}
          g = candidate('gen')
          assert g != [0, 1, 2] and tuple(g) == (0, 1, 2)
          assert candidate('bool') is False
          assert f('tuple') == (1, 2)   # the entry point by its name is the candidate too
  ''')
  judge = sandbox.Judge(setup='def f(kind):\n    """"""\n', test=test, entry_point='f')
  r = sandbox.run_program(program, LIMITS, judge=judge)
  assert r.passed, r
  r = sandbox.run_program(program.replace("'bool': False", "'bool': 0"), LIMITS, judge=judge)
  assert not r.passed and r.reason == 'AssertionError'


def test_missing_layers_are_recorded_and_refused_unless_allowed():
  iso = sandbox.describe_isolation(LIMITS, namespaces=False)
  assert iso['works'] and iso['filesystem'] == 'host' and iso['pid_namespace'] is False
  assert iso['network'] == 'socket-patch'
  assert {'filesystem', 'network', 'pid_namespace'} <= set(iso['missing'])
  with pytest.raises(ValueError) as e:
    sandbox.require_isolation(LIMITS, namespaces=False)
  msg = str(e.value)
  assert '\n' not in msg and 'filesystem (a private filesystem view' in msg, msg
  assert '--allow_weaker_isolation' in msg, msg
  assert sandbox.require_isolation(LIMITS, allow_weaker=True, namespaces=False)['missing'] == \
      iso['missing']
  # The evaluate command's path refuses before it loads any model.
  with pytest.raises(ValueError, match='sandbox layers missing on this machine: filesystem'):
    runner.run('humaneval', workdir='/nonexistent/run', sandbox_kwargs=dict(namespaces=False))
  with pytest.raises(FileNotFoundError):   # accepted: it goes on to look for the checkpoint
    runner.run('humaneval', workdir='/nonexistent/run', allow_weaker_isolation=True,
               sandbox_kwargs=dict(namespaces=False))


def test_summary_records_the_isolation_layers(view, tmp_path):
  s = humaneval.evaluate([dict(_PROBLEM, task_id='T/0')], lambda ps: [HONEST] * len(ps),
                         out_dir=str(tmp_path), limits=LIMITS, progress=False,
                         sandbox_kwargs=dict(engine=view['engine']))
  iso = json.load(open(tmp_path / 'summary.json'))['isolation']
  assert s['pass@1'] == 1.0 and iso == s['isolation']
  assert iso['filesystem'] == 'private' and iso['verdict'] == 'judge'
  assert iso['missing'] == [] and 'uid' not in iso and iso['engine'] == view['engine']
  assert set(sandbox.LAYERS) <= set(iso), iso   # every layer named, seccomp, cgroup, ipc...
  assert iso['throwaway_uid'] is ROOT
