#!/usr/bin/env bash
# Long-context evals on the embedded model, dense vs random pruning (results/eval/long_context_smollm2-135m.md; docs/results.md).
# multi_news: first 10 samples, middle-truncated to 4096 prompt tokens and decoding capped at 64 new tokens
# (official: model.max_length - 500 and 512) to fit the shared 2-core CPU. needle: 4K-token prompts, 5 depths x 2.
# passage_retrieval / passage_count: 2K-token prompts, 5 samples each. One heavy process at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
# glibc malloc tuning (see shared cpu-calibration notes): avoids mmap churn on large activations.
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
PY="${PYTHON:-.venv/bin/python}"
THREADS=${THREADS:-1}
for pruning in none random; do
  "$PY" -m sdtp.cli.evaluate eval=needle model=smollm2-135m pruning=$pruning threads=$THREADS \
    eval.lengths=[4096] eval.depths=[0.0,0.25,0.5,0.75,1.0] eval.num_samples=2 | tail -1 > /dev/null
done
for pruning in none random; do
  "$PY" -m sdtp.cli.evaluate eval=longbench model=smollm2-135m pruning=$pruning threads=$THREADS \
    eval.datasets=[multi_news] eval.limit=10 eval.max_length=4096 eval.max_new_tokens=64 | tail -1 > /dev/null
done
for task in passage_retrieval passage_count; do
  for pruning in none random; do
    "$PY" -m sdtp.cli.evaluate eval=$task model=smollm2-135m pruning=$pruning threads=$THREADS \
      eval.lengths=[2048] eval.num_samples=5 | tail -1 > /dev/null
  done
done
"$PY" scripts/long_context_table.py results/runs/eval results/eval/long_context_smollm2-135m.md
