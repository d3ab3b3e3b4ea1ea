"""The evaluator's side of the isolation: the system-call filter (compiled by libseccomp), one
cgroup per sample, and the throwaway uids.

Runs in the evaluator only (it may import anything); what runs inside the sandbox is in
`isolation` and `view`.
"""
from __future__ import annotations

import errno
import os
import secrets
import signal
import tempfile
import threading
import time
from typing import Optional

from plt_jax.evaluation.sandbox import isolation

UID_RANGE = (1_000_000, 2_000_000_000)  # throwaway uids are drawn from here (not in passwd)

# ------------------------------------------------------------------ the system-call filter
# Denied with EPERM: the ways back to capabilities (a new user namespace, setns), the mount
# API, the kernel keyrings, and the kernel interfaces most privilege escalations go through.
DENIED_SYSCALLS = (
    'unshare', 'setns', 'mount', 'umount2', 'pivot_root', 'chroot', 'mount_setattr',
    'move_mount', 'open_tree', 'fsopen', 'fsconfig', 'fsmount', 'fspick',
    'keyctl', 'add_key', 'request_key',
    'io_uring_setup', 'io_uring_enter', 'io_uring_register', 'bpf', 'perf_event_open',
    'userfaultfd', 'ptrace', 'process_vm_readv', 'process_vm_writev', 'process_madvise',
    'pidfd_getfd', 'open_by_handle_at', 'name_to_handle_at', 'kexec_load', 'kexec_file_load',
    'init_module', 'finit_module', 'delete_module', 'fanotify_init', 'lookup_dcookie',
    'quotactl', 'swapon', 'swapoff', 'acct', 'reboot', 'iopl', 'ioperm',
)
NAMESPACE_FLAGS = (isolation.CLONE_NEWNS, isolation.CLONE_NEWCGROUP, isolation.CLONE_NEWUTS,
                   isolation.CLONE_NEWIPC, isolation.CLONE_NEWUSER, isolation.CLONE_NEWPID,
                   isolation.CLONE_NEWNET)
# socket(2) families that stay allowed: AF_UNIX, and AF_INET/AF_INET6, which reach nothing in
# the empty network namespace. Every other family (netlink, packet, vsock...) is EAFNOSUPPORT.
ALLOWED_FAMILIES = (1, 2, 10)

_FILTER: dict = {}
_FILTER_LOCK = threading.Lock()


def syscall_filter() -> tuple[Optional[bytes], str]:
  """(the seccomp BPF program, '') or (None, why it cannot be built). Compiled once."""
  with _FILTER_LOCK:
    if 'bpf' not in _FILTER:
      try:
        _FILTER['bpf'], _FILTER['error'] = _build_filter(), ''
      except (ImportError, OSError, RuntimeError, ValueError) as e:
        _FILTER['bpf'], _FILTER['error'] = None, f'{type(e).__name__}: {e}'[:200]
    return _FILTER['bpf'], _FILTER['error']


def _build_filter() -> bytes:
  import pyseccomp as sc  # pylint: disable=g-import-not-at-top
  f = sc.SyscallFilter(sc.ALLOW)
  for name in DENIED_SYSCALLS:
    try:
      f.add_rule(sc.ERRNO(errno.EPERM), name)
    except (OSError, ValueError, RuntimeError):   # not a system call of this architecture
      if name in ('unshare', 'setns', 'mount', 'keyctl', 'add_key', 'request_key', 'bpf',
                  'io_uring_setup', 'perf_event_open', 'userfaultfd', 'ptrace'):
        raise
  for flag in NAMESPACE_FLAGS:   # clone with any new-namespace flag
    f.add_rule(sc.ERRNO(errno.EPERM), 'clone', sc.Arg(0, sc.MASKED_EQ, flag, flag))
  # clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes the C library
  # fall back to clone.
  f.add_rule(sc.ERRNO(errno.ENOSYS), 'clone3')
  top = max(ALLOWED_FAMILIES)
  for call in ('socket', 'socketpair'):
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.GT, top))
    for family in range(top):
      if family not in ALLOWED_FAMILIES:
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.EQ, family))
  with tempfile.TemporaryFile() as tmp:
    f.export_bpf(tmp)
    tmp.seek(0)
    return tmp.read()


# ----------------------------------------------------------------------------- cgroups

def _mounts() -> dict:
  """{'v2': mount point} and {controller: mount point} of the v1 hierarchies."""
  out: dict = {}
  try:
    with open('/proc/self/mountinfo') as f:
      for line in f:
        left, _, right = line.partition(' - ')
        fstype, _, options = right.split()[:3]
        point = left.split()[4]
        if fstype == 'cgroup2':
          out.setdefault('v2', point)
        elif fstype == 'cgroup':
          for opt in options.split(','):
            if opt in ('memory', 'pids'):
              out.setdefault(opt, point)
  except OSError:
    pass
  return out


