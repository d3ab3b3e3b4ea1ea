"""The sandbox's supervisor, run by path for every program: `python -I -S -B supervisor.py
--supervise CODE_DIR` (or `--init CODE_DIR` inside bubblewrap, `--kill-uid UID GID CODE_DIR`).
Not imported by the evaluator. CODE_DIR holds the modules it imports (the package's, compiled).

  evaluator --Popen, new session, stdout a pipe--> supervisor (this file)
      unshares the network, IPC, UTS and PID namespaces (and a user namespace when not root),
      forks
      --> init of the PID namespace: joins the sample's cgroup, unshares the mount and cgroup
          namespaces, builds the private filesystem view, joins a fresh session keyring,
          installs the system-call filter, then forks
          --> the judge (throwaway uid J): prompt + tests, calls the candidate through pipes
          --> the candidate (throwaway uid C): prompt + completion, serves the entry point

With bubblewrap (as root, where it is installed), the evaluator starts `bwrap` instead, which
makes the namespaces (but the network's) and the view, and runs init (`--init`) directly.
The supervisor reads its job (marshal) on stdin and writes its report (marshal) on a pipe.
Only the cheapest standard-library modules are imported at start: one supervisor starts per
program, so its start-up time is the harness's overhead.
"""
import marshal
import os
import signal
import sys
import time

# Set in __main__ from the package directory given on the command line (-I leaves it out).
isolation = protocol = view = wire = None


class _Timeout(Exception):
  pass


def _init(job: dict, info: dict, fds: dict) -> None:
  """Forked by the supervisor. With a PID namespace it is that namespace's init (which ignores
  most signals and inherits orphans), so the judge and the candidate run below it."""
  code = 2
  try:
    isolation.prctl(isolation.PR_SET_DUMPABLE, 0)
    rep = _isolate(job, info)
    wire.write_all(fds['status'], marshal.dumps(dict(info, **rep)))
    os.close(fds['status'])
    wait_for = _start_judged(job, info, fds) if job['judge'] else _start_alone(job, info, fds)
    while True:  # reap orphans until the one that decides is done
      pid, status = os.waitpid(-1, 0)
      if pid == wait_for:
        break
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
  except BaseException:  # pylint: disable=broad-except
    protocol.print_exception()
  os._exit(code)


def _isolate(job: dict, info: dict) -> dict:
  """Init's own layers, in order: the cgroup, the mount and cgroup namespaces with the view, the
  session keyring, the capabilities to keep, the system-call filter. Returns their report."""
  off = set(job['disable'])
  rep = dict(filesystem='host', cgroup=None, cgroup_namespace=False, keyring=False,
             seccomp='none')
  _join_cgroup_and_build_view(job, info, rep, off)
  if 'keyring' not in off:
    rep['keyring'] = isolation.join_session_keyring()
  # Outside a private view the stdlib may sit where other users cannot enter (a pyenv in
  # /root): then the throwaway uids need CAP_DAC_READ_SEARCH to import it.
  job['read_search'] = job['uid'] is not None and not all(
      isolation.others_can_read(p) for p in sys.path if os.path.isdir(p))
  rep['capabilities'] = 'dac_read_search' if job['read_search'] else 'none'
  if job['uid'] is None and os.geteuid() == 0 and not job['userns']:
    rep['capabilities'] = 'none (uid 0)'
  if job['uid'] is None:
    # The processes of the evaluator's uid that RLIMIT_NPROC counts besides the program:
    # in a user namespace the supervisor, init and the judge, otherwise all of the uid's.
    n_judge = 1 if job['judge'] else 0
    job['same_uid_procs'] = n_judge + (2 if job['userns'] else isolation.tasks_of_uid(
        os.getuid()))
  if job['seccomp']:   # last: init, the judge and the candidate all run under it
    try:
      isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
      isolation.install_seccomp(job['seccomp'])
      rep['seccomp'] = 'filter'
    except OSError as e:
      rep['seccomp_error'] = str(e)[:200]
  else:
    rep['seccomp_error'] = job['seccomp_error']
  return rep


