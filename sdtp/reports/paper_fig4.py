"""Paper Figure 4 (effect of the first pruning layer): one pruning stage before layer k, keep ratio r.

    python -m sdtp.reports.paper_fig4 points --model smollm2-135m --first-layers "1 2 3" --ratios "0.9 0.7"
    python -m sdtp.reports.paper_fig4 render --points results/paper/fig4/smollm2-135m --model smollm2-135m \
        --out results/paper/fig4 --command "bash experiments/paper_fig4.sh"

Each point (first layer k x keep ratio r) is its own predictor, trained for the one-stage schedule
``pruning.layers=[k] pruning.keep_ratio=r`` and evaluated by continuation NLL against dense on the same
segments (:mod:`sdtp.reports.ablation_points`; ``experiments/paper_fig4.sh``).

**Layer numbering.** The paper's "first layer k" is our 0-based ``pruning.layers=[k]``, unchanged on every
model. That is the convention the shipped schedules already follow: the paper's default "start at layer 4,
step 3, 10 stages" is ``first_layer: 4`` in ``conf/model/llama2-7b.yaml`` (stages before 0-based layers
4..31 of 32). A stage before layer 0 is not possible here (layer 0's cache length is the prompt length
decoding relies on), so k starts at 1, as in the paper. SmolLM2's default schedule shifts the paper's
layers by −2 so that 10 stages end at its last layer (30 layers); that shift is about the *last* stage
and would push k = 1, 2 to impossible layers, so Figure 4, which asks how early the *first* stage may
be, keeps k as the depth from the input. Figure 5 uses the model's own default first layer and step.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdtp.figures import new_figure, save_figure
from sdtp.reports.ablation_points import (MAIN_STEPS, SCHEMA, cell, coarse_to_fine, dense_entry, dense_text,
                                          figure_caveats, interval_side, load_points, model_depth, page_header,
                                          provenance, provenance_text, setup_text)
from sdtp.reports.ablation_seeds import (SEED_CSV_COLUMNS, diff_text, per_seed_text, plot_seed_dots, points_by_row,
                                         seed_csv_cells, seed_diff, seed_entry, seed_verdict, seeds_text)
from sdtp.reports.lm_eval_pages import error_bars, minutes, num, write_page_files

# The paper's Figure 4 (sdtp-method.md): Llama2-7B, WinoGrande 5-shot accuracy, dense 73.88.
PAPER_FULL = 73.88
PAPER_LAYERS = list(range(1, 11))
PAPER_RATIOS = (0.9, 0.8, 0.7)
PAPER = {0.9: [72.22, 72.22, 73.01, 73.49, 73.95, 73.48, 73.64, 73.88, 73.48, 73.64],
         0.8: [70.24, 68.67, 71.67, 71.11, 71.90, 73.32, 72.69, 73.24, 73.40, 73.80],
         0.7: [65.27, 65.27, 69.93, 69.77, 71.35, 72.22, 72.45, 73.09, 73.01, 73.48]}
ROW = re.compile(r"^first(\d+)_keep([0-9.]+)$")


def row_name(first_layer: int, ratio: float) -> str:
    """The point's name (its summary is ``<name>_s<seed>.json``): ``first4_keep0.9``."""
    return f"first{first_layer}_keep{ratio:g}"


def parse_row(row: str) -> tuple[int, float] | None:
    """``first4_keep0.9`` -> (4, 0.9); None for another name."""
    m = ROW.match(row)
    return (int(m.group(1)), float(m.group(2))) if m else None


def stage_layer(first_layer: int, num_layers: int, model: str = "the model") -> int:
    """The 0-based stage layer of the paper's "first layer" (the same number, see the module docstring);
    ValueError naming FIRST_LAYERS when the model has no such layer."""
    if not 1 <= first_layer < num_layers:
        raise ValueError(f"FIRST_LAYERS: first layer {first_layer} is beyond {model}'s depth ({num_layers} layers: "
                         f"a stage can run before layers 1..{num_layers - 1})")
    return first_layer


def check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"RATIOS: keep ratio {ratio} is outside (0, 1) (1 would prune nothing)")
    return ratio


def schedule(first_layer: int, ratio: float) -> str:
    """The point's pruning overrides, for its training and its eval alike."""
    return f"pruning.layers=[{first_layer}] pruning.keep_ratio={ratio:g}"


