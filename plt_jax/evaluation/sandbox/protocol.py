"""The judge protocol: what runs in the judge and in the candidate once they are isolated.

The judge holds the trusted code (the problem's prompt, for its helper functions, and its tests),
read from a memfd that only it receives, together with a random token. The candidate never
holds the tests, the token or the verdict pipe. `check` runs in the judge; every
`candidate(...)` call crosses a pipe as a `wire` frame, the reply is decoded into plain built-in
values only, and the judge compares those. The judge writes the token only after `check`
returned, so nothing the candidate does inside its own process (frames, gc, ctypes, writing to
its fds, exiting with 0, objects with a rigged `__eq__`) can make the judge write it.

Without a judge (`run_program` with no `Judge`) the program writes its own end-of-run token,
which it could fake: that verdict is not adversary-proof.

Standard library only: the supervisor imports this module by path.
"""
from __future__ import annotations

import errno
import marshal
import os
import sys
import types

try:
  from . import wire
except ImportError:   # imported by path in the supervisor
  import wire  # type: ignore

REASON_MAX = 300


class ProgramError(Exception):
  """Raised in the judge by a call of the candidate that did not return a value."""


def print_exception() -> None:
  try:
    # Late: a failure is rare, and every program's start would pay for the import.
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass


def describe(e: BaseException) -> str:
  try:
    text = str(e)
  except BaseException:  # pylint: disable=broad-except
    text = ''
  return (type(e).__name__ + (f': {text}' if text else ''))[:REASON_MAX]


def disable_sockets() -> None:
  """Fallback when no network namespace is allowed: the socket module refuses to connect."""
  # Late: only this fallback needs the socket modules, which are slow to import at every start.
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


def _load_program(program: str):
  """Runs the program as module __main__ (in /sandbox/program.py, nominally)."""
  module = types.ModuleType('__main__')
  module.__file__ = os.path.join(os.getcwd(), 'program.py')
  sys.modules['__main__'] = module
  compiled = compile(program, module.__file__, 'exec')
  exec(compiled, module.__dict__)  # pylint: disable=exec-used
  return module


def run_alone(job: dict, network: str, sig_fd: int) -> None:
  """Without a judge: runs the whole program, then writes the token. Never returns."""
  code = 2
  try:
    if network == 'socket-patch':
      disable_sockets()
    token, program = job.pop('token').encode(), job.pop('program')
    write = os.write
    code = 1                         # from here on, a failure is the program's
    _load_program(program)
    del program, job
    sys.stdout.flush()
    write(sig_fd, token)
    code = 0
  except BaseException as e:  # pylint: disable=broad-except
    # The failure reason, on the verdict pipe (the output may be cut at its size limit).
    try:
      os.write(sig_fd, b'\0' + describe(e).encode('utf-8', 'replace'))
    except BaseException:  # pylint: disable=broad-except
      pass
    print_exception()
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    pass
  os._exit(code)


def serve(job: dict, network: str, call_fd: int, reply_fd: int) -> None:
  """The candidate: runs prompt + completion, then answers the judge's calls. Never returns.

  Everything here runs in the untrusted process; the judge trusts none of it. Replies: b'R'
  (loaded), b'O' + value (returned), b'E' + text (raised)."""
  code = 2
  try:
    if network == 'socket-patch':
      disable_sockets()
    program, entry_point = job.pop('program'), job.pop('entry_point')
    del job
    code = 1
    try:
      fn = getattr(_load_program(program), entry_point)
      if not callable(fn):
        raise TypeError(f'{entry_point} is not callable')
      reply = b'R'
    except BaseException as e:  # pylint: disable=broad-except
      print_exception()
      reply = b'E' + describe(e).encode('utf-8', 'replace')
      fn = None
    sys.stdout.flush()
    wire.send(reply_fd, reply)
    while fn is not None:
      request = wire.recv(call_fd, 1 << 62)
      if request is None:
        break
      args, kwargs = wire.loads(request)
      try:
        reply = b'O' + wire.dumps(fn(*args, **kwargs))
      except BaseException as e:  # pylint: disable=broad-except
        reply = b'E' + describe(e).encode('utf-8', 'replace')
      try:
        sys.stdout.flush()
      except BaseException:  # pylint: disable=broad-except
        pass
      wire.send(reply_fd, reply)
    code = 0
  except BaseException:  # pylint: disable=broad-except
    print_exception()
  os._exit(code)


def judge(judge_fd: int, call_fd: int, reply_fd: int, sig_fd: int) -> None:
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
      msg = wire.recv(reply_fd)
      if msg is None:
        raise ProgramError('the program exited before the tests finished')
      if msg[:1] == b'E':
        raise ProgramError(msg[1:1 + REASON_MAX].decode('utf-8', 'replace'))
      if msg[:1] != expect or (expect == b'R' and len(msg) != 1):
        raise ValueError('malformed reply from the program')
      return msg[1:]

    def candidate(*args, **kwargs):
      try:
        wire.send(call_fd, wire.dumps((args, kwargs)))
      except BrokenPipeError:
        raise ProgramError('the program exited before the tests finished') from None
      return wire.loads(reply(b'O'))

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
      reason = str(e) if isinstance(e, ProgramError) else describe(e)
      os.write(sig_fd, b'\0' + reason[:REASON_MAX].encode('utf-8', 'replace'))
    except BaseException:  # pylint: disable=broad-except
      pass
  os._exit(code)
