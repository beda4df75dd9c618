# Sourced by the pages of the continuation protocol that compare at equal KV memory or tokens per layer
# (experiments/kv_continuation.sh, kv_gap.sh, schedule_shape.sh) after they set PY (the Python to use), MODEL and PAGE
# (the page's folder): offline environment, the cells they share and the schedule's shares their rows are sized by.
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$PAGE/continuation"

# copy_cells SOURCE NAME...: copy the cells NAME (globs allowed) of page SOURCE into $PAGE where it has none. They are
# reused only where their fingerprint matches (sdtp/reports/predictor_eval.py); a cell SOURCE lacks is computed.
copy_cells() {
  local source="$1" cell name row
  shift
  for cell in "$source"/continuation/*/; do
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
  { read -r share "${keeps[@]/#/ratio}"; read -r layers; } < <("$PY" - "$MODEL" "${keeps[@]}" <<'EOF'
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
}

# equal_keep LAYOUT...: for each LAYOUT (stage layers, comma-separated, e.g. 2,14), the per-stage keep ratio r
# (4 decimals) at which a schedule with those stage layers gives each layer, on average, the model's default
# schedule's share of tokens, as the array `keeps` (bisection; r = 1 keeps everything, so the share grows with r).
equal_keep() {
  mapfile -t keeps < <("$PY" - "$MODEL" "$@" <<'EOF'
import sys
from sdtp.config import build_schedule, compose
model, layouts, length = sys.argv[1], sys.argv[2:], 1_000_000
def share(*overrides: str) -> float:
    cfg = compose("eval", [f"model={model}", "pruning=random", *overrides])
    layers = build_schedule(cfg).tokens_per_layer(length, int(cfg.model.num_layers))
    return sum(layers) / len(layers) / length
target = share()
for layout in layouts:
    low, high = 0.0, 1.0
    for _ in range(30):
        r = (low + high) / 2
        low, high = (r, high) if share(f"pruning.layers=[{layout}]", f"pruning.keep_ratio={r}") < target else (low, r)
    print(f"{(low + high) / 2:.4f}")
EOF
)
}
