# Archipelago — developer entry points. Everything installs into caches outside the clone
# ($(CACHE)); `make setup` is idempotent and fast when nothing changed.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CACHE ?= $(HOME)/.cache/archipelago
PY := .venv/bin/python
FLEET ?= e2e/fleets/demo.yaml
export ARCHIPELAGO_CACHE := $(CACHE)
# This clone's package wins over whatever the shared venv has installed (see scripts/setup.sh).
export PYTHONPATH := $(CURDIR)/operator

.PHONY: help setup setup-python crds lint unit e2e e2e-loop test demo demo-down e2e-kind bench clean

help:
	@echo "make demo   - main job: local control plane + demo GPU fleet (+ operator), shown with kubectl"
	@echo "make test   - setup, lint, unit tests, e2e tests against the local control plane"
	@echo "make setup  - install Prometheus, Go (if needed), the venv and the control-plane binaries"
	@echo "make crds   - regenerate crds/ from the pydantic models"
	@echo "make bench  - run the benchmarks in bench/"
	@echo "make e2e-kind - the same e2e suite against a kind cluster (needs Docker; not available here)"

setup:
	bash scripts/setup.sh

setup-python:
	bash scripts/setup.sh --python-only

crds: setup-python
	$(PY) -m archipelago.api.crdgen --out crds/

lint: setup-python
	.venv/bin/ruff check operator tests e2e bench
	.venv/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layering.py

unit: setup-python
	$(PY) scripts/pytest_strict.py tests

e2e: setup
	$(PY) scripts/pytest_strict.py e2e

test: setup lint
	$(PY) scripts/pytest_strict.py tests e2e

e2e-loop: setup
	$(PY) scripts/pytest_strict.py e2e -m loop

demo: setup
	$(PY) scripts/demo.py --fleet $(FLEET)

demo-down:
	$(PY) e2e/localcluster.py down --name demo

e2e-kind: setup-python
	bash e2e/kind.sh

bench: setup-python
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf .run .pytest_cache
