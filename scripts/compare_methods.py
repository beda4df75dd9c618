"""Render the method comparison (accuracy and speedup per token pruner / KV policy) from sweep outputs.

    python scripts/compare_methods.py [--root results/multiruns] [--out results/compare]

Reads every ``metrics.json`` written by ``sdtp-eval`` runs and every ``bench.json`` written by
``sdtp-bench`` runs under ``--root`` (recursively), groups them by method (``pruning.name``, plus
``+<kv method>`` when a KV policy was active) and writes into ``--out``:

* ``compare_methods.md`` / ``.csv`` / ``.json``: one row per method, one column per task metric
  (lm-eval accuracy per task, LongBench/needle scores, WikiText perplexity), the mean accuracy,
  the average fraction of prompt tokens per layer, the analytic layer-cost speedup and, when a
  benchmark exists, the measured prefill speedup over dense;
* ``compare_methods.png``: mean score, paired lm-eval / LongBench deltas (95% error bars) and
  perplexity vs speedup, one point per method.

Per-document outcomes (lm-eval's ``samples_<task>.jsonl``, the generation runners'
``predictions.jsonl``) give paired differences to dense (``<eval>_delta`` columns) and SDTP's paired
difference to every other method; under the table, the 95% binomial half-width of each lm-eval
accuracy says which differences a ``limit``-ed run can resolve at all.

Files that cannot be parsed are reported and skipped; when a method has several runs of the same
eval, the newest file wins. Nothing here runs a model.

A page is never silently replaced by a smaller one: ``compare_methods.json`` records its ``sizes``
(documents per eval, scored perplexity tokens); if ``--out`` already holds a page built from more
(or from an unrecorded number, i.e. rendered before sizes were kept), the new page goes to
``--smaller-out`` when given, else the script refuses. ``--replace`` overwrites regardless.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdtp.eval.stats import binomial_ci95, document_outcomes, paired_delta, prediction_outcomes

log = logging.getLogger("compare_methods")

ACC_KEYS = ("acc", "acc_norm", "score", "accuracy", "exact_match", "rouge_l", "rougeL", "rouge")
LOWER_IS_BETTER = ("perplexity",)
SPEEDUP_KEYS = ("prefill_speedup", "speedup_prefill", "ttft_speedup", "speedup")
# Eval keys that decide what a number means (how many documents, tokens, shots...), listed under the table.
SETTING_KEYS = ("tasks", "num_fewshot", "limit", "datasets", "max_new_tokens", "max_tokens", "window", "stride",
                "lengths", "depths", "num_samples")


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _first_metric(entry: dict[str, Any]) -> float | None:
    """The task's headline number: the first of ACC_KEYS present (lm-eval's ``acc,none`` too)."""
    for key in ACC_KEYS:
        for variant in (key, f"{key},none"):
            value = _number(entry.get(variant))
            if value is not None:
                return value
    return None


# Command-line overrides that change what a method is (so an ablation gets a row of its own).
VARIANT_PREFIXES = ("pruning.", "kv.", "model.")


def variant(run_dir: Path) -> str:
    """``[key=value,...]`` of a run's pruning/kv/model overrides (Hydra's ``.hydra/overrides.yaml``), or ''."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    try:
        overrides = [str(o) for o in OmegaConf.load(path)]
    except Exception as exc:  # a hand-edited or truncated file: the run still counts, unnamed
        log.warning("ignoring %s: %s", path, exc)
        return ""
    keys = [o.lstrip("+~") for o in overrides]
    # kv.ratio is already part of the name (<pruning>+<kv>@<ratio>).
    extra = sorted(o for o in keys if o.startswith(VARIANT_PREFIXES) and not o.startswith("kv.ratio="))
    return f"[{','.join(extra)}]" if extra else ""


