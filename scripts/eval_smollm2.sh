#!/usr/bin/env bash
# Issue 4 measurements on the embedded model: dense vs random pruning (lm-eval 5-shot, limit 10;
# WikiText-2 perplexity) and the parity run with lm-eval's own `hf` model. Sequential on purpose
# (2 cores). Re-running skips finished runs (metrics.json present). Then: python scripts/eval_report.py --limit N
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-${PY:-.venv/bin/python}}"
LIMIT=${LIMIT:-10}
TASKS=${TASKS:-sdtp_piqa,sdtp_arc_easy,sdtp_hellaswag}
DATA=${SDTP_DATA_DIR:-$PWD/../shared/data}

for pruning in none random; do
  "$PY" -m sdtp.cli.evaluate eval=lm_eval model=smollm2-135m pruning=$pruning "eval.tasks=[$TASKS]" \
    eval.limit=$LIMIT eval.batch_size=4
done

# lm-eval's own HF path on the same weights (the converted cache folder) and the same task files, with
# lm-eval's default seeds (0,1234,1234,1234), which sdtp-eval seed=0 uses too. HF_PARITY=0 skips it.
HF_OUT=results/runs/eval/hf_parity/smollm2-135m/limit=$LIMIT
if [ -d "$HF_OUT" ] && [ "$(cat "$HF_OUT/tasks.txt" 2>/dev/null)" != "$TASKS" ]; then
  rm -rf "$HF_OUT"   # made for another task list (or before the list was recorded): its rows would be missing
fi
if [ "${HF_PARITY:-1}" = 1 ] && [ ! -d "$HF_OUT" ]; then
  # Older converted folders' config.json carried the GGUF quantization_config, which HFLM's from_pretrained
  # rejects; give lm-eval a plain view of the same files (symlinks, config without it).
  CONVERTED="${SDTP_CACHE_DIR:-$HOME/.cache/sdtp}/models/smollm2-135m"
  PLAIN=$(mktemp -d)
  trap 'rm -rf "$PLAIN"' EXIT
  for f in "$CONVERTED"/*; do ln -s "$f" "$PLAIN/"; done
  rm "$PLAIN/config.json"
  "$PY" -c "import json,sys; c=json.load(open(sys.argv[1])); c.pop('quantization_config', None); json.dump(c, open(sys.argv[2], 'w'))" \
    "$CONVERTED/config.json" "$PLAIN/config.json"
  SECONDS=0
  rm -rf "$HF_OUT.partial"   # a killed attempt's outputs (lm-eval keeps no resumable state)
  "$PY" -m lm_eval --model hf \
    --model_args pretrained="$PLAIN",dtype=float32 --device cpu \
    --tasks "$TASKS" --include_path sdtp/eval/tasks --metadata "{\"data_root\": \"$DATA/mc\"}" \
    --num_fewshot 5 --limit "$LIMIT" --batch_size 4 --output_path "$HF_OUT.partial"
  echo "{\"wall_s\": $SECONDS}" > "$HF_OUT.partial/wall.json"
  echo "$TASKS" > "$HF_OUT.partial/tasks.txt"
  mv "$HF_OUT.partial" "$HF_OUT"   # complete with its wall time, or absent (so the next run redoes it)
fi

for pruning in none random; do
  "$PY" -m sdtp.cli.evaluate eval=perplexity model=smollm2-135m pruning=$pruning eval.max_tokens=${PPL_TOKENS:-4096}
done
