"""Each isolation layer against the hostile program it exists for, run through the real sandbox:
IPC objects, kernel keyrings, user namespaces, memory beyond the limit, disk through stdout,
socket families, host identity and uid collisions. Every test has its control: the same program
with that one layer switched off (`run_program(disable=...)`) does escape, so the test fails
when the layer is removed. Needs root (throwaway uids, cgroups), as CI runs; elsewhere the tests
skip with the missing layer's reason.
"""
import concurrent.futures
import ctypes
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from plt_jax.evaluation import humaneval, runner, sandbox
from plt_jax.evaluation.sandbox import host, launch, wire

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='the sandbox is Linux-only')
LIMITS = sandbox.Limits(timeout=10.0, nproc=6, memory_bytes=256 << 20, file_bytes=1 << 20)
MARK = secrets.token_hex(6)
IPC_KEY = 0x5100_0000 + secrets.randbelow(1 << 24)   # SysV keys of this test run
_LIBC = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope='module', params=sandbox.ENGINES)
def layers(request):
  """The isolation report of `request.param` (bubblewrap, or the builtin fallback)."""
  if os.geteuid() != 0:
    pytest.skip('the layer tests run as root (throwaway uids, cgroups), as CI does')
  if request.param == 'bubblewrap' and launch.bubblewrap()[0] is None:
    pytest.skip(f'no bubblewrap: {launch.bubblewrap()[1]}')
  iso = sandbox.describe_isolation(LIMITS, engine=request.param)
  assert iso['works'], iso
  assert iso['engine'] == request.param
  return iso


def _need(iso, *names):
  missing = [n for n in names if n in iso['missing']]
  if missing:
    why = {n: iso.get(f'{n}_error') for n in missing}
    pytest.skip(f'layers missing on this machine: {why}')


def _run_all(iso, jobs: dict) -> dict:
  """{name: (program, run_program kwargs)} -> {name: ExecResult}, all at once, with the
  engine of `iso`."""
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futs = {name: pool.submit(sandbox.run_program, prog, kw.pop('limits', LIMITS),
                              engine=iso['engine'], **kw)
            for name, (prog, kw) in jobs.items()}
    res = {name: f.result() for name, f in futs.items()}
  assert {r.isolation['engine'] for r in res.values()} == {iso['engine']}
  return res


def _lines(r, tag):
  return [ln.split(' ', 1)[1] for ln in r.output.splitlines() if ln.startswith(tag + ' ')]


# ------------------------------------------------------------------------------------ IPC

IPC = textwrap.dedent(f'''
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    seen = [ln.split()[0] for ln in open('/proc/sysvipc/shm').read().splitlines()[1:]]
    print('SEEN_SHM', {IPC_KEY + 9} in [int(k) for k in seen])
    shm = libc.shmget({IPC_KEY}, 1 << 20, 0o1000 | 0o644)     # IPC_CREAT
    msg = libc.msgget({IPC_KEY + 1}, 0o1000 | 0o644)
    sem = libc.semget({IPC_KEY + 2}, 1, 0o1000 | 0o644)
    libc.mq_open.restype = ctypes.c_int
    mq = libc.mq_open(b'/plt-{MARK}', os.O_CREAT | os.O_RDWR, 0o644, None)
    print('MADE', shm >= 0, msg >= 0, sem >= 0, mq >= 0)
''')


def _sysv_keys(kind):
  with open(f'/proc/sysvipc/{kind}') as f:
    return {int(ln.split()[0]): int(ln.split()[1]) for ln in f.read().splitlines()[1:]}


def _remove_ipc():
  """Removes this test's IPC objects; which ones existed."""
  found = []
  for kind, key, ctl in (('shm', IPC_KEY, _LIBC.shmctl), ('msg', IPC_KEY + 1, _LIBC.msgctl),
                         ('sem', IPC_KEY + 2, _LIBC.semctl)):
    ident = _sysv_keys(kind).get(key)
    if ident is not None:
      found.append(kind)
      ctl(ident, 0, None)   # IPC_RMID
  if _LIBC.mq_unlink(f'/plt-{MARK}'.encode()) == 0:
    found.append('mqueue')
  return found


