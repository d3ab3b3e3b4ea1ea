"""The public API: `Limits`, `Judge`, `ExecResult`, `run_program`, `run_programs`, and the
isolation report (`LAYERS`, `missing_layers`, `describe_isolation`, `require_isolation`)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from plt_jax.evaluation.sandbox import host, launch, protocol

REASON_MAX = protocol.REASON_MAX
OUTPUT_TAIL = launch.OUTPUT_TAIL
ENGINES = ('bubblewrap', 'builtin')

# The layers `missing_layers` checks, and what each protects.
LAYERS = {
    'filesystem': 'a private filesystem view (mount namespace)',
    'identity': 'a throwaway uid checked unused, or a user namespace',
    'capabilities': 'no capabilities',
    'network': 'no network (network namespace)',
    'pid_namespace': 'a PID namespace',
    'ipc': 'an IPC namespace (SysV IPC and POSIX message queues die with the sample)',
    'uts': 'a UTS namespace with a neutral hostname',
    'cgroup_namespace': 'a cgroup namespace (no host cgroup path)',
    'cgroup': 'a cgroup of its own (memory including tmpfs, memfd and shm; tasks)',
    'seccomp': 'a system-call filter (no user namespaces, mounts, keyrings, io_uring, bpf, '
               'ptrace; sockets AF_UNIX/INET/INET6 only)',
    'keyring': 'a fresh session keyring (no access to the evaluator\'s keys)',
    'output': 'stdout and stderr as a pipe read up to a byte cap (no file to grow)',
}
# What `run_program(disable=...)` may switch off: for tests that show a layer matters.
DISABLE = ('ipc', 'uts', 'cgroup_namespace', 'cgroup', 'seccomp', 'keyring', 'uid_check',
           'output_pipe')
_REPORT_KEYS = ('uid', 'identity', 'filesystem', 'capabilities', 'network', 'pid_namespace',
                'ipc', 'uts', 'cgroup_namespace', 'cgroup', 'seccomp', 'keyring', 'output',
                'verdict', 'subreaper')
_ERROR_KEYS = ('filesystem_error', 'cgroup_error', 'seccomp_error', 'engine_error')


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. cpu_seconds None: the timeout rounded up, plus one."""
  timeout: float = 10.0              # wall-clock seconds
  cpu_seconds: Optional[int] = None
  memory_bytes: int = 1 << 30        # RLIMIT_AS per process, and the sample's cgroup memory
  file_bytes: int = 16 << 20         # RLIMIT_FSIZE, and the cap on stdout + stderr
  nproc: int = 8                     # processes (tasks) of the program, itself included
  open_files: int = 128
  tmpfs_bytes: int = 16 << 20        # each of the work dir, /tmp, /var/tmp and /dev/shm
  network: bool = False              # True: leave the network alone (no namespace, no patch)

  def cpu(self) -> int:
    return int(self.cpu_seconds or int(self.timeout + 0.999) + 1)


@dataclasses.dataclass(frozen=True)
class Judge:
  """Trusted code that decides the verdict: `setup` (e.g. the problem's prompt, which may define
  helpers the tests use) and `test`, which defines `check(candidate)`; `entry_point` is the
  program's function that `candidate` calls."""
  setup: str
  test: str
  entry_point: str
  check: str = 'check'


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


def missing_layers(isolation_report: dict, limits: Limits = Limits()) -> list:
  """The names (keys of LAYERS) of the layers that were not in force."""
  iso, out = isolation_report, []
  if iso.get('filesystem') != 'private':
    out.append('filesystem')
  if iso.get('identity') not in ('throwaway_uid', 'user_namespace'):
    out.append('identity')
  if iso.get('capabilities') != 'none':
    out.append('capabilities')
  if not limits.network and iso.get('network') != 'netns':
    out.append('network')
  for name in ('pid_namespace', 'ipc', 'uts', 'cgroup_namespace', 'keyring'):
    if iso.get(name) is not True:
      out.append(name)
  if not iso.get('cgroup'):
    out.append('cgroup')
  if iso.get('seccomp') != 'filter':
    out.append('seccomp')
  if iso.get('output') != 'pipe':
    out.append('output')
  return out


def _new_token() -> str:
  """The random token the judge (or the program without one) writes on success."""
  return secrets.token_hex(16)


