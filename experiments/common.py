"""What every absl entry point shares."""
import functools
import re
import sys
from typing import Callable, NoReturn, Optional

from absl import app, flags, logging
from ml_collections import config_flags
# Public, though the package does not re-export it.
from ml_collections.config_flags.config_flags import is_config_flag


def quiet_library_logs() -> None:
  """Orbax logs every file it reads or writes at INFO: show warnings only, unless --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def fail(prog: str, message: str) -> NoReturn:
  """A user error (bad flags, config or data): `prog: error: message` on stderr, exit code 1."""
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


def define_config_file(prog: str, name: str, default: Optional[str], help_string: str,
                       **kwargs):
  """`config_flags.DEFINE_config_file`. With a default, ml_collections loads the config and
  applies the command line's overrides right here, at import: a typo in one fails here, as in
  `run`."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except (AttributeError, KeyError) as e:
    message = _unknown_field(e, sys.argv, [name])
    if message is None:
      raise
    fail(prog, message)


def run(main: Callable, prog: str) -> None:
  """`app.run(main)` for an entry point with a config flag: errors in the command line, typos in
  config overrides and config files that fail to load included, end as one `fail` line."""
  app.run(main, flags_parser=functools.partial(_parse_flags, prog))


def _parse_flags(prog: str, argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(prog, _flag_error(e))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a field the config lacks, outside absl's
    # flags.Error, so absl would show a traceback.
    message = _unknown_field(e, argv, _config_flag_names())
    if message is None:
      raise
    fail(prog, message)
  for name in _config_flag_names():
    flag = flags.FLAGS[name]
    try:
      # ml_collections defers a config file's load error until the config is first read.
      getattr(flag.value, 'to_dict', None)
    except OSError as e:
      fail(prog, f'--{name}={config_flags.get_config_filename(flag)}: '
                 f'{_last_line(e.__cause__ or e)}')
  return rest


def _config_flag_names() -> list[str]:
  return [n for n in list(flags.FLAGS) if is_config_flag(flags.FLAGS[n])]


def _last_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _flag_error(e: flags.Error) -> str:
  """absl's message; for a config file's get_config that raised, its error, not a traceback."""
  message = str(e)
  if 'Traceback (most recent call last)' not in message:
    return message
  inner = e
  while inner.__context__ is not None:
    inner = inner.__context__
  return f'{message.split(": ", 1)[0]}: {inner}'


def _unknown_field(e: Exception, argv: list[str], names: list[str]) -> Optional[str]:
  """'--config.a.b=1: the config has no field 'b'. Did you mean ...?', or None when `e` does not
  come from a config override."""
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
    e = e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  key, *hint = [line.strip() for line in text.splitlines() if line.strip()] or ['']
  if not re.fullmatch(r"'[^']*'", key):
    return None
  for arg in argv[1:]:
    m = re.match(r'--?(?:no)?([^=.]+)\.([^=]+)', arg)
    if m and m.group(1) in names and key[1:-1] in m.group(2).split('.'):
      return ' '.join([f'{arg}: the config has no field {key}.', *hint])
  return None


# ------------------------------------------------------------------- a lost coordinator

# What JAX's coordination client logs, in C++, right before it aborts the process: when process 0
# (which runs the coordination service) dies, the others end this way at once, before Python
# can say anything.
_JAX_FATAL = b'Terminating process because the JAX distributed service detected fatal errors'


def relay_stderr(prog: str, num_processes: int, resume_command: str) -> None:
  """Sends this process's stderr (fd 2, C++ logs included) through a small relay process that
  passes it on unchanged, except that an abort by JAX's coordination client (its fatal log line,
  the stack dump after it) is replaced by one `prog: error: process I of N stopped responding;
  ...` line naming the lost process and the command that resumes."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  original = os.dup(2)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root, *filter(None, [os.environ.get('PYTHONPATH')])]))
  relay = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, '-c', 'from experiments.common import _relay_main; _relay_main()', prog,
       str(num_processes), resume_command],
      stdin=subprocess.PIPE, stdout=original, stderr=original, env=env, close_fds=True)
  sys.stderr.flush()
  os.dup2(relay.stdin.fileno(), 2)
  relay.stdin.close()
  os.close(original)


def _relay_main() -> None:
  import os  # pylint: disable=g-import-not-at-top
  import select  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # it ends when the process it serves closes the pipe
  prog, count, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  out = sys.stdout.buffer
  pending, fatal = b'', None
  while True:
    ready, _, _ = select.select([0], [], [], 0.2)
    chunk = os.read(0, 1 << 16) if ready else b''
    if ready and not chunk:
      break
    if fatal is not None:
      fatal += chunk
      del fatal[:-(1 << 16)]
      continue
    pending += chunk
    cut = max(pending.rfind(b'\n'), pending.rfind(b'\r')) + 1
    if not chunk:
      cut = len(pending)  # idle: pass on a partial line too (a progress bar)
    text, pending = pending[:cut], pending[cut:]
    at = text.find(_JAX_FATAL)
    if at < 0:
      at = pending.find(_JAX_FATAL)
      if at >= 0:
        text, pending, at = text + pending, b'', len(text) + at
    if at >= 0:
      line_start = text.rfind(b'\n', 0, at) + 1
      out.write(text[:line_start])
      fatal = bytearray(text[line_start:])
    else:
      out.write(text)
    out.flush()
  if fatal is None:
    out.write(pending)
    out.flush()
    return
  out.write(_lost_process_line(prog, count, command, bytes(fatal)).encode() + b'\n')
  out.flush()


def _lost_process_line(prog: str, count: int, command: str, log: bytes) -> str:
  text = log.decode('utf-8', 'replace')
  status = text.split('absl::Status:', 1)[-1].strip().splitlines()
  status = status[0].strip().split('. ')[0].rstrip('.') if status else ''
  m = re.search(r'/task:(\d+)', text)
  process = int(m.group(1)) if m else 0  # otherwise the service itself, in process 0, is gone
  of = f' of {count}' if count > 0 else ''
  return (f'{prog}: error: process {process}{of} stopped responding; JAX\'s coordination '
          f'service ended this process ({status[:160]}). Every complete checkpoint is kept. To '
          f'resume, run the same command on every process again: {command}')
