# The two commands a newcomer needs: `make run` and `make test`.
# Each creates .venv with the interpreter below and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --quiet

.PHONY: run test lint typecheck unit bench clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hive-relay needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[dev,redis]'
	@touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(PY) -m relay

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check relay client tests bench
	$(PY) -m ruff format --check relay client tests bench

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy

unit: $(VENV)/.dev-installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(VENV)/.dev-installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