def run_program(program: str, limits: Limits = Limits(), *, judge: Optional[Judge] = None,
                namespaces: bool = True, drop_privileges: bool = True,
                base_dir: Optional[str] = None, disable: Sequence[str] = (),
                engine: Optional[str] = None) -> ExecResult:
  """Runs `program` (Python source) in the sandbox.

  With `judge`: it passes only if the judge's `check(candidate)` returned, every call of
  `candidate` having gone to the program's `judge.entry_point`. Without: it passes if the
  program ran to its end, which the program itself could fake (no adversary-proof verdict).
  disable: layers to switch off (names in DISABLE), to show in tests what each one stops.
  engine: 'bubblewrap' (the namespaces and the view by bwrap; the default where it runs, as
  root) or 'builtin' (by this package's code; the fallback, and always with namespaces=False).
  """
  if judge is not None:
    for name in ('entry_point', 'check'):
      value = getattr(judge, name)
      if not (isinstance(value, str) and value.isidentifier()):
        raise ValueError(f'judge.{name}={value!r} is not a Python identifier')
  off = set(disable)
  if off - set(DISABLE):
    raise ValueError(f'disable={sorted(off - set(DISABLE))}: not among {list(DISABLE)}')
  if engine not in (None,) + ENGINES:
    raise ValueError(f'engine={engine!r}: not among {list(ENGINES)}')
  bwrap, engine_error = launch.bubblewrap() if namespaces and engine != 'builtin' else (
      None, 'builtin engine asked for')
  if engine == 'bubblewrap' and bwrap is None:
    raise ValueError(f'engine=bubblewrap: {engine_error}')
  start = time.monotonic()
  uid = gid = judge_uid = None
  uids: list = []
  if drop_privileges and hasattr(os, 'geteuid') and os.geteuid() == 0:
    uids = host.draw_uids(2, check='uid_check' not in off)
    uid = gid = uids[0]
    judge_uid = uids[1]
  cgroup = workdir = judge_fd = None
  fds: list = []
  try:   # the setup: nothing of it may outlive a failure
    cgroup_error = 'disabled'
    if 'cgroup' not in off:
      try:
        cgroup = host.Cgroup.create(limits.memory_bytes, limits.nproc + 4)
      except OSError as e:
        cgroup_error = f'no cgroup for the sample: {e}'[:200]
    bpf, bpf_error = host.syscall_filter() if 'seccomp' not in off else (None, 'disabled')
    workdir = tempfile.mkdtemp(prefix='plt-sandbox-', dir=base_dir)
    os.chmod(workdir, 0o700)
    if uid is not None:
      os.chown(workdir, uid, gid)
    sig_r, sig_w = os.pipe()
    rep_r, rep_w = os.pipe()
    fds = [sig_r, sig_w, rep_r, rep_w]
    token = _new_token()
    judge_fd = launch.judge_file(judge, token) if judge is not None else None
    script, code_dir = launch.code()
    job = dict(
        program=program, sig_fd=sig_w, rep_fd=rep_w, judge_fd=judge_fd, uid=uid, gid=gid,
        judge_uid=judge_uid, judge=judge is not None, namespaces=bool(namespaces),
        timeout=float(limits.timeout), disable=sorted(off),
        engine='bubblewrap' if bwrap else 'builtin',
        cgroup_procs=cgroup.procs_files if cgroup and not bwrap else [],
        cgroup_joined=cgroup.version if cgroup and bwrap else None,
        cgroup_version=cgroup.version if cgroup else None, cgroup_error=cgroup_error,
        seccomp=bpf, seccomp_error=bpf_error,
        limits=dict(cpu=limits.cpu(), memory_bytes=int(limits.memory_bytes),
                    file_bytes=int(limits.file_bytes), nproc=int(limits.nproc),
                    open_files=int(limits.open_files), tmpfs_bytes=int(limits.tmpfs_bytes),
                    network=bool(limits.network)))
    if judge is None:
      job['token'] = token
    else:
      job['entry_point'] = judge.entry_point
    job = marshal.dumps(job)
    env = {'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
           'LANG': 'C.UTF-8', 'OMP_NUM_THREADS': '1'}
    if bwrap:   # bwrap is init's parent: the deadline here is the program's timeout
      argv = launch.bubblewrap_command(bwrap, limits.tmpfs_bytes, off, script, code_dir)
      if cgroup is not None:
        argv = launch.in_cgroup(argv, cgroup.procs_files)
      deadline = limits.timeout + 0.5
    else:       # the supervisor keeps the timeout; the deadline here is a backstop
      argv = [sys.executable, '-I', '-S', '-B', script, '--supervise', code_dir]
      deadline = limits.timeout + 10.0
  except BaseException:
    for fd in fds + ([judge_fd] if judge_fd is not None else []):
      os.close(fd)
    if cgroup is not None:
      cgroup.remove()
    host.release_uids(uids)
    if workdir is not None:
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  pipe = 'output_pipe' not in off
  stuck = dead = over = False
  report: dict = {}
  try:
    with tempfile.TemporaryFile() as log:   # the output's file, only with output_pipe off
      try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE if pipe else log,
            stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True,
            pass_fds=tuple(fd for fd in (sig_w, rep_w, judge_fd) if fd is not None))
      finally:
        for fd in (sig_w, rep_w, judge_fd):
          if fd is not None:
            os.close(fd)
      try:
        if pipe:
          tail, over, stuck = launch.communicate(proc, job, deadline, int(limits.file_bytes))
        else:
          try:
            proc.communicate(job, timeout=deadline)
          except subprocess.TimeoutExpired:
            stuck = True
      finally:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
          pass
        proc.wait()
      report = launch.report_of(launch.read_available(rep_r))
      if bwrap and report:   # bwrap exits with init's status
        code = proc.returncode if proc.returncode >= 0 and not stuck else None
        sig_no = code - 128 if code is not None and code > 128 else None
        report.update(timed_out=stuck, exit_code=None if sig_no else code, signal=sig_no)
        stuck = False
      sig = launch.read_available(sig_r)
      if not pipe:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - OUTPUT_TAIL))
        tail = log.read()
      output = tail.decode('utf-8', errors='replace')
  finally:
    os.close(sig_r)
    os.close(rep_r)
    emptied = cgroup.remove() if cgroup is not None else False
    if (not report or bwrap) and uid is not None and not emptied:
      launch.sweep_uid(uid, gid)   # uids checked unused: only the sandbox's processes
    if not report:  # the supervisor did not finish
      dead = not stuck
    host.release_uids(uids)
    shutil.rmtree(workdir, ignore_errors=True)
  duration = time.monotonic() - start
  isolation_report = {k: report.get(k) for k in _REPORT_KEYS}
  isolation_report['output'] = 'pipe' if pipe else 'file'
  isolation_report['engine'] = 'bubblewrap' if bwrap else 'builtin'
  if not bwrap and namespaces and engine is None:
    isolation_report['engine_error'] = engine_error
  if uid is not None and 'uid_check' in off:
    isolation_report['identity'] = 'throwaway_uid_unchecked'
  for k in _ERROR_KEYS:
    if report.get(k):
      isolation_report[k] = report[k]
  timed_out = bool(report.get('timed_out')) or stuck
  passed = (not timed_out) and sig == token.encode()
  if passed:
    status, reason = 'passed', ''
  elif timed_out:
    status, reason = 'timeout', f'timed out after {limits.timeout:g} s'
  else:
    status = 'failed'
    if over:
      reason = 'file size limit exceeded'
    elif dead:
      reason = 'sandbox supervisor died'
    elif sig.startswith(b'\0'):  # the exception that ended the tests (or the program)
      reason = sig[1:].decode('utf-8', 'replace')
    else:
      reason = launch.failure_reason(report, output, judge is not None)
  return ExecResult(passed, status, reason[:REASON_MAX], duration, report.get('exit_code'),
                    report.get('signal'), output, isolation_report)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 4,
                 judges: Optional[Sequence[Optional[Judge]]] = None,
                 on_result: Optional[Callable[[int, ExecResult], None]] = None,
                 **kwargs) -> list:
  """Runs many programs (each with its judge, if given) on a pool of `workers` threads."""
  if judges is not None and len(judges) != len(programs):
    raise ValueError(f'{len(judges)} judges for {len(programs)} programs')
  judges = list(judges) if judges is not None else [None] * len(programs)
  results: list = [None] * len(programs)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {pool.submit(run_program, p, limits, judge=j, **kwargs): i
               for i, (p, j) in enumerate(zip(programs, judges))}
    for fut in concurrent.futures.as_completed(futures):
      i = futures[fut]
      results[i] = fut.result()
      if on_result is not None:
        on_result(i, results[i])
  return results


