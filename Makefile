# `make run`  : set up the virtual environment (once) and run the main job.
# `make test` : set up the virtual environment (once) and run the whole test suite.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED ?= 1

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

# torch/torchvision first: pip takes them from this machine's disk (see shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[pipeline,dev]"
	touch $(STAMP)

run: setup bench

bench: setup
	mkdir -p out/benchmarks
	$(PY) benchmarks/solvers.py | tee out/benchmarks/solvers.jsonl
	$(PY) benchmarks/memory_depth.py | tee out/benchmarks/memory_depth.jsonl

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not integration"

clean:
	rm -rf out .pytest_cache
