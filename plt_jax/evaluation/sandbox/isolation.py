"""The isolation layers applied inside the sandbox: namespaces, identity, rlimits, the session
keyring, the cgroup join and the system-call filter; and the /proc helpers the sweeps use.

Standard library only (ctypes for the system calls Python has no wrapper for): the supervisor
imports this module by path. The evaluator's side (building the filter, making the cgroup) is in
`host`.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = (
    0x00020000, 0x02000000, 0x04000000, 0x08000000)
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS = 1, 4, 8
PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 22, 36, 38
_SECCOMP_MODE_FILTER = 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_KEYCTL = {'x86_64': 250, 'aarch64': 219, 'riscv64': 219, 'ppc64le': 271, 's390x': 280}
_KEYCTL_JOIN_SESSION_KEYRING = 1
NEUTRAL_HOSTNAME = 'sandbox'

_LIBC: list = []


def libc():
  if not _LIBC:
    _LIBC.extend((ctypes, ctypes.CDLL(None, use_errno=True)))
  return _LIBC[0], _LIBC[1]


def unshare(flags: int) -> bool:
  if not sys.platform.startswith('linux'):
    return False
  if hasattr(os, 'unshare'):  # Python >= 3.12
    try:
      os.unshare(flags)
      return True
    except OSError:
      return False
  ctypes, lib = libc()
  return lib.unshare(ctypes.c_int(flags)) == 0


def prctl(option: int, arg: int) -> bool:
  if not sys.platform.startswith('linux'):
    return False
  ctypes, lib = libc()
  zero = ctypes.c_ulong(0)
  return lib.prctl(option, ctypes.c_ulong(arg), zero, zero, zero) == 0


def set_caps(keep: int) -> bool:
  """capset: effective = permitted = `keep` (a bit mask), nothing inheritable."""
  ctypes, lib = libc()
  # struct __user_cap_header_struct {u32 version; int pid}, then two {u32 eff, perm, inh}.
  header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
  data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)
  return lib.capset(header, data) == 0


def set_hostname(name: str = NEUTRAL_HOSTNAME) -> bool:
  """In a new UTS namespace: a hostname (and NIS domain) that says nothing about the host."""
  ctypes, lib = libc()
  ok = lib.sethostname(name.encode(), ctypes.c_size_t(len(name))) == 0
  return lib.setdomainname(b'(none)', ctypes.c_size_t(6)) == 0 and ok


def join_session_keyring() -> bool:
  """A fresh anonymous session keyring: the evaluator's session keyring, and the user keyring
  it links to, are no longer possessed by anything started from here."""
  ctypes, lib = libc()
  nr = _SYS_KEYCTL.get(os.uname().machine)
  return nr is not None and lib.syscall(ctypes.c_long(nr), ctypes.c_long(
      _KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_void_p(None)) >= 0


def install_seccomp(program: bytes) -> None:
  """Loads a seccomp BPF program (built by libseccomp in the evaluator, see host.py) into this
  process; every process it starts afterwards inherits it. Needs no_new_privs or CAP_SYS_ADMIN."""
  ctypes, lib = libc()
  if not program or len(program) % 8:
    raise OSError('the system-call filter is empty or malformed')

  class FProg(ctypes.Structure):   # struct sock_fprog
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]

  buf = ctypes.create_string_buffer(program, len(program))
  prog = FProg(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
  zero = ctypes.c_ulong(0)
  if lib.prctl(PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog),
               zero, zero) != 0:
    e = ctypes.get_errno()
    raise OSError(e, f'loading the system-call filter failed: {os.strerror(e)}')


def join_cgroups(procs_files) -> None:
  """Moves this process into the sample's cgroup(s) (its children follow)."""
  for path in procs_files:
    with open(path, 'w') as f:
      f.write('0')


def map_ids() -> None:
  """In a fresh user namespace: the evaluator's own uid and gid map to themselves."""
  uid, gid = os.getuid(), os.getgid()
  for name, text in (('setgroups', 'deny'), ('uid_map', f'{uid} {uid} 1'),
                     ('gid_map', f'{gid} {gid} 1')):
    try:
      with open(f'/proc/self/{name}', 'w') as f:
        f.write(text)
    except OSError:
      pass


