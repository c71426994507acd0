# The two commands a newcomer needs: `make run` and `make test`.
# Each creates .venv with the interpreter below and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --quiet

.PHONY: run test test-fast lint typecheck unit bench clean

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

# The edit loop: lint, types and every test not marked slow (real processes that
# take seconds) or e2e (third-party components). `make test` stays the whole suite.
test-fast: lint typecheck
	$(PY) -m pytest -q -m 'not slow and not e2e' $(PYTEST_ARGS)

# `make bench BENCH_ARGS=--quick` for one short round (see docs/benchmarks.md).
bench: $(VENV)/.dev-installed
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info

# Longer runs of the hardening tests (docs/security.md). Override the length with
# HIVE_RELAY_FUZZ_EXAMPLES / HIVE_RELAY_STATEFUL_EXAMPLES and HIVE_RELAY_SOAK_SECS.
.PHONY: fuzz soak

fuzz: $(VENV)/.dev-installed
	HIVE_RELAY_FUZZ_EXAMPLES=$${HIVE_RELAY_FUZZ_EXAMPLES:-500} \
	HIVE_RELAY_STATEFUL_EXAMPLES=$${HIVE_RELAY_STATEFUL_EXAMPLES:-500} \
	$(PY) -m pytest -q tests/test_fuzz.py tests/test_stateful.py $(PYTEST_ARGS)

soak: $(VENV)/.dev-installed
	HIVE_RELAY_SOAK_SECS=$${HIVE_RELAY_SOAK_SECS:-600} \
	$(PY) -m pytest -q -s tests/test_soak.py $(PYTEST_ARGS)

# The Redis store's Lua scripts (relay/store/lua, settings in .luacheckrc); needs
# luacheck (Debian: lua-check). tests/test_redis_scripts.py runs it too.
.PHONY: lint-lua
lint-lua:
	luacheck relay/store/lua/
