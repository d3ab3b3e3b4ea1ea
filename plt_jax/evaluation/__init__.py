"""Code-generation evaluation: HumanEval pass@k with sandboxed execution, held-out perplexity.

  sandbox     runs untrusted programs (bubblewrap or built-in namespaces: mount, PID, network,
              IPC, UTS, cgroup; throwaway uids, no capabilities, a seccomp filter, a fresh
              keyring, a memory/pids cgroup, rlimits, capped output pipes, a timeout) and judges
              them from a separate process
  passk       the unbiased pass@k estimator
  humaneval   problems, stop sequences, generate -> execute -> score, resumable JSONL
  perplexity  bits per byte and token perplexity on held-out text

`python -m experiments.evaluate` is the command line.
"""
from plt_jax.evaluation import humaneval, passk, perplexity, sandbox

__all__ = ['humaneval', 'passk', 'perplexity', 'sandbox']
