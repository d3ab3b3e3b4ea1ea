"""The loop-count sweep's variant names. The sweep end to end is tested in
tests/integration/test_sweep_runs.py."""
import pytest

from plt_jax.study import sweep


def test_parse_variants():
  assert sweep.parse_variants('r1, r4,vanilla2,deep3') == [
      ('r1', 1, 'plt'), ('r4', 4, 'plt'), ('vanilla2', 2, 'vanilla'), ('deep3', 3, 'deep')]
  for bad in ('r0', 'x2', '', 'r1,r1', 'deep0'):
    with pytest.raises(ValueError, match='sweep.variants'):
      sweep.parse_variants(bad)
