#!/usr/bin/env bash
# Token pruning against KV-cache policies at equal KV memory, on the predictor page's continuation protocol:
# results/compare/kv_continuation/eval.{md,json} (docs/results.md).
#
#   bash experiments/kv_continuation.sh --render-only   # re-render the committed page from its cells (~1 min)
#   bash experiments/kv_continuation.sh --threads 2     # compute every missing cell, then render (hours on CPU)
#   bash experiments/kv_continuation.sh --threads 2 --contexts 2048 --only sdtp95_h2o   # one row, then --render-only
#
# Rows: the predictor page's scorers (dense, random, norm, positional, lazyllm, lexical, the shipped SDTP
# predictor), whose cells are copied from results/predictors/<model>/continuation when the page has none;
# H2O, SnapKV and StreamingLLM on the dense prefill, each layer's cache cut to 63% (= the tokens per layer the
# default schedule leaves); and hybrids sdtp<r>_h2o: SDTP with the milder per-stage keep ratio 0.<r>, then
# H2O cutting what the pruned prefill left to the same 63%: kv.ratio = 0.63 / the schedule's tokens per layer
# (0.720, 0.789 and 0.867 for r = 93, 95, 97, from sdtp.config.build_schedule). Cells are reused when their
# fingerprint matches (sdtp/reports/predictor_eval.py), so a fresh clone re-renders; missing cells are computed
# (H2O: 2-4 min per set at 2K, 7-14 min at 4K on 2 CPU cores). Extra arguments go to scripts/predictor_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
PAGE="results/compare/kv_continuation"
PRED="results/predictors/${MODEL}"
mkdir -p "$PAGE/continuation"
for cell in "$PRED"/continuation/*/; do   # the baseline cells: reused only where their fingerprint matches
  name="$(basename "$cell")"
  mkdir -p "$PAGE/continuation/$name"
  cp -n "$cell"/{dense,random_s*,norm,positional,lazyllm,lexical,sdtp}.json "$PAGE/continuation/$name/" \
    2>/dev/null || true   # a cell the predictor page lacks is computed below
done
hybrid=(--predictor "sdtp=$PRED")
for point in 93:0.874 95:0.798 97:0.727; do
  IFS=: read -r keep ratio <<< "$point"
  hybrid+=(--predictor "sdtp${keep}_h2o=$PRED" --row-override "sdtp${keep}_h2o=pruning.keep_ratio=0.${keep}"
           --row-override "sdtp${keep}_h2o=kv=h2o" --row-override "sdtp${keep}_h2o=kv.ratio=${ratio}")
done
kv=(--kv h2o=h2o --kv snapkv=snapkv --kv streaming=streaming --kv-ratio 0.63)
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,c4,multi_news,passage_qa \
  --contexts 2048,4096 "${kv[@]}" "${hybrid[@]}" --out "$PAGE" "$@"   # a later --contexts wins (argparse)
