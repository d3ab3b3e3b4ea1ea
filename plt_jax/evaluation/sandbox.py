"""Runs untrusted Python programs (model completions plus their tests) in a contained process.

`run_program(program, limits)` -> `ExecResult`; `run_programs(...)` runs many on a thread pool.

One program runs like this on Linux. Each layer is used when the system permits it, and
`ExecResult.isolation` says which ones were in force:

  evaluator --Popen, new session--> supervisor (this file run as a script: `python -I -S`)
      unshares a network namespace and a PID namespace, then forks
      --> init of the PID namespace: rlimits, drops to a fresh uid, forks again
          --> the program: prompt + completion + tests + check(entry_point)

* **Processes.** The sandbox has its own session and process group, and a fresh temporary
  working directory that is removed afterwards.
* **rlimits.** CPU seconds, address space (memory), file size, open files, no core files, and
  RLIMIT_NPROC. Root ignores RLIMIT_NPROC, so an evaluator running as root drops the sandbox to
  a fresh, random, otherwise unused uid/gid with no supplementary groups and no_new_privs.
  Then:
  - the process limit counts exactly this program's processes;
  - root-owned files and directories are read-only to it;
  - it cannot signal the evaluator or the supervisor.

  If the interpreter's standard library sits under a directory other users cannot enter (e.g.
  a pyenv under /root), the uid keeps one capability, CAP_DAC_READ_SEARCH. It can then *read*
  any file, so imports work, but it still cannot write, delete or signal anything it does not own.
* **Network.** A new network namespace, whose only interface is a loopback that is down. Where
  that is not permitted, the program's `socket` constructors are replaced instead; this is
  best effort only.
* **Wall clock.** The supervisor kills the namespace's init at the timeout, which tears down the
  PID namespace and everything in it. Then every process of the throwaway uid is killed with
  kill(-1, SIGKILL), sent from that uid. The kernel walks the task list under the lock fork needs,
  so even a fork bomb that left the process group with setsid() cannot escape. The evaluator
  keeps a backstop (killpg plus the same uid sweep) in case the supervisor itself dies.
* **Passing.** A pass is a positive signal. The program's process writes a random token to a
  pipe only after the whole program returned. These all count as failures:
  - exiting early with status 0 (sys.exit(0), os._exit(0));
  - being killed;
  - raising.

  The token is in the program's memory, so code written to introspect this harness could forge
  it. The signal guards against programs that stop or crash, not against an adversary that
  targets this file.
* **Output.** stdout and stderr go together to an anonymous file bounded by the file-size limit.
  Its tail is kept for the failure reason.

Only the cheapest standard-library modules are imported above the `__main__` guard below: the
supervisor starts once per program, so its start-up time is the harness's overhead.
"""
from __future__ import annotations

import errno
import marshal
import os
import signal
import sys
import time

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 8, 36, 38
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


# ------------------------------------------------------------------------ system helpers

def _libc():
  import ctypes  # pylint: disable=g-import-not-at-top
  return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
  if not sys.platform.startswith('linux'):
    return False
  if hasattr(os, 'unshare'):  # Python >= 3.12
    try:
      os.unshare(flags)
      return True
    except OSError:
      return False
  ctypes, libc = _libc()
  return libc.unshare(ctypes.c_int(flags)) == 0


def _prctl(option: int, arg: int) -> bool:
  if not sys.platform.startswith('linux'):
    return False
  ctypes, libc = _libc()
  zero = ctypes.c_ulong(0)
  return libc.prctl(option, ctypes.c_ulong(arg), zero, zero, zero) == 0


def _keep_only_read_search() -> bool:
  """capset: effective = permitted = {CAP_DAC_READ_SEARCH}, nothing inheritable."""
  ctypes, libc = _libc()

  class Header(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]

  class Data(ctypes.Structure):
    _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32),
                ('inheritable', ctypes.c_uint32)]

  data = (Data * 2)()
  data[0].effective = data[0].permitted = 1 << _CAP_DAC_READ_SEARCH
  return libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) == 0


def _others_can_read(path: str) -> bool:
  """Can a user with no relation to the owners open `path` (every ancestor searchable)?"""
  import stat  # pylint: disable=g-import-not-at-top
  path = os.path.realpath(path)
  try:
    if not os.stat(path).st_mode & stat.S_IROTH:
      return False
    while True:
      if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
      parent = os.path.dirname(path)
      if parent == path:
        return True
      path = parent
  except OSError:
    return False


