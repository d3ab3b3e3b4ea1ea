# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make train   installs into .venv and runs the main job on its embedded default
#   make test    installs into .venv (with the PyTorch side) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m experiments.pretrain --config=configs/r2.py

test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests

.PHONY: install train test