def method_name(data: dict[str, Any]) -> str:
    """``<pruning>`` or ``<pruning>+<kv>`` from a run's own record of its config."""
    pruning = _get(data, "pruning", "name") or _get(data, "config", "pruning", "name") or data.get("pruning")
    pruning = pruning if isinstance(pruning, str) else "unknown"
    kv = _get(data, "config", "kv", "method") or _get(data, "kv", "method") or data.get("kv")
    if isinstance(kv, str) and kv != "none":
        ratio = _get(data, "config", "kv", "ratio") or _get(data, "kv", "ratio") or data.get("kv_ratio")
        return f"{pruning}+{kv}" + (f"@{ratio:g}" if isinstance(ratio, int | float) else "")
    return pruning


def eval_metrics(data: dict[str, Any]) -> dict[str, float]:
    """Column -> value for one ``metrics.json`` (accuracy-like columns in %, or ``perplexity``)."""
    results = data.get("results") if isinstance(data.get("results"), dict) else data
    columns: dict[str, float] = {}
    # lm-eval reports fractions, LongBench and the synthetic tasks percentages: one scale for the mean.
    scale = 100.0 if data.get("eval") == "lm_eval" else 1.0
    # lm-eval: results.tasks.<task>.<metric>; LongBench: results.datasets.<dataset> = score.
    tasks = results.get("tasks") if isinstance(results.get("tasks"), dict) else results.get("datasets")
    if isinstance(tasks, dict):
        for task, entry in tasks.items():
            value = _first_metric(entry) if isinstance(entry, dict) else _number(entry)
            if value is not None:
                columns[str(task).removeprefix("sdtp_")] = scale * value
    for key in LOWER_IS_BETTER:
        if _number(results.get(key)) is not None:
            columns[key] = float(results[key])
    if not columns:
        value = _first_metric(results)
        if value is not None:
            columns[str(data.get("eval", "score"))] = value
    return columns


def sample_counts(data: dict[str, Any]) -> dict[str, int]:
    """Column -> documents scored, for the lm-eval accuracy columns (per-document 0/1 outcomes)."""
    if data.get("eval") != "lm_eval":
        return {}
    counts = _get(data, "results", "n_samples")
    if not isinstance(counts, dict):
        return {}
    return {str(task).removeprefix("sdtp_"): int(n) for task, n in counts.items() if _number(n)}


def run_settings(data: dict[str, Any]) -> str:
    """The settings a run's numbers depend on, e.g. ``limit=20, num_fewshot=5, dtype=torch.float32``."""
    if isinstance(data.get("settings"), dict):  # sdtp-bench
        values = {**data["settings"], "dtype": _get(data, "environment", "dtype")}
        keys = ("lengths", "new_tokens", "repeats", "threads", "dtype")
    else:
        values = {**(_get(data, "config", "eval") or {}), "dtype": data.get("dtype")}
        keys = (*SETTING_KEYS, "dtype")
    return ", ".join(f"{key}={json.dumps(values[key])}" for key in keys if values.get(key) is not None)


def settings_key(data: dict[str, Any]) -> str:
    """The eval a run belongs to; lm-eval runs of different task lists are listed apart (their columns add up)."""
    name = str(data.get("eval"))
    tasks = _get(data, "config", "eval", "tasks")
    if name == "lm_eval" and isinstance(tasks, list):
        return f"{name}[{','.join(str(t).removeprefix('sdtp_') for t in tasks)}]"
    return name


def bench_speedup(data: dict[str, Any]) -> float | None:
    """Measured prefill speedup over dense at the longest prompt length of a bench JSON.

    Reads sdtp-bench's schema (``results: [{seq_len, speedup: {prefill}}]``) and, as a fallback, any
    ``prefill_speedup``-like number or ``{length: number}`` map (``targets`` are ignored).
    """
    rows = data.get("results")
    if isinstance(rows, list):
        pairs = [(_number(r.get("seq_len")) or -1.0, _number(_get(r, "speedup", "prefill")))
                 for r in rows if isinstance(r, dict)]
        pairs = [(length, value) for length, value in pairs if value is not None]
        if pairs:
            return max(pairs)[1]
    found: list[tuple[float, float]] = []  # (length or -1, speedup)

    def walk(node: Any, length: float) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, length)
        if not isinstance(node, dict):
            return
        here = _number(node.get("length", node.get("seq_len")))
        here = length if here is None else here
        for key, value in node.items():
            if key == "targets":  # goals, not measurements
                continue
            if key in SPEEDUP_KEYS and _number(value) is not None:
                found.append((here, float(value)))
            elif key in SPEEDUP_KEYS and isinstance(value, dict):
                for sub, val in value.items():  # {"2048": 1.6, ...}
                    if _to_float(sub) is not None and _number(val) is not None:
                        found.append((_to_float(sub), float(val)))
            else:
                walk(value, _to_float(key) or here)

    walk(data, -1.0)
    if not found:
        return None
    longest = max(length for length, _ in found)
    values = [speedup for length, speedup in found if length == longest]
    return sum(values) / len(values)


