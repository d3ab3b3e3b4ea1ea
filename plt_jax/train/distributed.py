"""Multi-process set-up: `jax.distributed` and the peer watchdog that ends a run whose host died."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, ClassVar, Optional

from absl import logging
import jax
from jax._src import distributed as jax_distributed  # its client: no public API


_CLUSTER_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE')


def multihost_requested(num_processes: Optional[int] = None,
                        coordinator_address: Optional[str] = None) -> bool:
  """True when flags or the environment describe a job with more than one process."""
  if coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if (num_processes or 0) > 1:
    return True
  for var in _CLUSTER_ENV:
    try:
      if int(os.environ.get(var, '1')) > 1:
        return True
    except ValueError:
      pass
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


# How long a process may go without a heartbeat before the others call it lost and exit. JAX's
# coordination service would notice too, after its own (longer) heartbeat timeout, and then end
# every process with a C++ fatal error instead of a message.
PEER_TIMEOUT_S = 30.0
PEER_HEARTBEAT_S = 2.0
_HEARTBEAT_DIR = 'plt_jax/heartbeat/'
_FINISHED = 'finished'


def initialize_distributed(mode: str = 'auto', *, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           peer_timeout_s: float = PEER_TIMEOUT_S,
                           on_peer_lost: Optional[Callable[[int, str], None]] = None) -> bool:
  """Calls `jax.distributed.initialize` for multi-process runs; must precede any JAX work.

  mode 'auto' initializes when `multihost_requested`; 'on' always; 'off' never. Without explicit
  arguments JAX detects SLURM, Open MPI and Cloud TPU pods itself.

  Then starts the peer watchdog (unless peer_timeout_s <= 0): when another process sends no
  heartbeat for peer_timeout_s, on_peer_lost(process index, reason) runs on the watchdog's
  thread; it must end this process (the default prints an error and exits with code 1).
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"multihost mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == 'off' or (mode == 'auto' and not multihost_requested(num_processes,
                                                                   coordinator_address)):
    return False
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  # JAX's own heartbeat timeout stays well above the watchdog's, so the watchdog speaks first.
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(max(100, 4 * peer_timeout_s)))
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if peer_timeout_s > 0 and jax.process_count() > 1:
    PeerWatchdog.start_global(jax_distributed.global_state.client, jax.process_index(),
                              jax.process_count(), timeout_s=peer_timeout_s,
                              on_lost=on_peer_lost or _exit_on_lost_peer)
  return True


def _exit_on_lost_peer(process: int, reason: str) -> None:
  del process
  print(f'error: {reason}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


class PeerWatchdog:
  """Heartbeats through the coordination service's key-value store, one thread per process.

  Every `interval_s` each process writes a counter under its key and reads everyone's. A peer
  whose counter has not moved for `timeout_s`, or a store that stays unreachable that long (it
  lives in process 0), is lost: `on_lost(index, reason)` is called once, on this thread, while the
  main thread may be blocked in a collective that will never finish. `finish()` marks this
  process as done, so peers stop waiting for its heartbeats while it exits.
  """
  _global: ClassVar[Optional['PeerWatchdog']] = None

  def __init__(self, client, index: int, count: int, *, timeout_s: float,
               interval_s: float = PEER_HEARTBEAT_S, on_lost: Callable[[int, str], None]):
    self.client, self.index, self.count = client, index, count
    self.timeout_s, self.interval_s = float(timeout_s), min(float(interval_s), timeout_s / 4)
    self.on_lost = on_lost
    self.lost: Optional[int] = None
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(target=self._run, name='plt_jax-peer-watchdog', daemon=True)

  @classmethod
  def start_global(cls, client, index: int, count: int, **kwargs) -> 'PeerWatchdog':
    if cls._global is not None:
      cls._global.stop()
    cls._global = cls(client, index, count, **kwargs)
    cls._global._thread.start()
    return cls._global

  @classmethod
  def current(cls) -> Optional['PeerWatchdog']:
    return cls._global

  def finish(self) -> None:
    self._finished = True
    self._beat(_FINISHED)

  def stop(self) -> None:
    self._stop.set()

  def wait_for_loss(self) -> Optional[int]:
    """Blocks at most one timeout for the watchdog to find a lost peer (after an error that a
    lost peer may have caused); returns its index, or None if every peer is alive."""
    deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
    while self.lost is None and time.monotonic() < deadline and self._thread.is_alive():
      time.sleep(0.1)
    return self.lost

  def _beat(self, value: str) -> None:
    self.client.key_value_set(f'{_HEARTBEAT_DIR}{self.index}', value, allow_overwrite=True)

  def _declare(self, process: int, reason: str) -> None:
    self.lost = process
    self._stop.set()
    self.on_lost(process, reason)

  def _run(self) -> None:
    start = time.monotonic()
    seen = {p: (None, start) for p in range(self.count) if p != self.index}
    failing_since, beat = None, 0
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      try:
        if not self._finished:
          self._beat(str(beat))
          beat += 1
        values = dict(self.client.key_value_dir_get(_HEARTBEAT_DIR))
        failing_since = None
      except Exception as e:  # pylint: disable=broad-except
        failing_since = failing_since or now
        if now - failing_since >= self.timeout_s:
          self._declare(0, f'process 0 of {self.count} stopped responding; the coordination '
                        f'service it runs is unreachable ({str(e).splitlines()[0][:160]})')
          return
        continue
      for p, (last, since) in seen.items():
        value = values.get(f'{_HEARTBEAT_DIR}{p}')
        if value == _FINISHED:
          continue
        if value != last:
          seen[p] = (value, now)
        elif now - since >= self.timeout_s:
          self._declare(p, f'process {p} of {self.count} stopped responding; no heartbeat for '
                        f'{now - since:.0f} s')
          return
