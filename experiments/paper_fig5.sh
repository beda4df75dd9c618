#!/usr/bin/env bash
# Paper Figure 5: effect of multi-stage pruning — 1..7 stages at keep 0.9 per stage from the model's default first
# layer and step (model.schedule: the paper's layer 4, step 3 is 4, 7, ... on a 32-layer model, 2, 5, ... on
# SmolLM2), one predictor trained per point and training seed, scored by continuation NLL vs dense, with analytic
# prefill FLOPs.
#
#   bash experiments/paper_fig5.sh                          # all points missing from results/paper/fig5/<model>/
#   STAGES="1 4 7" bash experiments/paper_fig5.sh           # a subset this session (the page lists the rest as missing)
#   SEEDS="1" bash experiments/paper_fig5.sh                 # one training seed this session (the page asks for 0 1 2)
#   SMOKE=1 MODEL=tiny-llama THREADS=1 bash experiments/paper_fig5.sh   # pipeline check into scratch folders
#   MODEL=llama2-7b EVAL_ARGS="eval.num_segments=64 eval.context_len=2048 eval.cont_len=128" bash experiments/paper_fig5.sh   # GPU
#
# Per training seed in SEEDS (default 0 1 2, the page's; seed-major) and point (S stages; run order 1, 7, 4, 2, 5,
# 3, 6), skipped when results/paper/fig5/<model>/stages<S>_s<seed>.json summarises it with the same setup (resumable from what is committed; steps shared with Tables 4/5 and Figure 4:
# experiments/lib/ablation_points.sh): sdtp-train (v3 recipe, TRAIN_STEPS, default 60; the shipped predictor had
# 480) for pruning.layers=[the S default stage layers] pruning.keep_ratio=0.9, then sdtp-eval eval=continuation with
# that predictor alone and dense on the same WikiText-2 validation segments (EVAL_ARGS, default 12 x 2K + 128).
# More stages than the model's depth allows stop the script before any work.
# Time on smollm2-135m, 2 threads (measured): 6-11 min per point, ~1 h per seed for the 7 points.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/ablation_points.sh
shown="$(shown_with_env experiments/paper_fig5.sh "STAGES SEEDS TRAIN_STEPS TRAIN_ARGS EVAL_ARGS THREADS SMOKE" "$@")"
PAGE_STAGES="1 2 3 4 5 6 7"   # the paper's: the page lists what is not summarised yet
[[ "${SMOKE:-0}" != 1 ]] || { STAGES="${STAGES:-1 2}"; PAGE_STAGES="$STAGES"; }
STAGES="${STAGES:-$PAGE_STAGES}"
PAGE_SEEDS="0 1 2"   # training seeds per point: the page shows their mean, the spread over them and what is missing
[[ "${SMOKE:-0}" != 1 ]] || PAGE_SEEDS="${SEEDS:-0}"
SEEDS="${SEEDS:-$PAGE_SEEDS}"
ablation_defaults fig5 60 12
plan_text=$("$PY" -m sdtp.reports.paper_fig5 points --model "$MODEL" --stages "$STAGES")
start=$(date +%s)
ablation_figure_points "$plan_text" "$@"

"$PY" -m sdtp.reports.paper_fig5 render --points "$POINTS" --model "$MODEL" --stages "$PAGE_STAGES" --seeds "$PAGE_SEEDS" \
  --out "$OUT" --command "$shown" --wall-s "$(( $(date +%s) - start ))"