def _proc_status(pid: str) -> dict:
  out = {}
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('Uid', 'State', 'Threads'):
        out[key] = value.split()
  return out


def _proc_entries() -> list:
  try:
    return os.listdir('/proc')
  except OSError:  # no procfs (not Linux)
    return []


def live_pids_of_uid(uid: int) -> list:
  """Processes (not zombies) whose real uid is `uid`."""
  out = []
  for name in _proc_entries():
    if not name.isdigit():
      continue
    try:
      st = _proc_status(name)
    except OSError:
      continue
    if 'Uid' in st and int(st['Uid'][0]) == uid and st.get('State', ['?'])[0] != 'Z':
      out.append(int(name))
  return out


def _tasks_of_uid(uid: int) -> int:
  n = 0
  for name in _proc_entries():
    if name.isdigit():
      try:
        st = _proc_status(name)
      except OSError:
        continue
      if 'Uid' in st and int(st['Uid'][0]) == uid:
        n += int(st.get('Threads', ['1'])[0])
  return n


def _session_pids(sid: int, exclude=()) -> list:
  out, exclude = [], set(exclude)
  for name in _proc_entries():
    if name.isdigit() and int(name) not in exclude:
      try:
        with open(f'/proc/{name}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()   # state ppid pgrp session ...
      except (OSError, IndexError):
        continue
      if int(fields[3]) == sid and fields[0] != 'Z':
        out.append(int(name))
  return out


def _become(uid: int, gid: int) -> None:
  os.setgroups([])
  os.setresgid(gid, gid, gid)
  os.setresuid(uid, uid, uid)


def _kill_uid_here(uid: int, gid: int) -> None:
  """In a throwaway process: become `uid` and SIGKILL every process of it until none is left.

  kill(-1) reaches every process the caller may signal (its own uid) except itself, and the
  kernel walks the task list under the lock fork needs, so no child slips out during one call.
  Its return value cannot tell whether anything was hit, hence the /proc check.
  """
  _become(uid, gid)
  me = os.getpid()
  deadline = time.monotonic() + 5.0
  while True:
    try:
      os.kill(-1, signal.SIGKILL)
    except OSError:
      pass
    if not [p for p in live_pids_of_uid(uid) if p != me] or time.monotonic() > deadline:
      return
    time.sleep(0.002)


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def _print_exception() -> None:
  try:
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass


# ------------------------------------------------------------------------ the supervisor

class _Timeout(Exception):
  pass


def _disable_sockets() -> None:
  """Fallback when no network namespace is allowed: the socket module refuses to connect."""
  import socket  # pylint: disable=g-import-not-at-top
  import _socket  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise OSError(errno.EACCES, 'network access is disabled in the sandbox')

  class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):  # pylint: disable=super-init-not-called
      refuse()

  socket.socket = _socket.socket = NoSocket
  for name in ('create_connection', 'create_server', 'socketpair', 'fromfd', 'getaddrinfo',
               'gethostbyname', 'gethostbyname_ex', 'gethostbyaddr'):
    if hasattr(socket, name):
      setattr(socket, name, refuse)


def _limit_and_drop(job: dict, extra_procs: int) -> None:
  """rlimits, then the throwaway identity. Runs as root (when the evaluator is root)."""
  import resource  # pylint: disable=g-import-not-at-top
  lim = job['limits']
  parent = os.getppid()  # 0 for the init of a new PID namespace

  def set_(r, v):
    resource.setrlimit(r, (v, v))

  resource.setrlimit(resource.RLIMIT_CPU, (lim['cpu'], lim['cpu'] + 1))
  set_(resource.RLIMIT_CORE, 0)
  set_(resource.RLIMIT_FSIZE, lim['file_bytes'])
  set_(resource.RLIMIT_NOFILE, lim['open_files'])
  if hasattr(resource, 'RLIMIT_NPROC'):
    nproc = lim['nproc'] + extra_procs
    if job.get('userns'):   # counted per user namespace: the supervisor and this program
      nproc += 1
    elif job['uid'] is None:  # the evaluator's own user: its other processes count too
      nproc += _tasks_of_uid(os.getuid())
    set_(resource.RLIMIT_NPROC, nproc)
  set_(resource.RLIMIT_AS, lim['memory_bytes'])
  if job['uid'] is not None:
    if job['read_search']:
      _prctl(_PR_SET_KEEPCAPS, 1)
    _become(job['uid'], job['gid'])
    if job['read_search'] and not _keep_only_read_search():
      raise OSError('capset(CAP_DAC_READ_SEARCH) failed')
  _prctl(_PR_SET_NO_NEW_PRIVS, 1)
  _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
  if os.getppid() != parent:                 # the supervisor died before that
    os._exit(2)


