#!/usr/bin/env bash
# Side-by-side comparison of token pruners (and KV policies) at the SAME schedule and budgets:
# dense, random, positional, norm, lazyllm, gemfilter, fastkv (equal average tokens per layer) and sdtp,
# on the seven offline lm-eval tasks (with a limit), LongBench multi_news, a needle task and WikiText perplexity,
# plus sdtp-bench prefill timings; then renders results/compare/{compare_methods.md,.csv,.json,.png}
# (scripts/compare_methods.py -> sdtp/reports/compare_methods.py: paired intervals, Holm per eval).
# A smaller (e.g. LIMIT=2 smoke) pass never replaces a committed page built from more documents: it is
# rendered into results/compare_smoke/ (gitignored) instead. OUT=dir renders elsewhere; REPLACE=1 overwrites.
#
#   experiments/compare_methods.sh                    # smollm2-135m, quick limits
#   MODEL=llama2-7b LIMIT=200 experiments/compare_methods.sh
#   STEPS="perplexity table" experiments/compare_methods.sh   # only some steps
#   TASKS=[sdtp_copa,sdtp_boolq] STEPS="lm_eval table" experiments/compare_methods.sh   # other lm-eval tasks
#   RANDOM_SEEDS=0,1,2,3,4 STEPS="lm_eval table" experiments/compare_methods.sh           # more random seeds
#   KV_POLICIES=h2o,keynorm STEPS="kv table" experiments/compare_methods.sh  # conf/kv policies, yours too
#
# The random scorer is run once per seed in RANDOM_SEEDS (pruning.scorer.seed, its own multirun: one run
# directory per seed); the table shows a row per seed and a `random` row whose per-document outcome is
# the mean over the seeds, which is the row paired with the other methods. SDTP likewise runs with the
# shipped predictor and with each of its other training seeds (pruning.scorer.path=<folder>: the lines of
# results/predictors/$MODEL/seeds.txt, or SEED_PREDICTORS="<folder> ..."; SEED_PREDICTORS="" for none), on
# every eval and KV policy: rows sdtp_shipped, sdtp_seed9, ... and their mean `sdtp`, with a section of
# each seed's numbers and a 95% interval over the seeds (sdtp/reports/compare_seeds.py). The benchmark
# times the shipped predictor only (the seeds prune the same number of tokens).
#
# A clean clone needs nothing else: the default .venv is set up first (make setup) when missing.
# Every sdtp-eval run writes metrics.json in its own deterministic run directory and is skipped when it
# exists (re-running resumes the sweep); force=true re-runs. sdtp-bench writes bench.json per job.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
PY="${PYTHON:-${PY:-$BIN/python}}"   # PYTHON as in the other experiment scripts (PY still read)
MODEL=${MODEL:-smollm2-135m}
LIMIT=${LIMIT:-50}                      # lm-eval documents per task
# lm-eval tasks: the seven offline ones (5-shot); TASKS= (empty) uses conf/eval/lm_eval.yaml's list.
TASKS=${TASKS-[sdtp_piqa,sdtp_arc_easy,sdtp_hellaswag,sdtp_boolq,sdtp_winogrande,sdtp_copa,sdtp_lambada_openai]}
LB_LIMIT=${LB_LIMIT:-10}                # LongBench samples
LB_NEW_TOKENS=${LB_NEW_TOKENS:-128}     # cap on multi_news generation (official: 512; CPU budget)
NEEDLE_LENGTHS=${NEEDLE_LENGTHS:-[1024,2048]}
NEEDLE_SAMPLES=${NEEDLE_SAMPLES:-2}     # per (length, depth); 5 depths
PPL_TOKENS=${PPL_TOKENS:-8192}          # WikiText test tokens scored
BENCH_LENGTHS=${BENCH_LENGTHS:-[2048]}
STEPS=${STEPS:-"lm_eval perplexity longbench needle kv bench table"}
for name in $STEPS; do   # a misspelt step would otherwise run nothing and exit 0
  [[ " lm_eval perplexity longbench needle kv bench table " == *" $name "* ]] ||
    { echo "STEPS: unknown step '$name' (lm_eval perplexity longbench needle kv bench table)" >&2; exit 2; }
done
RANDOM_SEEDS=${RANDOM_SEEDS:-0,1,2}     # pruning.scorer.seed values of the random scorer
# Offline environment, allocator settings, seed_predictors.
source experiments/lib/lm_eval_runs.sh
if [ ! -x "$BIN/sdtp-eval" ] && [ "$BIN" = .venv/bin ]; then make setup; fi

# Every training-free scorer, SDTP when a predictor is shipped for $MODEL, and the gradient x input
# oracle (SDTP's teacher: an upper bound, slow: a backward pass per prompt). METHODS=a,b,c overrides.
if [ -z "${METHODS:-}" ]; then
  METHODS="none,random,positional,norm,lazyllm,lexical,gemfilter,fastkv"
  if [ -f "results/predictors/$MODEL/predictor.json" ]; then
    METHODS="$METHODS,sdtp"
  else
    echo "[compare] no trained predictor in results/predictors/$MODEL: sdtp is left out (run sdtp-train first)" >&2
  fi
  METHODS="$METHODS,oracle"