def test_ipc_objects_die_with_the_sample(layers):
  _need(layers, 'ipc')
  host_shm = _LIBC.shmget(IPC_KEY + 9, 4096, 0o1000 | 0o644)   # the host's own segment
  assert host_shm >= 0
  try:   # one after the other: the objects of the control must not count for the other
    on = sandbox.run_program(IPC, LIMITS, engine=layers['engine'])
    left_on = _remove_ipc()
    off = sandbox.run_program(IPC, LIMITS, engine=layers['engine'], disable=('ipc',))
    left_off = _remove_ipc()
  finally:
    _remove_ipc()
    _LIBC.shmctl(host_shm, 0, None)
  assert on.passed and _lines(on, 'MADE') == ['True True True True'], on
  assert _lines(on, 'SEEN_SHM') == ['False'], on.output          # the host's segment is unseen
  assert left_on == [], left_on
  assert off.passed and _lines(off, 'MADE') == ['True True True True'], off
  assert _lines(off, 'SEEN_SHM') == ['True'], off.output
  assert left_off == ['shm', 'msg', 'sem', 'mqueue'], left_off


# ------------------------------------------------------------------------------ keyrings

_KEYCTL, _ADD_KEY = 250, 248
_SESSION = ctypes.c_long(-3)


def _keys_of_uid(uid):
  with open('/proc/key-users') as f:
    return [ln for ln in f if ln.split(':')[0].strip() == str(uid)]


KEYS = textwrap.dedent(f'''
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    found = libc.syscall(250, 10, ctypes.c_long(-3), b'user', b'plt-host-{MARK}', 0)  # SEARCH
    print('SEARCH', found, ctypes.get_errno())
    if found > 0:
        buf = ctypes.create_string_buffer(256)
        n = libc.syscall(250, 11, ctypes.c_long(found), buf, 256)   # READ
        print('READ', buf.raw[:max(n, 0)].decode())
    added = libc.syscall(248, b'user', b'plt-sample-{MARK}', b'x', 1, ctypes.c_long(-3))
    print('ADDED', added, ctypes.get_errno())
''')


def test_keyrings_are_out_of_reach(layers):
  _need(layers, 'keyring', 'seccomp')
  secret = 'KEY-' + secrets.token_hex(8)
  _LIBC.syscall.restype = ctypes.c_long
  key = _LIBC.syscall(_ADD_KEY, b'user', f'plt-host-{MARK}'.encode(), secret.encode(),
                      len(secret), _SESSION)
  if key < 0:
    pytest.skip(f'no session keyring for this process: errno {ctypes.get_errno()}')
  try:
    res = _run_all(layers, {'on': (KEYS, {}), 'no_filter': (KEYS, dict(disable=('seccomp',))),
                    'off': (KEYS, dict(disable=('seccomp', 'keyring')))})
    on = res['on']
    assert on.passed, on
    assert _lines(on, 'SEARCH') == [f'-1 {errno.EPERM}'], on.output   # the filter
    assert _lines(on, 'ADDED') == [f'-1 {errno.EPERM}'] and 'READ' not in on.output
    assert _keys_of_uid(on.isolation['uid']) == []
    # The fresh session keyring alone already hides the host's key.
    nf = res['no_filter']
    assert nf.passed and _lines(nf, 'SEARCH')[0].split()[1] == str(errno.ENOKEY), nf.output
    # The control: neither layer, the sample reads the host's key and leaves its own there.
    off = res['off']
    assert _lines(off, 'READ') == [secret], off.output
    sample_key = int(_lines(off, 'ADDED')[0].split()[0])
    assert sample_key > 0
    assert _keys_of_uid(off.isolation['uid']) != []
    _LIBC.syscall(_KEYCTL, 21, ctypes.c_long(sample_key))   # KEYCTL_INVALIDATE
  finally:
    _LIBC.syscall(_KEYCTL, 21, ctypes.c_long(key))


# ---------------------------------------------------------------------- user namespaces

USERNS = textwrap.dedent('''
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid == 0:
        os._exit(0)
    print('CLONE', pid > 0, ctypes.get_errno() if pid < 0 else 0)
    if pid > 0:
        os.waitpid(pid, 0)
    ok = libc.unshare(0x10000000 | 0x00020000)          # CLONE_NEWUSER | CLONE_NEWNS
    print('UNSHARE', ok, ctypes.get_errno())
    if ok == 0:
        caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]
        print('CAPS', caps[0].split()[1])
        os.makedirs('/sandbox/mnt', exist_ok=True)
        r = libc.mount(b'none', b'/sandbox/mnt', b'tmpfs', 0, b'size=64m')
        print('MOUNT', r)
''')


