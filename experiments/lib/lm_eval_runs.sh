# Sourced by the paper scripts over sdtp-eval runs (experiments/paper_table1.sh, paper_table3.sh, paper_table6.sh;
# paper_table45.sh, paper_fig4.sh, paper_fig5.sh through experiments/lib/ablation_points.sh), after they set PY (the
# Python to use) and MODEL: offline environment, allocator settings and the one resumable run step they share (lm-eval
# and generation runs alike).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
# Same allocator settings as `make demo` and sdtp-bench (dense prefills otherwise page-fault for seconds).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}" \
  MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-68719476736}" MALLOC_TOP_PAD_="${MALLOC_TOP_PAD_:-1073741824}"

# SMOKE=true / yes / on mean SMOKE=1 (a full run must not start, into the committed folders, on a spelling).
case "${SMOKE:-0}" in
  1|true|yes|on) SMOKE=1 ;;
  0|false|no|off|"") SMOKE=0 ;;
  *) echo "SMOKE: '$SMOKE' is not 1 or 0 (true/false, yes/no, on/off)" >&2; exit 2 ;;
esac

# sdtp-train overrides of a SMOKE=1 pipeline check: a handful of short examples, one per step (paper_table1.sh and
# the ablations of experiments/lib/ablation_points.sh).
SMOKE_TRAIN_ARGS="data.sources.0.num_samples=6 data.sources.1.num_samples=3 data.sources.2.num_samples=3 \
data.max_length=320 data.continuation_length=64 train.val_sequences=2 train.grad_accum=1"

# restored_run PAGE_JSON NAME RUN_DIR OVERRIDE...: restore run NAME's summary from the committed page into
# RUN_DIR when it was made with the same setup (sdtp/reports/run_summary.py), then run sdtp-eval there,
# which skips a finished run with the same fingerprint.
restored_run() {
  local page="$1" name="$2" dir="$3"
  shift 3
  [[ ! -f "$page" ]] || "$PY" -m sdtp.reports.run_summary restore --page "$page" --name "$name" --run "$dir" -- "$@"
  "$PY" -m sdtp.cli.evaluate "$@" "hydra.run.dir=$dir"
}

# shown_command SCRIPT ARG...: the command line a page states it was made by.
shown_command() {
  local script="$1"
  shift
  local shown="bash $script${*:+ $*}"
  [[ "$MODEL" == smollm2-135m ]] || shown="MODEL=$MODEL $shown"
  echo "$shown"
}

# shown_with_env SCRIPT "VAR..." ARG...: shown_command prefixed with those of the VARs that are set (the environment
# that made the page, on the page).
shown_with_env() {
  local script="$1" vars="$2" var shown
  shift 2
  shown="$(shown_command "$script" "$@")"
  for var in $vars; do
    [[ -z "${!var+x}" ]] || shown="$var=${!var@Q} $shown"
  done
  echo "$shown"
}

# seed_predictors: the predictor folders of the shipped predictor's other training seeds (same recipe, another seed),
# one per line: $SEED_PREDICTORS if set (space-separated; SEED_PREDICTORS="" runs the shipped predictor alone), else
# the lines of results/predictors/$MODEL/seeds.txt (none there: the shipped predictor alone). A page row with SDTP
# then also runs with each, as <row>@<folder name>, and shows their per-document mean (sdtp/reports/seed_runs.py).
seed_predictors() {
  local listed="results/predictors/${MODEL}/seeds.txt"
  if [[ -n "${SEED_PREDICTORS+x}" ]]; then
    [[ -z "$SEED_PREDICTORS" ]] || printf '%s\n' $SEED_PREDICTORS
  elif [[ -f "$listed" ]]; then
    grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$listed" || true
  fi
}

# load_seed_predictors: seed_predictors into the array seed_dirs, each folder checked to hold a predictor, so a typo
# fails before the first run rather than after the main ones (not in a process substitution: its exit is lost).
load_seed_predictors() {
  mapfile -t seed_dirs < <(seed_predictors)
  local dir
  for dir in "${seed_dirs[@]}"; do
    [[ -f "$dir/predictor.json" ]] || { echo "SEED_PREDICTORS / seeds.txt: $dir holds no predictor.json" >&2; exit 1; }
  done
}

# check_commands [--will-exist PATH]... ENTRY OVERRIDE... [--- ENTRY OVERRIDE...]...: compose and validate every
# command a script will run (sdtp/cli/check.py: no model loads), before its first step, so that a bad variable for a
# late step fails in seconds rather than after the hours of the steps before it. --will-exist PATH: a predictor folder
# an earlier step creates. Exits the script (set -e) with one line naming the failing command.
check_commands() {
  "$PY" -m sdtp.cli.check "$@"
}
