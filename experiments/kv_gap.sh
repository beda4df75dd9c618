#!/usr/bin/env bash
# Why SDTP trails H2O on multi_news at equal KV memory: results/compare/kv_gap/eval.{md,json} (docs/results.md,
# "Where SDTP's multi_news gap comes from"), on the continuation protocol of the predictor page.
#
#   bash experiments/kv_gap.sh --render-only   # re-render the committed page from its cells (~1 min)
#   bash experiments/kv_gap.sh --threads 2     # compute every missing cell, then render (hours on CPU)
#   bash experiments/kv_gap.sh --threads 2 --contexts 2048 --only sdtp_refill   # one row, then --render-only
#
# Rows: the predictor page's scorers (dense, random seed 0, norm, positional, lazyllm, lexical, the shipped SDTP
# predictor; cells copied from it), H2O and SnapKV (from results/compare/kv_continuation), each layer's cache cut to
# the default schedule's share of tokens per layer (SmolLM2: 0.63); then, at that KV memory:
# - refilled rows <scorer>_refill (+pruning.refill=true, sdtp/eval/refill.py): the scorer's pruned prefill picks
#   each layer's tokens, a dense prefill fills their keys/values (the pruned cache without what pruning during
#   prefill loses);
# - H2O one step at a time towards a token pruner: h2o_schedule (each layer cut to the schedule's share for it,
#   kv.layer_ratios; snapkv_schedule the same for SnapKV), h2o_tokens_schedule (also one token set per layer for
#   all KV heads, kv.per_head=false), h2o_nested_schedule (also each layer within what the layer before kept,
#   kv.nested=true: the constraint physical pruning works under);
# - lazyllm_all: H2O's statistic as a token pruner, the attention every alive prompt query pays each token at the
#   layer before a stage;
# - nesting ablations at the same tokens per layer: sdtp_revive and random_revive (+pruning.revive=true,
#   sdtp/engine/revival.py: every stage chooses among all prompt tokens, re-admitting dropped ones with the state
#   they were dropped with; random_revive_refill also refilled, so without stale states), sdtp_merge
#   (+pruning.merge_weight=1, sdtp/engine/merging.py: each dropped token's state averaged into the next kept
#   token's). How far from nested the reviving rows are (revived.json; prefills only, 3 min at 2K):
#   PYTHONPATH=. python experiments/lib/revived_share.py results/compare/kv_gap/revived.json --contexts 2048
# Cells are reused when their fingerprint matches (sdtp/reports/predictor_eval.py); missing cells are computed
# (refilled rows 1.5 min per set at 2K, H2O rows 2.5-3 min at 2K and 6 min at 4K on 2 CPU cores).
# Extra arguments go to scripts/predictor_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
PY="${PYTHON:-.venv/bin/python}"
PAGE="results/compare/kv_gap"
PRED="results/predictors/${MODEL}"
source experiments/lib/kv_pages.sh
copy_cells "$PRED" dense random_s0 norm positional lazyllm lexical sdtp
copy_cells results/compare/kv_continuation h2o snapkv
schedule_shares   # share and layers
rows=(--predictor "sdtp=$PRED" --predictor "sdtp_refill=$PRED" --row-override "sdtp_refill=+pruning.refill=true")
for method in positional lexical random; do
  rows+=(--scorer "${method}_refill=$method" --row-override "${method}_refill=+pruning.refill=true")
done
rows+=(--scorer lazyllm_all=lazyllm --row-override lazyllm_all=pruning.scorer.num_queries=1000000)
rows+=(--predictor "sdtp_revive=$PRED" --row-override "sdtp_revive=+pruning.revive=true"
       --scorer random_revive=random --row-override "random_revive=+pruning.revive=true"
       --scorer random_revive_refill=random --row-override "random_revive_refill=+pruning.revive=true"
       --row-override "random_revive_refill=+pruning.refill=true"
       --predictor "sdtp_merge=$PRED" --row-override "sdtp_merge=+pruning.merge_weight=1")
rows+=(--kv h2o=h2o --kv snapkv=snapkv --kv-ratio "$share")
for method in h2o snapkv; do   # the same KV memory, laid out across layers as the pruning schedule does
  rows+=(--kv "${method}_schedule=$method" --row-override "${method}_schedule=+kv.layer_ratios=$layers")
done
for name in tokens nested; do   # H2O as token-level eviction, per layer or nested across layers
  row="h2o_${name}_schedule"
  rows+=(--kv "$row=h2o" --row-override "$row=+kv.layer_ratios=$layers" --row-override "$row=+kv.per_head=false")
done
rows+=(--row-override h2o_nested_schedule=+kv.nested=true)
"$PY" scripts/predictor_report.py --model "$MODEL" --datasets wikitext,c4,multi_news,passage_qa --contexts 2048,4096 \
  --random-seeds 0 "${rows[@]}" --out "$PAGE" "$@"   # later options win
