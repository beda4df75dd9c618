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
# H2O, SnapKV and StreamingLLM on the dense prefill, each layer's cache cut to the share of tokens per layer the
# model's default schedule leaves (SmolLM2: 0.63); and hybrids sdtp<r>_h2o: SDTP with the milder per-stage keep
# ratio 0.<r>, then H2O cutting what the pruned prefill left to the same share: kv.ratio = that share / the milder
# schedule's (SmolLM2: 0.63 / 0.720, 0.789 and 0.867 for r = 93, 95, 97). Cells are reused when their
# fingerprint matches (sdtp/reports/predictor_eval.py), so a fresh clone re-renders; missing cells are computed
# (H2O: 2-4 min per set at 2K, 7-14 min at 4K on 2 CPU cores). Extra arguments go to scripts/predictor_report.py.
# Why SDTP trails H2O on multi_news: experiments/kv_gap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
PAGE="results/compare/kv_continuation"
PRED="results/predictors/${MODEL}"
source experiments/lib/kv_pages.sh
copy_cells "$PRED" dense 'random_s*' norm positional lazyllm lexical sdtp
KEEPS=(93 95 97)
schedule_shares "${KEEPS[@]}"   # share, ratio93, ratio95, ratio97 (and layers)
hybrid=(--predictor "sdtp=$PRED")
for keep in "${KEEPS[@]}"; do
  ratio="ratio${keep}"
  hybrid+=(--predictor "sdtp${keep}_h2o=$PRED" --row-override "sdtp${keep}_h2o=pruning.keep_ratio=0.${keep}"
           --row-override "sdtp${keep}_h2o=kv=h2o" --row-override "sdtp${keep}_h2o=kv.ratio=${!ratio}")
done
kv=(--kv h2o=h2o --kv snapkv=snapkv --kv streaming=streaming --kv-ratio "$share")
"$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,c4,multi_news,passage_qa \
  --contexts 2048,4096 "${kv[@]}" "${hybrid[@]}" --out "$PAGE" "$@"   # a later --contexts wins (argparse)
