#!/usr/bin/env bash
# Does the schedule's shape, at equal tokens per layer, close SDTP's multi_news gap? results/compare/schedule_shape/
# {validation,test}/eval.{md,json} (docs/results.md, "Schedule shape at equal tokens per layer"), on the continuation
# protocol of the predictor page.
#
#   bash experiments/schedule_shape.sh --render-only        # re-render both committed pages from their cells
#   bash experiments/schedule_shape.sh --threads 2          # compute every missing cell, then render (hours on CPU)
#   SPLIT=validation bash experiments/schedule_shape.sh --threads 2 --only sdtp_2   # one row of one page
#   SPLIT=test TEST_LAYOUTS="2 2,14" bash experiments/schedule_shape.sh --threads 2  # the test page at two layouts
#   SPLIT=bench bash experiments/schedule_shape.sh   # wall clock of the default and the flat layout (not by default)
#
# The kv_gap page found that nesting (a token dropped before a layer stays dropped deeper) costs H2O's statistic as
# much as SDTP trails it by on multi_news. Fewer stages nest less. A row <scorer>_<layers> prunes before those layers
# with the per-stage keep ratio that gives each layer, on average, the default schedule's share of tokens (SmolLM2:
# 63%; `equal_keep`). SDTP rows score with the shipped predictor's stages at those layers
# (+pruning.scorer.select_stages=true): the predictor is not retrained per layout. Layouts: one stage before layer 2
# (flat: 60% of the prompt from layer 2 on) or 11, two (2, 14), four (2, 5, 8, 11, front-loaded; 5, 11, 17, 23) and
# five (2, 8, 14, 20, 26: SDTP-low's layers).
# - validation (SPLIT=validation): WikiText-2 validation, multi_news and passage QA records 64..127 (where the
#   predictor's prior weights were chosen; the test page does not use them): SDTP at every layout, dense and SDTP at
#   the default schedule (cells copied from the predictor's recency_tuning page). Layouts are chosen here.
# - test (SPLIT=test): the predictor page's sets and segments, its cells at the default schedule copied from it,
#   and at each layout of TEST_LAYOUTS (default: 2) SDTP and every training-free scorer (random: seeds 0, 1, 2).
#   Both pages also have `sdtpflat_2`, a predictor fine-tuned for the flat layout (`flat_rows`).
# - bench (SPLIT=bench, only when asked: it times, so it must have the machine alone): scripts/bench_page.py for the
#   default schedule and the flat layout, each against its own dense run, into bench/{default,flat}/.
# Cells are reused when their fingerprint matches (sdtp/reports/predictor_eval.py); missing cells are computed
# (0.5-1.5 min per row and set at 2K, 0.7-2 min at 4K, on 2 CPU cores). Extra arguments go to
# scripts/predictor_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
PRED="results/predictors/${MODEL}"

# layout_rows SCORER... -- LAYOUT...: `rows`, the report's options for each scorer at each layout (an SDTP row for
# `sdtp`, a --scorer row otherwise; random_s<seed> rows grouped as random_<layout>).
layout_rows() {
  local scorers=() layouts i scorer name seed
  while [[ "$1" != -- ]]; do scorers+=("$1"); shift; done
  shift
  layouts=("$@")
  equal_keep "${layouts[@]}"
  rows=()
  for i in "${!layouts[@]}"; do
    local at="${layouts[$i]//,/_}" seeds=()
    for scorer in "${scorers[@]}"; do
      name="${scorer}_$at"
      case "$scorer" in
        sdtp) rows+=(--predictor "$name=$PRED" --row-override "$name=+pruning.scorer.select_stages=true") ;;
        random_s*) seed="${scorer#random_s}" seeds+=("$name")
                   rows+=(--scorer "$name=random" --row-override "$name=pruning.scorer.seed=$seed") ;;
        *) rows+=(--scorer "$name=$scorer") ;;
      esac
      rows+=(--row-override "$name=pruning.layers=[${layouts[$i]}]"
             --row-override "$name=pruning.keep_ratio=${keeps[$i]}")
    done
    if (( ${#seeds[@]} )); then rows+=(--seed-group "random_$at=$(IFS=,; echo "${seeds[*]}")"); fi
  done
}

# flat_rows: `sdtpflat_2`, the predictor fine-tuned for the flat layout (results/predictors/<model>-flat, its
# README), with the shipped predictor's prior weights (not re-selected), at that layout; appended to `rows`.
flat_rows() {
  local name=sdtpflat_2 prior
  equal_keep 2
  rows+=(--predictor "$name=$PRED-flat" --row-override "$name=pruning.layers=[2]"
         --row-override "$name=pruning.keep_ratio=${keeps[0]}")
  for prior in recency_weight=4 recency_weight_chat=0 lexical_weight=8 lexical_weight_chat=8; do
    rows+=(--row-override "$name=pruning.scorer.$prior")
  done
}

SPLITS=(${SPLIT:-validation test})
for name in "${SPLITS[@]}"; do   # a misspelt split would otherwise run nothing and exit 0
  [[ " validation test bench " == *" $name "* ]] || { echo "SPLIT: unknown split '$name' (validation test bench)" >&2; exit 2; }
done
if [[ " ${SPLITS[*]} " == *" validation "* ]]; then
  PAGE="results/compare/schedule_shape/validation"
  source experiments/lib/kv_pages.sh
  copy_cells "$PRED/recency_tuning" dense norm positional lazyllm lexical
  layout_rows sdtp -- 2 11 2,14 2,5,8,11 5,11,17,23 2,8,14,20,26
  flat_rows
  "$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,multi_news,passage_qa --contexts 2048 \
    --wikitext-file '${paths.data_dir}/lm/wiki.valid.raw' --multi-news-start 64 --passage-qa-start 64 \
    --random-seeds "" \
    --predictor "sdtp=$PRED" "${rows[@]}" --out "$PAGE" "$@"   # later options win
fi
if [[ " ${SPLITS[*]} " == *" test "* ]]; then
  PAGE="results/compare/schedule_shape/test"
  source experiments/lib/kv_pages.sh
  copy_cells "$PRED" dense 'random_s[012]' norm positional lazyllm lexical sdtp
  layout_rows sdtp random_s0 random_s1 random_s2 norm positional lazyllm lexical -- ${TEST_LAYOUTS:-2}
  flat_rows
  "$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,c4,multi_news,passage_qa --contexts 2048,4096 \
    --predictor "sdtp=$PRED" "${rows[@]}" --out "$PAGE" "$@"
fi
if [[ " ${SPLITS[*]} " == *" bench "* ]]; then
  PAGE="results/compare/schedule_shape/bench"
  source experiments/lib/kv_pages.sh
  equal_keep 2
  flat=("pruning.layers=[2]" "pruning.keep_ratio=${keeps[0]}" +pruning.scorer.select_stages=true)
  for name in default flat; do
    [[ "$name" == flat ]] && layout=("${flat[@]}") || layout=()
    "$PY" scripts/bench_page.py --model "$MODEL" --out "$PAGE/$name" threads=2 "lengths=[2048,4096]" new_tokens=32 \
      repeats=3 "${layout[@]}" "$@"
  done
fi
