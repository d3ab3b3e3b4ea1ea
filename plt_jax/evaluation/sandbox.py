"""Runs untrusted Python programs (model completions) in a contained process, and judges them.

`run_program(program, limits, judge=Judge(...))` -> `ExecResult`; `run_programs(...)` runs many
on a thread pool. With a `Judge`, the verdict comes from trusted test code in a process of its
own; without one, `passed` only means the program reached its end.

One program runs like this on Linux. Each layer is used when the system permits it, and
`ExecResult.isolation` says which ones were in force (`missing_layers` lists the absent ones):

  evaluator --Popen, new session--> supervisor (this file, compiled, run as `python -I -S`)
      unshares network and PID namespaces (and a user namespace when not root), forks
      --> init of the PID namespace: unshares a mount namespace, builds the private
          filesystem view in it, then forks
          --> the judge (throwaway uid J): prompt + tests, calls the candidate through pipes
          --> the candidate (throwaway uid C): prompt + completion, serves the entry point

* **Filesystem.** A private mount namespace whose root is a fresh read-only tmpfs holding only
  read-only bind mounts of the system directories (/usr and the /bin, /lib... links or dirs),
  /etc/ld.so.cache and /etc/localtime, the interpreter's prefix (at its own path, even under
  /root), a few /dev nodes and /proc of the PID namespace. Home directories and the
  evaluator's files (output dir, checkpoints, this checkout) are not in it. The work dir
  (/sandbox), /tmp, /var/tmp and /dev/shm are private tmpfs mounts of `Limits.tmpfs_bytes` each;
  they vanish with the namespace when the program ends. Where no view can be built the program
  sees the host's files (`filesystem: 'host'`); if the standard library is then unreadable to
  other users (a pyenv in /root), the throwaway uids keep CAP_DAC_READ_SEARCH to import it.
* **Identity.** Run as root, the evaluator gives the candidate and the judge two fresh, random,
  otherwise unused uids, no groups, no capabilities, no_new_privs. RLIMIT_NPROC then counts
  exactly the candidate's processes, and it cannot signal, trace or read any other process of
  the sandbox. Not root: a user namespace mapping the evaluator's uid, all capabilities dropped.
* **rlimits.** CPU seconds, address space (memory), file size, open files, no core files,
  processes.
* **Network.** A new network namespace whose only interface is a loopback that is down. Where
  that is not permitted, the candidate's `socket` constructors are replaced (best effort).
* **Wall clock.** The supervisor kills the namespace's init at the timeout, which tears down the
  PID namespace and everything in it; then every process of the candidate uid is killed with
  kill(-1, SIGKILL) sent from that uid (the kernel walks the task list under the lock fork
  needs, so a fork bomb that left with setsid() cannot escape). The evaluator keeps a backstop
  (killpg plus the same uid sweep) in case the supervisor itself dies.
* **Verdict.** The judge holds the trusted code (the problem's prompt, for its helper functions,
  and its tests), read from a memfd that only the judge ever receives, together with a random
  token. The candidate process never holds the tests, the token or the verdict pipe. `check`
  runs in the judge; every `candidate(...)` call crosses a pipe in a small tagged format (never
  pickle or marshal), the reply is decoded into plain built-in values only, and the judge
  compares those.
  The judge writes the token only after `check` returned. Whatever the candidate does inside
  its own process (frames, gc, ctypes, writing to its fds, exiting with 0, objects with a
  rigged `__eq__`) cannot make the judge write it. Arguments reach the candidate as copies, so
  the tests never see it mutate them.
* **Output.** stdout and stderr go together to an anonymous file bounded by the file-size limit.
  Its tail is kept; the failure reason is at most 300 characters.

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

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x10000000, 0x20000000, 0x40000000)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS = 1, 4, 8
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 16384, 1 << 18, 1 << 21
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {'x86_64': 155, 'aarch64': 41, 'riscv64': 41, 'ppc64le': 203, 's390x': 217}

VIEW_WORKDIR = '/sandbox'   # the program's working directory inside the private view
_SYSTEM_DIRS = ('/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32')
_ETC_FILES = ('/etc/ld.so.cache', '/etc/localtime')
_DEV_NODES = ('null', 'zero', 'full', 'random', 'urandom')
_MAX_FRAME = 8 << 20        # the largest call or reply the judge accepts
_MAX_DEPTH = 64             # nesting of a value crossing between judge and candidate
_REASON_MAX = 300


# ------------------------------------------------------------------------ system helpers

_LIBC: list = []


def _libc():
  if not _LIBC:
    import ctypes  # pylint: disable=g-import-not-at-top
    _LIBC.extend((ctypes, ctypes.CDLL(None, use_errno=True)))
  return _LIBC[0], _LIBC[1]


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


def _set_caps(keep: int) -> bool:
  """capset: effective = permitted = `keep` (a bit mask), nothing inheritable."""
  ctypes, libc = _libc()
  # struct __user_cap_header_struct {u32 version; int pid}, then two {u32 eff, perm, inh}.
  header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
  data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)
  return libc.capset(header, data) == 0


def _mount(src, dst: str, fstype, flags: int, data=None) -> None:
  ctypes, libc = _libc()
  enc = lambda s: None if s is None else s.encode()
  if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    e = ctypes.get_errno()
    raise OSError(e, f'mount {dst}: {os.strerror(e)}')


def _bind_read_only(src: str, dst: str) -> None:
  _mount(src, dst, None, _MS_BIND | _MS_REC)
  # A remount must keep the flags a user namespace locked; nosuid/nodev may always be added.
  f = os.statvfs(src).f_flag
  keep = (f & (_MS_NOEXEC | _MS_NOATIME | _MS_NODIRATIME)) | (_MS_RELATIME if f & 4096 else 0)
  _mount(None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep)


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


def _close_fds_except(keep) -> None:
  """Closes every descriptor above 2 that is not in `keep` (nothing else may be inherited)."""
  import resource  # pylint: disable=g-import-not-at-top
  top = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
  if top == resource.RLIM_INFINITY or top < 0:
    top = 1 << 20
  lo = 3
  for fd in sorted(set(keep)):
    if fd >= lo:
      os.closerange(lo, fd)
      lo = fd + 1
  os.closerange(lo, top)


def _print_exception() -> None:
  try:
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass


def _describe(e: BaseException) -> str:
  try:
    text = str(e)
  except BaseException:  # pylint: disable=broad-except
    text = ''
  return (type(e).__name__ + (f': {text}' if text else ''))[:_REASON_MAX]


# ----------------------------------------------------- values between judge and candidate
# A small tagged byte format, so that neither process imports json (with re and enum, at every
# start) and the judge never unpickles or unmarshals what the candidate wrote:
#   N T F            None True False
#   i<digits>;       int            f<float.hex>;   float      c<hex>;<hex>;  complex
#   s<n>:<utf-8>     str            b<n>:<bytes>    bytes
#   l t S z I<n>:    list, tuple, set, frozenset, iterator (n items follow)
#   d<n>:            dict (n key, value pairs follow)    r<int><int><int>  range
# Decoding builds only built-in values, so nothing of the candidate's (methods, __eq__,
# __hash__) reaches the judge.

_SEQ_TAGS = {list: b'l', tuple: b't', set: b'S', frozenset: b'z'}
_SEQ_TYPES = {b'l': list, b't': tuple, b'S': set, b'z': frozenset, b'I': iter}
_BASES = (bool, int, float, str, complex, bytes, tuple, list, dict, frozenset, set)


def _dumps(x) -> bytes:
  out: list = []
  _dump(x, out, 0)
  return b''.join(out)


def _dump(x, out: list, depth: int) -> None:
  if depth > _MAX_DEPTH:
    raise ValueError('value nested too deeply')
  t = type(x)
  if x is None:
    out.append(b'N')
  elif t is bool:
    out.append(b'T' if x else b'F')
  elif t is int:
    out.append(b'i%d;' % x)
  elif t is float:
    out.append(b'f%s;' % x.hex().encode())
  elif t is complex:
    out.append(b'c%s;%s;' % (x.real.hex().encode(), x.imag.hex().encode()))
  elif t is str or t is bytes:
    b = x.encode('utf-8', 'surrogatepass') if t is str else x
    out.append(b'%s%d:' % (b's' if t is str else b'b', len(b)))
    out.append(b)
  elif t in _SEQ_TAGS:
    items = list(x)
    out.append(b'%s%d:' % (_SEQ_TAGS[t], len(items)))
    for y in items:
      _dump(y, out, depth + 1)
  elif t is dict:
    items = list(x.items())
    out.append(b'd%d:' % len(items))
    for k, v in items:
      _dump(k, out, depth + 1)
      _dump(v, out, depth + 1)
  elif t is range:
    out.append(b'r')
    for v in (x.start, x.stop, x.step):
      _dump(v, out, depth + 1)
  else:
    for base in _BASES:
      if isinstance(x, base):  # a subclass (IntEnum, namedtuple, Counter...) as its base type
        return _dump(base(x), out, depth)
    if hasattr(t, '__next__'):  # a generator, map, zip...: its items, as an iterator again
      items = list(x)
      out.append(b'I%d:' % len(items))
      for y in items:
        _dump(y, out, depth + 1)
      return None
    raise TypeError(f'a {t.__name__} cannot be passed between the program and its tests')
  return None


def _loads(data: bytes):
  """The value `_dumps` wrote; ValueError for anything else."""
  try:
    value, i = _load(bytes(data), 0, 0)
  except (IndexError, TypeError, OverflowError, RecursionError):  # e.g. a list as a set item
    raise ValueError('malformed value') from None
  if i != len(data):
    raise ValueError('malformed value')
  return value


def _count(d: bytes, i: int):
  j = d.index(b':', i)
  if not d[i:j].isdigit():
    raise ValueError('malformed value')
  n = int(d[i:j])
  if n > len(d) - j - 1:   # every item takes at least one byte
    raise ValueError('malformed value')
  return n, j + 1


def _load(d: bytes, i: int, depth: int):
  if depth > _MAX_DEPTH:
    raise ValueError('value nested too deeply')
  tag = d[i:i + 1]
  i += 1
  if tag in (b'N', b'T', b'F'):
    return {b'N': None, b'T': True, b'F': False}[tag], i
  if tag == b'i':
    j = d.index(b';', i)
    text = d[i:j]
    if not (text[:1] == b'-' and text[1:].isdigit() or text.isdigit()):
      raise ValueError('malformed value')
    return int(text), j + 1
  if tag in (b'f', b'c'):
    parts = []
    for _ in range(1 if tag == b'f' else 2):
      j = d.index(b';', i)
      parts.append(float.fromhex(d[i:j].decode('ascii')))
      i = j + 1
    return (parts[0] if tag == b'f' else complex(*parts)), i
  if tag in (b's', b'b'):
    n, i = _count(d, i)
    raw = d[i:i + n]
    return (raw.decode('utf-8', 'surrogatepass') if tag == b's' else raw), i + n
  if tag in _SEQ_TYPES or tag == b'd':
    n, i = _count(d, i)
    items = []
    for _ in range(n * 2 if tag == b'd' else n):
      v, i = _load(d, i, depth + 1)
      items.append(v)
    if tag == b'd':
      return dict(zip(items[::2], items[1::2])), i
    return _SEQ_TYPES[tag](items), i
  if tag == b'r':
    parts = []
    for _ in range(3):
      v, i = _load(d, i, depth + 1)
      if type(v) is not int:
        raise ValueError('malformed value')
      parts.append(v)
    return range(*parts), i
  raise ValueError('malformed value')


def _send(fd: int, payload: bytes) -> None:
  _write_all(fd, len(payload).to_bytes(4, 'big') + payload)


def _recv(fd: int, limit: int = _MAX_FRAME):
  """One frame, or None at end of file (also mid-frame: the writer is gone)."""
  def exactly(n):
    chunks = []
    while n:
      b = os.read(fd, min(n, 1 << 20))
      if not b:
        return None
      chunks.append(b)
      n -= len(b)
    return b''.join(chunks)

  head = exactly(4)
  if head is None:
    return None
  n = int.from_bytes(head, 'big')
  if n > limit:
    raise ValueError(f'the program sent {n} bytes at once (at most {limit})')
  return exactly(n)


# ------------------------------------------------------------------------ the supervisor

class _Timeout(Exception):
  pass


class ProgramError(Exception):
  """Raised in the judge by a call of the candidate that did not return a value."""


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


def _map_ids() -> None:
  """In a fresh user namespace: the evaluator's own uid and gid map to themselves."""
  uid, gid = os.getuid(), os.getgid()
  for name, text in (('setgroups', 'deny'), ('uid_map', f'{uid} {uid} 1'),
                     ('gid_map', f'{gid} {gid} 1')):
    try:
      with open(f'/proc/self/{name}', 'w') as f:
        f.write(text)
    except OSError:
      pass