def _run(job: dict, network: str, sig_fd: int) -> None:
  """The program's process: runs it, then writes the token. Never returns."""
  code = 2
  try:
    import types  # pylint: disable=g-import-not-at-top
    if network == 'socket-patch':
      _disable_sockets()
    token, program = job.pop('token').encode(), job.pop('program')
    write = os.write
    module = types.ModuleType('__main__')
    module.__file__ = os.path.join(os.getcwd(), 'program.py')
    sys.modules['__main__'] = module
    code = 1                         # from here on, a failure is the program's
    compiled = compile(program, module.__file__, 'exec')
    del program, job
    exec(compiled, module.__dict__)  # pylint: disable=exec-used
    sys.stdout.flush()
    write(sig_fd, token)
    code = 0
  except BaseException as e:  # pylint: disable=broad-except
    # The failure reason, on the pipe: the output file may be full (RLIMIT_FSIZE).
    try:
      text = type(e).__name__ + (f': {e}' if str(e) else '')
      os.write(sig_fd, b'\0' + text[:300].encode('utf-8', 'replace'))
    except BaseException:  # pylint: disable=broad-except
      pass
    _print_exception()
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass
  os._exit(code)


def _child(job: dict, info: dict, sig_fd: int) -> None:
  """Forked by the supervisor. With a PID namespace it is that namespace's init (which ignores
  most signals and inherits orphans), so the program runs in a process of its own below it."""
  code = 2
  try:
    in_pidns = info['pid_namespace']
    _limit_and_drop(job, extra_procs=1 if in_pidns else 0)
    if not in_pidns:
      _run(job, info['network'], sig_fd)
    program = os.fork()
    if program == 0:
      _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
      _run(job, info['network'], sig_fd)
    os.close(sig_fd)
    while True:  # reap orphans until the program itself is done
      pid, status = os.waitpid(-1, 0)
      if pid == program:
        break
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
  except BaseException:  # pylint: disable=broad-except
    _print_exception()
  os._exit(code)


def _supervise() -> None:
  """Reads its job (marshal) from stdin, runs the program, reports (marshal) on a pipe."""
  job = marshal.loads(sys.stdin.buffer.read())
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  sig_fd, rep_fd = job.pop('sig_fd'), job.pop('rep_fd')
  root = os.geteuid() == 0
  job['read_search'] = job['uid'] is not None and not all(
      _others_can_read(p) for p in sys.path if os.path.isdir(p))
  killer = kill_w = None
  if job['uid'] is not None:
    # Forked before the PID namespace exists (once its init is gone nothing can be forked into
    # it): waits for the go, then kills every process of the throwaway uid.
    kill_r, kill_w = os.pipe()
    killer = os.fork()
    if killer == 0:
      os.close(kill_w)
      os.close(sig_fd)
      os.close(rep_fd)
      try:
        os.read(kill_r, 1)
        _kill_uid_here(job['uid'], job['gid'])
      finally:
        os._exit(0)
    os.close(kill_r)
  lim = job['limits']
  info = dict(uid=job['uid'], network='allowed' if lim['network'] else 'socket-patch',
              pid_namespace=False, read_all_files=job['read_search'],
              subreaper=_prctl(_PR_SET_CHILD_SUBREAPER, 1))
  if job['namespaces']:
    net = 0 if lim['network'] else _CLONE_NEWNET
    user = 0 if root else _CLONE_NEWUSER
    for flags in (net | _CLONE_NEWPID, net, _CLONE_NEWPID):
      if flags and _unshare(user | flags):
        job['userns'] = bool(user)
        if flags & _CLONE_NEWNET:
          info['network'] = 'netns'
        info['pid_namespace'] = bool(flags & _CLONE_NEWPID)
        break
  me = os.getpid()
  pid = os.fork()
  if pid == 0:
    os.close(rep_fd)
    if kill_w is not None:
      os.close(kill_w)
    _child(job, info, sig_fd)
  os.close(sig_fd)

  def on_alarm(signum, frame):
    raise _Timeout()

  timed_out, status = False, 0
  signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, job['timeout'])
  try:
    _, status = os.waitpid(pid, 0)
  except _Timeout:
    timed_out = True
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
  if timed_out:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    _, status = os.waitpid(pid, 0)
  # Everything the program left behind dies now.
  if killer is not None:
    os.close(kill_w)
    os.waitpid(killer, 0)
  else:
    for p in _session_pids(os.getsid(0), exclude=(me,)):
      try:
        os.kill(p, signal.SIGKILL)
      except OSError:
        pass
  deadline = time.monotonic() + 2.0  # reap what was reparented to us (we are a subreaper)
  while time.monotonic() < deadline:
    try:
      if os.waitpid(-1, os.WNOHANG)[0] == 0:
        time.sleep(0.002)
    except ChildProcessError:
      break
  code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
  sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
  if info['pid_namespace'] and code is not None and code > 128:  # init's report of a signal
    code, sig = None, code - 128
  _write_all(rep_fd, marshal.dumps(dict(info, timed_out=timed_out, exit_code=code, signal=sig)))
  os._exit(0)