def _to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def collect(root: Path) -> dict[str, dict[str, Any]]:
    """method -> {"metrics": {column: value}, "layer_fraction": f, "prefill_speedup": s, ...}.

    The settings of the runs each row uses are kept per eval (``row["settings"][eval] = text``).
    """
    rows: dict[str, dict[str, Any]] = {}
    files = sorted(root.rglob("metrics.json")) + sorted(root.rglob("bench.json"))
    for path in sorted(files, key=lambda p: p.stat().st_mtime):  # newest last, so it wins
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if not isinstance(data, dict):
            continue
        name = method_name(data) + variant(path.parent)
        row = rows.setdefault(name, {"metrics": {}, "files": [], "settings": {}, "counts": {}, "docs": {}})
        row["files"].append(str(path))
        is_bench = path.name == "bench.json" or data.get("task") == "bench"
        row["settings"]["bench" if is_bench else settings_key(data)] = run_settings(data)
        if is_bench:
            speedup = bench_speedup(data)
            if speedup is not None:
                row["prefill_speedup"] = speedup
            continue
        row["metrics"].update(eval_metrics(data))
        row["counts"].update(sample_counts(data))
        # Per-document outcomes, for paired differences between methods on the same documents.
        outcomes = document_outcomes(path.parent) if data.get("eval") == "lm_eval" else prediction_outcomes(path.parent)
        if outcomes:
            row["docs"].setdefault(str(data.get("eval")), {}).update(outcomes)
        fraction = _number(_get(data, "results", "avg_layer_token_fraction")) or _number(
            data.get("avg_layer_token_fraction")
        )
        if fraction:
            row["layer_fraction"] = fraction
        scored = _number(_get(data, "results", "scored_tokens"))
        if scored is not None:
            row.setdefault("sizes", {})["perplexity_tokens"] = int(scored)
        kv_kept = _number(_get(data, "kv", "kept_fraction"))
        if kv_kept is not None:
            row["kv_kept"] = kv_kept
    for name, row in rows.items():
        if name == "none":  # the dense model is the reference: speedup 1 by definition
            row.setdefault("layer_fraction", 1.0)
            row.setdefault("prefill_speedup", 1.0)
        if row.get("layer_fraction"):
            row["analytic_speedup"] = 1.0 / row["layer_fraction"]
            # Entries left in the KV cache relative to dense: pruned tokens, then the KV policy's cut.
            row["kv_cache"] = row["layer_fraction"] * row.get("kv_kept", 1.0)
    return rows


