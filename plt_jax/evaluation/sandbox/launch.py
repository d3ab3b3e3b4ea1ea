"""Starting the supervisor and collecting what it leaves: the compiled code, the job's pipes, the
capped output, the bubblewrap command line, the failure reason and the backstop sweep."""
from __future__ import annotations

import atexit
import marshal
import os
import py_compile
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

from plt_jax.evaluation.sandbox import isolation, protocol, view, wire

OUTPUT_TAIL = 4000
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SUPERVISOR_MODULES = ('supervisor', 'isolation', 'protocol', 'view', 'wire')
_COMPILED: dict = {}   # pid of the evaluator process -> code()
_COMPILED_LOCK = threading.Lock()


def code() -> tuple[str, str]:
  """(supervisor script, directory of the modules it imports): the sandbox's modules as
  bytecode, compiled once per evaluator process into a private directory (a script given as
  source is compiled again at every start, and one starts per program). Falls back to the
  package's sources."""
  pid = os.getpid()
  with _COMPILED_LOCK:
    if pid not in _COMPILED:   # also after a fork: the parent removes its copy at its exit
      result = (os.path.join(PACKAGE_DIR, 'supervisor.py'), PACKAGE_DIR)
      d = tempfile.mkdtemp(prefix='plt-sandbox-code-')
      os.chmod(d, 0o755)
      try:
        for name in SUPERVISOR_MODULES:
          src = os.path.join(PACKAGE_DIR, name + '.py')
          py_compile.compile(src, cfile=os.path.join(d, name + '.pyc'), dfile=src,
                             doraise=True)
        open(os.path.join(d, 'empty'), 'w').close()   # what masked /proc files show
        result = (os.path.join(d, 'supervisor.pyc'), d)
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(d, ignore_errors=True))
      except (OSError, py_compile.PyCompileError):
        shutil.rmtree(d, ignore_errors=True)
      _COMPILED[pid] = result
    return _COMPILED[pid]


def read_available(fd: int, limit: int = 1 << 16) -> bytes:
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


def communicate(proc, job: bytes, timeout: float, cap: int):
  """Writes the job to the supervisor's stdin and reads its stdout (the program's stdout and
  stderr) until end of file or `timeout`. Keeps the last OUTPUT_TAIL of the first `cap` bytes;
  past `cap` the pipe is closed, so that every further write of the program fails.
  Returns (tail, over_cap, stuck)."""
  out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
  os.set_blocking(in_fd, False)
  sel = selectors.DefaultSelector()
  sel.register(out_fd, selectors.EVENT_READ)
  sel.register(in_fd, selectors.EVENT_WRITE)
  view, tail, total = memoryview(job), bytearray(), 0
  deadline, exited_at = time.monotonic() + timeout, None
  over = stuck = False
  while sel.get_map():
    now = time.monotonic()
    if now > deadline:
      stuck = True
      break
    if exited_at is None and proc.poll() is not None:
      exited_at = now
    if exited_at is not None and now > exited_at + 1.0:   # a survivor holds the pipe
      break
    for key, _ in sel.select(min(deadline - now, 0.25)):
      if key.fd == in_fd:
        try:
          view = view[os.write(in_fd, view[:1 << 16]):]
        except BrokenPipeError:
          view = view[:0]
        except BlockingIOError:
          continue
        if not view:
          sel.unregister(in_fd)
          proc.stdin.close()
        continue
      chunk = os.read(out_fd, 1 << 16)
      if not chunk:
        sel.unregister(out_fd)
        continue
      take = chunk[:max(0, cap - total)]
      total += len(chunk)
      tail += take
      del tail[:-OUTPUT_TAIL]
      if total > cap:
        over = True
        sel.unregister(out_fd)
  sel.close()
  for f in (proc.stdin, proc.stdout):
    if not f.closed:
      f.close()
  return bytes(tail), over, stuck


def sweep_uid(uid: int, gid: int) -> None:
  """Backstop: kill every process of a throwaway uid from a helper process."""
  for _ in range(3):
    if not isolation.live_pids_of_uid(uid):
      return
    subprocess.run([sys.executable, '-I', '-S', code()[0], '--kill-uid', str(uid),
                    str(gid), code()[1]], check=False, timeout=30, stdin=subprocess.DEVNULL)


_SIGNAL_REASONS = {'SIGXCPU': 'CPU time limit exceeded', 'SIGXFSZ': 'file size limit exceeded',
                   'SIGKILL': 'killed (SIGKILL)', 'SIGSEGV': 'segmentation fault'}


def failure_reason(report: dict, output: str, judged: bool) -> str:
  if report.get('signal'):
    try:
      name = signal.Signals(report['signal']).name
    except ValueError:
      name = f'signal {report["signal"]}'
    return _SIGNAL_REASONS.get(name, f'killed by {name}')
  code = report.get('exit_code')
  if judged:
    return f'the judge exited with status {code} without a verdict'
  lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
  if code == 0:
    return 'exited with status 0 before the tests finished (no pass signal)'
  if code == 1 and lines:
    return lines[-1][:protocol.REASON_MAX]
  return f'exit status {code}' + (f': {lines[-1][:protocol.REASON_MAX]}' if lines else '')


def judge_file(judge, token: str) -> int:
  """A memfd (or unlinked file) holding the judge's code and token; only the judge reads it."""
  data = marshal.dumps(dict(token=token, setup=judge.setup, test=judge.test,
                           entry_point=judge.entry_point, check=judge.check))
  if hasattr(os, 'memfd_create'):
    fd = os.memfd_create('plt-judge', os.MFD_CLOEXEC)
  else:
    fd = os.dup(tempfile.TemporaryFile().fileno())
  wire.write_all(fd, data)
  return fd