def _join_cgroup_and_build_view(job: dict, info: dict, rep: dict, off: set) -> None:
  if job['engine'] == 'bubblewrap':   # its shell joined the cgroup; bwrap built the rest
    rep.update(cgroup=job['cgroup_joined'], filesystem='private',
               cgroup_namespace='cgroup_namespace' not in off)
    if not job['cgroup_joined']:
      rep['cgroup_error'] = job['cgroup_error']
    return
  if job['cgroup_procs']:   # before the cgroup namespace, whose root is the cgroup joined
    try:
      isolation.join_cgroups(job['cgroup_procs'])
      rep['cgroup'] = job['cgroup_version']
    except OSError as e:
      rep['cgroup_error'] = f'joining the cgroup failed: {e}'[:200]
  else:
    rep['cgroup_error'] = job['cgroup_error']
  # A mount namespace of init's own: the supervisor keeps the host's root and /proc.
  if not info['may_unshare']:
    rep['filesystem_error'] = 'no namespaces'
  elif not isolation.unshare(isolation.CLONE_NEWNS):
    rep['filesystem_error'] = 'unshare(CLONE_NEWNS) failed'
  else:
    if 'cgroup_namespace' not in off:
      rep['cgroup_namespace'] = isolation.unshare(isolation.CLONE_NEWCGROUP)
    try:
      view.build(job, with_proc=info['pid_namespace'])
      rep['filesystem'] = 'private'
    except view.ViewFailed as e:  # nothing was changed yet: the program sees the host
      rep['filesystem_error'] = str(e)[:200]


def _start_judged(job: dict, info: dict, fds: dict) -> int:
  """Forks the judge and the candidate, joined by two pipes; returns the judge's pid."""
  call_r, call_w = os.pipe()
  reply_r, reply_w = os.pipe()
  judge = os.fork()
  if judge == 0:
    os.chdir('/')
    isolation.close_fds_except((fds['judge'], call_w, reply_r, fds['sig']))
    isolation.limit_and_drop(job, judge=True)
    protocol.judge(fds['judge'], call_w, reply_r, fds['sig'])
  os.close(fds['judge'])
  os.close(fds['sig'])    # from here on, only the judge can write the verdict
  program = os.fork()
  if program == 0:
    isolation.close_fds_except((call_r, reply_w))
    isolation.limit_and_drop(job, judge=False)
    protocol.serve(job, info['network'], call_r, reply_w)
  for fd in (call_r, call_w, reply_r, reply_w):
    os.close(fd)
  return judge


def _start_alone(job: dict, info: dict, fds: dict) -> int:
  """Forks the program, which writes its own verdict; returns its pid."""
  program = os.fork()
  if program == 0:
    isolation.close_fds_except((fds['sig'],))
    isolation.limit_and_drop(job, judge=False)
    protocol.run_alone(job, info['network'], fds['sig'])
  os.close(fds['sig'])
  return program


def _unshare_namespaces(job: dict, info: dict, root: bool) -> None:
  off = set(job['disable'])
  lim = job['limits']
  if not root and isolation.unshare(isolation.CLONE_NEWUSER):
    isolation.map_ids()
    job['userns'] = True
    info['identity'] = 'user_namespace'
  if not (root or job['userns']):
    return
  info['may_unshare'] = True
  if not lim['network'] and isolation.unshare(isolation.CLONE_NEWNET):
    info['network'] = 'netns'
  if 'ipc' not in off:
    info['ipc'] = isolation.unshare(isolation.CLONE_NEWIPC)
  if 'uts' not in off:
    info['uts'] = isolation.unshare(isolation.CLONE_NEWUTS) and isolation.set_hostname()
  info['pid_namespace'] = isolation.unshare(isolation.CLONE_NEWPID)


def _supervise() -> None:
  """Reads its job (marshal) from stdin, runs the program, reports (marshal) on a pipe."""
  job = marshal.loads(sys.stdin.buffer.read())
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  fds = dict(sig=job.pop('sig_fd'), judge=job.pop('judge_fd'))
  rep_fd = job.pop('rep_fd')
  root = os.geteuid() == 0
  killer, kill_w = _start_killer(job, fds, rep_fd) if job['uid'] is not None else (None, None)
  lim = job['limits']
  info = dict(uid=job['uid'], network='allowed' if lim['network'] else 'socket-patch',
              pid_namespace=False, ipc=False, uts=False, may_unshare=False,
              identity='throwaway_uid' if job['uid'] is not None else (
                  'root' if root else 'evaluator_user'),
              verdict='judge' if job['judge'] else 'program',
              subreaper=isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1))
  job['userns'] = False
  if job['namespaces']:
    _unshare_namespaces(job, info, root)
  isolation.prctl(isolation.PR_SET_DUMPABLE, 0)   # after map_ids, which writes to /proc/self
  status_r, fds['status'] = os.pipe()
  me = os.getpid()
  pid = os.fork()
  if pid == 0:
    os.close(rep_fd)
    os.close(status_r)
    if kill_w is not None:
      os.close(kill_w)
    _init(job, info, fds)
  os.close(fds['status'])
  os.close(fds['sig'])
  if fds['judge'] is not None:
    os.close(fds['judge'])
  timed_out, status = _wait(pid, job['timeout'])
  _end_leftovers(killer, kill_w, info['pid_namespace'], me)
  try:
    os.set_blocking(status_r, False)
    info.update(marshal.loads(os.read(status_r, 1 << 16)))
  except (OSError, EOFError, ValueError, TypeError):
    pass
  code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
  sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
  if code is not None and code > 128:  # init's report of a signal
    code, sig = None, code - 128
  wire.write_all(rep_fd, marshal.dumps(dict(info, timed_out=timed_out, exit_code=code,
                                            signal=sig)))
  os._exit(0)


