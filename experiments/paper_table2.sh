#!/usr/bin/env bash
# Paper Table 2: FLOPs, prefill / end-to-end latency and peak memory by context length, dense vs SDTP.
#
#   bash experiments/paper_table2.sh                     # embedded model, lengths 1K..8K (~25 min on 2 cores)
#   bash experiments/paper_table2.sh "lengths=[512]"     # add 512 (the lengths measured before are kept)
#   MODEL=mistral-7b-instruct-v0.2 bash experiments/paper_table2.sh "lengths=[4096,8192,16384,32768]"   # GPU
#
# One sdtp-bench run (conf/experiment/paper_table2.yaml) in a stable run directory, so a rerun skips
# the lengths already measured and keeps those it is not asked for (sdtp-bench resume=true). A fresh
# clone resumes from the committed measurements: results/paper/table2/<model>.json is copied into the
# run directory first. Then
# sdtp/reports/paper_table2.py renders results/paper/table2/<model>.{md,csv,png,json} with the
# paper's numbers beside ours.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
RUN="results/runs/paper/table2/${MODEL}"
PAGE="results/paper/table2/${MODEL}"
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
mkdir -p "$RUN"
if [[ ! -f "$RUN/bench.json" && -f "$PAGE.json" ]]; then
  cp "$PAGE.json" "$RUN/bench.json"   # resume from the committed measurements
fi
start=$(date +%s)
"$PY" -m sdtp.cli.bench experiment=paper_table2 "model=${MODEL}" "hydra.run.dir=${RUN}" "$@"
shown="bash experiments/paper_table2.sh${*:+ $*}"
[[ "$MODEL" == smollm2-135m ]] || shown="MODEL=$MODEL $shown"   # the page states the command that reproduces it
replace=()   # REPLACE=1: overwrite the committed page even if it has more context lengths
[[ "${REPLACE:-0}" != 1 ]] || replace=(--replace)
"$PY" -m sdtp.reports.paper_table2 --run "$RUN" --out "$(dirname "$PAGE")" --smaller-out results/paper/table2_smoke \
  "${replace[@]}" \
  --command "${shown}" --wall-s "$(( $(date +%s) - start ))"
