# Two entry points: `make demo` (the system end to end) and `make test` (the whole suite).
# Both create the virtual environment at .venv (reused when present) and install what they need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STREAMREC := $(VENV)/bin/streamrec

.PHONY: demo test soak soak-memory compose-client lint typecheck check train bench-state bench-e2e kafka-up kafka-down clean

demo: $(VENV)/.runtime
	$(STREAMREC) demo

test: $(VENV)/.dev compose-client
	$(PY) -m pytest

# The randomized fault schedules at soak strength (`make test` runs a share of them):
# 2,000 in process and 30 + 2 x 5 takeovers against the real broker and real flows, each
# checked against the oracle (about 6 + 17 minutes on 2 cores).
# STREAMREC_BROKER_CLUSTER_SCHEDULES=N adds two-process clusters, STREAMREC_BROKER_RESTARTS=1
# restarts of the broker itself.
soak: $(VENV)/.dev
	STREAMREC_FAULT_SCHEDULES=2000 STREAMREC_BROKER_SCHEDULES=30 STREAMREC_BROKER_TAKEOVERS=5 \
	  $(PY) -m pytest -q tests/test_fault_schedules.py tests/test_fault_broker.py

# The flow's resident memory over 30 minutes at 2,000 ev/s of 1,000,000 distinct users, hostile
# ids included: the curve, its slope after the warm-up, and the "Memory soak" section of
# BENCHMARKS.md. Starts the local broker if none answers. Not part of `make test`.
soak-memory: $(VENV)/.runtime
	$(STREAMREC) bench memory

# tests/test_compose.py validates docker-compose.yml with a real compose client;
# without a Docker engine, Debian's docker-compose package is enough for that.
compose-client:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; } \
	  || echo "note: no docker-compose client; tests/test_compose.py cannot validate the file"

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# flows/ state/ ... install as streamrec.flows, ... (pyproject's package-dir); mypy sees them
# under those names through links in build/mypy/streamrec/ (mypy_path in pyproject.toml).
# Checking flows/ itself would make it the module `flows`: pass the links, never the folders.
MYPY_TREE := build/mypy/streamrec
MAPPED := flows state model tools bench

typecheck: $(VENV)/.dev
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)
	for p in $(MAPPED); do ln -s ../../../$$p $(MYPY_TREE)/$$p; done
	$(VENV)/bin/mypy streamrec $(addprefix $(MYPY_TREE)/,$(MAPPED)) tests conftest.py

check: lint typecheck test

train: $(VENV)/.dev
	$(STREAMREC) train

bench-state: $(VENV)/.runtime
	$(STREAMREC) bench state --json run/bench-state.json

bench-e2e: $(VENV)/.runtime
	$(STREAMREC) bench e2e --json run/bench-e2e.json

kafka-up: $(VENV)/.runtime
	$(STREAMREC) kafka up

kafka-down: $(VENV)/.runtime
	$(STREAMREC) kafka down

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "streamrec needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The runtime alone (no torch): what the flow and the tools need.
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

# Tests also train a tiny model end to end, so they need the train extra (torch).
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[dev,train]'
	touch $@ $(VENV)/.runtime

clean:
	-$(STREAMREC) kafka down
	rm -rf run .pytest_cache .mypy_cache .ruff_cache
