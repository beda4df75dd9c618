"""Retrained-predictor ablation points: the machinery paper Tables 4/5 and Figures 4/5 share.

    python -m sdtp.reports.ablation_points setup --row first4_keep0.9 --steps 60 --train-args "" \
        --eval-args "eval.num_segments=12" --schedule "pruning.layers=[4] pruning.keep_ratio=0.9"
    python -m sdtp.reports.ablation_points train-args --model smollm2-135m --steps 60 --seed 0   # v3 recipe
    python -m sdtp.reports.ablation_points done --point <json> --setup '<json>'      # exit 0: finished, same setup
    python -m sdtp.reports.ablation_points record --row full --seed 0 --train <run>/train --eval <run>/eval \
        --setup '<json>' --out results/paper/table45/smollm2-135m/full_s0.json

One *point* = one predictor trained with ``sdtp-train`` (the shipped v3 recipe, :data:`RECIPE`, plus
the point's own losses or schedule) and evaluated by continuation NLL (``sdtp-eval eval=continuation
pruning=sdtp``) on the same segments as a dense reference. Its small summary ``<row>_s<seed>.json``
(the training's final validation metrics, the eval's provenance and the NLL of every segment) is
committed beside the page, so a result is completed over several sessions and a fresh clone resumes
from what is committed. ``dense.json`` holds the dense reference. A summary is reused only when its
*setup* (steps, training / eval arguments and the point's schedule) equals the one asked for
(:func:`done`). ``experiments/lib/ablation_points.sh`` drives these steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sdtp.eval.stats import paired_t_interval
from sdtp.paths import portable_tree
from sdtp.reports.lm_eval_pages import machine_name, minutes
from sdtp.reports.paired_tables import paired_summary
from sdtp.reports.run_summary import machine
from sdtp.utils import parse_jsonl, write_json_atomic

SCHEMA = 1
# The v3 recipe's labels, data and accumulation (results/predictors/smollm2-135m-v3/README.md); the
# steps are each page's (smaller than MAIN_STEPS). Its losses (CE off, MSE + ranking) are the "full" row of
# Tables 4/5 and the loss of every figure point.
RECIPE = ["train.target=attention", "train.grad_accum=3", "data.sources.0.num_samples=800",
          "data.sources.1.num_samples=500", "data.sources.2.num_samples=150"]
FULL_LOSSES = ["train.loss.ce=0"]
MAIN_STEPS = 480  # v3's budget: the recipe the points train with (the shipped v4 is v3 + 200 fine-tuning steps)
EVAL_KEYS = ("eval", "model", "dtype", "pruning", "seed", "threads", "wall_s", "git_commit", "machine",
             "avg_kept_fraction")
# From the eval's results: the measured tokens per layer (Figure 5 sets them beside the analytic FLOPs) and the
# segment sizes.
RESULT_KEYS = ("avg_layer_token_fraction", "context_len", "cont_len")
# Setup keys that differ from point to point by design (not a sign of points made different ways).
PER_POINT_KEYS = ("row", "schedule")


def train_overrides(model: str, steps: int, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """sdtp-train overrides of one point before the script's folders: model, recipe, ``extra``, steps, seed."""
    return [f"model={model}", *RECIPE, *extra, f"train.max_steps={steps}", f"seed={seed}"]


def setup(row: str, steps: int, train_args: str, eval_args: str, schedule: str = "") -> dict[str, Any]:
    """What a point's summary must match to be reused; ``schedule`` (the point's pruning overrides) only
    when it has one, so Tables 4/5's setups keep their keys."""
    out: dict[str, Any] = {"row": row, "train_steps": steps, "train_args": train_args, "eval_args": eval_args}
    if schedule:
        out["schedule"] = schedule
    return out


def segment_nll(run_dir: Path) -> dict[str, float]:
    """segment id -> NLL of a finished continuation run (its ``segments.jsonl``)."""
    from sdtp.eval.continuation import SEGMENTS_FILE

    return {str(r["id"]): float(r["nll"]) for r in parse_jsonl((run_dir / SEGMENTS_FILE).read_text())}


