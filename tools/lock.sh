#!/usr/bin/env bash
# Regenerates locks/py<X.Y>.txt for one Python: a throwaway venv gets today's newest releases that
# setup.py allows, and `pip freeze` of it becomes the lock that `make train` / `make test` install
# through (pip -c). Run `make lock` after changing a dependency, then `make test` on the new lock.
#
#   tools/lock.sh python3        # Python 3.11 here: everything `make test` installs, torch included
#   tools/lock.sh python3.12     # GPU machines / Colab: the same minus torch, which they bring
set -euo pipefail
python=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
ver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
out="$root/locks/py$ver.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$python" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
if [ "$ver" = "3.11" ]; then
  # The CPU build of torch 2.13.0 (a plain `torch` from PyPI is a multi-GB CUDA build).
  "${pip[@]}" install -q torch==2.13.0
  "${pip[@]}" install -q "$root[torch,test]"
else
  # The HF side without torch (accelerate needs torch): the GPU machines and Colab bring torch.
  "${pip[@]}" install -q "$root[test]" transformers
fi
{
  echo "# Tested package set for Python $ver, made by tools/lock.sh on $(date -u +%Y-%m-%d)."
  echo "# Install through it: pip install -c locks/py$ver.txt -e '.[torch,test]'  (see README)."
  "${pip[@]}" freeze --all --exclude-editable \
    | grep -viE '^(plt[-_]jax)[ =@]' \
    | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