def plan(first_layers: list[int], ratios: list[float], num_layers: int, model: str = "the model"
         ) -> list[tuple[str, str]]:
    """(row, schedule) of every point in run order, every input checked first.

    Order: the two outer ratios (the paper's 0.7 and 0.9, the widest gap) interleaved along the layers taken
    coarse to fine (1, 10, 5, 3, 7, ...), then the other ratios the same way, so a session stopped early
    still has the curves' ends and shape.
    """
    layers = coarse_to_fine(sorted({stage_layer(k, num_layers, model) for k in first_layers}))
    tiers = coarse_to_fine(sorted({check_ratio(r) for r in ratios}, reverse=True))
    return [(row_name(k, r), schedule(k, r)) for group in (tiers[:2], tiers[2:]) for k in layers for r in group]


def _accept(row: str) -> bool:
    return parse_row(row) is not None


def build_page(points_dir: Path, model: str, first_layers: list[int], ratios: list[float],
               seeds: Sequence[int] = (0,), command: str = "", wall_s: float | None = None) -> dict[str, Any]:
    """The page dict: per point its training seeds, Δ NLL vs dense of the seed mean (95% paired t over segments)
    and over seeds, the grid's missing points (per seed) and the paired trends the paper's conclusions predict
    (:func:`trends`)."""
    points, dense = load_points(points_dir, _accept)
    groups = points_by_row(points, seeds)
    entries = {}
    for row, group in sorted(groups.items(), key=lambda kv: parse_row(kv[0])):
        layer, ratio = parse_row(row)
        entries[row] = {"first_layer": layer, "keep_ratio": ratio, **seed_entry(group, dense)}
    grid = [row_name(k, r) for r in ratios for k in first_layers]
    return {"schema": SCHEMA, "model": model, "command": command, "wall_s": wall_s, "seeds": list(seeds),
            "first_layers": first_layers, "ratios": ratios, "points": entries,
            "missing": [r for r in grid if r not in entries],
            "missing_by_seed": {str(s): [r for r in grid if s not in groups.get(r, {})] for s in seeds},
            "dense": dense_entry(dense), "trends": trends(groups),
            **provenance([p for g in groups.values() for p in g.values()], dense),
            "sizes": {"points": len(entries), "segments": 0 if dense is None else len(dense["segments"])}}


