#!/usr/bin/env bash
# Paper Table 3: accuracy on eight 5-shot lm-eval tasks (COPA, PIQA, WinoGrande, MathQA, BoolQ, CB, WiC, WSC),
# dense vs SDTP, with paired intervals over the same documents.
#
#   bash experiments/paper_table3.sh                                   # embedded model (~40 min on 2 CPU cores)
#   MODEL=mistral-7b-instruct-v0.2 bash experiments/paper_table3.sh    # GPU (needs results/predictors/<model>)
#   bash experiments/paper_table3.sh eval.limit=null eval.batch_size=16   # every document, bigger batches (GPU)
#
# Two sdtp-eval runs (conf/experiment/paper_table3.yaml), dense (pruning=none) then SDTP (pruning=sdtp,
# the shipped predictor), then SDTP with each other training seed of that predictor
# (results/predictors/<model>/seeds.txt, or SEED_PREDICTORS="<folder> ..."; SEED_PREDICTORS="" for none), one
# after the other, in stable run directories under results/runs/paper/table3/<model>/{none,sdtp,sdtp@<seed>}: a
# finished run with the same fingerprint is skipped.
# A fresh clone resumes from the committed page: results/paper/table3/<model>.json holds both runs'
# summaries (metrics, fingerprint, per-document correctness), restored into the run directories first
# when they were made with the same setup (sdtp/reports/run_summary.py). Then sdtp/reports/paper_table3.py
# renders results/paper/table3/<model>.{md,csv,png,json} with the paper's numbers beside ours.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
RUN="results/runs/paper/table3/${MODEL}"
PAGE="results/paper/table3/${MODEL}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/lm_eval_runs.sh
start=$(date +%s)
load_seed_predictors   # the other training seeds' predictors (seed_dirs), checked before any run
for run in none:dense sdtp:sdtp; do   # one after the other: on a small machine two runs only slow each other
  pruning="${run%%:*}" name="${run##*:}"
  overrides=(experiment=paper_table3 "model=${MODEL}" "pruning=${pruning}" "$@")
  restored_run "$PAGE.json" "$name" "$RUN/$pruning" "${overrides[@]}"
done
seeds=()   # SDTP with the predictor's other training seeds (seed_predictors): the page shows the mean over seeds
for dir in "${seed_dirs[@]}"; do
  name="sdtp@$(basename "$dir")"
  restored_run "$PAGE.json" "$name" "$RUN/$name" experiment=paper_table3 "model=${MODEL}" pruning=sdtp \
    "pruning.scorer.path=$dir" "$@"
  seeds+=(--run "$name=$RUN/$name")
done
shown="$(shown_command experiments/paper_table3.sh "$@")"
replace=()   # REPLACE=1: overwrite the committed page even if it rests on more documents or seeds
[[ "${REPLACE:-0}" != 1 ]] || replace=(--replace)
"$PY" -m sdtp.reports.paper_table3 --run "dense=$RUN/none" --run "sdtp=$RUN/sdtp" "${seeds[@]}" "${replace[@]}" \
  --out "$(dirname "$PAGE")" --smaller-out results/paper/table3_smoke --command "$shown" \
  --wall-s "$(( $(date +%s) - start ))"
