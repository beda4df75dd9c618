#!/usr/bin/env bash
# Paper Table 1: LongBench accuracy, compression ratio 1/τ and prefill / end-to-end speedup of dense,
# LLMLingua-2, SDTP (10 stages) and SDTP-low (5 stages), beside the paper's numbers.
#
#   bash experiments/paper_table1.sh                     # embedded model, ~1.5-2 h on 2 CPU cores (see below)
#   THREADS=1 bash experiments/paper_table1.sh eval.limit=20   # threads for every stage; overrides for every eval run
#   SMOKE=1 THREADS=1 bash experiments/paper_table1.sh   # pipeline check (~2.5 min): 2 samples, a 2-step SDTP-low, scratch folders
#   LB_ARGS="eval.datasets=[multi_news,hotpotqa] eval.data_files.hotpotqa=/data/hotpotqa.jsonl" bash experiments/paper_table1.sh
#   MODEL=mistral-7b-instruct-v0.2 LB_ARGS="eval.limit=null eval.max_new_tokens=null" bash experiments/paper_table1.sh   # GPU
#
# Steps, each skipped when already done (an interrupted run resumes; finished runs are reused only when
# their fingerprint matches, sdtp/provenance.py):
# 1. SDTP-low's predictor: if $LOW_PREDICTOR (results/predictors/<model>-low) holds none, sdtp-train with
#    pruning=sdtp_low (conf/pruning/sdtp_low.yaml: 5 stages) and the v3 recipe
#    (results/predictors/smollm2-135m-v3/README.md), TRAIN_STEPS (480) steps, resuming from the checkpoint in
#    $RUN/train_low if one is there. Then the same with seed=<n> for each n in LOW_SEEDS ("1 2"; "" for none) into
#    $LOW_PREDICTOR/seed<n> (checkpoints in $RUN/train_low_seed<n>).
# 2. sdtp-eval, one run per row and eval, in stable run directories $RUN/<eval>/<row>: LongBench
#    (conf/experiment/paper_table1.yaml; LB_ARGS adds overrides) and the synthetic passage tasks in SYNTHETIC
#    (paper_table1_synthetic.yaml; SYN_ARGS). Rows: dense, sdtp (the shipped predictor), sdtp_low (with the
#    shipped predictor's prior weights) and llmlingua2 (compression=llmlingua2 at SDTP's tokens per
#    layer, LLMLINGUA_MODEL): skipped, and said so on the page, when the compressor cannot be loaded here.
#    Then sdtp@<seed> with each other training seed of the shipped predictor (results/predictors/<model>/seeds.txt,
#    or SEED_PREDICTORS="<folder> ..."; SEED_PREDICTORS="" for none) and sdtp_low@seed<n> with each SDTP-low seed:
#    each row's scores are the mean over its seeds.
#    A fresh clone resumes from the committed page: results/paper/table1/<model>.json holds every run's
#    summary, restored first when made with the same setup (sdtp/reports/run_summary.py).
# 3. sdtp-bench for sdtp and sdtp_low (paper_table1_bench.yaml; BENCH_ARGS) in $RUN/bench_<row>; the
#    committed page's reports are copied in first and finished lengths reused.
# 4. sdtp/reports/paper_table1.py renders $OUT/<model>.{md,csv,png,json}; a page built from less data than
#    the one in $OUT goes to results/paper/table1_smoke/ (gitignored) instead (REPLACE=1 overwrites).
# THREADS=n passes threads=n to every stage; TRAIN_ARGS adds sdtp-train overrides.
# Time on smollm2-135m, 2 threads (measured): SDTP-low's training ~45 min per seed (3 seeds), LongBench ~12 min per
# run (dense, sdtp and sdtp_low, each pruned row once per seed: 7 runs), passage tasks ~0.5 min per run, bench ~7 min.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/lm_eval_runs.sh
shown="$(shown_with_env experiments/paper_table1.sh \
  "LB_ARGS SYN_ARGS BENCH_ARGS TRAIN_ARGS TRAIN_STEPS SYNTHETIC THREADS LLMLINGUA_MODEL LOW_PREDICTOR LOW_SEEDS \
  SEED_PREDICTORS SMOKE" "$@")"
if [[ "${SMOKE:-0}" == 1 ]]; then   # every size tiny, every output in a scratch folder (nothing to commit)
  RUN="${RUN:-results/runs/paper/table1_smoke/${MODEL}}"
  OUT="${OUT:-results/paper/table1_smoke}"
  LOW_PREDICTOR="${LOW_PREDICTOR:-$RUN/predictor_low}"
  TRAIN_STEPS="${TRAIN_STEPS:-2}"
  TRAIN_ARGS="${TRAIN_ARGS:-$SMOKE_TRAIN_ARGS}"
  LB_ARGS="${LB_ARGS:-eval.limit=2 eval.max_length=1024 eval.max_new_tokens=8}"
  SYN_ARGS="${SYN_ARGS:-eval.lengths=[512] eval.num_samples=1 eval.max_new_tokens=8}"
  BENCH_ARGS="${BENCH_ARGS:-lengths=[512] repeats=1 warmup=0 new_tokens=4}"
  SYNTHETIC="${SYNTHETIC-passage_count}"
  SEED_PREDICTORS="${SEED_PREDICTORS-}"   # the shipped predictor alone
  LOW_SEEDS="${LOW_SEEDS-}"               # SDTP-low's one predictor alone