def _start_killer(job: dict, fds: dict, rep_fd: int) -> tuple[int, int]:
  """(pid, the pipe that tells it to act): a process forked before the PID namespace exists
  (once its init is gone nothing can be forked into it) that, told to, kills every process of
  the throwaway uid. Used without a PID namespace only."""
  kill_r, kill_w = os.pipe()
  killer = os.fork()
  if killer == 0:
    os.close(kill_w)
    for fd in (fds['sig'], rep_fd, fds['judge']):
      if fd is not None:
        os.close(fd)
    try:
      if os.read(kill_r, 1) == b'k':
        isolation.kill_uid_here(job['uid'], job['gid'])
    finally:
      os._exit(0)
  os.close(kill_r)
  return killer, kill_w


def _wait(pid: int, timeout: float) -> tuple[bool, int]:
  """(timed out, wait status) of `pid`, killed once `timeout` seconds have passed."""
  def on_alarm(signum, frame):
    raise _Timeout()

  timed_out, status = False, 0
  signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, timeout)
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
  return timed_out, status


def _end_leftovers(killer, kill_w, pid_namespace: bool, me: int) -> None:
  """Everything the program left behind dies now: with a PID namespace, the kernel killed it
  with init; without one, the sweep of the throwaway uid or of this session. Then reaps what
  was reparented to this process (a subreaper)."""
  if killer is not None:
    if not pid_namespace:
      os.write(kill_w, b'k')
    os.close(kill_w)
    os.waitpid(killer, 0)
  else:
    for p in isolation.session_pids(os.getsid(0), exclude=(me,)):
      try:
        os.kill(p, signal.SIGKILL)
      except OSError:
        pass
  deadline = time.monotonic() + 2.0
  while time.monotonic() < deadline:
    try:
      if os.waitpid(-1, os.WNOHANG)[0] == 0:
        time.sleep(0.002)
    except ChildProcessError:
      break


def _init_in_bubblewrap(code_dir: str) -> None:
  """Run by bwrap as the PID namespace's init, in the view it built: the network namespace
  (bwrap's would have its loopback up), the work dir's owner, then `_init`."""
  job = marshal.loads(sys.stdin.buffer.read())
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  isolation.libc()[1].umount2(code_dir.encode(), 2)   # MNT_DETACH: the program never sees it
  fds = dict(sig=job.pop('sig_fd'), judge=job.pop('judge_fd'), status=job.pop('rep_fd'))
  off, lim = set(job['disable']), job['limits']
  info = dict(uid=job['uid'], network='allowed' if lim['network'] else 'socket-patch',
              pid_namespace=True, ipc='ipc' not in off, uts='uts' not in off,
              may_unshare=True, identity='throwaway_uid' if job['uid'] is not None else 'root',
              verdict='judge' if job['judge'] else 'program', subreaper=True)
  if not lim['network'] and isolation.unshare(isolation.CLONE_NEWNET):
    info['network'] = 'netns'
  if job['uid'] is not None:
    os.chown(view.VIEW_WORKDIR, job['uid'], job['gid'])
    os.chmod(view.VIEW_WORKDIR, 0o700)
  job['userns'] = False
  _init(job, info, fds)


def _import_package(directory: str) -> None:
  """The sandbox's own modules, by path; the directory leaves sys.path again at once, so the
  view (which binds the directories on sys.path) never holds it. What they import loads here,
  before the view is built and the identity dropped (the stdlib may then be out of reach)."""
  global isolation, protocol, view, wire  # pylint: disable=global-statement
  sys.path.insert(0, directory)
  try:
    # pylint: disable-next=g-import-not-at-top,redefined-outer-name,multiple-imports
    import isolation, protocol, view, wire
  finally:
    sys.path.remove(directory)


if __name__ == '__main__':
  if sys.argv[1:2] == ['--supervise'] and len(sys.argv) == 3:
    _import_package(sys.argv[2])
    _supervise()
  elif sys.argv[1:2] == ['--init'] and len(sys.argv) == 3:
    _import_package(sys.argv[2])
    _init_in_bubblewrap(sys.argv[2])
  elif sys.argv[1:2] == ['--kill-uid'] and len(sys.argv) == 5:
    _import_package(sys.argv[4])
    isolation.kill_uid_here(int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(0)
  sys.exit(f'usage: {sys.argv[0]} --supervise CODE_DIR | --init CODE_DIR | '
           '--kill-uid UID GID CODE_DIR (internal to plt_jax)')