# ---------------------------------------------------------------------------- bubblewrap

CODE_IN_VIEW = '/.sandbox-code'   # where the supervisor's bytecode is bound, until init starts
_JOIN_CGROUP = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
                'exec "$@"')
_BWRAP: dict = {}
_BWRAP_LOCK = threading.Lock()


def bubblewrap() -> tuple:
  """(path of a bwrap that runs here, '') or (None, why not). Probed once per process. Used as
  root only: without root, the builtin code's user namespace does what bwrap would."""
  with _BWRAP_LOCK:
    if 'path' not in _BWRAP:
      path, why = shutil.which('bwrap') or shutil.which('bwrap', path='/usr/bin'), ''
      if path is None:
        why = 'bubblewrap is not installed'
      elif os.geteuid() != 0:
        path, why = None, 'not root'
      else:
        try:
          p = subprocess.run([path, '--ro-bind', '/', '/', '--unshare-pid', '--unshare-ipc',
                              '--unshare-uts', '--unshare-cgroup', '--new-session',
                              '--die-with-parent', '--as-pid-1', 'true'],
                             capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
          if p.returncode != 0:
            path, why = None, f'bwrap fails here: {p.stderr.decode(errors="replace")[:150]}'
        except (OSError, subprocess.SubprocessError) as e:
          path, why = None, f'bwrap fails here: {e}'[:200]
      _BWRAP.update(path=path, why=why)
    return _BWRAP['path'], _BWRAP['why']


def _interpreter_dirs() -> list:
  """What `python -I -S` imports from: the prefixes and the standard library's directories."""
  dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
  for key in ('stdlib', 'platstdlib'):
    p = os.path.realpath(sysconfig.get_paths(vars={'base': sys.base_prefix,
                                                   'platbase': sys.base_exec_prefix})[key])
    if os.path.isdir(p):
      dirs.add(p)
  return sorted(d for d in dirs if not any(d.startswith(o.rstrip('/') + '/') for o in dirs))


def bubblewrap_command(bwrap: str, tmpfs_bytes: int, off: set, script: str,
                      code_dir: str) -> list:
  """The argv of bwrap building the private view and the namespaces (but the network's, which
  init makes with its loopback down), then running init in it."""
  exe = os.path.realpath(sys.executable)
  argv = [bwrap, '--new-session', '--die-with-parent', '--as-pid-1', '--unshare-pid']
  if 'ipc' not in off:
    argv += ['--unshare-ipc']
  if 'uts' not in off:
    argv += ['--unshare-uts', '--hostname', isolation.NEUTRAL_HOSTNAME]
  if 'cgroup_namespace' not in off:
    argv += ['--unshare-cgroup']
  covered: list = []
  made: set = set()

  def parents(path):   # bwrap would make them 0700: the throwaway uids must pass through
    out, p = [], os.path.dirname(path)
    while p != '/' and p not in made:
      made.add(p)
      out = ['--perms', '0755', '--dir', p] + out
      p = os.path.dirname(p)
    return out

  for d in view.SYSTEM_DIRS:
    if os.path.islink(d):
      argv += ['--symlink', os.readlink(d), d]
    elif os.path.isdir(d):
      argv += ['--ro-bind', d, d]
      covered.append(d)
  for d in _interpreter_dirs() + [os.path.dirname(exe)]:
    if d == '/':
      raise OSError('the interpreter prefix is /')
    if not any(d == c or d.startswith(c.rstrip('/') + '/') for c in covered):
      argv += parents(d) + ['--ro-bind', d, d]
      covered.append(d)
  for f in view.ETC_FILES:
    if os.path.islink(f):
      argv += ['--symlink', os.readlink(f), f]
    elif os.path.isfile(f):
      argv += parents(f) + ['--ro-bind', f, f]
  argv += ['--dev', '/dev', '--proc', '/proc']
  empty = os.path.join(code_dir, 'empty')
  for name in view.MASKED_PROC:   # bwrap's binds are nodev: /dev/null would read as EACCES
    if os.path.exists('/proc/' + name):
      argv += ['--ro-bind', empty if os.path.isfile(empty) else '/dev/null', '/proc/' + name]
  size = str(int(tmpfs_bytes))
  for d in view.PRIVATE_DIRS:
    argv += parents(d) + ['--perms', '1777', '--size', size, '--tmpfs', d]
  argv += ['--ro-bind', code_dir, CODE_IN_VIEW, '--remount-ro', '/',
           '--chdir', view.VIEW_WORKDIR, '--setenv', 'HOME', view.VIEW_WORKDIR,
           '--setenv', 'TMPDIR', view.VIEW_WORKDIR, '--',
           exe, '-I', '-S', '-B', os.path.join(CODE_IN_VIEW, os.path.basename(script)),
           '--init', CODE_IN_VIEW]
  return argv


def in_cgroup(argv: list, procs_files: list) -> list:
  """argv, started by a shell that first moves itself into the cgroup."""
  return ['/bin/sh', '-c', _JOIN_CGROUP, 'sh', *procs_files, '--', *argv]


def report_of(rep: bytes) -> dict:
  try:
    return marshal.loads(rep) if rep else {}
  except (EOFError, ValueError, TypeError):
    return {}
