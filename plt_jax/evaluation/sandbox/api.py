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


@dataclasses.dataclass
class _Run:
  """One program's run as set up: who runs it, where, its pipes, its job and how it starts."""
  bwrap: Optional[str]
  uid: Optional[int]
  gid: Optional[int]
  uids: list
  cgroup: Optional[host.Cgroup]
  workdir: str
  token: str
  sig_r: int
  sig_w: int
  rep_r: int
  rep_w: int
  judge_fd: Optional[int]
  job: bytes
  argv: list
  env: dict
  deadline: float


@dataclasses.dataclass
class _Outcome:
  """What a run left: the supervisor's report, the verdict pipe's bytes, the output's tail."""
  report: dict
  sig: bytes
  output: str
  stuck: bool   # past the deadline here
  over: bool    # the output went past the file size limit
  dead: bool    # the supervisor did not finish


def _check_arguments(judge: Optional[Judge], off: set, engine: Optional[str]) -> None:
  if judge is not None:
    for name in ('entry_point', 'check'):
      value = getattr(judge, name)
      if not (isinstance(value, str) and value.isidentifier()):
        raise ValueError(f'judge.{name}={value!r} is not a Python identifier')
  if off - set(DISABLE):
    raise ValueError(f'disable={sorted(off - set(DISABLE))}: not among {list(DISABLE)}')
  if engine not in (None,) + ENGINES:
    raise ValueError(f'engine={engine!r}: not among {list(ENGINES)}')


def _job(program: str, limits: Limits, judge: Optional[Judge], run: _Run, *, namespaces: bool,
         off: set, cgroup_error: str, bpf, bpf_error: str, judge_uid: Optional[int]) -> bytes:
  """The supervisor's job (marshal): the program, its identity, layers and limits."""
  cgroup, bwrap = run.cgroup, run.bwrap
  job = dict(
      program=program, sig_fd=run.sig_w, rep_fd=run.rep_w, judge_fd=run.judge_fd, uid=run.uid,
      gid=run.gid, judge_uid=judge_uid, judge=judge is not None, namespaces=bool(namespaces),
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
    job['token'] = run.token
  else:
    job['entry_point'] = judge.entry_point
  return marshal.dumps(job)


def _command(run: _Run, limits: Limits, off: set) -> tuple[list, float]:
  """(argv, deadline here): bwrap, or the supervisor itself with the built-in engine."""
  script, code_dir = launch.code()
  if run.bwrap:   # bwrap is init's parent: the deadline here is the program's timeout
    argv = launch.bubblewrap_command(run.bwrap, limits.tmpfs_bytes, off, script, code_dir)
    if run.cgroup is not None:
      argv = launch.in_cgroup(argv, run.cgroup.procs_files)
    return argv, limits.timeout + 0.5
  # The supervisor keeps the timeout; the deadline here is a backstop.
  return [sys.executable, '-I', '-S', '-B', script, '--supervise', code_dir], limits.timeout + 10.0


def _set_up(program: str, limits: Limits, judge: Optional[Judge], *, bwrap: Optional[str],
            namespaces: bool, drop_privileges: bool, base_dir: Optional[str], off: set) -> _Run:
  """Draws the uids and makes the cgroup, the work dir, the pipes and the job: nothing of it
  outlives a failure."""
  uid = gid = judge_uid = None
  uids: list = []
  if drop_privileges and hasattr(os, 'geteuid') and os.geteuid() == 0:
    uids = host.draw_uids(2, check='uid_check' not in off)
    uid = gid = uids[0]
    judge_uid = uids[1]
  cgroup = workdir = judge_fd = None
  fds: list = []
  try:
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
    env = {'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
           'LANG': 'C.UTF-8', 'OMP_NUM_THREADS': '1'}
    run = _Run(bwrap, uid, gid, uids, cgroup, workdir, token, sig_r, sig_w, rep_r, rep_w,
               judge_fd, b'', [], env, 0.0)
    run.job = _job(program, limits, judge, run, namespaces=namespaces, off=off,
                   cgroup_error=cgroup_error, bpf=bpf, bpf_error=bpf_error, judge_uid=judge_uid)
    run.argv, run.deadline = _command(run, limits, off)
    return run
  except BaseException:
    for fd in fds + ([judge_fd] if judge_fd is not None else []):
      os.close(fd)
    if cgroup is not None:
      cgroup.remove()
    host.release_uids(uids)
    if workdir is not None:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _execute(run: _Run, limits: Limits, pipe: bool) -> _Outcome:
  """Starts the run, waits for it (killing its session at the end), reads what it left, and
  removes everything it set up."""
  stuck = over = False
  report: dict = {}
  try:
    with tempfile.TemporaryFile() as log:   # the output's file, only with output_pipe off
      try:
        proc = subprocess.Popen(
            run.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE if pipe else log,
            stderr=subprocess.STDOUT, cwd=run.workdir, env=run.env, start_new_session=True,
            pass_fds=tuple(fd for fd in (run.sig_w, run.rep_w, run.judge_fd) if fd is not None))
      finally:
        for fd in (run.sig_w, run.rep_w, run.judge_fd):
          if fd is not None:
            os.close(fd)
      try:
        if pipe:
          tail, over, stuck = launch.communicate(proc, run.job, run.deadline,
                                                 int(limits.file_bytes))
        else:
          try:
            proc.communicate(run.job, timeout=run.deadline)
          except subprocess.TimeoutExpired:
            stuck = True
      finally:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
          pass
        proc.wait()
      report = launch.report_of(launch.read_available(run.rep_r))
      if run.bwrap and report:   # bwrap exits with init's status
        code = proc.returncode if proc.returncode >= 0 and not stuck else None
        sig_no = code - 128 if code is not None and code > 128 else None
        report.update(timed_out=stuck, exit_code=None if sig_no else code, signal=sig_no)
        stuck = False
      sig = launch.read_available(run.sig_r)
      if not pipe:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - OUTPUT_TAIL))
        tail = log.read()
      output = tail.decode('utf-8', errors='replace')
  finally:
    os.close(run.sig_r)
    os.close(run.rep_r)
    emptied = run.cgroup.remove() if run.cgroup is not None else False
    if (not report or run.bwrap) and run.uid is not None and not emptied:
      launch.sweep_uid(run.uid, run.gid)   # uids checked unused: only the sandbox's processes
    host.release_uids(run.uids)
    shutil.rmtree(run.workdir, ignore_errors=True)
  return _Outcome(report, sig, output, stuck, over, dead=not report and not stuck)