def test_no_new_user_namespace(layers):
  _need(layers, 'seccomp')
  res = _run_all(layers, {'on': (USERNS, {}), 'off': (USERNS, dict(disable=('seccomp',)))})
  on, off = res['on'], res['off']
  assert on.passed, on
  assert _lines(on, 'UNSHARE') == [f'-1 {errno.EPERM}'], on.output
  assert _lines(on, 'CLONE') == [f'False {errno.EPERM}'], on.output
  assert 'MOUNT' not in on.output
  # The control: a user namespace gives every capability back, and a mount of its own.
  if _lines(off, 'UNSHARE')[0].startswith('-1'):
    pytest.skip(f'this kernel refuses user namespaces to unprivileged users: {off.output}')
  with open('/proc/sys/kernel/cap_last_cap') as f:
    every = (1 << (int(f.read()) + 1)) - 1
  assert int(_lines(off, 'CAPS')[0], 16) == every, off.output
  assert _lines(off, 'MOUNT') == ['0'], off.output
  assert _lines(off, 'CLONE') == ['True 0'], off.output


KERNEL = textwrap.dedent('''
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for name, nr, args in (('ptrace', 101, (0, 0, 0, 0)),                 # PTRACE_TRACEME
                           ('process_vm_readv', 310, (os.getpid(), 0, 0, 0, 0, 0)),
                           ('userfaultfd', 323, (1,)),                    # UFFD_USER_MODE_ONLY
                           ('io_uring_setup', 425, (1, 0)),
                           ('perf_event_open', 298, (0, 0, -1, -1, 0)),
                           ('bpf', 321, (0, 0, 0))):
        r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
        print('CALL', name, 'ok' if r >= 0 else ctypes.get_errno())
    print('SECCOMP', [l.split()[1] for l in open('/proc/self/status')
                      if l.startswith('Seccomp:')])
''')


@pytest.mark.skipif(os.uname().machine != 'x86_64', reason='x86_64 system call numbers')
def test_kernel_interfaces_are_filtered(layers):
  _need(layers, 'seccomp')
  res = _run_all(layers, {'on': (KERNEL, {}), 'off': (KERNEL, dict(disable=('seccomp',)))})
  on = dict(ln.split() for ln in _lines(res['on'], 'CALL'))
  off = dict(ln.split() for ln in _lines(res['off'], 'CALL'))
  assert on == {k: str(errno.EPERM) for k in ('ptrace', 'process_vm_readv', 'userfaultfd',
                                              'io_uring_setup', 'perf_event_open', 'bpf')}, on
  assert _lines(res['on'], 'SECCOMP') == ["['2']"]                 # filter mode
  # The control: the same calls reach the kernel (tracing itself, reading its own memory).
  assert off['ptrace'] == off['process_vm_readv'] == off['userfaultfd'] == 'ok', off
  assert off['io_uring_setup'] != str(errno.EPERM) or _sysctl('kernel/io_uring_disabled'), off
  assert _lines(res['off'], 'SECCOMP') == ["['0']"]


def _sysctl(name):
  try:
    with open('/proc/sys/' + name) as f:
      return int(f.read())
  except OSError:
    return 0


# --------------------------------------------------------------------------------- memory

MEMFD = textwrap.dedent('''
    import os
    chunk, held, fds = b'x' * (8 << 20), 0, []
    for i in range(48):                        # 384 MiB in memfds of 8 MiB (under file_bytes)
        fd = os.memfd_create(f'm{i}')
        os.write(fd, chunk)
        fds.append(fd)
        held += 8
    print('HELD', held)
''')


def test_memfd_beyond_the_memory_limit_kills_the_sample(layers):
  _need(layers, 'cgroup')
  lim = sandbox.Limits(timeout=20.0, memory_bytes=256 << 20, file_bytes=16 << 20)
  res = _run_all(layers, {'on': (MEMFD, dict(limits=lim)),
                  'off': (MEMFD, dict(limits=lim, disable=('cgroup',)))})
  on, off = res['on'], res['off']
  assert not on.passed and _lines(on, 'HELD') == [], on
  assert on.reason in ('killed (SIGKILL)', 'OSError: [Errno 12] Cannot allocate memory',
                       'OSError: [Errno 28] No space left on device'), on.reason
  assert off.passed and _lines(off, 'HELD') == ['384'], off       # the control


# ----------------------------------------------------------------------------------- disk

FALLOCATE = textwrap.dedent('''
    import ctypes, os, stat
    libc = ctypes.CDLL(None, use_errno=True)
    for fd in range(1024):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        print('FD', fd, 'file' if stat.S_ISREG(mode) else 'pipe' if stat.S_ISFIFO(mode)
              else 'other')
    import sys; sys.stdout.flush()
    for fd in (1, 2):                          # FALLOC_FL_KEEP_SIZE, 32 MiB
        r = libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(32 << 20))
        print('FALLOCATE', fd, r, ctypes.get_errno() if r else 0)
''')