def _own_paths() -> dict:
  """This process's cgroup path: {'v2': path} and {controller: path} for v1."""
  out = {}
  try:
    with open('/proc/self/cgroup') as f:
      for line in f:
        _, controllers, path = line.rstrip('\n').split(':', 2)
        if controllers == '':
          out['v2'] = path
        for c in controllers.split(','):
          if c in ('memory', 'pids'):
            out[c] = path
  except OSError:
    pass
  return out


class Cgroup:
  """One cgroup per sample: memory (tmpfs, memfd and shm pages included) and task limits.

  `create` raises OSError (with the reason) where none can be made: no cgroup v2 with the
  memory and pids controllers, and no writable v1 memory and pids hierarchies."""

  def __init__(self, dirs: list, version: str):
    self.dirs, self.version = dirs, version

  @property
  def procs_files(self) -> list:
    return [os.path.join(d, 'cgroup.procs') for d in self.dirs]

  @classmethod
  def create(cls, memory_bytes: int, tasks: int) -> 'Cgroup':
    mounts, own = _mounts(), _own_paths()
    name = 'plt-sandbox-' + secrets.token_hex(8)
    v2 = mounts.get('v2')
    if v2 and 'memory' not in mounts and 'v2' in own:
      parent = os.path.join(v2, own['v2'].lstrip('/'))
      with open(os.path.join(parent, 'cgroup.controllers')) as f:
        have = f.read().split()
      if not {'memory', 'pids'} <= set(have):
        raise OSError(errno.ENOTSUP, f'cgroup v2 at {parent} lacks the memory/pids controllers')
      try:
        with open(os.path.join(parent, 'cgroup.subtree_control'), 'w') as f:
          f.write('+memory +pids')
      except OSError as e:   # EBUSY: processes in it, which cgroup v2 forbids beside children
        raise OSError(e.errno, f'cannot enable memory/pids below {parent} ({e.strerror}); run '
                      'the evaluator in a delegated cgroup of its own, e.g. systemd-run '
                      '--scope -p Delegate=yes') from None
      d = os.path.join(parent, name)
      os.mkdir(d)
      group = cls([d], 'v2')
      try:
        group._write(d, 'memory.max', memory_bytes)
        group._write(d, 'memory.swap.max', 0, optional=True)
        group._write(d, 'pids.max', tasks)
      except OSError:
        group.remove()
        raise
      return group
    if 'memory' not in mounts or 'pids' not in mounts:
      raise OSError(errno.ENOTSUP, 'no cgroup v2 memory controller and no v1 memory and pids '
                    'hierarchies are mounted')
    dirs = []
    group = cls(dirs, 'v1')
    try:
      for c in ('memory', 'pids'):
        d = os.path.join(mounts[c], own.get(c, '/').lstrip('/'), name)
        os.mkdir(d)
        dirs.append(d)
      group._write(dirs[0], 'memory.limit_in_bytes', memory_bytes)
      # With swap accounting, memory + swap too (else tmpfs pages could move to swap).
      group._write(dirs[0], 'memory.memsw.limit_in_bytes', memory_bytes, optional=True)
      group._write(dirs[1], 'pids.max', tasks)
    except OSError:
      group.remove()
      raise
    return group

  @staticmethod
  def _write(d: str, name: str, value: int, optional: bool = False) -> None:
    path = os.path.join(d, name)
    if optional and not os.path.exists(path):
      return
    with open(path, 'w') as f:
      f.write(str(int(value)))

  def pids(self) -> list:
    out = set()
    for p in self.procs_files:
      try:
        with open(p) as f:
          out.update(int(x) for x in f.read().split())
      except OSError:
        pass
    return sorted(out)

  def remove(self, timeout: float = 5.0) -> bool:
    """Kills what is left in the cgroup (only processes the sandbox started can be in it) and
    removes it; False if it could not be emptied in time."""
    deadline = time.monotonic() + timeout
    while True:
      for pid in self.pids():
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
      left = []
      for d in reversed(self.dirs):
        try:
          os.rmdir(d)
        except FileNotFoundError:
          pass
        except OSError:
          left.append(d)
      if not left:
        return True
      if time.monotonic() > deadline:
        return False
      time.sleep(0.002)


# --------------------------------------------------------------------------- throwaway uids

_UIDS_HELD: set = set()
_UIDS_LOCK = threading.Lock()


def draw_uids(n: int, check: bool = True) -> list:
  """`n` distinct uids from UID_RANGE that no live process uses as a uid or gid (checked
  against /proc) and no other sandbox of this evaluator holds; release them with
  `release_uids`. check=False skips the /proc check (tests of the check only)."""
  used = isolation.ids_in_use() if check else set()
  out = []
  with _UIDS_LOCK:
    while len(out) < n:
      uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
      if uid not in used and uid not in _UIDS_HELD and uid not in out:
        out.append(uid)
    _UIDS_HELD.update(out)
  return out


def release_uids(uids) -> None:
  with _UIDS_LOCK:
    _UIDS_HELD.difference_update(uids)
