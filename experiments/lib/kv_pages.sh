# Sourced by the pages of the continuation protocol that compare at equal KV memory or tokens per layer
# (experiments/kv_continuation.sh, kv_gap.sh, schedule_shape.sh) after they set PY (the Python to use), MODEL and PAGE
# (the page's folder): offline environment, the cells they share and the schedule's shares their rows are sized by.
export PYTHONPATH=. HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
mkdir -p "$PAGE/continuation"

# copy_cells SOURCE NAME...: copy the cells NAME (globs allowed) of page SOURCE into $PAGE where it has none. They are
# reused only where their fingerprint matches (sdtp/reports/predictor_eval.py); a cell SOURCE lacks is computed.
copy_cells() {
  local source="$1" cell name row
  shift
  for cell in "$source"/continuation/*/; do
    [[ -d "$cell" ]] || continue   # no cells at all: the glob stays literal
    name="$(basename "$cell")"
    mkdir -p "$PAGE/continuation/$name"
    for row in "$@"; do
      cp -n "$cell"/$row.json "$PAGE/continuation/$name/" 2>/dev/null || true
    done
  done
}

# schedule_shares KEEP...: the model's default schedule's share of tokens per layer as `share` (2 decimals); for each
# milder per-stage keep ratio 0.KEEP, `ratio<KEEP>` = share / that schedule's share (3 decimals: the kv.ratio that
# brings it to the same KV memory); and the default's share per layer as `layers`, a list (4 significant digits,
# kv.layer_ratios). The printed values are part of the cells' fingerprints.
schedule_shares() {
  local keeps=("$@")
  { read -r share "${keeps[@]/#/ratio}"; read -r layers; } \
    < <("$PY" experiments/lib/schedule_shares.py shares "$MODEL" "${keeps[@]}")
}

# equal_keep LAYOUT...: for each LAYOUT (stage layers, comma-separated, e.g. 2,14), the per-stage keep ratio r
# (4 decimals) at which a schedule with those stage layers gives each layer, on average, the model's default
# schedule's share of tokens, as the array `keeps`.
equal_keep() {
  mapfile -t keeps < <("$PY" experiments/lib/schedule_shares.py equal-keep "$MODEL" "$@")
}
