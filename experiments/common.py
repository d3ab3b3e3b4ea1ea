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