def eval_summary(run_dir: Path) -> dict[str, Any]:
    """The eval run's provenance (:data:`EVAL_KEYS` of its ``metrics.json``) and per-segment NLLs."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.setdefault("machine", machine(str((metrics.get("fingerprint") or {}).get("device", "cpu"))))
    results = metrics.get("results") or {}
    kept = {**{k: metrics[k] for k in EVAL_KEYS if k in metrics}, **{k: results[k] for k in RESULT_KEYS if k in results}}
    return {"metrics": kept, "segments": segment_nll(run_dir)}


def record(row: str | None, seed: int | None, train_dir: Path | None, eval_dir: Path, setup: dict[str, Any],
           out: Path, command: str = "", wall_s: float | None = None) -> dict[str, Any]:
    """Write one point's (or, without ``train_dir``, the dense reference's) summary to ``out``."""
    point: dict[str, Any] = {"schema": SCHEMA, "row": row or "dense", "seed": seed, "setup": setup,
                             "command": command, "wall_s": wall_s, **eval_summary(eval_dir)}
    if train_dir is not None:
        train = json.loads((train_dir / "metrics.json").read_text())
        point["train"] = {k: v for k, v in train.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
    write_json_atomic(out, portable_tree(point))
    return point


def done(point: Path, setup: dict[str, Any]) -> bool:
    """Is ``point`` summarised with this setup (same steps, data, eval arguments and schedule)?"""
    try:
        return portable_tree(json.loads(point.read_text()).get("setup")) == portable_tree(setup)
    except (OSError, json.JSONDecodeError):
        return False


def load_points(points_dir: Path, accept: Callable[[str], bool]
                ) -> tuple[dict[tuple[str, int], dict[str, Any]], dict[str, Any] | None]:
    """(row, seed) -> summary of the points in ``points_dir`` whose row ``accept`` takes, and the dense
    reference (None when missing)."""
    points, dense = {}, None
    for path in sorted(points_dir.glob("[!.]*.json")) if points_dir.is_dir() else []:  # not a killed write's temp
        p = json.loads(path.read_text())
        if p.get("row") == "dense":
            dense = p
        elif isinstance(p.get("row"), str) and accept(p["row"]):
            points[(p["row"], int(p["seed"]))] = p
    return points, dense


def interval(values: list[float]) -> dict[str, Any] | None:
    """Mean with its 95% t interval (None without values; no interval from one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return paired_summary(paired_t_interval(values)) if values else None


def nll_diffs(point: dict[str, Any], reference: dict[str, Any]) -> list[float]:
    """Per shared segment (sorted by id): the point's − the reference's NLL."""
    shared = sorted(point["segments"].keys() & reference["segments"].keys(), key=int)
    return [point["segments"][i] - reference["segments"][i] for i in shared]


def delta_nll(point: dict[str, Any], dense: dict[str, Any]) -> float | None:
    """Mean over the segments both evaluated of the point's − dense NLL."""
    diffs = nll_diffs(point, dense)
    return sum(diffs) / len(diffs) if diffs else None


def paired_delta(point: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mean point − reference NLL with its 95% paired t interval over the shared segments (None if either is
    missing or they share no segment)."""
    return None if point is None or reference is None else interval(nll_diffs(point, reference))


def mean_nll(point: dict[str, Any]) -> float:
    return sum(point["segments"].values()) / max(len(point["segments"]), 1)


def provenance(points: Iterable[dict[str, Any]], dense: dict[str, Any] | None) -> dict[str, Any]:
    """What a page states about how its summaries were made: setups, commands, compute, commits, dtypes,
    machines."""
    found = [*points]
    every = [*found, *([dense] if dense else [])]
    metrics = [p["metrics"] for p in every]
    setups = sorted({json.dumps(p["setup"], sort_keys=True) for p in every})
    return {"setups": [json.loads(s) for s in setups],
            "point_commands": {f"{p['row']}_s{p['seed']}": p.get("command", "") for p in found},
            "compute_s": sum(p.get("wall_s") or 0 for p in every),
            "commits": sorted({str(m.get("git_commit")) for m in metrics}),
            "dtypes": sorted({str(m.get("dtype")).removeprefix("torch.") for m in metrics}),
            "machines": sorted({machine_name(m) for m in metrics}), "machine_split": machine_split(found, dense)}


def machine_split(points: list[dict[str, Any]], dense: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the dense reference and the point summaries ran, from their recorded metadata: dense's machine, the
    summaries per machine and how many points (rows) have a summary from another machine than dense's, whose Δ
    vs dense then pairs NLLs computed on two machines (None without a dense reference)."""
    if dense is None:
        return None
    where = machine_name(dense["metrics"])
    crossing = {p["row"] for p in points if machine_name(p["metrics"]) != where}
    return {"dense": where, "summaries": dict(sorted(Counter(machine_name(p["metrics"]) for p in points).items())),
            "points": len({p["row"] for p in points}), "points_crossing": len(crossing)}


def machine_split_text(split: dict[str, Any] | None) -> str:
    """The sentence a page adds when some points ran on another machine than the dense reference ("" otherwise)."""
    if not split or not split["points_crossing"]:
        return ""
    counts = ", ".join(f"{n} on {m}" for m, n in split["summaries"].items())
    share = ("every point's" if split["points_crossing"] == split["points"]
             else f"{split['points_crossing']} of the {split['points']} points'")
    return (f" **Machines differ:** the dense reference ran on {split['dense']}, the point summaries (point x "
            f"training seed) {counts}; {share} Δ vs dense (the seed mean) includes NLLs computed on another machine "
            "than dense's.")


def dense_entry(dense: dict[str, Any] | None) -> dict[str, Any] | None:
    """The page's dense reference: mean NLL and segment count (None when missing)."""
    return None if dense is None else {"nll": mean_nll(dense), "segments": len(dense["segments"])}


def dense_text(entry: dict[str, Any] | None) -> str:
    """A page's :func:`dense_entry` as text."""
    return "missing" if entry is None else f"NLL {entry['nll']:.4f} over {entry['segments']} segments"


def setup_text(setups: list[dict[str, Any]]) -> str:
    """The points' setups without their per-point keys (one entry when every point was made the same way)."""
    shared = sorted({json.dumps({k: v for k, v in s.items() if k not in PER_POINT_KEYS}, sort_keys=True)
                     for s in setups})
    if not shared:
        return "–"
    text = "; ".join(f"{s['train_steps']} training steps, training arguments `{s['train_args'] or '(recipe)'}`, "
                     f"eval arguments `{s['eval_args']}`" for s in map(json.loads, shared))
    return text if len(shared) == 1 else f"**points made with different setups**: {text}"


def interval_side(d: dict[str, Any] | None) -> int | None:
    """Which side of 0 a difference's interval lies on: +1 above, -1 below, 0 when it includes 0, None when there is
    no interval (one sample)."""
    if d is None or d.get("low") is None:
        return None
    return 1 if d["low"] > 0 else -1 if d["high"] < 0 else 0


def verdict(d: dict[str, Any] | None, expected: str) -> str:
    """How a paired difference's interval reads when the paper predicts it ``expected`` ("positive" or
    "negative"): **expected** / **unexpected** when it excludes 0 on that / the other side, else unresolved."""
    side = interval_side(d)
    if side is None:
        return "not enough data to judge"
    if side == 0:
        return "unresolved (interval includes 0)"
    return "**expected**" if (side > 0) == (expected == "positive") else "**unexpected**"


def page_header(title: str, page: dict[str, Any]) -> list[str]:
    """A page's first lines: title with the model, and the command that made it."""
    return [f"# {title} — {page['model']}", "",
            "Made by (resumable; each finished point's summary is committed beside this page):", "", "```bash",
            page["command"], "```", ""]


def provenance_text(page: dict[str, Any]) -> str:
    """Commits, machines, dtypes, this session's wall time and the compute of every summarised point; where the
    dense reference and points ran on different machines, which ran where (:func:`machine_split_text`)."""
    return (f"Commit(s): {', '.join(page['commits']) or '–'}; machine: {', '.join(page['machines']) or '–'}; "
            f"dtype: {', '.join(page['dtypes']) or '–'}; wall time of this session {minutes(page['wall_s'])}, "
            f"compute of all summarised points {minutes(page['compute_s'])}."
            + machine_split_text(page.get("machine_split")))


def figure_caveats(model: str, paper: str, paper_metric: str) -> list[str]:
    """The expected differences every figure page states: model and hardware, metric (and why), recipe."""
    return [f"- Expected: absolute numbers are not comparable. The paper ran {paper} on GPUs; this page ran "
            f"{model} (with the default smollm2-135m: 135M parameters, a 2-core CPU). The paper's metric is "
            f"{paper_metric} (higher is better); ours is the continuation NLL Δ vs dense (lower is better) with a 95% "
            "paired t interval over the same WikiText-2 validation segments.",
            "- Why NLL and not accuracy: a 135M model is near chance on WinoGrande (and close to it on most of the "
            "paper's 5-shot tasks), so accuracy cannot resolve differences of a few tenths of a point between "
            "schedules; per-segment NLL, paired with dense on the same text, resolves differences of about 0.01.",
            "- Expected: each point's predictor is trained with the v3 recipe (attention labels, MSE + "
            f"ranking, CE off) for fewer steps than v3's {MAIN_STEPS}, not with the paper's "
            "gradient saliency + CE; the eval scores the predictor alone (recency prior off)."]


def cell(d: dict[str, Any] | None, spec: str = "+.3f") -> str:
    """``mean [low, high] (n=...)``, "missing" for None."""
    if d is None:
        return "missing"
    if d.get("low") is None:
        return f"{d['mean']:{spec}} (n={d['n']}, no interval)"
    return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}] (n={d['n']})"