if __name__ == '__main__':
  if sys.argv[1:2] == ['--supervise']:
    _supervise()
  elif sys.argv[1:2] == ['--kill-uid']:
    _kill_uid_here(int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(0)
  sys.exit(f'usage: {sys.argv[0]} --supervise | --kill-uid UID GID (internal to plt_jax)')


# ------------------------------------------------------------------------- the evaluator
# pylint: disable=g-import-not-at-top,wrong-import-position
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

_UID_RANGE = (1_000_000, 2_000_000_000)  # throwaway uids are drawn from here (not in passwd)
_OUTPUT_TAIL = 4000
_SCRIPT = os.path.abspath(__file__)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. cpu_seconds None: the timeout rounded up, plus one."""
  timeout: float = 10.0              # wall-clock seconds
  cpu_seconds: Optional[int] = None
  memory_bytes: int = 1 << 30        # RLIMIT_AS, per process
  file_bytes: int = 16 << 20         # RLIMIT_FSIZE (also bounds the captured output)
  nproc: int = 8                     # processes (tasks) of the program, itself included
  open_files: int = 128
  network: bool = False              # True: leave the network alone (no namespace, no patch)

  def cpu(self) -> int:
    return int(self.cpu_seconds or int(self.timeout + 0.999) + 1)


@dataclasses.dataclass
class ExecResult:
  passed: bool
  status: str            # 'passed' | 'failed' | 'timeout'
  reason: str            # why it did not pass ('' when it passed)
  duration: float        # wall seconds, supervisor start to cleanup
  exit_code: Optional[int] = None
  signal: Optional[int] = None
  output: str = ''       # tail of stdout + stderr
  isolation: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dict(passed=self.passed, status=self.status, reason=self.reason,
                duration=round(self.duration, 4))


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
  os.set_blocking(fd, False)
  chunks, total = [], 0
  while total < limit:
    try:
      chunk = os.read(fd, limit - total)
    except BlockingIOError:
      break
    if not chunk:
      break
    chunks.append(chunk)
    total += len(chunk)
  return b''.join(chunks)


def _sweep_uid(uid: int, gid: int) -> None:
  """Backstop: kill every process of a throwaway uid from a helper process."""
  for _ in range(3):
    if not live_pids_of_uid(uid):
      return
    subprocess.run([sys.executable, '-I', '-S', _SCRIPT, '--kill-uid', str(uid), str(gid)],
                   check=False, timeout=30, stdin=subprocess.DEVNULL)


_SIGNAL_REASONS = {'SIGXCPU': 'CPU time limit exceeded', 'SIGXFSZ': 'file size limit exceeded',
                   'SIGKILL': 'killed (SIGKILL)', 'SIGSEGV': 'segmentation fault'}


def _failure_reason(report: dict, output: str) -> str:
  if report.get('signal'):
    try:
      name = signal.Signals(report['signal']).name
    except ValueError:
      name = f'signal {report["signal"]}'
    return _SIGNAL_REASONS.get(name, f'killed by {name}')
  code = report.get('exit_code')
  lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
  if code == 0:
    return 'exited with status 0 before the tests finished (no pass signal)'
  if code == 1 and lines:
    return lines[-1][:300]
  return f'exit status {code}' + (f': {lines[-1][:300]}' if lines else '')


def run_program(program: str, limits: Limits = Limits(), *, namespaces: bool = True,
                drop_privileges: bool = True, base_dir: Optional[str] = None) -> ExecResult:
  """Runs `program` (Python source) in the sandbox; it passes only if it ran to its end."""
  start = time.monotonic()
  uid = gid = None
  if drop_privileges and hasattr(os, 'geteuid') and os.geteuid() == 0:
    uid = gid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
  workdir = tempfile.mkdtemp(prefix='plt-sandbox-', dir=base_dir)
  os.chmod(workdir, 0o700)
  if uid is not None:
    os.chown(workdir, uid, gid)
  sig_r, sig_w = os.pipe()
  rep_r, rep_w = os.pipe()
  token = secrets.token_hex(16)
  job = marshal.dumps(dict(
      program=program, token=token, sig_fd=sig_w, rep_fd=rep_w, uid=uid, gid=gid,
      namespaces=bool(namespaces), timeout=float(limits.timeout),
      limits=dict(cpu=limits.cpu(), memory_bytes=int(limits.memory_bytes),
                  file_bytes=int(limits.file_bytes), nproc=int(limits.nproc),
                  open_files=int(limits.open_files), network=bool(limits.network))))
  env = {'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
         'LANG': 'C.UTF-8', 'OMP_NUM_THREADS': '1'}
  stuck = dead = False
  report: dict = {}
  try:
    with tempfile.TemporaryFile() as log:
      try:
        proc = subprocess.Popen(
            [sys.executable, '-I', '-S', '-B', _SCRIPT, '--supervise'], stdin=subprocess.PIPE,
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
            start_new_session=True, pass_fds=(sig_w, rep_w))
      finally:
        os.close(sig_w)
        os.close(rep_w)
      try:
        proc.communicate(job, timeout=limits.timeout + 10.0)
      except subprocess.TimeoutExpired:
        stuck = True
      finally:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
          pass
        proc.wait()
      rep, sig = _read_available(rep_r), _read_available(sig_r)
      try:
        report = marshal.loads(rep) if rep else {}
      except (EOFError, ValueError, TypeError):
        report = {}
      if not report:  # the supervisor did not finish: clean up from here
        dead = not stuck
        if uid is not None:
          _sweep_uid(uid, gid)
      log.seek(0, os.SEEK_END)
      log.seek(max(0, log.tell() - _OUTPUT_TAIL))
      output = log.read().decode('utf-8', errors='replace')
  finally:
    os.close(sig_r)
    os.close(rep_r)
    shutil.rmtree(workdir, ignore_errors=True)
  duration = time.monotonic() - start
  isolation = {k: report.get(k) for k in ('uid', 'network', 'pid_namespace', 'read_all_files',
                                          'subreaper')}
  timed_out = bool(report.get('timed_out')) or stuck
  passed = (not timed_out) and sig == token.encode()
  if passed:
    status, reason = 'passed', ''
  elif timed_out:
    status, reason = 'timeout', f'timed out after {limits.timeout:g} s'
  else:
    status = 'failed'
    if dead:
      reason = 'sandbox supervisor died'
    elif sig.startswith(b'\0') and report.get('exit_code') == 1:  # the exception it raised
      reason = sig[1:].decode('utf-8', 'replace')
    else:
      reason = _failure_reason(report, output)
  return ExecResult(passed, status, reason, duration, report.get('exit_code'),
                    report.get('signal'), output, isolation)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 4,
                 on_result: Optional[Callable[[int, ExecResult], None]] = None,
                 **kwargs) -> list:
  """Runs many programs on a pool of `workers` threads (each waits on one sandbox)."""
  results: list = [None] * len(programs)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {pool.submit(run_program, p, limits, **kwargs): i for i, p in enumerate(programs)}
    for fut in concurrent.futures.as_completed(futures):
      i = futures[fut]
      results[i] = fut.result()
      if on_result is not None:
        on_result(i, results[i])
  return results


def describe_isolation(limits: Limits = Limits(timeout=20.0)) -> dict:
  """Which layers a trivial program gets on this machine, and whether it passes."""
  r = run_program('import socket, math\n', limits)
  return dict(r.isolation, works=r.passed, reason=r.reason)
