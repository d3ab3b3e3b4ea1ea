"""Strips outputs and execution counts from notebooks, so they are committed clean.

  python tools/clear_notebooks.py notebooks/*.ipynb            # rewrite in place
  python tools/clear_notebooks.py --check notebooks/*.ipynb    # exit 1 if any has outputs
"""
from __future__ import annotations

import argparse
import sys

import nbformat

# Per-run cell metadata that Jupyter / Colab add; the rest (e.g. Colab form settings) is kept.
_RUN_METADATA = ('execution', 'collapsed', 'scrolled', 'outputId', 'executionInfo')


def is_clean(nb) -> bool:
  return all(not c.get('outputs') and c.get('execution_count') is None
             and not any(k in c.metadata for k in _RUN_METADATA)
             for c in nb.cells if c.cell_type == 'code')


def clear(nb):
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs = []
      cell.execution_count = None
    for k in _RUN_METADATA:
      cell.metadata.pop(k, None)
  nb.metadata.pop('widgets', None)
  return nb


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('paths', nargs='+')
  p.add_argument('--check', action='store_true', help='only report notebooks that have outputs')
  args = p.parse_args(argv)
  dirty = []
  for path in args.paths:
    nb = nbformat.read(path, as_version=4)
    if is_clean(nb):
      continue
    dirty.append(path)
    if not args.check:
      nbformat.write(clear(nb), path)
  for path in dirty:
    print(f'{"has outputs" if args.check else "cleared"}: {path}')
  return 1 if args.check and dirty else 0


if __name__ == '__main__':
  sys.exit(main())
