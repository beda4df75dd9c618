#!/usr/bin/env bash
# Schedule search (issue 12, item 2): an Optuna NSGA-II study over first layer, layer step, stages and keep ratio,
# minimising continuation NLL (WikiText-2 validation) and analytic prefill FLOPs; the Pareto front with the paper's
# schedule marked on it. Settings: conf/experiment/schedule_search.yaml; why: docs/results.md, "Schedule search".
#
#   bash experiments/schedule_search.sh                      # N_TRIALS=36 trials (resumes a killed search)
#   N_TRIALS=60 bash experiments/schedule_search.sh          # more trials: adds to the same study
#   PRUNING=oracle bash experiments/schedule_search.sh       # gradient x input oracle scorer (~3x the time per trial)
#     (a PRUNING with explicit stage layers, gemfilter or fastkv, is refused before any run: no trial could vary them)
#   SMOKE=1 THREADS=1 bash experiments/schedule_search.sh    # pipeline check: 4 trials of 2 short segments, scratch folders
#   MODEL=llama2-7b bash experiments/schedule_search.sh eval.num_segments=64 eval.context_len=4096   # GPU
#
# 1. The dense model and the paper's schedule (r = 0.9 and the model's default layers: smollm2-135m 10 stages before
#    layers 2, 5, ..., 29) with the same settings, in $RUN/dense and $RUN/paper.
# 2. `sdtp-eval -m experiment=schedule_search` with the study stored in $RUN/optuna.db: a killed search resumes (the
#    trials still missing from N_TRIALS run; trials drawing an already evaluated schedule reuse its run directory).
#    The sampler's seed is the search's (0, or an argument hydra.sweeper.sampler.seed=S) plus the trials the study
#    already holds: a resumed sampler seeded as the killed one would redraw the schedules that one drew.
#    Trials whose schedule does not fit the model fail at composition and are counted, not run.
# 3. sdtp/reports/schedule_search.py renders $OUT/<model>.{md,csv,png,json} from the run directories.
# Time on smollm2-135m, 2 threads (estimated, not measured): ~10 s per 2K segment dense + pruned -> ~2-3 s per pruned
# 1K + 64 segment, 8 segments + model load and tokenisation ~25-30 s per trial; 36 trials (~30 valid) + dense + paper
# ~18-22 min.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
source experiments/lib/lm_eval_runs.sh
shown="$(shown_with_env experiments/schedule_search.sh "N_TRIALS PRUNING POPULATION EVAL_ARGS THREADS SMOKE" "$@")"
# One run directory (study, sweep, fixed points) per setup: a study must not gather trials of other settings.
setup_tag=$(printf '%s|' "${PRUNING:-}" "${EVAL_ARGS:-}" "${SMOKE:-0}" "$@" | sha256sum | cut -c1-10)
if [[ "${SMOKE:-0}" == 1 ]]; then   # every size tiny, every output in a scratch folder (nothing to commit)
  RUN="${RUN:-results/runs/paper/schedule_search_smoke/${MODEL}/${setup_tag}}"
  OUT="${OUT:-results/paper/schedule_search_smoke}"
  N_TRIALS="${N_TRIALS:-4}"
  POPULATION="${POPULATION:-2}"
  EVAL_ARGS="${EVAL_ARGS:-eval.num_segments=2 eval.context_len=256 eval.cont_len=16}"
fi
RUN="${RUN:-results/runs/paper/schedule_search/${MODEL}/${setup_tag}}"
OUT="${OUT:-results/paper/schedule_search}"
N_TRIALS="${N_TRIALS:-36}"
THREADS="${THREADS:-2}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
# optuna 2.10 uses SQLAlchemy 1.4 APIs that 2.0 removed (pyproject pins sqlalchemy<2); silence 1.4's notice about it.
export SQLALCHEMY_SILENCE_UBER_WARNING=1
common=(experiment=schedule_search "model=$MODEL" "threads=$THREADS" ${PRUNING:+"pruning=$PRUNING"} "${eval_args[@]}" "$@")
start=$(date +%s)
mkdir -p "$RUN"
STUDY="sqlite:///$(realpath "$RUN")/optuna.db"   # an absolute path: sqlite:/// + /abs/path

# Both fixed points' commands checked before either runs (sdtp/cli/check.py): e.g. PRUNING=gemfilter|fastkv, whose
# explicit stage layers no trial could vary, stops here (the sweep itself refuses them before its first trial too).
check_commands eval "${common[@]}" pruning=none --- eval "${common[@]}"

# Fixed points with the search's settings (each skipped when its run directory holds a finished run of this setup).
"$PY" -m sdtp.cli.evaluate "${common[@]}" pruning=none "hydra.run.dir=$RUN/dense"
"$PY" -m sdtp.cli.evaluate "${common[@]}" "hydra.run.dir=$RUN/paper"   # the model's default schedule, r = 0.9

left=$("$PY" -m sdtp.reports.schedule_search remaining --study "$STUDY" --trials "$N_TRIALS")
if (( left > 0 )); then
  base_seed=""   # the config's, unless an argument sets it (the last one, as Hydra takes it)
  for arg in "$@"; do [[ "$arg" != hydra.sweeper.sampler.seed=* ]] || base_seed="${arg#*=}"; done
  seed=$("$PY" -m sdtp.reports.schedule_search sampler-seed --study "$STUDY" ${base_seed:+--base "$base_seed"})
  "$PY" -m sdtp.cli.evaluate -m "${common[@]}" "hydra.sweep.dir=$RUN/sweep" "hydra.sweeper.storage=$STUDY" \
    "hydra.sweeper.n_trials=$left" ${POPULATION:+"hydra.sweeper.sampler.population_size=$POPULATION"} \
    "hydra.sweeper.sampler.seed=$seed"
else
  echo "schedule_search: the study in $RUN/optuna.db has its $N_TRIALS trials"
fi

"$PY" -m sdtp.reports.schedule_search render --sweep "$RUN/sweep" --paper "$RUN/paper" --dense "$RUN/dense" \
  --study "$STUDY" --model "$MODEL" --out "$OUT" --command "$shown" --wall-s "$(( $(date +%s) - start ))"
