"""The private filesystem view, built in a fresh mount namespace (the fallback when bubblewrap is
not installed).

Its root is a fresh read-only tmpfs holding only read-only bind mounts of the system directories
(/usr and the /bin, /lib... links or dirs), /etc/ld.so.cache and /etc/localtime, the
interpreter's prefix (at its own path, even under /root), a few /dev nodes and /proc of the PID
namespace, with the host-identifying /proc files masked. The work dir (/sandbox), /tmp, /var/tmp
and /dev/shm are private tmpfs mounts of `Limits.tmpfs_bytes` each.

Standard library only: the supervisor imports this module by path.
"""
from __future__ import annotations

import errno
import os
import sys

try:
  from . import isolation
except ImportError:   # imported by path in the supervisor
  import isolation  # type: ignore

VIEW_WORKDIR = '/sandbox'   # the program's working directory inside the private view
SYSTEM_DIRS = ('/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32')
ETC_FILES = ('/etc/ld.so.cache', '/etc/localtime')
DEV_NODES = ('null', 'zero', 'full', 'random', 'urandom')
# Files of /proc that identify the host (or list its keys): they read as empty.
MASKED_PROC = ('cmdline', 'sys/kernel/random/boot_id', 'keys', 'key-users', 'kallsyms',
               'kcore', 'timer_list', 'sched_debug', 'latency_stats')
PRIVATE_DIRS = (VIEW_WORKDIR, '/tmp', '/var/tmp', '/dev/shm')

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 16384, 1 << 18, 1 << 21
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {'x86_64': 155, 'aarch64': 41, 'riscv64': 41, 'ppc64le': 203, 's390x': 217}


class ViewFailed(Exception):
  pass


def _mount(src, dst: str, fstype, flags: int, data=None) -> None:
  ctypes, libc = isolation.libc()
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


def build(job: dict, with_proc: bool) -> None:
  """Makes the private view this process's root (it must be alone in a new mount namespace).

  Raises ViewFailed, with the host's root left as it was, when a step before pivot_root fails;
  a failure after it is an error of the sandbox (OSError)."""
  root = os.getcwd()   # the evaluator's (empty) work dir: only a mount point here
  try:
    _mount(None, '/', None, _MS_REC | _MS_PRIVATE)   # nothing propagates back to the host
    _mount('tmpfs', root, 'tmpfs', _MS_NOSUID | _MS_NODEV, 'size=1m,nr_inodes=4096,mode=755')
  except OSError as e:
    raise ViewFailed(str(e)) from None
  try:
    _populate(job, root, with_proc)
    ctypes, libc = isolation.libc()
    os.chdir(root)
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None or libc.syscall(ctypes.c_long(nr), b'.', b'.') != 0:
      raise OSError(ctypes.get_errno(), 'pivot_root failed')
  except OSError as e:
    os.chdir('/')
    isolation.libc()[1].umount2(root.encode(), _MNT_DETACH)
    os.chdir(root)
    raise ViewFailed(str(e)) from None
  ctypes, libc = isolation.libc()
  if libc.umount2(b'.', ctypes.c_int(_MNT_DETACH)) != 0:   # the old root, stacked on "."
    raise OSError(ctypes.get_errno(), 'detaching the old root failed')
  os.chdir('/')
  _mount(None, '/', None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
  os.chdir(VIEW_WORKDIR)
  os.environ['HOME'] = os.environ['TMPDIR'] = VIEW_WORKDIR


def interpreter_dirs() -> list:
  """The interpreter's prefixes and the directories of its sys.path (the standard library, its
  zip and lib-dynload), outermost only."""
  prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
  for p in sys.path:   # with -I -S: the standard library, its zip and lib-dynload
    if os.path.isdir(p):
      rp = os.path.realpath(p)
      if not any(rp.startswith(x.rstrip('/') + '/') for x in prefixes):
        prefixes.add(rp)
  return sorted(prefixes)


def _populate(job: dict, root: str, with_proc: bool) -> None:
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

  for d in SYSTEM_DIRS:
    if os.path.islink(d):
      os.symlink(os.readlink(d), root + d)
    elif os.path.isdir(d):
      bind_dir(d)
  for p in interpreter_dirs():
    if p == '/':
      raise OSError(errno.EINVAL, 'the interpreter prefix is /')
    bind_dir(p)
  os.makedirs(root + '/etc', 0o755, exist_ok=True)
  for f in ETC_FILES:
    if os.path.islink(f):
      os.symlink(os.readlink(f), root + f)
    elif os.path.isfile(f):
      open(root + f, 'w').close()
      _bind_read_only(f, root + f)
  os.mkdir(root + '/dev')
  _mount('tmpfs', root + '/dev', 'tmpfs', _MS_NOSUID | _MS_NOEXEC, 'size=64k,mode=755')
  for n in DEV_NODES:
    if os.path.exists('/dev/' + n):
      open(root + '/dev/' + n, 'w').close()
      _mount('/dev/' + n, root + '/dev/' + n, None, _MS_BIND)
  for i, n in enumerate(('stdin', 'stdout', 'stderr')):
    os.symlink(f'/proc/self/fd/{i}', f'{root}/dev/{n}')
  os.symlink('/proc/self/fd', root + '/dev/fd')
  os.mkdir(root + '/dev/shm')
  _mount(None, root + '/dev', None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)
  size = f'size={int(lim["tmpfs_bytes"])},nr_inodes=1024'
  owner = f',uid={job["uid"]},gid={job["gid"]}' if job['uid'] is not None else ''
  for d in PRIVATE_DIRS:
    os.makedirs(root + d, 0o755, exist_ok=True)
    mode = 'mode=700' + owner if d == VIEW_WORKDIR else 'mode=1777'
    _mount('tmpfs', root + d, 'tmpfs', _MS_NOSUID | _MS_NODEV, f'{size},{mode}')
  os.mkdir(root + '/proc')
  if with_proc:  # a procfs of another PID namespace would show its processes
    try:
      _mount('proc', root + '/proc', 'proc', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
      return
    for name in MASKED_PROC:
      if os.path.exists(f'{root}/proc/{name}'):
        _mount(root + '/dev/null', f'{root}/proc/{name}', None, _MS_BIND)