class _ViewFailed(Exception):
  pass


def _build_view(job: dict, info: dict) -> None:
  """Makes the private filesystem view this process's root (see the module docstring).

  Raises _ViewFailed, with the host's root left as it was, when a step before pivot_root fails;
  a failure after it is an error of the sandbox (OSError)."""
  root = os.getcwd()   # the evaluator's (empty) work dir: only a mount point here
  try:
    _mount(None, '/', None, _MS_REC | _MS_PRIVATE)   # nothing propagates back to the host
    _mount('tmpfs', root, 'tmpfs', _MS_NOSUID | _MS_NODEV, 'size=1m,nr_inodes=4096,mode=755')
  except OSError as e:
    raise _ViewFailed(str(e)) from None
  try:
    _populate_view(job, info, root)
    ctypes, libc = _libc()
    os.chdir(root)
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None or libc.syscall(ctypes.c_long(nr), b'.', b'.') != 0:
      raise OSError(ctypes.get_errno(), 'pivot_root failed')
  except OSError as e:
    os.chdir('/')
    _libc()[1].umount2(root.encode(), _MNT_DETACH)
    os.chdir(root)
    raise _ViewFailed(str(e)) from None
  ctypes, libc = _libc()
  if libc.umount2(b'.', ctypes.c_int(_MNT_DETACH)) != 0:   # the old root, stacked on "."
    raise OSError(ctypes.get_errno(), 'detaching the old root failed')
  os.chdir('/')
  _mount(None, '/', None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
  os.chdir(VIEW_WORKDIR)
  os.environ['HOME'] = os.environ['TMPDIR'] = VIEW_WORKDIR


def _populate_view(job: dict, info: dict, root: str) -> None:
  """The view's contents, under `root` (a fresh tmpfs)."""
  lim = job['limits']
  os.umask(0o022)
  covered = []

  def bind_dir(src):
    if any(src == c or src.startswith(c.rstrip('/') + '/') for c in covered):
      return
    os.makedirs(root + src, 0o755, exist_ok=True)
    _bind_read_only(src, root + src)
    covered.append(src)

  for d in _SYSTEM_DIRS:
    if os.path.islink(d):
      os.symlink(os.readlink(d), root + d)
    elif os.path.isdir(d):
      bind_dir(d)
  prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
  for p in sys.path:   # with -I -S: the standard library, its zip and lib-dynload
    if os.path.isdir(p):
      rp = os.path.realpath(p)
      if not any(rp.startswith(x.rstrip('/') + '/') for x in prefixes):
        prefixes.add(rp)
  for p in sorted(prefixes):
    if p == '/':
      raise OSError(errno.EINVAL, 'the interpreter prefix is /')
    bind_dir(p)
  os.makedirs(root + '/etc', 0o755, exist_ok=True)
  for f in _ETC_FILES:
    if os.path.islink(f):
      os.symlink(os.readlink(f), root + f)
    elif os.path.isfile(f):
      open(root + f, 'w').close()
      _bind_read_only(f, root + f)
  size = f'size={int(lim["tmpfs_bytes"])},nr_inodes=1024'
  os.mkdir(root + '/dev')
  _mount('tmpfs', root + '/dev', 'tmpfs', _MS_NOSUID | _MS_NOEXEC, 'size=64k,mode=755')
  for n in _DEV_NODES:
    if os.path.exists('/dev/' + n):
      open(root + '/dev/' + n, 'w').close()
      _mount('/dev/' + n, root + '/dev/' + n, None, _MS_BIND)
  for i, n in enumerate(('stdin', 'stdout', 'stderr')):
    os.symlink(f'/proc/self/fd/{i}', f'{root}/dev/{n}')
  os.symlink('/proc/self/fd', root + '/dev/fd')
  os.mkdir(root + '/dev/shm')
  _mount(None, root + '/dev', None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)
  owner = f',uid={job["uid"]},gid={job["gid"]}' if job['uid'] is not None else ''
  for d in ('/tmp', '/var/tmp', VIEW_WORKDIR):
    os.makedirs(root + d, 0o755, exist_ok=True)
  private = ((VIEW_WORKDIR, f'{size},mode=700{owner}'), ('/tmp', f'{size},mode=1777'),
             ('/var/tmp', f'{size},mode=1777'), ('/dev/shm', f'{size},mode=1777'))
  for d, opts in private:
    _mount('tmpfs', root + d, 'tmpfs', _MS_NOSUID | _MS_NODEV, opts)
  os.mkdir(root + '/proc')
  if info['pid_namespace']:  # a procfs of another PID namespace would show its processes
    try:
      _mount('proc', root + '/proc', 'proc', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
      pass


def _limit_and_drop(job: dict, judge: bool) -> None:
  """rlimits, then the process's identity: a throwaway uid (root) or no capabilities."""
  import resource  # pylint: disable=g-import-not-at-top
  lim = job['limits']
  parent = os.getppid()
  uid = job['judge_uid'] if judge else job['uid']

  def set_(r, v):
    resource.setrlimit(r, (v, v))

  resource.setrlimit(resource.RLIMIT_CPU, (lim['cpu'], lim['cpu'] + 1))
  set_(resource.RLIMIT_CORE, 0)
  set_(resource.RLIMIT_FSIZE, lim['file_bytes'])
  set_(resource.RLIMIT_NOFILE, lim['open_files'])
  if hasattr(resource, 'RLIMIT_NPROC'):
    if uid is not None:   # a uid of its own: exactly its processes count
      nproc = 1 if judge else lim['nproc']
    else:                 # the evaluator's uid: the sandbox's other processes count too
      nproc = lim['nproc'] + job['same_uid_procs']
    set_(resource.RLIMIT_NPROC, nproc)
  set_(resource.RLIMIT_AS, lim['memory_bytes'])
  keep = 1 << _CAP_DAC_READ_SEARCH if job['read_search'] else 0
  if uid is not None:
    if keep:
      _prctl(_PR_SET_KEEPCAPS, 1)
    _become(uid, job['gid'] if not judge else uid)
  if (keep or os.geteuid() != 0 or uid is None) and not _set_caps(keep):
    raise OSError('capset failed')
  _prctl(_PR_SET_NO_NEW_PRIVS, 1)
  _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
  if judge:  # after the uid change, which resets it: no tracing, no /proc/<pid>/fd access
    _prctl(_PR_SET_DUMPABLE, 0)
  if os.getppid() != parent:                 # init died before that
    os._exit(2)


def _load_program(program: str):
  """Runs the program as module __main__ (in /sandbox/program.py, nominally)."""
  import types  # pylint: disable=g-import-not-at-top
  module = types.ModuleType('__main__')
  module.__file__ = os.path.join(os.getcwd(), 'program.py')
  sys.modules['__main__'] = module
  compiled = compile(program, module.__file__, 'exec')
  exec(compiled, module.__dict__)  # pylint: disable=exec-used
  return module


def _run(job: dict, network: str, sig_fd: int) -> None:
  """Without a judge: runs the whole program, then writes the token. Never returns."""
  code = 2
  try:
    if network == 'socket-patch':
      _disable_sockets()
    token, program = job.pop('token').encode(), job.pop('program')
    write = os.write
    code = 1                         # from here on, a failure is the program's
    _load_program(program)
    del program, job
    sys.stdout.flush()
    write(sig_fd, token)
    code = 0
  except BaseException as e:  # pylint: disable=broad-except
    # The failure reason, on the pipe: the output file may be full (RLIMIT_FSIZE).
    try:
      os.write(sig_fd, b'\0' + _describe(e).encode('utf-8', 'replace'))
    except BaseException:  # pylint: disable=broad-except
      pass
    _print_exception()
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass
  os._exit(code)


def _serve(job: dict, network: str, call_fd: int, reply_fd: int) -> None:
  """The candidate: runs prompt + completion, then answers the judge's calls. Never returns.

  Everything here runs in the untrusted process; the judge trusts none of it. Replies: b'R'
  (loaded), b'O' + value (returned), b'E' + text (raised)."""
  code = 2
  try:
    if network == 'socket-patch':
      _disable_sockets()
    program, entry_point = job.pop('program'), job.pop('entry_point')
    del job
    code = 1
    try:
      fn = getattr(_load_program(program), entry_point)
      if not callable(fn):
        raise TypeError(f'{entry_point} is not callable')
      reply = b'R'
    except BaseException as e:  # pylint: disable=broad-except
      _print_exception()
      reply = b'E' + _describe(e).encode('utf-8', 'replace')
      fn = None
    sys.stdout.flush()
    _send(reply_fd, reply)
    while fn is not None:
      request = _recv(call_fd, 1 << 62)
      if request is None:
        break
      args, kwargs = _loads(request)
      try:
        reply = b'O' + _dumps(fn(*args, **kwargs))
      except BaseException as e:  # pylint: disable=broad-except
        reply = b'E' + _describe(e).encode('utf-8', 'replace')
      try:
        sys.stdout.flush()
      except BaseException:  # pylint: disable=broad-except
        pass
      _send(reply_fd, reply)
    code = 0
  except BaseException:  # pylint: disable=broad-except
    _print_exception()
  os._exit(code)


def _judge(judge_fd: int, call_fd: int, reply_fd: int, sig_fd: int) -> None:
  """Runs the trusted setup and tests against the candidate; writes the token only if `check`
  returned. Never returns."""
  code = 2
  try:
    chunks, offset = [], 0
    while True:
      b = os.pread(judge_fd, 1 << 20, offset)
      if not b:
        break
      chunks.append(b)
      offset += len(b)
    os.close(judge_fd)
    spec = marshal.loads(b''.join(chunks))   # written by the evaluator
    token = spec.pop('token').encode()
    code = 1

    def reply(expect: bytes):
      msg = _recv(reply_fd)
      if msg is None:
        raise ProgramError('the program exited before the tests finished')
      if msg[:1] == b'E':
        raise ProgramError(msg[1:1 + _REASON_MAX].decode('utf-8', 'replace'))
      if msg[:1] != expect or (expect == b'R' and len(msg) != 1):
        raise ValueError('malformed reply from the program')
      return msg[1:]

    def candidate(*args, **kwargs):
      try:
        _send(call_fd, _dumps((args, kwargs)))
      except BrokenPipeError:
        raise ProgramError('the program exited before the tests finished') from None
      return _loads(reply(b'O'))

    ns = {'__name__': '__judge__'}
    exec(compile(spec['setup'], 'prompt.py', 'exec'), ns)  # pylint: disable=exec-used
    exec(compile(spec['test'], 'test.py', 'exec'), ns)     # pylint: disable=exec-used
    reply(b'R')
    ns[spec['entry_point']] = candidate   # tests that call the function by its name
    ns[spec['check']](candidate)
    os.write(sig_fd, token)
    code = 0
  except BaseException as e:  # pylint: disable=broad-except
    try:
      reason = str(e) if isinstance(e, ProgramError) else _describe(e)
      os.write(sig_fd, b'\0' + reason[:_REASON_MAX].encode('utf-8', 'replace'))
    except BaseException:  # pylint: disable=broad-except
      pass
  os._exit(code)


def _init(job: dict, info: dict, fds: dict) -> None:
  """Forked by the supervisor. With a PID namespace it is that namespace's init (which ignores
  most signals and inherits orphans), so the judge and the candidate run below it."""
  code = 2
  try:
    _prctl(_PR_SET_DUMPABLE, 0)
    view = dict(filesystem='host')
    # A mount namespace of init's own: the supervisor keeps the host's root and /proc.
    if not info['may_unshare']:
      view['filesystem_error'] = 'no namespaces'
    elif not _unshare(_CLONE_NEWNS):
      view['filesystem_error'] = 'unshare(CLONE_NEWNS) failed'
    else:
      try:
        _build_view(job, info)
        view['filesystem'] = 'private'
      except _ViewFailed as e:  # nothing was changed yet: the program sees the host
        view['filesystem_error'] = str(e)[:200]
    # Outside a private view the stdlib may sit where other users cannot enter (a pyenv in
    # /root): then the throwaway uids need CAP_DAC_READ_SEARCH to import it.
    job['read_search'] = job['uid'] is not None and not all(
        _others_can_read(p) for p in sys.path if os.path.isdir(p))
    view['capabilities'] = 'dac_read_search' if job['read_search'] else 'none'
    if job['uid'] is None and os.geteuid() == 0 and not job['userns']:
      view['capabilities'] = 'none (uid 0)'
    _write_all(fds['status'], marshal.dumps(view))
    os.close(fds['status'])
    if job['uid'] is None:
      # The processes of the evaluator's uid that RLIMIT_NPROC counts besides the program:
      # in a user namespace the supervisor, init and the judge, otherwise all of the uid's.
      n_judge = 1 if job['judge'] else 0
      job['same_uid_procs'] = n_judge + (2 if job['userns'] else _tasks_of_uid(os.getuid()))
    wait_for = None
    if job['judge']:
      call_r, call_w = os.pipe()
      reply_r, reply_w = os.pipe()
      judge = os.fork()
      if judge == 0:
        os.chdir('/')
        _close_fds_except((fds['judge'], call_w, reply_r, fds['sig']))
        _limit_and_drop(job, judge=True)
        _judge(fds['judge'], call_w, reply_r, fds['sig'])
      wait_for = judge
      os.close(fds['judge'])
      os.close(fds['sig'])    # from here on, only the judge can write the verdict
      program = os.fork()
      if program == 0:
        _close_fds_except((call_r, reply_w))
        _limit_and_drop(job, judge=False)
        _serve(job, info['network'], call_r, reply_w)
      for fd in (call_r, call_w, reply_r, reply_w):
        os.close(fd)
    else:
      program = os.fork()
      if program == 0:
        _close_fds_except((fds['sig'],))
        _limit_and_drop(job, judge=False)
        _run(job, info['network'], fds['sig'])
      wait_for = program
      os.close(fds['sig'])
    while True:  # reap orphans until the one that decides is done
      pid, status = os.waitpid(-1, 0)
      if pid == wait_for:
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
  fds = dict(sig=job.pop('sig_fd'), judge=job.pop('judge_fd'))
  rep_fd = job.pop('rep_fd')
  root = os.geteuid() == 0
  import resource, types  # pylint: disable=g-import-not-at-top,unused-import,multiple-imports
  killer = kill_w = None
  if job['uid'] is not None:
    # Forked before the PID namespace exists (once its init is gone nothing can be forked into
    # it): waits for the go, then kills every process of the throwaway uid.
    kill_r, kill_w = os.pipe()
    killer = os.fork()
    if killer == 0:
      os.close(kill_w)
      for fd in (fds['sig'], rep_fd, fds['judge']):
        if fd is not None:
          os.close(fd)
      try:
        os.read(kill_r, 1)
        _kill_uid_here(job['uid'], job['gid'])
      finally:
        os._exit(0)
    os.close(kill_r)
  lim = job['limits']
  info = dict(uid=job['uid'], network='allowed' if lim['network'] else 'socket-patch',
              pid_namespace=False, may_unshare=False,
              identity='throwaway_uid' if job['uid'] is not None else (
                  'root' if root else 'evaluator_user'),
              verdict='judge' if job['judge'] else 'program',
              subreaper=_prctl(_PR_SET_CHILD_SUBREAPER, 1))
  job['userns'] = False
  if job['namespaces']:
    if not root and _unshare(_CLONE_NEWUSER):
      _map_ids()
      job['userns'] = True
      info['identity'] = 'user_namespace'
    if root or job['userns']:
      info['may_unshare'] = True
      if not lim['network'] and _unshare(_CLONE_NEWNET):
        info['network'] = 'netns'
      info['pid_namespace'] = _unshare(_CLONE_NEWPID)
  _prctl(_PR_SET_DUMPABLE, 0)   # after _map_ids, which writes to /proc/self as its owner
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
  try:
    os.set_blocking(status_r, False)
    info.update(marshal.loads(os.read(status_r, 1 << 16)))
  except (OSError, EOFError, ValueError, TypeError):
    pass
  code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
  sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
  if code is not None and code > 128:  # init's report of a signal
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
import threading  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

_UID_RANGE = (1_000_000, 2_000_000_000)  # throwaway uids are drawn from here (not in passwd)
_OUTPUT_TAIL = 4000
_SCRIPT = os.path.abspath(__file__)
_COMPILED: dict = {}   # pid of the evaluator process -> this file compiled (or _SCRIPT)
_COMPILED_LOCK = threading.Lock()


def _supervisor_script() -> str:
  """This file as bytecode, compiled once per evaluator process into a private directory: a
  script given as source is compiled again at every start, and one starts per program."""
  pid = os.getpid()
  with _COMPILED_LOCK:
    if pid not in _COMPILED:   # also after a fork: the parent removes its copy at its exit
      import atexit  # pylint: disable=g-import-not-at-top
      import py_compile  # pylint: disable=g-import-not-at-top
      path = _SCRIPT
      d = tempfile.mkdtemp(prefix='plt-sandbox-code-')
      try:
        path = py_compile.compile(_SCRIPT, cfile=os.path.join(d, 'sandbox.pyc'), dfile=_SCRIPT,
                                  doraise=True)
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(d, ignore_errors=True))
      except (OSError, py_compile.PyCompileError):
        shutil.rmtree(d, ignore_errors=True)
      _COMPILED[pid] = path
    return _COMPILED[pid]
# The layers `missing_layers` checks, and what each protects.
LAYERS = {
    'filesystem': 'a private filesystem view (mount namespace)',
    'identity': 'a throwaway uid or a user namespace',
    'capabilities': 'no capabilities',
    'network': 'no network (network namespace)',
    'pid_namespace': 'a PID namespace',
}


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. cpu_seconds None: the timeout rounded up, plus one."""
  timeout: float = 10.0              # wall-clock seconds
  cpu_seconds: Optional[int] = None
  memory_bytes: int = 1 << 30        # RLIMIT_AS, per process
  file_bytes: int = 16 << 20         # RLIMIT_FSIZE (also bounds the captured output)
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


def missing_layers(isolation: dict, limits: Limits = Limits()) -> list:
  """The names (keys of LAYERS) of the layers that were not in force."""
  out = []
  if isolation.get('filesystem') != 'private':
    out.append('filesystem')
  if isolation.get('identity') not in ('throwaway_uid', 'user_namespace'):
    out.append('identity')
  if isolation.get('capabilities') != 'none':
    out.append('capabilities')
  if not limits.network and isolation.get('network') != 'netns':
    out.append('network')
  if not isolation.get('pid_namespace'):
    out.append('pid_namespace')
  return out


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
    subprocess.run([sys.executable, '-I', '-S', _supervisor_script(), '--kill-uid', str(uid),
                    str(gid)], check=False, timeout=30, stdin=subprocess.DEVNULL)


_SIGNAL_REASONS = {'SIGXCPU': 'CPU time limit exceeded', 'SIGXFSZ': 'file size limit exceeded',
                   'SIGKILL': 'killed (SIGKILL)', 'SIGSEGV': 'segmentation fault'}


def _failure_reason(report: dict, output: str, judged: bool) -> str:
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
    return lines[-1][:_REASON_MAX]
  return f'exit status {code}' + (f': {lines[-1][:_REASON_MAX]}' if lines else '')


def _random_uid(avoid=None) -> int:
  while True:
    uid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
    if uid != avoid:
      return uid


def _judge_file(judge: Judge, token: str) -> int:
  """A memfd (or unlinked file) holding the judge's code and token; only the judge reads it."""
  data = marshal.dumps(dict(token=token, setup=judge.setup, test=judge.test,
                           entry_point=judge.entry_point, check=judge.check))
  if hasattr(os, 'memfd_create'):
    fd = os.memfd_create('plt-judge', os.MFD_CLOEXEC)
  else:
    fd = os.dup(tempfile.TemporaryFile().fileno())
  _write_all(fd, data)
  return fd


def run_program(program: str, limits: Limits = Limits(), *, judge: Optional[Judge] = None,
                namespaces: bool = True, drop_privileges: bool = True,
                base_dir: Optional[str] = None) -> ExecResult:
  """Runs `program` (Python source) in the sandbox.

  With `judge`: it passes only if the judge's `check(candidate)` returned, every call of
  `candidate` having gone to the program's `judge.entry_point`. Without: it passes if the
  program ran to its end, which the program itself could fake (no adversary-proof verdict).
  """
  if judge is not None:
    for name in ('entry_point', 'check'):
      value = getattr(judge, name)
      if not (isinstance(value, str) and value.isidentifier()):
        raise ValueError(f'judge.{name}={value!r} is not a Python identifier')
  start = time.monotonic()
  uid = gid = judge_uid = None
  if drop_privileges and hasattr(os, 'geteuid') and os.geteuid() == 0:
    uid = gid = _random_uid()
    judge_uid = _random_uid(avoid=uid)
  workdir = tempfile.mkdtemp(prefix='plt-sandbox-', dir=base_dir)
  os.chmod(workdir, 0o700)
  if uid is not None:
    os.chown(workdir, uid, gid)
  sig_r, sig_w = os.pipe()
  rep_r, rep_w = os.pipe()
  token = secrets.token_hex(16)
  judge_fd = _judge_file(judge, token) if judge is not None else None
  job = dict(
      program=program, sig_fd=sig_w, rep_fd=rep_w, judge_fd=judge_fd, uid=uid, gid=gid,
      judge_uid=judge_uid, judge=judge is not None, host_workdir=workdir,
      namespaces=bool(namespaces), timeout=float(limits.timeout),
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
  stuck = dead = False
  report: dict = {}
  try:
    with tempfile.TemporaryFile() as log:
      try:
        proc = subprocess.Popen(
            [sys.executable, '-I', '-S', '-B', _supervisor_script(), '--supervise'],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
            start_new_session=True,
            pass_fds=tuple(fd for fd in (sig_w, rep_w, judge_fd) if fd is not None))
      finally:
        for fd in (sig_w, rep_w, judge_fd):
          if fd is not None:
            os.close(fd)
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
  isolation = {k: report.get(k) for k in (
      'uid', 'identity', 'filesystem', 'capabilities', 'network', 'pid_namespace', 'verdict',
      'subreaper')}
  if report.get('filesystem_error'):
    isolation['filesystem_error'] = report['filesystem_error']
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
    elif sig.startswith(b'\0'):  # the exception that ended the tests (or the program)
      reason = sig[1:].decode('utf-8', 'replace')
    else:
      reason = _failure_reason(report, output, judge is not None)
  return ExecResult(passed, status, reason[:_REASON_MAX], duration, report.get('exit_code'),
                    report.get('signal'), output, isolation)


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
    why = '; '.join(f'{m} ({LAYERS[m]})' for m in iso['missing'])
    if iso.get('filesystem_error'):
      why += f': {iso["filesystem_error"]}'
    raise ValueError(f'sandbox layers missing on this machine: {why}; pass --{flag} to '
                     f'evaluate with weaker isolation')
  return iso
