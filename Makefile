# `make run`  : set up the virtual environment (once) and run the main job.
# `make test` : set up the virtual environment (once) and run the whole test suite.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ($(CURDIR), not $(abspath): a project path with a space is one word)
export PATH := $(if $(filter /%,$(VENV)),$(VENV),$(CURDIR)/$(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED ?= 1

.PHONY: setup run repro test test-fast bench gpu-check mutation-check ui clean
MLFLOW_PORT ?= 5000

setup: $(STAMP)

# torch/torchvision first: pip takes them from this machine's disk (see shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[pipeline,dev]"
	touch $(STAMP)

# The main job: the whole DVC pipeline (prepare → tune → train → evaluate → report) from params.yaml.
# PROFILE=profiles/paper-gpu.yaml merges that profile into params.yaml first (python -m pipelines.profile).
run: setup repro

repro: setup
	test -d .dvc || dvc init --quiet $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	dvc config core.analytics false
	$(if $(PROFILE),$(PY) -m pipelines.profile "$(PROFILE)")
	dvc repro
	@echo "results: results/REPORT.md — browse runs with: make ui"

# The benchmarks at the paper's sizes (the pipeline's bench stage runs memory_depth.py at params.yaml's bench size).
bench: setup
	mkdir -p out/benchmarks
	$(PY) benchmarks/solvers.py | tee out/benchmarks/solvers.jsonl
	$(PY) benchmarks/memory_depth.py | tee out/benchmarks/memory_depth.jsonl

gpu-check:
	bash benchmarks/gpu_check.sh

# Each deliberate one-line bug of benchmarks/mutation_check.py's table must make its tests fail (tests/README.md).
mutation-check: setup
	$(PY) benchmarks/mutation_check.py

# MLflow UI on 127.0.0.1 only; prints each experiment's runs page (the UI opens on a GenAI overview).
ui: setup
	@$(PY) -c "from pipelines.settings import load_params; from pipelines.tracking import Tracker; s = load_params(); t = Tracker(s.tracking_uri()); [print(t.run_url(s.tracking.experiment_prefix + e, $(MLFLOW_PORT))) for e in s.experiments]"
	mlflow ui --backend-store-uri "$$($(PY) -c "from pipelines.settings import load_params; print(load_params().tracking_uri())")" --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not integration"

clean:
	rm -rf out .pytest_cache