fi
RUN="${RUN:-results/runs/paper/table1/${MODEL}}"
OUT="${OUT:-results/paper/table1}"
COMMITTED="results/paper/table1/${MODEL}.json"
LOW_PREDICTOR="${LOW_PREDICTOR:-results/predictors/${MODEL}-low}"
TRAIN_STEPS="${TRAIN_STEPS:-480}"
LOW_SEEDS="${LOW_SEEDS-1 2}"
SYNTHETIC="${SYNTHETIC-passage_retrieval passage_count}"
# SDTP-low blends the shipped predictor's priors (step 2): without one, stop now, not after training SDTP-low.
[[ -f "results/predictors/${MODEL}/predictor.json" ]] ||
  { echo "results/predictors/${MODEL}/predictor.json: no shipped predictor for MODEL=${MODEL} (the SDTP row and" \
      "SDTP-low's priors need one; train it with sdtp-train export_dir=results/predictors/${MODEL})" >&2; exit 2; }
LLMLINGUA_MODEL="${LLMLINGUA_MODEL:-microsoft/llmlingua-2-xlm-roberta-large-meetingbank}"
read -r -a lb_args <<< "${LB_ARGS:-}"
read -r -a syn_args <<< "${SYN_ARGS:-}"
read -r -a bench_args <<< "${BENCH_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
threads=(${THREADS:+"threads=$THREADS"})
start=$(date +%s)
load_seed_predictors   # the other training seeds' predictors (seed_dirs), checked before any run

# Row -> its sdtp-eval overrides (steps 2 and 3).
# SDTP-low blends the shipped predictor's priors (every <prior>_weight in its predictor.json; the chat weight, when
# null, is the raw-text one, as the scorer reads it), selected for that predictor.
prior=$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
for k in [k for k in m if k.endswith("_weight")]:
    chat = m.get(k + "_chat"); print("pruning.scorer.%s=%s pruning.scorer.%s_chat=%s" % (k, m[k], k, m[k] if chat is None else chat), end=" ")' \
  "results/predictors/${MODEL}/predictor.json")
tau=$("$PY" -m sdtp.reports.paper_table1 tau --model "$MODEL")
declare -A row_args=(
  [dense]="pruning=none"
  [sdtp]="pruning=sdtp"
  [sdtp_low]="pruning=sdtp_low pruning.scorer.path=$LOW_PREDICTOR $prior"
  [llmlingua2]="pruning=none compression=llmlingua2 compression.rate=$tau compression.model=$LLMLINGUA_MODEL"
)
evals=(longbench ${SYNTHETIC})
overrides() {   # overrides EVAL ROW: the sdtp-eval overrides of one run
  local -a own
  read -r -a own <<< "${row_args[$2]}"
  if [[ "$1" == longbench ]]; then echo experiment=paper_table1 "model=$MODEL" "${lb_args[@]}" "${own[@]}"
  else echo experiment=paper_table1_synthetic "eval=$1" "model=$MODEL" "${syn_args[@]}" "${own[@]}"; fi
}
bench_overrides() {   # bench_overrides ROW: the sdtp-bench overrides of one row (step 3)
  local -a own
  read -r -a own <<< "${row_args[$1]}"
  echo experiment=paper_table1_bench "model=$MODEL" "${own[@]}" "${bench_args[@]}" "${threads[@]}"
}

# Step 1's sdtp-train command (the v3 recipe on the 5-stage schedule: below).
train_overrides() {   # train_overrides FOLDER RUN_DIR [OVERRIDE...]: set `train` to the sdtp-train overrides
  train=(pruning=sdtp_low "model=$MODEL" train.target=attention train.loss.ce=0 "train.max_steps=$TRAIN_STEPS"
         train.grad_accum=3 data.sources.0.num_samples=800 data.sources.1.num_samples=500
         data.sources.2.num_samples=150 "${train_args[@]}" "${@:3}" "out_dir=$2" "export_dir=$1")
}

# Every step's commands checked now (sdtp/cli/check.py), not when the step comes: a typo in LB_ARGS, SYN_ARGS or
# BENCH_ARGS would otherwise fail after the hours of training in step 1. SDTP-low's predictor may be step 1's to make.
check=(--will-exist "$LOW_PREDICTOR")
train_overrides "$LOW_PREDICTOR" "$RUN/train_low"
check+=(train "${train[@]}" resume=true "${threads[@]}")
for ev in "${evals[@]}"; do
  for row in dense sdtp sdtp_low llmlingua2; do   # the seed rows differ from these by a checked folder only
    read -r -a args <<< "$(overrides "$ev" "$row")"
    check+=(--- eval "${args[@]}" "$@" "${threads[@]}")
  done
