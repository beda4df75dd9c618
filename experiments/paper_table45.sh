#!/usr/bin/env bash
# Paper Tables 4/5: loss ablations — full (MSE + ranking), w/o ranking, w/o ranking and MSE — each retrained
# with several seeds, scored by ranking agreement with the saliency labels and by continuation NLL.
#
#   bash experiments/paper_table45.sh                        # all points missing from results/paper/table45/<model>/
#   SEEDS="0 1 2 3" TRAIN_STEPS=240 THREADS=2 bash experiments/paper_table45.sh
#   ROWS="full wo_rank" bash experiments/paper_table45.sh   # only these rows this session (the page lists the rest as missing)
#   SMOKE=1 THREADS=1 bash experiments/paper_table45.sh     # pipeline check: 2-step trainings, 2 short segments, scratch folders
#   MODEL=llama2-7b EVAL_ARGS="eval.num_segments=64" bash experiments/paper_table45.sh   # GPU
#
# Per point (row x seed; the steps shared with paper_fig4.sh / paper_fig5.sh are in experiments/lib/ablation_points.sh),
# skipped when results/paper/table45/<model>/<row>_s<seed>.json already summarises it
# with the same setup (steps, training and eval arguments), so a fresh clone resumes from what is committed:
# 1. sdtp-train with the v3 recipe (results/predictors/smollm2-135m-v3/README.md: attention labels, grad_accum 3,
#    the same data) plus the row's losses (sdtp/reports/paper_table45.py ROWS: full = CE off, MSE + ranking;
#    wo_rank = experiment=sdtp_wo_rank, CE off, MSE only; wo_rank_mse = experiment=sdtp_wo_rank_mse, which
#    leaves no label loss, so the LM cross-entropy is on (ce=1) and the keep rate is the hard top-k budget,
#    keep_mode=topk with the ratio loss at 0), seed=<seed>, TRAIN_STEPS steps (default 120; the shipped
#    predictor had 480) in $RUN/<row>_s<seed>_t<steps>/train (resume=true: an interrupted training continues).
# 2. sdtp-eval eval=continuation pruning=sdtp with that predictor and pruning.scorer.recency_weight=0 on
#    WikiText-2 validation (none of the training data; EVAL_ARGS, default 16 segments of 2K context + 128) in
#    $RUN/<row>_s<seed>_t<steps>/eval; dense once in $RUN/dense.
# 3. The point's summary (ranking agreement from the training's metrics.json, NLL per segment) goes to
#    $POINTS/<row>_s<seed>.json — commit it; then sdtp/reports/paper_table45.py renders $OUT/<model>.{md,csv,png,json}.
# Time on smollm2-135m, 2 threads: ~3.4 s per step of 3 examples for the label-loss rows (no LLM backward;
# ~7 min at 120 steps), more for wo_rank_mse (CE needs the LLM backward, ~2-3x), continuation eval ~10 s per
# segment x 16 = ~3 min per point: ~9 points x ~12 min = ~1.8 h for the full table (fits one 2.5 h job when
# alone on the machine; otherwise run ROWS / SEEDS subsets over several sessions).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/ablation_points.sh
shown="$(shown_with_env experiments/paper_table45.sh "SEEDS ROWS TRAIN_STEPS TRAIN_ARGS EVAL_ARGS THREADS SMOKE" "$@")"
[[ "${SMOKE:-0}" != 1 ]] || SEEDS="${SEEDS:-0 1}"
ablation_defaults table45 120 16
SEEDS="${SEEDS:-0 1 2}"
ROWS="${ROWS:-full wo_rank wo_rank_mse}"
# Every row and seed is checked before any work: a typo must not train something else for an hour.
for row in $ROWS; do
  [[ " full wo_rank wo_rank_mse " == *" $row "* ]] || die "ROWS: unknown row '$row' (full wo_rank wo_rank_mse)"
done
check_seeds
start=$(date +%s)

ablation_dense "$@"
for seed in $SEEDS; do   # seed-major: an interrupted session leaves whole seeds of every row
  for row in $ROWS; do
    # Assigned first: a failing $(...) aborts the script here (set -e), not when passed as an argument.
    train=$("$PY" -m sdtp.reports.paper_table45 train-args --row "$row" --seed "$seed" --steps "$TRAIN_STEPS" \
      --model "$MODEL")
    ablation_point "$row" "$seed" "$train"
  done
done

"$PY" -m sdtp.reports.paper_table45 render --points "$POINTS" --model "$MODEL" --seeds "$SEEDS" --out "$OUT" \
  --command "$shown" --wall-s "$(( $(date +%s) - start ))"
