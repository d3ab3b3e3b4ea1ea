"""What every absl entry point shares."""
from absl import flags, logging


def quiet_library_logs() -> None:
  """Orbax logs every file it reads or writes at INFO: show warnings only, unless --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