def others_can_read(path: str) -> bool:
  """Can a user with no relation to the owners open `path` (every ancestor searchable)?"""
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


# ------------------------------------------------------------------------------ processes

def _proc_status(pid: str) -> dict:
  out = {}
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('Uid', 'Gid', 'State', 'Threads'):
        out[key] = value.split()
  return out


def _proc_entries() -> list:
  try:
    return [name for name in os.listdir('/proc') if name.isdigit()]
  except OSError:  # no procfs (not Linux)
    return []


def live_pids_of_uid(uid: int) -> list:
  """Processes (not zombies) whose real uid is `uid`."""
  out = []
  for name in _proc_entries():
    try:
      st = _proc_status(name)
    except OSError:
      continue
    if 'Uid' in st and int(st['Uid'][0]) == uid and st.get('State', ['?'])[0] != 'Z':
      out.append(int(name))
  return out


def ids_in_use() -> set:
  """Every uid and gid (real, effective, saved, filesystem) of a live process."""
  out = set()
  for name in _proc_entries():
    try:
      st = _proc_status(name)
    except OSError:
      continue
    for key in ('Uid', 'Gid'):
      out.update(int(x) for x in st.get(key, ()))
  return out


def tasks_of_uid(uid: int) -> int:
  n = 0
  for name in _proc_entries():
    try:
      st = _proc_status(name)
    except OSError:
      continue
    if 'Uid' in st and int(st['Uid'][0]) == uid:
      n += int(st.get('Threads', ['1'])[0])
  return n


def session_pids(sid: int, exclude=()) -> list:
  out, exclude = [], set(exclude)
  for name in _proc_entries():
    if int(name) not in exclude:
      try:
        with open(f'/proc/{name}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()   # state ppid pgrp session ...
      except (OSError, IndexError):
        continue
      if int(fields[3]) == sid and fields[0] != 'Z':
        out.append(int(name))
  return out


def become(uid: int, gid: int) -> None:
  os.setgroups([])
  os.setresgid(gid, gid, gid)
  os.setresuid(uid, uid, uid)


def kill_uid_here(uid: int, gid: int) -> None:
  """In a throwaway process: become `uid` and SIGKILL every process of it until none is left.

  kill(-1) reaches every process the caller may signal (its own uid) except itself, and the
  kernel walks the task list under the lock fork needs, so no child slips out during one call.
  Its return value cannot tell whether anything was hit, hence the /proc check. Only for uids
  checked unused before the sandbox started (see host.draw_uids).
  """
  become(uid, gid)
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


def close_fds_except(keep) -> None:
  """Closes every descriptor above 2 that is not in `keep` (nothing else may be inherited)."""
  top = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
  if top == resource.RLIM_INFINITY or top < 0:
    top = 1 << 20
  lo = 3
  for fd in sorted(set(keep)):
    if fd >= lo:
      os.closerange(lo, fd)
      lo = fd + 1
  os.closerange(lo, top)


def limit_and_drop(job: dict, judge: bool) -> None:
  """rlimits, then the process's identity: a throwaway uid (root) or no capabilities."""
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
  if not judge:   # under memory pressure in its cgroup, the candidate goes first
    try:
      with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('1000')
    except OSError:
      pass
  keep = 1 << _CAP_DAC_READ_SEARCH if job['read_search'] else 0
  if uid is not None:
    if keep:
      prctl(PR_SET_KEEPCAPS, 1)
    become(uid, job['gid'] if not judge else uid)
  if (keep or os.geteuid() != 0 or uid is None) and not set_caps(keep):
    raise OSError('capset failed')
  prctl(PR_SET_NO_NEW_PRIVS, 1)
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
  if judge:  # after the uid change, which resets it: no tracing, no /proc/<pid>/fd access
    prctl(PR_SET_DUMPABLE, 0)
  if os.getppid() != parent:                 # init died before that
    os._exit(2)