def _isolation_report(out: _Outcome, run: _Run, *, pipe: bool, namespaces: bool,
                      engine: Optional[str], engine_error: str, off: set) -> dict:
  iso = {k: out.report.get(k) for k in _REPORT_KEYS}
  iso['output'] = 'pipe' if pipe else 'file'
  iso['engine'] = 'bubblewrap' if run.bwrap else 'builtin'
  if not run.bwrap and namespaces and engine is None:
    iso['engine_error'] = engine_error
  if run.uid is not None and 'uid_check' in off:
    iso['identity'] = 'throwaway_uid_unchecked'
  for k in _ERROR_KEYS:
    if out.report.get(k):
      iso[k] = out.report[k]
  return iso


def _verdict(out: _Outcome, token: str, limits: Limits, judged: bool) -> tuple[bool, str, str]:
  """(passed, status, reason)."""
  timed_out = bool(out.report.get('timed_out')) or out.stuck
  if not timed_out and out.sig == token.encode():
    return True, 'passed', ''
  if timed_out:
    return False, 'timeout', f'timed out after {limits.timeout:g} s'
  if out.over:
    reason = 'file size limit exceeded'
  elif out.dead:
    reason = 'sandbox supervisor died'
  elif out.sig.startswith(b'\0'):  # the exception that ended the tests (or the program)
    reason = out.sig[1:].decode('utf-8', 'replace')
  else:
    reason = launch.failure_reason(out.report, out.output, judged)
  return False, 'failed', reason


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
  off = set(disable)
  _check_arguments(judge, off, engine)
  bwrap, engine_error = launch.bubblewrap() if namespaces and engine != 'builtin' else (
      None, 'builtin engine asked for')
  if engine == 'bubblewrap' and bwrap is None:
    raise ValueError(f'engine=bubblewrap: {engine_error}')
  start = time.monotonic()
  run = _set_up(program, limits, judge, bwrap=bwrap, namespaces=namespaces,
                drop_privileges=drop_privileges, base_dir=base_dir, off=off)
  pipe = 'output_pipe' not in off
  out = _execute(run, limits, pipe)
  duration = time.monotonic() - start
  iso = _isolation_report(out, run, pipe=pipe, namespaces=namespaces, engine=engine,
                          engine_error=engine_error, off=off)
  passed, status, reason = _verdict(out, run.token, limits, judge is not None)
  return ExecResult(passed, status, reason[:REASON_MAX], duration, out.report.get('exit_code'),
                    out.report.get('signal'), out.output, iso)


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
