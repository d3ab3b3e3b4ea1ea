"""Training: the run, its loop and step, multi-process set-up, optimizer, checkpoints, metrics.

  run.py          train_and_evaluate(config, workdir): checks, data, state, restore, the loop
  loop.py         the steps (a generator of StepInfo) and the hooks after each, with their own
                  cadence: reports, stop signals, evaluation, checkpoints; throughput
  step.py         the train state and its mesh/shardings (Program), the jitted train/eval steps
  distributed.py  jax.distributed set-up and the peer watchdog (a dead host ends the run)
  optimizer.py, checkpoint.py, metrics.py, flops.py

The names below are the package's public API.
"""
from plt_jax.train.distributed import (PEER_HEARTBEAT_S, PEER_TIMEOUT_S, PeerWatchdog,
                                       initialize_distributed, multihost_requested)
from plt_jax.train.run import train_and_evaluate, validate_config
from plt_jax.train.step import (PROFILE_SCOPES, Batch, NonFiniteLossError, Program, TrainState,
                                abstract_train_state, build_mesh, device_batch, evaluate,
                                loss_sums, make_eval_step, make_train_step)

__all__ = ['Batch', 'NonFiniteLossError', 'PEER_HEARTBEAT_S', 'PEER_TIMEOUT_S', 'PROFILE_SCOPES',
           'PeerWatchdog', 'Program', 'TrainState', 'abstract_train_state', 'build_mesh',
           'device_batch', 'evaluate', 'initialize_distributed', 'loss_sums', 'make_eval_step',
           'make_train_step', 'multihost_requested', 'train_and_evaluate', 'validate_config']