def trends(groups: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The paper's two conclusions as paired NLL differences over the seeds both points have (:func:`seed_diff`;
    positive = the first is worse):

    * ``early_vs_late``: per keep ratio, the earliest first layer − the latest one (the paper: early hurts);
    * ``low_vs_high_keep``: per first layer, the lowest keep ratio − the highest (the paper: more pruning hurts).
    """
    by_ratio: dict[float, list[int]] = {}
    by_layer: dict[int, list[float]] = {}
    for row in groups:
        k, r = parse_row(row)
        by_ratio.setdefault(r, []).append(k)
        by_layer.setdefault(k, []).append(r)
    early = [{"keep_ratio": r, "layers": [min(ks), max(ks)],
              **seed_diff(groups[row_name(min(ks), r)], groups[row_name(max(ks), r)])}
             for r, ks in sorted(by_ratio.items(), reverse=True) if len(ks) > 1]
    keep = [{"first_layer": k, "ratios": [min(rs), max(rs)],
             **seed_diff(groups[row_name(k, min(rs))], groups[row_name(k, max(rs))])}
            for k, rs in sorted(by_layer.items()) if len(rs) > 1]
    return {"early_vs_late": early, "low_vs_high_keep": keep}


def paper_early_late() -> str:
    """The paper's own early-vs-late contrast, read off :data:`PAPER`: accuracy − dense at its lowest keep ratio, at
    its first and its last layer."""
    r = min(PAPER)
    first, last = (PAPER[r][i] - PAPER_FULL for i in (0, -1))
    return f"at keep {r:g} {first:+.2f} points at layer {PAPER_LAYERS[0]} vs {last:+.2f} at layer {PAPER_LAYERS[-1]}"


def expectations(page: dict[str, Any]) -> list[str]:
    lines = []
    for t in page["trends"]["early_vs_late"]:
        lines.append(f"- keep {t['keep_ratio']:g}: first layer {t['layers'][0]} − first layer {t['layers'][1]} = "
                     f"{diff_text(t)} — "
                     f"{seed_verdict(t['diff'], t['diff_seeds'], 'positive')} (the paper: pruning early hurts "
                     f"more, {paper_early_late()}).")
    by_ratio = [seed_verdict(t["diff"], t["diff_seeds"], "positive") for t in page["trends"]["low_vs_high_keep"]
                if interval_side(t["diff"]) is not None]
    if by_ratio:
        worse, better = by_ratio.count("**expected**"), by_ratio.count("**unexpected**")
        lines.append(f"- lowest − highest keep ratio at the same first layer, over {len(by_ratio)} layers: "
                     f"{worse} worse (**expected**: more pruning costs more), "
                     f"{better} better (**unexpected**), the rest unresolved.")
    return lines or ["- Too few points to judge the paper's trends (needs two layers or two ratios)."]


def render(page: dict[str, Any]) -> str:
    ratios, pts = page["ratios"], page["points"]
    out = [*page_header("Paper Figure 4: effect of the first pruning layer", page),
           f"Setup: {setup_text(page['setups'])}. One pruning stage before 0-based layer k "
           "(`pruning.layers=[k]`), keeping the fraction r of the prompt (first 4 and last 10% always kept); "
           "each point its own predictor trained for that schedule (per training seed), then `sdtp-eval eval=continuation pruning=sdtp` with it (recency prior off) and dense "
           "on the same WikiText-2 validation segments (text none of the training data contains). Training budget "
           f"per point: the steps above, smaller than v3's {MAIN_STEPS} (the shipped predictor is v3 fine-tuned).", "",
           "Layer numbering: the paper's \"first layer k\" is our 0-based layer k on every model, the convention of "
           "the shipped schedules (the paper's default first layer 4 is `first_layer: 4` in "
           "`conf/model/llama2-7b.yaml`); SmolLM2's default schedule shifts by −2 only so that 10 stages end at its "
           "last layer, which does not concern one stage, and would make k = 1, 2 impossible.", "",
           provenance_text(page), "",
           f"Dense reference: {dense_text(page['dense'])}.", "",
           "## Ours: Δ NLL vs dense [95% paired t interval over segments] (lower is better)", "",
           "Per point the seed mean (per segment the mean NLL over the point's training seeds); the interval over "
           "training seeds and each seed's value are in the per-point table below.", "",
           seeds_text(page["seeds"], page["missing_by_seed"]), "",
           "| First layer k | " + " | ".join(f"r = {r:g}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for k in page["first_layers"]:
        out.append(f"| {k} | " + " | ".join(cell((pts.get(row_name(k, r)) or {}).get("delta_nll"), "+.4f")
                                            if row_name(k, r) in pts else "missing" for r in ratios) + " |")
    out += ["", f"Missing points: {', '.join(page['missing']) or 'none'}.", "",
            "## The paper's Figure 4 (Llama2-7B, WinoGrande 5-shot accuracy; dense 73.88; sdtp-method.md)", "",
            "| First layer | " + " | ".join(f"r = {r:g}" for r in PAPER) + " |", "|---" * (len(PAPER) + 1) + "|"]
    for i, k in enumerate(PAPER_LAYERS):
        out.append(f"| {k} | " + " | ".join(f"{PAPER[r][i]:.2f} ({PAPER[r][i] - PAPER_FULL:+.2f})" for r in PAPER)
                   + " |")
    out += ["", "In parentheses: accuracy − dense. The paper concludes: start at the 4th layer with keep 90%; early "
            "layers tolerate aggressive pruning poorly.", "", "## Expected and unexpected differences", "",
            *figure_caveats(page["model"], "Llama2-7B", "WinoGrande 5-shot accuracy"), *expectations(page), "",
            "## Per point", "", "| Point | k | r | Seeds | Δ NLL vs dense (seed mean) | Δ NLL over seeds | Per seed | "
            "Spearman | Top-k overlap | Tokens per layer (measured) | Wall time (all seeds) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, e in pts.items():
        out.append(f"| {row} | {e['first_layer']} | {e['keep_ratio']:g} | {', '.join(map(str, e['seeds']))} | "
                   f"{cell(e['delta_nll'], '+.4f')} | {cell(e['delta_seeds'], '+.4f')} | {per_seed_text(e)} | "
                   f"{num(e['spearman'], '.3f')} | {num(e['topk_overlap'], '.3f')} | "
                   f"{num(e['measured_layer_fraction'], '.3f')} | "
                   f"{minutes(e['wall_s'])} |")
    return "\n".join(out) + "\n"


def to_csv(page: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["first_layer", "keep_ratio", "delta_nll", "low", "high", "n", "spearman", "topk_overlap",
                "paper_accuracy", *SEED_CSV_COLUMNS])
    for k in page["first_layers"]:
        for r in page["ratios"]:
            e = page["points"].get(row_name(k, r))
            d = (e or {}).get("delta_nll") or {}
            paper = PAPER[r][k - 1] if r in PAPER and k in PAPER_LAYERS else None
            w.writerow([k, r, d.get("mean"), d.get("low"), d.get("high"), d.get("n"), (e or {}).get("spearman"),
                        (e or {}).get("topk_overlap"), paper, *seed_csv_cells(e)])
    return buf.getvalue()


def render_plot(page: dict[str, Any], path: Path) -> Path:
    fig, (ours, paper) = new_figure(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(page["ratios"]):
        found = [e for e in page["points"].values() if e["keep_ratio"] == r and e["delta_nll"] is not None]
        if found:
            means, yerr = error_bars(e["delta_nll"] for e in found)
            ours.errorbar([e["first_layer"] for e in found], means, yerr=yerr, marker="o", capsize=3,
                          color=f"C{i}", label=f"r = {r:g}")
            plot_seed_dots(ours, found, "first_layer", f"C{i}")
    ours.axhline(0, color="grey", lw=0.8)
    ours.set(xlabel="first pruning layer k (0-based)", ylabel="Δ NLL vs dense (lower is better)",
             title=f"ours: {page['model']}, continuation NLL")
    for i, r in enumerate(PAPER):
        paper.plot(PAPER_LAYERS, PAPER[r], marker="o", color=f"C{i}", label=f"r = {r:g}")
    paper.axhline(PAPER_FULL, color="grey", lw=0.8, label="dense")
    paper.set(xlabel="first pruning layer", ylabel="accuracy (higher is better)",
              title="paper: Llama2-7B, WinoGrande 5-shot")
    for ax in (ours, paper):
        if ax.get_legend_handles_labels()[0]:  # no curve yet when every point is missing
            ax.legend(fontsize=7)
    fig.suptitle("Figure 4: one pruning stage, first layer x keep ratio (95% paired t intervals over segments; "
                 "dots: training seeds)")
    return save_figure(fig, path)


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sdtp.reports.paper_fig4")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("points", help="print 'row<TAB>schedule' per point in run order (inputs checked first)")
    p.add_argument("--model", required=True)
    p.add_argument("--first-layers", default=" ".join(map(str, PAPER_LAYERS)))
    p.add_argument("--ratios", default=" ".join(map(str, PAPER_RATIOS)))
    r = sub.add_parser("render")
    r.add_argument("--points", type=Path, required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--first-layers", default=" ".join(map(str, PAPER_LAYERS)), help="the page's grid")
    r.add_argument("--ratios", default=" ".join(map(str, PAPER_RATIOS)))
    r.add_argument("--seeds", default="0", help="the page's training seeds (each point's mean over them)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--command", default="")
    r.add_argument("--wall-s", type=float)
    args = ap.parse_args(argv)
    try:
        layers, ratios = _numbers(args.first_layers, int), _numbers(args.ratios, float)
        seeds = _numbers(getattr(args, "seeds", "0"), int)
    except ValueError as err:
        ap.error(f"FIRST_LAYERS / RATIOS / SEEDS: expected numbers separated by spaces ({err})")
    if args.cmd == "points":
        try:
            rows = plan(layers, ratios, model_depth(args.model)[0], args.model)
        except ValueError as err:
            ap.error(str(err))
        print("\n".join(f"{row}\t{sched}" for row, sched in rows))
    else:
        page = build_page(args.points, args.model, layers, ratios, seeds, args.command, args.wall_s)
        print(write_page_files(args.out, page, render, to_csv, render_plot))


if __name__ == "__main__":
    main()
