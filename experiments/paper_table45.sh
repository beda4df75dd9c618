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
# Per point (row x seed), skipped when results/paper/table45/<model>/<row>_s<seed>.json already summarises it
# with the same setup (steps, training and eval arguments), so a fresh clone resumes from what is committed:
# 1. sdtp-train with the shipped v3 recipe (results/predictors/<model>/README.md: attention labels, grad_accum 3,
#    the same data) plus the row's losses (sdtp/reports/paper_table45.py ROWS: full = CE off, MSE + ranking;
#    wo_rank = experiment=sdtp_wo_rank, CE off, MSE only; wo_rank_mse = experiment=sdtp_wo_rank_mse, which
#    leaves no label loss, so the LM cross-entropy is on (ce=1) and the keep rate is the hard top-k budget,
#    keep_mode=topk with the ratio loss at 0), seed=<seed>, TRAIN_STEPS steps (default 120; the shipped
#    predictor had 480) in $RUN/<row>_s<seed>/train (resume=true: an interrupted training continues).
# 2. sdtp-eval eval=continuation pruning=sdtp with that predictor and pruning.scorer.recency_weight=0 on
#    WikiText-2 validation (none of the training data; EVAL_ARGS, default 16 segments of 2K context + 128) in
#    $RUN/<row>_s<seed>/eval; dense once in $RUN/dense.
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
source experiments/lib/lm_eval_runs.sh
shown="$(shown_command experiments/paper_table45.sh "$@")"
for var in SEEDS ROWS TRAIN_STEPS TRAIN_ARGS EVAL_ARGS THREADS SMOKE; do
  [[ -z "${!var+x}" ]] || shown="$var=${!var@Q} $shown"
done
if [[ "${SMOKE:-0}" == 1 ]]; then   # every size tiny, every output in a scratch folder (nothing to commit)
  RUN="${RUN:-results/runs/paper/table45_smoke/${MODEL}}"
  OUT="${OUT:-results/paper/table45_smoke}"
  TRAIN_STEPS="${TRAIN_STEPS:-2}"
  TRAIN_ARGS="${TRAIN_ARGS:-$SMOKE_TRAIN_ARGS}"
  EVAL_ARGS="${EVAL_ARGS:-eval.num_segments=2 eval.context_len=512 eval.cont_len=32}"
  SEEDS="${SEEDS:-0 1}"
fi
RUN="${RUN:-results/runs/paper/table45/${MODEL}}"
OUT="${OUT:-results/paper/table45}"
POINTS="$OUT/$MODEL"
TRAIN_STEPS="${TRAIN_STEPS:-120}"
SEEDS="${SEEDS:-0 1 2}"
ROWS="${ROWS:-full wo_rank wo_rank_mse}"
EVAL_ARGS="${EVAL_ARGS:-eval.num_segments=16 eval.context_len=2048 eval.cont_len=128}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a eval_args <<< "$EVAL_ARGS"
threads=(${THREADS:+"threads=$THREADS"})
eval_common=(eval=continuation "model=$MODEL" eval.dataset=wikitext 'eval.data_file=${paths.data_dir}/lm/wiki.valid.raw'
             "${eval_args[@]}" "$@")
setup() {   # setup ROW: what a point's summary must match to be reused (JSON)
  "$PY" -c 'import json, sys; print(json.dumps({"row": sys.argv[1], "train_steps": int(sys.argv[2]),
    "train_args": sys.argv[3], "eval_args": sys.argv[4]}, sort_keys=True))' "$1" "$TRAIN_STEPS" "${TRAIN_ARGS:-}" \
    "$EVAL_ARGS${extra:+ $extra}"
}
extra="$*"   # the script's own arguments (sdtp-eval overrides) are part of every point's setup
start=$(date +%s)
mkdir -p "$POINTS"

# Dense reference (once).
dense_setup=$(setup dense)
if ! "$PY" -m sdtp.reports.paper_table45 done --point "$POINTS/dense.json" --setup "$dense_setup"; then
  t0=$(date +%s)
  "$PY" -m sdtp.cli.evaluate "${eval_common[@]}" pruning=none "${threads[@]}" "hydra.run.dir=$RUN/dense"
  "$PY" -m sdtp.reports.paper_table45 record --row dense --eval "$RUN/dense" --setup "$dense_setup" \
    --out "$POINTS/dense.json" --command "sdtp-eval ${eval_common[*]} pruning=none" --wall-s "$(( $(date +%s) - t0 ))"
fi

for seed in $SEEDS; do   # seed-major: an interrupted session leaves whole seeds of every row
  for row in $ROWS; do
    point="$POINTS/${row}_s${seed}.json"
    point_setup=$(setup "$row")
    if "$PY" -m sdtp.reports.paper_table45 done --point "$point" --setup "$point_setup"; then
      echo "paper_table45: $row seed $seed already summarised ($point)"
      continue
    fi
    t0=$(date +%s)
    dir="$RUN/${row}_s${seed}"
    read -r -a train <<< "$("$PY" -m sdtp.reports.paper_table45 train-args --row "$row" --seed "$seed" \
      --steps "$TRAIN_STEPS" --model "$MODEL")"
    train+=("${train_args[@]}" "out_dir=$dir/train" "export_dir=$dir/predictor")
    if [[ ! -f "$dir/predictor/predictor.json" || ! -f "$dir/train/metrics.json" ]]; then
      "$PY" -m sdtp.cli.train "${train[@]}" resume=true "${threads[@]}"
    fi
    ev=("${eval_common[@]}" pruning=sdtp "pruning.scorer.path=$dir/predictor" pruning.scorer.recency_weight=0 pruning.scorer.recency_weight_chat=0)
    "$PY" -m sdtp.cli.evaluate "${ev[@]}" "${threads[@]}" "hydra.run.dir=$dir/eval"
    "$PY" -m sdtp.reports.paper_table45 record --row "$row" --seed "$seed" --train "$dir/train" --eval "$dir/eval" \
      --setup "$point_setup" --out "$point" --command "sdtp-train ${train[*]}; sdtp-eval ${ev[*]}" \
      --wall-s "$(( $(date +%s) - t0 ))"
  done
done

"$PY" -m sdtp.reports.paper_table45 render --points "$POINTS" --model "$MODEL" --seeds "$SEEDS" --out "$OUT" \
  --command "$shown" --wall-s "$(( $(date +%s) - start ))"
