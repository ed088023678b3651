# Two commands on a fresh machine (Python >= 3.10 with venv):
#   make run    install, then train the autoencoder on Shapes in fast mode and write a reconstruction grid
#   make test   install with the test extra, then run the unit, exercise and notebook tests (fast mode)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
# Real data sets (MNIST, CIFAR-10 test) for the tests and notebooks, where a copy lies beside the checkout.
export MINILDM_DATA ?= $(wildcard $(abspath ../shared/data))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml constraints-ci.txt | $(BIN)/python
	$(PIP) install -q -c constraints-ci.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints-ci.txt | $(BIN)/python
	$(PIP) install -q -c constraints-ci.txt -e ".[test]"
	touch $@ $(VENV)/.installed-run

# The grading sandbox (minildm/sandbox.py) runs each student's kernel in bubblewrap: installed where missing and
# possible (root or passwordless sudo with apt-get); elsewhere `minildm grade` says it grades without isolation.
APT = $(if $(filter 0,$(shell id -u)),,sudo -n) apt-get
grading-sandbox:
	@command -v bwrap >/dev/null || { command -v apt-get >/dev/null \
	  && { $(APT) install -y -qq bubblewrap >/dev/null 2>&1 \
	       || { $(APT) update -qq && $(APT) install -y -qq bubblewrap >/dev/null; }; }; } \
	  || echo "make: could not install bubblewrap; minildm grade will run student code without its sandbox" \
	          "(install the bubblewrap package, see README 'Grading')"

# A new student's first run in a fresh clone and venv, notebook 01 in JupyterLab in headless Chromium (a screenshot in
# runs/first_run/), every notebook through the new kernel: minutes, so not part of `make test`.
first-run: $(VENV)/.installed-test
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { command -v apt-get >/dev/null \
	  && { $(APT) install -y -qq chromium >/dev/null 2>&1 \
	       || { $(APT) update -qq && $(APT) install -y -qq chromium >/dev/null; }; }; } \
	  || echo "make: could not install chromium; the first-run test will be skipped"
	MINILDM_FIRST_RUN=1 $(BIN)/python -m pytest -q -s tests/test_first_run.py

.PHONY: run test lint grading-sandbox first-run
run: $(VENV)/.installed-run
	MINILDM_FAST=1 $(BIN)/minildm train --out runs/quickstart

# The solution notebooks are not given to nbval: tests/test_exercises.py runs each one once, through nbgrader validate
# (every cell executed, and it fails when any cell raises, as nbval would).
test: $(VENV)/.installed-test grading-sandbox
	PATH="$(abspath $(BIN)):$$PATH" MINILDM_FAST=1 $(BIN)/python -m pytest -q tests --nbval-lax notebooks

lint: $(VENV)/.installed-test
	$(BIN)/ruff check minildm tests benchmarks scripts
