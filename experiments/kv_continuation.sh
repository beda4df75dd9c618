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
# schedule's (SmolLM2: 0.63 / 0.720, 0.789 and 0.867 for r = 93, 95, 97); and refilled rows <scorer>_refill
# (sdtp/eval/refill.py): that scorer's pruned prefill picks each layer's tokens, a dense prefill fills their K/V
# (the same KV memory as pruning, without what pruning during prefill loses); and <policy>_schedule rows: H2O and
# SnapKV with each layer's cache cut to the schedule's tokens per layer (kv.layer_ratios), i.e. the pruned
# prefill's cache layout with the policy's per-head choice; h2o_tokens_schedule, the same with one token set
# per layer for all heads (kv.per_head=false), and h2o_nested_schedule, whose layers also keep only what the
# layer before kept (kv.nested=true), as a token pruner must; and lazyllm_all, H2O's statistic as a token pruner:
# the attention every alive prompt query pays each token at the layer before a stage. Cells are reused when their
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
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
KEEPS=(93 95 97)
# Equal KV memory from the model's own schedules: the default's share of tokens per layer (2 decimals), then each
# hybrid's kv.ratio (3 decimals), then the default's share per layer (4 decimals, kv.layer_ratios of the
# <policy>_schedule rows); the printed values are part of the cells' fingerprints.
{ read -r share "${KEEPS[@]/#/ratio}"; read -r layers; } < <("$PY" - "$MODEL" "${KEEPS[@]}" <<'EOF'
import sys
from sdtp.config import build_schedule, compose
model, keeps, length = sys.argv[1], sys.argv[2:], 1_000_000  # long enough that budgets do not round
def per_layer(*overrides: str) -> list[float]:
    cfg = compose("eval", [f"model={model}", "pruning=random", *overrides])
    return [tokens / length for tokens in build_schedule(cfg).tokens_per_layer(length, int(cfg.model.num_layers))]
def share(*overrides: str) -> float:
    layers = per_layer(*overrides)
    return sum(layers) / len(layers)
default = share()
print(f"{default:.2f}", *(f"{default / share(f'pruning.keep_ratio=0.{keep}'):.3f}" for keep in keeps))
print("[" + ",".join(f"{r:.4g}" for r in per_layer()) + "]")
EOF
)
hybrid=(--predictor "sdtp=$PRED")
for keep in "${KEEPS[@]}"; do
  ratio="ratio${keep}"
  hybrid+=(--predictor "sdtp${keep}_h2o=$PRED" --row-override "sdtp${keep}_h2o=pruning.keep_ratio=0.${keep}"
           --row-override "sdtp${keep}_h2o=kv=h2o" --row-override "sdtp${keep}_h2o=kv.ratio=${!ratio}")
done
refill=(--predictor "sdtp_refill=$PRED" --row-override "sdtp_refill=+pruning.refill=true")
for method in positional lexical random; do
  refill+=(--scorer "${method}_refill=$method" --row-override "${method}_refill=+pruning.refill=true")
done
kv=(--kv h2o=h2o --kv snapkv=snapkv --kv streaming=streaming --kv-ratio "$share")
for method in h2o snapkv; do   # the same KV memory, laid out across layers as the pruning schedule does
  kv+=(--kv "${method}_schedule=$method" --row-override "${method}_schedule=+kv.layer_ratios=$layers")
done
for name in tokens nested; do   # H2O as token-level eviction, per layer or nested across layers
  row="h2o_${name}_schedule"
  kv+=(--kv "$row=h2o" --row-override "$row=+kv.layer_ratios=$layers" --row-override "$row=+kv.per_head=false")
done
kv+=(--row-override h2o_nested_schedule=+kv.nested=true)
refill+=(--scorer lazyllm_all=lazyllm --row-override lazyllm_all=pruning.scorer.num_queries=1000000)
"$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,c4,multi_news,passage_qa \
  --contexts 2048,4096 "${kv[@]}" "${hybrid[@]}" "${refill[@]}" --out "$PAGE" "$@"   # later options win
