#!/usr/bin/env bash
# Paper Table 6: accuracy on four 5-shot lm-eval tasks (COPA, PIQA, WinoGrande, MathQA) with the KV cache
# compressed to 40% after prefill: Local (StreamingLLM-style, kv=streaming), H2O (kv=h2o), each alone and
# with SDTP, beside dense and SDTP alone (Table 3's runs), with paired intervals over the same documents.
#
#   bash experiments/paper_table6.sh threads=1                         # embedded model (~60 min on 2 CPU cores)
#   MODEL=mistral-7b-instruct-v0.2 bash experiments/paper_table6.sh   # GPU (needs results/predictors/<model>)
#
# Dense and SDTP alone come from the Table 3 page (results/paper/table3/<model>.json): experiments/paper_table3.sh
# runs first with the same overrides (restoring its committed runs when they match, so usually in seconds). Four
# sdtp-eval runs (conf/experiment/paper_table6.yaml), one after the other, in stable run directories under
# results/runs/paper/table6/<model>/<name>: a finished run with the same fingerprint is skipped. A fresh
# clone resumes from the committed page: results/paper/table6/<model>.json holds the four runs' summaries
# (metrics, fingerprint, per-document correctness), restored into the run directories first when they were
# made with the same setup (sdtp/reports/run_summary.py). With other training seeds of the predictor
# (results/predictors/<model>/seeds.txt or SEED_PREDICTORS, as in paper_table3.sh) both SDTP + KV runs are repeated with
# each, as <name>@<seed>. Then sdtp/reports/paper_table6.py renders
# results/paper/table6/<model>.{md,csv,png,json} with the paper's numbers beside ours.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
RUN="results/runs/paper/table6/${MODEL}"
PAGE="results/paper/table6/${MODEL}"
TABLE3="results/paper/table3/${MODEL}.json"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/lm_eval_runs.sh
start=$(date +%s)
load_seed_predictors   # the other training seeds' predictors (seed_dirs), checked before any run
# Dense and SDTP alone: Table 3's runs, restored when made with this setup and recomputed when not (e.g. after a task
# YAML changed), so the page below never pairs with a stale Table 3 (its render would refuse, after the KV runs).
bash experiments/paper_table3.sh "$@"
# name:pruning:kv, in the paper's column order, then SDTP with Local (not in the paper).
for run in local:none:streaming h2o:none:h2o sdtp_h2o:sdtp:h2o sdtp_local:sdtp:streaming; do
  IFS=: read -r name pruning kv <<< "$run"
  overrides=(experiment=paper_table6 "model=${MODEL}" "pruning=${pruning}" "kv=${kv}" "$@")
  restored_run "$PAGE.json" "$name" "$RUN/$name" "${overrides[@]}"
done
seeds=()   # SDTP + KV with the predictor's other training seeds (seed_predictors), as Table 3's SDTP column
for dir in "${seed_dirs[@]}"; do
  for run in sdtp_h2o:h2o sdtp_local:streaming; do
    name="${run%%:*}@$(basename "$dir")"
    restored_run "$PAGE.json" "$name" "$RUN/$name" experiment=paper_table6 "model=${MODEL}" pruning=sdtp \
      "kv=${run##*:}" "pruning.scorer.path=$dir" "$@"
    seeds+=(--run "$name=$RUN/$name")
  done
done
shown="$(shown_command experiments/paper_table6.sh "$@")"
replace=()   # REPLACE=1: overwrite the committed page even if it rests on more documents or seeds
[[ "${REPLACE:-0}" != 1 ]] || replace=(--replace)
"$PY" -m sdtp.reports.paper_table6 --table3 "$TABLE3" --run "local=$RUN/local" --run "h2o=$RUN/h2o" \
  --run "sdtp_h2o=$RUN/sdtp_h2o" --run "sdtp_local=$RUN/sdtp_local" "${seeds[@]}" "${replace[@]}" \
  --out "$(dirname "$PAGE")" --smaller-out results/paper/table6_smoke --command "$shown" \
  --wall-s "$(( $(date +%s) - start ))"