_PROBE = Judge(setup='def f(x):\n    """x + 1"""\n',
               test='def check(candidate):\n    assert candidate(1) == 2\n', entry_point='f')


def describe_isolation(limits: Limits = Limits(timeout=20.0), **kwargs) -> dict:
  """Which layers a trivial judged program gets on this machine, and whether it passes."""
  r = run_program('import socket, math\n\ndef f(x):\n    return x + 1\n', limits,
                  judge=_PROBE, **kwargs)
  return dict(r.isolation, works=r.passed, reason=r.reason,
              missing=missing_layers(r.isolation, limits))


def require_isolation(limits: Limits = Limits(timeout=20.0), *, allow_weaker: bool = False,
                      flag: str = 'allow_weaker_isolation', **kwargs) -> dict:
  """describe_isolation, raising a one-line ValueError when the sandbox does not work, or when
  a layer is missing and `allow_weaker` is False."""
  iso = describe_isolation(limits, **kwargs)
  if not iso['works']:
    raise ValueError(f'the sandbox does not run programs on this machine: {iso["reason"]}')
  if iso['missing'] and not allow_weaker:
    errors = {'filesystem': 'filesystem_error', 'cgroup': 'cgroup_error',
              'seccomp': 'seccomp_error'}
    why = '; '.join(f'{m} ({LAYERS[m]})' + (f': {iso[errors[m]]}' if iso.get(errors.get(m))
                                            else '') for m in iso['missing'])
    raise ValueError(f'sandbox layers missing on this machine: {why}; pass --{flag} to '
                     f'evaluate with weaker isolation')
  return iso
