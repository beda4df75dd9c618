"""The method comparison page's files in ``--out``: writing them, and never replacing a bigger page.

:func:`write_outputs` writes ``compare_methods.{md,csv,json,png}`` atomically with portable paths;
:func:`page_sizes` is how much data a page rests on, which :func:`smaller_than_existing` compares with
the page already in ``--out``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sdtp.figures import new_figure, save_figure
from sdtp.paths import portable_text, portable_tree
from sdtp.reports.lm_eval_pages import smaller_page
from sdtp.utils import atomic_path, write_text_atomic


# --------------------------------------------------------------------------------------------
# Output files


def write_outputs(header: list[str], records: list[dict[str, Any]], out: Path, page: str,
                  compared: dict[str, Any], sizes: dict[str, int]) -> list[Path]:
    """``compare_methods.{md,csv,json,png}`` in ``out``, each written atomically, paths portable (:mod:`sdtp.paths`)."""
    page, records, compared = portable_text(page), portable_tree(records), portable_tree(compared)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare_methods.md", out / "compare_methods.csv", out / "compare_methods.json"]
    write_text_atomic(paths[0], page)
    with atomic_path(paths[1]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    document = {"columns": header, "rows": records, "comparisons": compared, "sizes": sizes}
    write_text_atomic(paths[2], json.dumps(document, indent=2, allow_nan=False))
    plot = _plot([r for r in records if not r["seed_of"]], out / "compare_methods.png")
    return paths + ([plot] if plot else [])


def _plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy measures vs prefill speedup, one colour per method (legend, not labels: points overlap)."""
    panels = [("lm_eval_mean_acc", "lm-eval mean accuracy, % (higher is better)"),
              ("lm_eval_delta", "paired lm-eval accuracy vs dense, points (95% CI)"),
              ("longbench_delta", "paired LongBench score vs dense, points (95% CI)"),
              ("perplexity", "WikiText perplexity (lower is better)")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in records)]
    if not panels:
        return None
    fig, axes = new_figure(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    shown = [r["method"] for r in records if any(r.get(col) is not None for col, _ in panels)]
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(shown) <= 10 else "tab20"]
    colours = {name: palette(i % palette.N) for i, name in enumerate(shown)}
    for ax, (col, label) in zip(axes[0], panels):
        for r in records:
            speed = r["prefill_speedup"] or r["analytic_speedup"]
            if r.get(col) is None or speed is None:
                continue
            low, high = r.get(f"{col}_low"), r.get(f"{col}_high")
            err = [[r[col] - low], [high - r[col]]] if low is not None and high is not None else None
            marker = "o" if r["prefill_speedup"] is not None else "^"
            ax.errorbar(speed, r[col], yerr=err, fmt=marker, color=colours[r["method"]], capsize=3, markersize=6,
                        label=r["method"])
        if col.endswith("_delta"):
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("prefill speedup vs dense (o measured, ^ analytic)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=8, frameon=False)
    return save_figure(fig, path, rect=(0, 0, 0.9, 1), dpi=120)


# --------------------------------------------------------------------------------------------
# Never replace a bigger page


def page_sizes(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How much data the page rests on: per eval the most documents any method has outcomes for
    (lm-eval: per task), and the scored perplexity tokens."""
    sizes: dict[str, int] = {}
    for row in rows.values():
        for ev, outcomes in row.get("docs", {}).items():
            sizes[f"{ev}_documents"] = max(sizes.get(f"{ev}_documents", 0), len(outcomes))
        for col, n in row.get("counts", {}).items():
            sizes[f"{col}_documents"] = max(sizes.get(f"{col}_documents", 0), int(n))
        for key, n in row.get("sizes", {}).items():
            sizes[key] = max(sizes.get(key, 0), n)
    return sizes


def smaller_than_existing(out: Path, sizes: dict[str, int]) -> str | None:
    """Why the page in ``out`` must not be replaced by one of ``sizes`` (None if it may be)."""
    return smaller_page(out / "compare_methods.json", sizes)