def test_stdout_cannot_be_grown_on_the_host_disk(layers):
  judged = humaneval.build_job(
      dict(prompt='def f():\n    """"""\n', entry_point='f',
           test='def check(candidate):\n    assert candidate() is None\n'),
      '    exec(' + repr(FALLOCATE) + ', {})\n')
  res = _run_all(layers, {'on': (FALLOCATE, {}), 'judged': (judged[0], dict(judge=judged[1])),
                  'off': (FALLOCATE, dict(disable=('output_pipe',)))})
  on, judged, off = res['on'], res['judged'], res['off']
  assert on.passed and judged.passed, (on, judged)
  for r in (on, judged):   # every descriptor the candidate holds: no file among them
    kinds = dict(ln.split() for ln in _lines(r, 'FD'))
    assert 'file' not in kinds.values() and kinds['1'] == 'pipe', r.output
    assert _lines(r, 'FALLOCATE') == [f'1 -1 {errno.ESPIPE}', f'2 -1 {errno.ESPIPE}'], r.output
  assert on.isolation['output'] == 'pipe'
  # The control: stdout a file in the evaluator's temporary directory, allocated past the limit.
  assert dict(ln.split() for ln in _lines(off, 'FD'))['1'] == 'file', off.output
  assert _lines(off, 'FALLOCATE')[0] == '1 0 0', off.output


# -------------------------------------------------------------------------------- sockets

SOCKETS = textwrap.dedent('''
    import socket
    for name, fam, kind, proto in (('VSOCK', 40, socket.SOCK_STREAM, 0),
                                   ('PACKET', 17, socket.SOCK_RAW, 0),
                                   ('NETLINK', 16, socket.SOCK_RAW, 0),
                                   ('INET', 2, socket.SOCK_STREAM, 0),
                                   ('UNIX', 1, socket.SOCK_STREAM, 0)):
        try:
            socket.socket(fam, kind, proto).close()
            print('SOCKET', name, 0)
        except OSError as e:
            print('SOCKET', name, e.errno)
''')


def test_only_unix_and_inet_sockets(layers):
  _need(layers, 'seccomp')
  res = _run_all(layers, {'on': (SOCKETS, {}), 'off': (SOCKETS, dict(disable=('seccomp',)))})
  on = dict(ln.split() for ln in _lines(res['on'], 'SOCKET'))
  off = dict(ln.split() for ln in _lines(res['off'], 'SOCKET'))
  af = str(errno.EAFNOSUPPORT)
  assert on == {'VSOCK': af, 'PACKET': af, 'NETLINK': af, 'INET': '0', 'UNIX': '0'}, on
  # The control: netlink opens, and packet fails only for want of CAP_NET_RAW.
  assert off['NETLINK'] == '0' and off['PACKET'] == str(errno.EPERM), off


# ------------------------------------------------------------------------------- identity

IDENTITY = textwrap.dedent('''
    import os, socket, sys
    print('HOST', socket.gethostname())
    print('CGROUP', sorted({l.strip().split(':', 2)[2] for l in open('/proc/self/cgroup')}))
    for p in ('/proc/sys/kernel/random/boot_id', '/proc/cmdline'):
        print('READ', p, repr(open(p).read()))
    print('FD1', os.readlink('/proc/self/fd/1'))
''')


def test_the_host_is_not_identified(layers):
  _need(layers, 'uts', 'cgroup_namespace')
  res = _run_all(layers, {'on': (IDENTITY, {}), 'off': (IDENTITY, dict(disable=('uts',
                                                                         'cgroup_namespace')))})
  on, off = res['on'], res['off']
  assert on.passed, on
  assert _lines(on, 'HOST') == ['sandbox'], on.output
  assert _lines(on, 'CGROUP') == ["['/']"], on.output
  assert sorted(_lines(on, 'READ')) == ["/proc/cmdline ''", "/proc/sys/kernel/random/boot_id ''"]
  assert _lines(on, 'FD1')[0].startswith('pipe:'), on.output   # no host log path
  with open('/proc/sys/kernel/random/boot_id') as f:
    boot_id = f.read()
  assert boot_id.strip() and boot_id.strip() not in on.output
  # The control: the host's name and the sample's cgroup path on the host.
  assert _lines(off, 'HOST') == [socket.gethostname()], off.output
  assert 'plt-sandbox-' in _lines(off, 'CGROUP')[0], off.output


