# Two entry points: `make demo` (the system end to end) and `make test` (the whole suite).
# Both create the virtual environment at .venv (reused when present) and install what they need,
# from the lock files: every package pinned with its sha256 digests, checked by pip.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STREAMREC := $(VENV)/bin/streamrec

.PHONY: demo test soak soak-memory compose-client lint typecheck check train bench-state bench-e2e kafka-up kafka-down lock clean

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

# The tested set: pyproject.toml's ranges stay the library's contract, the locks pin what is
# installed here and in the image (Linux x86_64, Python 3.11), each package with its digests.
# requirements-dev.lock is the whole set `make test` runs with; requirements.lock, the runtime's
# share of it (resolved within the dev lock, so the tests test those very versions). Both hold
# pyproject's build backend: streamrec itself installs without build isolation, so that no
# package comes unchecked. tests/test_locks.py fails when pyproject and the locks disagree.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# The image's and the machines' platform: Debian 12 (glibc 2.36), x86_64, CPython 3.11.
LOCK_PLATFORM := --python-version 3.11 --python-platform x86_64-manylinux_2_36
BUILD_REQUIRES := $(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'
UV_COMPILE := $(VENV)/bin/uv pip compile --quiet --generate-hashes $(LOCK_PLATFORM) \
  --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "streamrec needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)

# The runtime alone (no torch): what the flow and the tools need.
$(VENV)/.runtime: pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Tests also train a tiny model end to end, so they need the train extra (torch).
$(VENV)/.dev: pyproject.toml $(DEV_LOCK) | $(VENV)/bin/python
	$(PY) -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(VENV)/.runtime

# Regenerate both locks after a change to pyproject's dependencies. Pins that pyproject still
# allows are kept; `make lock UPGRADE=1` moves every pin to the newest release allowed.
lock: $(VENV)/.dev
	$(BUILD_REQUIRES) | $(UV_COMPILE) --extra dev --extra train pyproject.toml - -o $(DEV_LOCK)
	$(BUILD_REQUIRES) | $(UV_COMPILE) -c $(DEV_LOCK) pyproject.toml - -o $(LOCK)

clean:
	-$(STREAMREC) kafka down
	rm -rf run .pytest_cache .mypy_cache .ruff_cache
