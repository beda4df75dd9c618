# Sourced by the retrained-predictor ablations (experiments/paper_table45.sh, paper_fig4.sh, paper_fig5.sh) after they
# set PY and MODEL (it sources experiments/lib/lm_eval_runs.sh: offline environment, SMOKE_TRAIN_ARGS, shown_with_env). One *point* = one
# predictor trained by sdtp-train, evaluated by continuation NLL on the same segments as a dense reference, its
# summary written to $POINTS/<row>_s<seed>.json (commit it) by sdtp/reports/ablation_points.py, and skipped next
# time when that summary has the same setup (steps, training / eval arguments, the point's schedule).

source experiments/lib/lm_eval_runs.sh

die() { echo "$*" >&2; exit 2; }

# check_seeds: every word of $SEEDS is a non-negative integer (before any work: a typo must not train for an hour).
check_seeds() {
  local seed
  for seed in $SEEDS; do
    [[ "$seed" =~ ^[0-9]+$ ]] || die "SEEDS: '$seed' is not a non-negative integer (space-separated, e.g. SEEDS=\"0 1\")"
  done
}

# ablation_defaults NAME STEPS SEGMENTS: RUN, OUT, POINTS, TRAIN_STEPS, TRAIN_ARGS, EVAL_ARGS unless set. SMOKE=1
# makes every size tiny and every output a scratch folder (results/paper/<NAME>_smoke/, gitignored).
ablation_defaults() {
  local name="$1" steps="$2" segments="$3"
  if [[ "${SMOKE:-0}" == 1 ]]; then
    RUN="${RUN:-results/runs/paper/${name}_smoke/${MODEL}}"
    OUT="${OUT:-results/paper/${name}_smoke}"
    TRAIN_STEPS="${TRAIN_STEPS:-2}"
    TRAIN_ARGS="${TRAIN_ARGS:-$SMOKE_TRAIN_ARGS}"
    EVAL_ARGS="${EVAL_ARGS:-eval.num_segments=2 eval.context_len=512 eval.cont_len=32}"
  fi
  RUN="${RUN:-results/runs/paper/${name}/${MODEL}}"
  OUT="${OUT:-results/paper/${name}}"
  POINTS="$OUT/$MODEL"
  TRAIN_STEPS="${TRAIN_STEPS:-$steps}"
  EVAL_ARGS="${EVAL_ARGS:-eval.num_segments=$segments eval.context_len=2048 eval.cont_len=128}"
  read -r -a train_args <<< "${TRAIN_ARGS:-}"
  read -r -a eval_args <<< "$EVAL_ARGS"
  threads=(${THREADS:+"threads=$THREADS"})
  mkdir -p "$POINTS"
}

# ablation_setup ROW [SCHEDULE]: the setup JSON a point's summary must match (the script's own arguments, sdtp-eval
# overrides passed to every eval, count as eval arguments).
ablation_setup() {
  "$PY" -m sdtp.reports.ablation_points setup --row "$1" --steps "$TRAIN_STEPS" --train-args "${TRAIN_ARGS:-}" \
    --eval-args "$EVAL_ARGS${extra:+ $extra}" --schedule "${2:-}"
}

# ablation_dense ARG...: the dense reference on the points' segments, once ($POINTS/dense.json).
ablation_dense() {
  extra="$*"
  eval_common=(eval=continuation "model=$MODEL" eval.dataset=wikitext 'eval.data_file=${paths.data_dir}/lm/wiki.valid.raw'
               "${eval_args[@]}" "$@")
  local setup t0
  setup=$(ablation_setup dense)
  "$PY" -m sdtp.reports.ablation_points done --point "$POINTS/dense.json" --setup "$setup" && return 0
  t0=$(date +%s)
  "$PY" -m sdtp.cli.evaluate "${eval_common[@]}" pruning=none "${threads[@]}" "hydra.run.dir=$RUN/dense"
  "$PY" -m sdtp.reports.ablation_points record --row dense --eval "$RUN/dense" --setup "$setup" \
    --out "$POINTS/dense.json" --command "sdtp-eval ${eval_common[*]} pruning=none" --wall-s "$(( $(date +%s) - t0 ))"
}

# ablation_point ROW SEED "TRAIN OVERRIDES" ["SCHEDULE"]: train (resumable) and evaluate one point unless it is
# summarised with the same setup. SCHEDULE (pruning.* overrides) goes to the training and the eval alike; the eval
# scores the predictor alone (recency prior off), so points compare what the predictors learnt. Call after
# ablation_dense (it sets eval_common).
ablation_point() {
  local row="$1" seed="$2" schedule_text="${4:-}" point setup dir t0 train schedule ev
  point="$POINTS/${row}_s${seed}.json"
  setup=$(ablation_setup "$row" "$schedule_text")
  if "$PY" -m sdtp.reports.ablation_points done --point "$point" --setup "$setup"; then
    echo "$(basename "$OUT"): $row seed $seed already summarised ($point)"
    return 0
  fi
  t0=$(date +%s)
  # Another TRAIN_STEPS or TRAIN_ARGS trains afresh in its own folder, not into this checkpoint (whose signature would
  # refuse it and stop the whole unattended session); with no TRAIN_ARGS the folder keeps its earlier name.
  dir="$RUN/${row}_s${seed}_t${TRAIN_STEPS}"
  [[ ${#train_args[@]} -eq 0 ]] || dir+="_a$(printf '%s\n' "${train_args[@]}" | sha256sum | cut -c1-8)"
  read -r -a train <<< "$3"
  read -r -a schedule <<< "$schedule_text"
  train+=("${schedule[@]}" "${train_args[@]}" "out_dir=$dir/train" "export_dir=$dir/predictor")
  # Always through sdtp-train: a finished run of the same setup only re-exports its checkpoint, an interrupted one
  # resumes, and one made with other steps or arguments is refused (its checkpoint signature differs), so a point is
  # never recorded under a setup its predictor was not trained with.
  "$PY" -m sdtp.cli.train "${train[@]}" resume=true "${threads[@]}"
  ev=("${eval_common[@]}" pruning=sdtp "${schedule[@]}" "pruning.scorer.path=$dir/predictor"
      pruning.scorer.recency_weight=0 pruning.scorer.recency_weight_chat=0)
  "$PY" -m sdtp.cli.evaluate "${ev[@]}" "${threads[@]}" "hydra.run.dir=$dir/eval"
  "$PY" -m sdtp.reports.ablation_points record --row "$row" --seed "$seed" --train "$dir/train" --eval "$dir/eval" \
    --setup "$setup" --out "$point" --command "sdtp-train ${train[*]}; sdtp-eval ${ev[*]}" \
    --wall-s "$(( $(date +%s) - t0 ))"
}

# ablation_figure_points PLAN ARG...: the dense reference (ARG: sdtp-eval overrides), then one point per
# "row<TAB>schedule" line of PLAN (python -m sdtp.reports.paper_fig4|paper_fig5 points) per training seed in $SEEDS,
# seed-major (an interrupted session leaves whole curves of the first seeds), each trained with the v3 recipe's losses.
ablation_figure_points() {
  local plan_text="$1" train line seed
  shift
  mapfile -t plan <<< "$plan_text"
  check_seeds
  ablation_dense "$@"
  for seed in $SEEDS; do
    train=$("$PY" -m sdtp.reports.ablation_points train-args --model "$MODEL" --steps "$TRAIN_STEPS" --seed "$seed")
    for line in "${plan[@]}"; do
      ablation_point "${line%%$'\t'*}" "$seed" "$train" "${line#*$'\t'}"
    done
  done
}