# ------------------------------------------------------------------------------ uids

def test_a_uid_collision_never_touches_a_host_process():
  if os.geteuid() != 0:
    pytest.skip('throwaway uids need root, as CI runs')
  """A host process runs under the uid the sandbox draws first. Without a PID namespace (where
  the end-of-run sweep kills by uid), the check against /proc picks another uid."""
  victim_uid = host.UID_RANGE[0] + secrets.randbelow(1 << 20)
  victim = subprocess.Popen(['sleep', '60'], user=victim_uid, group=victim_uid)
  program = 'import os, signal\nos.kill(-1, signal.SIGKILL)\n'   # all it may signal
  draws = []
  real = host.secrets.randbelow

  def colliding(n):
    draws.append(n)
    return victim_uid - host.UID_RANGE[0] if len(draws) == 1 else real(n)

  try:
    time.sleep(0.05)
    results = {}
    for name, off in (('on', ()), ('off', ('uid_check',))):
      draws.clear()
      with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host.secrets, 'randbelow', colliding)
        results[name] = sandbox.run_program(program, LIMITS, namespaces=False, disable=off)
      if name == 'on':
        assert results['on'].isolation['uid'] != victim_uid
        assert victim.poll() is None, 'the host process was killed'
    off = results['off']                                              # the control
    assert off.isolation['uid'] == victim_uid
    assert off.isolation['identity'] == 'throwaway_uid_unchecked'
    victim.wait(timeout=5)
    assert victim.returncode == -signal.SIGKILL
  finally:
    if victim.poll() is None:
      victim.kill()
      victim.wait()


# ------------------------------------------------------------------- values and the report

def test_large_integers_round_trip(layers):
  big = 7 ** 20000                       # 16,902 decimal digits
  with pytest.raises(ValueError):        # the control: decimal conversion is limited
    str(big)
  for v in (big, -big, [big, {big: -big}]):
    assert wire.loads(wire.dumps(v)) == v
  prob = dict(prompt='def f(n):\n    """7 ** n"""\n', entry_point='f',
              test='def check(candidate):\n    assert candidate(20000) == 7 ** 20000\n')
  r = sandbox.run_program(*humaneval.build_job(prob, '    return 7 ** n\n')[:1], LIMITS,
                          judge=humaneval.build_job(prob, '')[1], engine=layers['engine'])
  assert r.passed, r


def test_the_report_names_every_layer(layers):
  assert set(sandbox.LAYERS) <= set(layers), layers
  assert layers['missing'] == [], layers
  bare = sandbox.describe_isolation(LIMITS, disable=sandbox.DISABLE, engine=layers['engine'])
  assert {'ipc', 'uts', 'cgroup_namespace', 'cgroup', 'seccomp', 'keyring', 'output',
          'identity'} <= set(bare['missing']), bare
  with pytest.raises(ValueError, match=r'seccomp \(a system-call filter.*: disabled'):
    sandbox.require_isolation(LIMITS, disable=('seccomp',), engine=layers['engine'])
  # Fail closed: without libseccomp the evaluate command refuses before it loads a model.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(host, '_FILTER', dict(bpf=None, error='ImportError: no pyseccomp'))
    r = sandbox.run_program('print(1)\n', LIMITS, engine=layers['engine'])
    assert r.passed and r.isolation['seccomp'] == 'none', r
    assert r.isolation['seccomp_error'] == 'ImportError: no pyseccomp'
    with pytest.raises(ValueError, match='missing on this machine: seccomp.*no pyseccomp'):
      runner.run('humaneval', workdir='/nonexistent/run')
    with pytest.raises(FileNotFoundError):   # accepted: it goes on to look for the checkpoint
      runner.run('humaneval', workdir='/nonexistent/run', allow_weaker_isolation=True)


def test_without_bubblewrap_the_builtin_code_gives_every_layer():
  if os.geteuid() != 0:
    pytest.skip('the layer tests run as root (throwaway uids, cgroups), as CI does')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(launch, '_BWRAP', dict(path=None, why='bubblewrap is not installed'))
    iso = sandbox.describe_isolation(LIMITS)
    with pytest.raises(ValueError, match='engine=bubblewrap: bubblewrap is not installed'):
      sandbox.run_program('pass\n', LIMITS, engine='bubblewrap')
  assert iso['works'] and iso['engine'] == 'builtin', iso
  assert iso['engine_error'] == 'bubblewrap is not installed'
  assert iso['missing'] == [], iso