fi
# Benchmarked methods: every pruned one but the oracle (its backward pass is not a deployable cost).
# One random seed is enough there: the seed changes which tokens are kept, not how many.
PRUNED=$(tr "," "\n" <<<"$METHODS" | { grep -v -x -e none -e oracle || true; } | paste -sd, -)
# random runs as a sweep over RANDOM_SEEDS of its own; every other method in one multirun.
SEEDLESS=$(tr "," "\n" <<<"$METHODS" | { grep -v -x random || true; } | paste -sd, -)
WITH_RANDOM=0; if [[ ",$METHODS," == *,random,* ]]; then WITH_RANDOM=1; fi
# SDTP's other training seeds: their predictor folders, comma-separated (one Hydra sweep over them).
SEED_PATHS=""   # checked before any step (load_seed_predictors), then one Hydra sweep over them
if [[ ",$METHODS," == *,sdtp,* ]]; then load_seed_predictors; SEED_PATHS=$(IFS=,; echo "${seed_dirs[*]}"); fi

has_step() { [[ " $STEPS " == *" $1 "* ]]; }
# step <name> <command...>: run the command only if <name> is in $STEPS.
step() { local name=$1; shift; if has_step "$name"; then echo "[compare] $*" >&2; "$@"; fi; }
evaluate() {
  if [ -n "$SEEDLESS" ]; then "$BIN/sdtp-eval" -m model="$MODEL" pruning="$SEEDLESS" "$@"; fi
  if [ "$WITH_RANDOM" = 1 ]; then
    "$BIN/sdtp-eval" -m model="$MODEL" pruning=random pruning.scorer.seed="$RANDOM_SEEDS" "$@"
  fi
  with_seed_predictors "$@"
}
# with_seed_predictors OVERRIDE...: SDTP with each other training seed's predictor (nothing when there is none).
with_seed_predictors() {
  if [ -z "$SEED_PATHS" ]; then return; fi
  "$BIN/sdtp-eval" -m model="$MODEL" pruning=sdtp pruning.scorer.path="$SEED_PATHS" "$@"
}

# Each step's overrides (the methods apart).
LM_EVAL=(eval=lm_eval eval.limit="$LIMIT")
if [ -n "$TASKS" ]; then LM_EVAL+=("eval.tasks=$TASKS"); fi
PERPLEXITY=(eval=perplexity eval.max_tokens="$PPL_TOKENS")
LONGBENCH=(eval=longbench "eval.datasets=[multi_news]" eval.limit="$LB_LIMIT" eval.max_new_tokens="$LB_NEW_TOKENS")
NEEDLE=(eval=needle eval.lengths="$NEEDLE_LENGTHS" eval.num_samples="$NEEDLE_SAMPLES")
# Paper Table 6: KV policies at 40% of the cache, alone and on top of SDTP's pruned prefill (multi_news).
KV_PRUNING="none"; if [[ ",$METHODS," == *,sdtp,* ]]; then KV_PRUNING="none,sdtp"; fi
KV_POLICIES=${KV_POLICIES:-streaming,h2o,snapkv}
KV_ARGS=(kv.ratio="${KV_RATIO:-0.4}" "${LONGBENCH[@]}")
BENCH=(lengths="$BENCH_LENGTHS" new_tokens=16 repeats=3 memory=false)

# Every step's commands checked before the first runs (sdtp/cli/check.py: a bad KV_POLICIES or BENCH_LENGTHS would
# otherwise fail after the hours of the steps before it): each method (random at each seed) once, on the first eval
# step, then one point per other step and per KV policy (the sweeps' other points differ only in the method).
first() { echo "${1%%,*}"; }
seeds=$(tr "," "\n" <<<"$RANDOM_SEEDS" | sed "s/^/random pruning.scorer.seed=/")
methods=$(tr "," "\n" <<<"$METHODS" | while read -r m; do
  if [[ "$m" == random ]]; then echo "$seeds"; else echo "$m"; fi
done)
check=()
for name in lm_eval:LM_EVAL perplexity:PERPLEXITY longbench:LONGBENCH needle:NEEDLE; do
  has_step "${name%%:*}" || continue
  declare -n overrides="${name#*:}"
  while read -r -a method; do
    check+=(--- eval "model=$MODEL" "pruning=${method[0]}" "${method[@]:1}" "${overrides[@]}")
  done <<<"$methods"
  methods=$(first "$METHODS")
  unset -n overrides
done
if has_step kv; then
  for policy in ${KV_POLICIES//,/ }; do
    check+=(--- eval "model=$MODEL" "pruning=${KV_PRUNING##*,}" "kv=$policy" "${KV_ARGS[@]}")
  done
fi
if has_step bench && [ -n "$PRUNED" ]; then
  check+=(--- bench "model=$MODEL" "pruning=$(first "$PRUNED")" "${BENCH[@]}")
fi
if [ ${#check[@]} -gt 0 ]; then check_commands "${check[@]:1}"; fi

step lm_eval    evaluate "${LM_EVAL[@]}"
step perplexity evaluate "${PERPLEXITY[@]}"
step longbench  evaluate "${LONGBENCH[@]}"
step needle     evaluate "${NEEDLE[@]}"
KV=(kv="$KV_POLICIES" "${KV_ARGS[@]}")
step kv "$BIN/sdtp-eval" -m model="$MODEL" pruning="$KV_PRUNING" "${KV[@]}"
step kv with_seed_predictors "${KV[@]}"
# Prefill timing: each bench job times dense and one pruned config side by side (interleaved).
if [ -n "$PRUNED" ]; then step bench "$BIN/sdtp-bench" -m model="$MODEL" pruning="$PRUNED" "${BENCH[@]}"; fi
TABLE=(--root results/multiruns --model "$MODEL" --out "${OUT:-results/compare}" --smaller-out "${SMALLER_OUT:-results/compare_smoke}")
if [ "${REPLACE:-0}" = 1 ]; then TABLE+=(--replace); fi
step table "$PY" scripts/compare_methods.py "${TABLE[@]}"
