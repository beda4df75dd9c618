#!/usr/bin/env bash
# Paper Figure 4: effect of the first pruning layer — one pruning stage before layer k (paper: k = 1..10) keeping
# r of the prompt (0.9, 0.8, 0.7), one predictor trained per point and training seed, scored by continuation NLL vs
# dense.
#
#   bash experiments/paper_fig4.sh                                # all points missing from results/paper/fig4/<model>/
#   RATIOS="0.7 0.9" bash experiments/paper_fig4.sh               # a subset this session (the page lists the rest as missing)
#   SEEDS="1" RATIOS="0.7 0.9" bash experiments/paper_fig4.sh     # one training seed this session (the page asks for 0 1 2)
#   FIRST_LAYERS="1 4 10" TRAIN_STEPS=120 THREADS=2 bash experiments/paper_fig4.sh
#   SMOKE=1 MODEL=tiny-llama THREADS=1 bash experiments/paper_fig4.sh   # pipeline check: 2-step trainings, 2 short segments, scratch folders
#   MODEL=llama2-7b EVAL_ARGS="eval.num_segments=64 eval.context_len=2048 eval.cont_len=128" bash experiments/paper_fig4.sh   # GPU
#
# Layer numbering: the paper's "first layer k" is our 0-based pruning.layers=[k] on every model (the convention of
# the shipped schedules, sdtp/reports/paper_fig4.py explains why); a k the model does not have, or a ratio outside
# (0, 1), stops the script before any work.
# Per training seed in SEEDS (default 0 1 2, the page's; seed-major) and point (k x r, run order: r = 0.9 and 0.7
# interleaved along k = 1, 10, 5, 3, 7, ..., then r = 0.8), skipped when
# results/paper/fig4/<model>/first<k>_keep<r>_s<seed>.json summarises it with the same setup, so a fresh clone
# resumes from what is committed (steps shared with Tables 4/5 and Figure 5: experiments/lib/ablation_points.sh):
# 1. sdtp-train with the shipped v3 recipe (attention labels, MSE + ranking, CE off, grad_accum 3, its data) for
#    pruning.layers=[k] pruning.keep_ratio=r, TRAIN_STEPS steps (default 60; the shipped predictor had 480).
# 2. sdtp-eval eval=continuation pruning=sdtp with that predictor alone (recency prior off) on WikiText-2
#    validation (EVAL_ARGS, default 12 segments of 2K context + 128), and dense once on the same segments.
# 3. The point's summary goes to $POINTS/ — commit it; sdtp/reports/paper_fig4.py renders $OUT/<model>.{md,csv,png,json}.
# Time on smollm2-135m, 2 threads (estimate): ~3.4 s per training step (~3.5 min at 60 steps, plus validation) and
# ~10 s per eval segment (~2 min for 12): 5-11 min per point (measured), ~4.5 h for the 30 points of one seed (two
# sessions; the order above leaves whole curves' ends and shape after a partial session).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/ablation_points.sh
shown="$(shown_with_env experiments/paper_fig4.sh "FIRST_LAYERS RATIOS SEEDS TRAIN_STEPS TRAIN_ARGS EVAL_ARGS THREADS SMOKE" "$@")"
PAGE_LAYERS="1 2 3 4 5 6 7 8 9 10"   # the paper's grid: the page lists what is not summarised yet
PAGE_RATIOS="0.9 0.8 0.7"
if [[ "${SMOKE:-0}" == 1 ]]; then
  FIRST_LAYERS="${FIRST_LAYERS:-1 2}" RATIOS="${RATIOS:-0.9 0.7}"
  PAGE_LAYERS="$FIRST_LAYERS" PAGE_RATIOS="$RATIOS"
fi
FIRST_LAYERS="${FIRST_LAYERS:-$PAGE_LAYERS}"
RATIOS="${RATIOS:-$PAGE_RATIOS}"
PAGE_SEEDS="0 1 2"   # training seeds per point: the page shows their mean, the spread over them and what is missing
[[ "${SMOKE:-0}" != 1 ]] || PAGE_SEEDS="${SEEDS:-0}"
SEEDS="${SEEDS:-$PAGE_SEEDS}"
ablation_defaults fig4 60 12
# Every point's row and schedule, checked against the model's depth before any work.
plan_text=$("$PY" -m sdtp.reports.paper_fig4 points --model "$MODEL" --first-layers "$FIRST_LAYERS" --ratios "$RATIOS")
start=$(date +%s)
ablation_figure_points "$plan_text" "$@"

"$PY" -m sdtp.reports.paper_fig4 render --points "$POINTS" --model "$MODEL" --first-layers "$PAGE_LAYERS" \
  --ratios "$PAGE_RATIOS" --seeds "$PAGE_SEEDS" --out "$OUT" --command "$shown" --wall-s "$(( $(date +%s) - start ))"
