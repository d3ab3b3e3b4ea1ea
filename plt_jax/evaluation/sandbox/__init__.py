"""Runs untrusted Python programs (model completions) in a contained process, and judges them.

`run_program(program, limits, judge=Judge(...))` -> `ExecResult`; `run_programs(...)` runs many
on a thread pool. With a `Judge`, the verdict comes from trusted test code in a process of its
own; without one, `passed` only means the program reached its end. `ExecResult.isolation`
says which layers were in force and `missing_layers` lists the absent ones; docs/sandbox.md is
the threat model.

  wire        the value format and frames between the judge and the candidate
  protocol    the judge protocol (what the judge and the candidate run)
  isolation   namespaces, identity, rlimits, keyring, cgroup join, system-call filter loading
  view        the private filesystem view (mount namespace)
  host        the evaluator's side: the filter (libseccomp), the cgroup, throwaway uids
  launch      starting the supervisor (or bubblewrap), the capped output, the failure reason
  supervisor  run by path for every program; forks init, the judge and the candidate
  api         the public API below
"""
from plt_jax.evaluation.sandbox.api import (DISABLE, ENGINES, LAYERS, OUTPUT_TAIL, ExecResult,
                                            Judge, Limits, describe_isolation, missing_layers,
                                            require_isolation, run_program, run_programs)
from plt_jax.evaluation.sandbox.isolation import live_pids_of_uid
from plt_jax.evaluation.sandbox.protocol import ProgramError
from plt_jax.evaluation.sandbox.view import VIEW_WORKDIR

__all__ = ['DISABLE', 'ENGINES', 'LAYERS', 'OUTPUT_TAIL', 'ExecResult', 'Judge', 'Limits',
           'ProgramError', 'VIEW_WORKDIR', 'describe_isolation', 'live_pids_of_uid',
           'missing_layers', 'require_isolation', 'run_program', 'run_programs']
