# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make train   installs into .venv and runs the main job on its embedded default
#   make test    installs into .venv (with the PyTorch side) and runs the test suite
#                (tests/, unit, and tests/integration/: training runs, sweeps, notebooks, the wheel,
#                fresh processes); `make test-unit` runs the unit tests alone
# Both install the tested package set in locks/py<X.Y>.txt; `make lock` regenerates it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK := locks/py$(PYVER).txt

$(VENV)/.installed: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	# torch first: the lock's CPU build, which pip finds on this machine's disk.
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[torch,test]'
	touch $@

$(LOCK):
	@echo "no lock for Python $(PYVER) ($(LOCK)): run 'make lock PYTHON=$(PYTHON)' or use Python 3.11" >&2
	@exit 1

install: $(VENV)/.installed

# System tools the code sandbox uses (bubblewrap for its namespaces). Installed through apt where
# this runs as root; elsewhere the sandbox falls back to its own namespace code and says so.
sysdeps:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null; \
	else echo "bubblewrap not installed (needs root + apt): sandbox tests that need it are skipped" >&2; fi

train: install
	$(PY) -m experiments.pretrain --config=configs/r2.py

test: install sysdeps
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

test-unit: install sysdeps
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=10 --ignore=tests/integration tests

# Regenerate the locks from today's newest releases (3.12 where a python3.12 exists), then run
# `make test` on the new lock before committing it.
PYTHON312 ?= $(shell command -v python3.12 || ls $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | head -n 1)
lock:
	tools/lock.sh $(PYTHON)
	@if [ -n "$(PYTHON312)" ]; then tools/lock.sh $(PYTHON312); else echo "python3.12 not found: locks/py3.12.txt left as it is"; fi

.PHONY: install sysdeps train test test-unit lock