def coarse_to_fine(values: Sequence[Any]) -> list[Any]:
    """``values`` reordered ends first, then repeated midpoints (1..10 -> 1, 10, 5, 3, 7, 2, 4, 6, 8, 9), so a
    session stopped early still spans the whole axis."""
    if len(values) <= 2:
        return list(values)
    order, seen, spans = [values[0], values[-1]], {0, len(values) - 1}, [(0, len(values) - 1)]
    while spans:
        nxt = []
        for lo, hi in spans:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            if mid not in seen:
                seen.add(mid)
                order.append(values[mid])
            nxt += [(lo, mid), (mid, hi)]
        spans = nxt
    return order


def model_depth(model: str) -> tuple[int, dict[str, int]]:
    """(decoder layers, default schedule {first_layer, layer_step, num_stages}) of a model config."""
    from sdtp.config import compose

    cfg = compose("train", [f"model={model}"])
    return int(cfg.model.num_layers), {k: int(v) for k, v in cfg.model.schedule.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sdtp.reports.ablation_points")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="print a point's setup JSON")
    s.add_argument("--row", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--train-args", default="")
    s.add_argument("--eval-args", default="")
    s.add_argument("--schedule", default="")
    t = sub.add_parser("train-args", help="print the sdtp-train overrides of a v3-recipe point (full losses)")
    t.add_argument("--model", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("done", help="exit 0 when the point is summarised with this setup")
    d.add_argument("--point", type=Path, required=True)
    d.add_argument("--setup", required=True)
    r = sub.add_parser("record", help="write a point's (or the dense reference's) summary")
    r.add_argument("--row", required=True, help="the point's row, or dense")
    r.add_argument("--seed", type=int)
    r.add_argument("--train", type=Path)
    r.add_argument("--eval", type=Path, required=True)
    r.add_argument("--setup", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--command", default="")
    r.add_argument("--wall-s", type=float)
    args = ap.parse_args(argv)
    if args.cmd == "train-args":
        print(" ".join(train_overrides(args.model, args.steps, args.seed, FULL_LOSSES)))
    elif args.cmd == "setup":
        print(json.dumps(setup(args.row, args.steps, args.train_args, args.eval_args, args.schedule), sort_keys=True))
    elif args.cmd == "done":
        sys.exit(0 if done(args.point, json.loads(args.setup)) else 1)
    else:
        record(None if args.row == "dense" else args.row, args.seed, args.train, args.eval, json.loads(args.setup),
               args.out, args.command, args.wall_s)


if __name__ == "__main__":
    main()
