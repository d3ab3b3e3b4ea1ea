"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", section 2.1).

With n samples per problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): one minus the
chance that k samples drawn without replacement are all failures. The binomials overflow quickly
(C(200, 100) ~ 1e58), so it is evaluated as a product of ratios:
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np


def _check(n: int, c: int, k: int) -> None:
  if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer))
          and isinstance(k, (int, np.integer))):
    raise TypeError(f'pass@k needs integers, got n={n!r}, c={c!r}, k={k!r}')
  if n < 1 or not 0 <= c <= n:
    raise ValueError(f'pass@k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}')
  if not 1 <= k <= n:
    raise ValueError(f'pass@{k} is undefined with n={n} samples (need 1 <= k <= n)')


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one problem: n samples, c of them correct."""
  _check(n, c, k)
  if n - c < k:  # every draw of k samples contains a correct one
    return 1.0
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
  """The same quantity in exact rational arithmetic (a reference for tests)."""
  _check(n, c, k)
  return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
  """pass@k averaged over problems (each problem may have its own n)."""
  if len(num_samples) != len(num_correct):
    raise ValueError(f'{len(num_samples)} sample counts but {len(num_correct)} correct counts')
  if not len(num_samples):
    raise ValueError('no problems to average over')
  return float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct)]))


def summarize(num_samples: Sequence[int], num_correct: Sequence[int],
              ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
  """{'pass@k': mean} for every k that every problem has enough samples for."""
  n_min = min(int(n) for n in num_samples) if len(num_samples) else 0
  return {f'pass@{k}': mean_pass_at_k(num_samples, num_correct, k)
          for k in sorted(set(int(k) for k in ks)) if 1 <= k <= n_min}