def table(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and one dict per method, methods ordered dense first, then by mean accuracy."""
    metric_cols = sorted({col for row in rows.values() for col in row["metrics"]}, key=lambda c: (c in LOWER_IS_BETTER, c))
    acc_cols = [c for c in metric_cols if c not in LOWER_IS_BETTER]
    # Mean over the accuracy columns the dense reference has (all of them when it has none), so a
    # method's mean is comparable with dense's; rows missing one of those columns get no mean.
    dense = rows.get("none", {}).get("metrics", {})
    acc_cols = [c for c in acc_cols if c in dense] or acc_cols
    # Paired deltas to dense, one pair of columns per eval with per-document outcomes (lm_eval first).
    dense_docs = rows.get("none", {}).get("docs", {})
    delta_evals = sorted(dense_docs, key=lambda ev: (ev != "lm_eval", ev))
    records = []
    for name, row in rows.items():
        record: dict[str, Any] = {"method": name}
        for col in metric_cols:
            record[col] = row["metrics"].get(col)
        accs = [row["metrics"][c] for c in acc_cols if c in row["metrics"]]
        record["mean_acc"] = sum(accs) / len(accs) if accs and len(accs) == len(acc_cols) else None
        record["tokens_per_layer"] = row.get("layer_fraction")
        record["kv_cache"] = row.get("kv_cache")
        record["analytic_speedup"] = row.get("analytic_speedup")
        record["prefill_speedup"] = row.get("prefill_speedup")
        for ev in delta_evals:
            delta = paired_delta(row["docs"].get(ev, {}), dense_docs[ev])
            record[f"{ev}_delta"], record[f"{ev}_delta_ci95"] = (delta[0], delta[1]) if delta else (None, None)
        records.append(record)
    records.sort(key=lambda r: (r["method"] != "none", -(r["mean_acc"] or -1.0), r["method"]))
    deltas = [col for ev in delta_evals for col in (f"{ev}_delta", f"{ev}_delta_ci95")]
    header = ["method", *metric_cols, "mean_acc", *deltas, "tokens_per_layer", "kv_cache", "analytic_speedup",
              "prefill_speedup"]
    return header, records


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def settings_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown bullet per eval: its settings, or every variant if methods were run differently."""
    by_eval: dict[str, set[str]] = {}
    for row in rows.values():
        for name, text in row.get("settings", {}).items():
            if text:
                by_eval.setdefault(name, set()).add(text)
    return [f"* {name}: " + " | ".join(sorted(texts)) + (" (methods differ!)" if len(texts) > 1 else "")
            for name, texts in sorted(by_eval.items())]


def intervals(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """method -> {column: 95% half-width in points} for the columns with a document count."""
    return {name: {col: round(binomial_ci95(row["metrics"][col], n), 2) for col, n in row.get("counts", {}).items()
                   if col in row["metrics"] and n > 0}
            for name, row in rows.items()}


def interval_line(rows: dict[str, dict[str, Any]], ci: dict[str, dict[str, float]]) -> str | None:
    """Markdown sentence with the dense row's half-widths (the reference every delta is read against)."""
    reference = "none" if ci.get("none") else next((name for name, widths in ci.items() if widths), None)
    if reference is None:
        return None
    counts = rows[reference]["counts"]
    parts = ", ".join(f"{col} ±{hw:.1f} (n={counts[col]})" for col, hw in sorted(ci[reference].items()))
    return (f"95% binomial CI half-width of the dense accuracies, in points: {parts}. One task's accuracy moves "
            "by about that much by chance; lm_eval_delta pairs the same documents and pools the tasks, so its "
            "interval is much narrower.")


def versus_lines(rows: dict[str, dict[str, Any]], method: str = "sdtp") -> list[str]:
    """Markdown bullets: ``method``'s paired score difference to every other method, per eval."""
    lines = []
    for ev, mine in sorted(rows.get(method, {}).get("docs", {}).items()):
        for other, row in sorted(rows.items()):
            delta = paired_delta(mine, row["docs"].get(ev, {})) if other != method else None
            if delta:
                lines.append(f"* {ev}: {method} - {other}: {delta[0]:+.2f} ± {delta[1]:.2f} points over {delta[2]} documents")
    return [f"Paired score difference of {method} to each method (same documents, 95% CI):", *lines] if lines else []


def write_outputs(header: list[str], records: list[dict[str, Any]], out: Path,
                  notes: list[str] | None = None, ci: dict[str, dict[str, float]] | None = None,
                  sizes: dict[str, int] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in header) + " |" for r in records]
    for block in notes or []:
        md += ["", *block.splitlines()]
    glossary = ("\nAccuracy columns (%): higher is better; perplexity: lower is better. tokens_per_layer = average "
             "fraction of prompt tokens each layer processed; kv_cache = KV entries left after prefill relative "
             "to dense (token pruning, then the KV policy); <eval>_delta = paired score difference to dense over "
             "the same documents (lm_eval: all tasks pooled), ± <eval>_delta_ci95; analytic_speedup = its inverse (layer cost, "
             "attention ignored); prefill_speedup = measured by sdtp-bench at its longest prompt.\n")
    paths = [out / "compare_methods.md", out / "compare_methods.csv", out / "compare_methods.json"]
    _atomic_write(paths[0], "\n".join(md) + "\n" + glossary)
    with _atomic(paths[1]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(records)
    _atomic_write(paths[2], json.dumps({"columns": header, "rows": records, "ci95": ci or {}, "sizes": sizes or {}},
                                       indent=2))
    plot = _plot(records, out / "compare_methods.png")
    return paths + ([plot] if plot else [])


class _atomic:
    """Context manager yielding a temp path that replaces ``path`` on success."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text)


def _plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy measures vs prefill speedup, one colour per method (legend, not labels: points overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_acc", None, "mean score over the task columns (higher is better)"),
              ("lm_eval_delta", "lm_eval_delta_ci95", "paired lm-eval accuracy vs dense, points (95% CI)"),
              ("longbench_delta", "longbench_delta_ci95", "paired LongBench score vs dense, points (95% CI)"),
              ("perplexity", None, "WikiText perplexity (lower is better)")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    shown = [r["method"] for r in records if any(r.get(col) is not None for col, _, _ in panels)]
    colours = {name: plt.cm.tab10(i % 10) if len(shown) <= 10 else plt.cm.tab20(i % 20) for i, name in enumerate(shown)}
    for ax, (col, err, label) in zip(axes[0], panels):
        for r in records:
            speed = r["prefill_speedup"] or r["analytic_speedup"]
            if r.get(col) is None or speed is None:
                continue
            marker = "o" if r["prefill_speedup"] is not None else "^"
            ax.errorbar(speed, r[col], yerr=r.get(err) if err else None, fmt=marker, color=colours[r["method"]],
                        capsize=3, markersize=6, label=r["method"])
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
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    with _atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


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
    path = out / "compare_methods.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text()).get("sizes")
    except (OSError, json.JSONDecodeError, AttributeError):
        old = None
    if not isinstance(old, dict):
        return f"{path} does not record how many documents it was built from (rendered before sizes were kept)"
    shrunk = [f"{key}: {n} -> {sizes.get(key, 0)}" for key, n in sorted(old.items()) if sizes.get(key, 0) < n]
    return f"{path} was built from more data ({'; '.join(shrunk)})" if shrunk else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("results/multiruns"))
    parser.add_argument("--out", type=Path, default=Path("results/compare"))
    parser.add_argument("--replace", action="store_true",
                        help="overwrite --out even if its page was built from more documents")
    parser.add_argument("--smaller-out", type=Path, default=None,
                        help="render here instead when --out holds a page built from more documents (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.root.is_dir():
        parser.error(f"--root {args.root} does not exist: run experiments/compare_methods.sh first")
    rows = collect(args.root)
    if not rows:
        parser.error(f"no metrics.json or bench.json under {args.root}")
    sizes = page_sizes(rows)
    refusal = None if args.replace else smaller_than_existing(args.out, sizes)
    if refusal and args.smaller_out is None:
        parser.error(f"{refusal}; not replacing it with this smaller page. Render elsewhere with --out DIR "
                     "(or --smaller-out DIR), or pass --replace to overwrite it")
    if refusal:
        log.warning("%s: rendering into %s instead", refusal, args.smaller_out)
        args.out = args.smaller_out
    header, records = table(rows)
    ci = intervals(rows)
    settings = settings_lines(rows)
    notes = [interval_line(rows, ci), "\n".join(versus_lines(rows)),
             "\n".join(["Settings (newest run per method and eval):", *settings]) if settings else None]
    for path in write_outputs(header, records, args.out, [n for n in notes if n], ci, sizes):
        log.info("wrote %s", path)
    print((args.out / "compare_methods.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