done
read -r -a args <<< "$(bench_overrides sdtp_low)"
check_commands "${check[@]}" --- bench "${args[@]}"

# 1. SDTP-low's predictors (the v3 command, results/predictors/smollm2-135m-v3/README.md, on the 5-stage schedule):
# the one in $LOW_PREDICTOR, then one per training seed in LOW_SEEDS, in $LOW_PREDICTOR/seed<n>.
train_low() {   # train_low FOLDER RUN_DIR [OVERRIDE...]: train SDTP-low's predictor into FOLDER unless it holds one
  local dir="$1" run="$2" recorded
  local -a train
  train_overrides "$@"
  if [[ -f "$dir/predictor.json" ]]; then
    # Kept only if this command made it: other TRAIN_STEPS / TRAIN_ARGS must not be stated for an older predictor.
    recorded=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("command", ""))' \
      "$dir/train_metrics.json" 2>/dev/null || true)
    [[ -z "$recorded" || "$recorded" == "sdtp-train ${train[*]}" ]] || {
      echo "$dir holds a predictor trained by: $recorded" >&2
      echo "this run would train it by:   sdtp-train ${train[*]}" >&2
      echo "(point LOW_PREDICTOR at another folder, or delete that one)" >&2; exit 2; }
    return 0
  fi
  "$PY" -m sdtp.cli.train "${train[@]}" resume=true "${threads[@]}"
  "$PY" -m sdtp.reports.paper_table1 record-training --run "$run" --predictor "$dir" \
    --train-command "sdtp-train ${train[*]}"
}
train_low "$LOW_PREDICTOR" "$RUN/train_low"
low_seed_dirs=()   # SDTP-low's other training seeds, as seed_predictors lists the shipped predictor's
for seed in $LOW_SEEDS; do
  low_seed_dirs+=("$LOW_PREDICTOR/seed$seed")
  train_low "$LOW_PREDICTOR/seed$seed" "$RUN/train_low_seed$seed" "seed=$seed"
done

# 2. The eval runs (each row's overrides: above).
skipped=()
lingua_missing=$("$PY" -m sdtp.eval.prompt_compression check "$LLMLINGUA_MODEL") && lingua_missing=""
for row in dense sdtp sdtp_low llmlingua2; do   # one after the other: on a small machine two runs only slow each other
  for ev in "${evals[@]}"; do
    read -r -a args <<< "$(overrides "$ev" "$row")"
    args+=("$@" "${threads[@]}")
    if [[ "$row" != llmlingua2 || -z "$lingua_missing" ]]; then
      restored_run "$COMMITTED" "$ev/$row" "$RUN/$ev/$row" "${args[@]}"
    else   # the compressor cannot run here: only a committed run of the same setup stands in for it
      [[ ! -f "$COMMITTED" ]] || "$PY" -m sdtp.reports.run_summary restore --page "$COMMITTED" --name "$ev/$row" \
        --run "$RUN/$ev/$row" -- "${args[@]}"
    fi
  done
done
# SDTP with the shipped predictor's other training seeds (seed_predictors) and SDTP-low with its own (LOW_SEEDS): the
# page shows each row's mean over its seeds.
seed_row() {   # seed_row ROW ROW_OVERRIDES [OVERRIDE...]: every eval of one more training seed of a row
  local row="$1" ev
  row_args[$row]="$2"
  shift 2
  for ev in "${evals[@]}"; do
    read -r -a args <<< "$(overrides "$ev" "$row")"
    restored_run "$COMMITTED" "$ev/$row" "$RUN/$ev/$row" "${args[@]}" "$@" "${threads[@]}"
  done
}
for dir in "${seed_dirs[@]}"; do seed_row "sdtp@$(basename "$dir")" "pruning=sdtp pruning.scorer.path=$dir" "$@"; done
for dir in "${low_seed_dirs[@]}"; do
  seed_row "sdtp_low@$(basename "$dir")" "pruning=sdtp_low pruning.scorer.path=$dir $prior" "$@"
done
[[ -z "$lingua_missing" ]] || skipped=(--skipped "llmlingua2=$LLMLINGUA_MODEL could not be loaded ($lingua_missing).")

# 3. Speed: sdtp-bench, dense vs each pruned row interleaved.
for row in sdtp sdtp_low; do
  [[ ! -f "$COMMITTED" ]] || "$PY" -m sdtp.reports.run_summary restore-bench --page "$COMMITTED" --name "$row" \
    --run "$RUN/bench_$row"
  read -r -a args <<< "$(bench_overrides "$row")"
  "$PY" -m sdtp.cli.bench "${args[@]}" "hydra.run.dir=$RUN/bench_$row" | tail -1
done

# 4. The page.
replace=()
[[ "${REPLACE:-0}" != 1 ]] || replace=(--replace)
"$PY" -m sdtp.reports.paper_table1 render --runs "$RUN" --low-predictor "$LOW_PREDICTOR" "${skipped[@]}" "${replace[@]}" \
  --out "$OUT" --smaller-out results/paper/table1_smoke --command "$shown" --wall-s "$(( $(date +%s) - start ))"
