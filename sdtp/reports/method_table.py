"""The method comparison page's table and its markdown.

:func:`table` turns the rows and their comparisons into one record per method in page order (the columns of
the csv/json, the plot's points); :func:`markdown` renders the page: the score / cost table, the paired
differences, fingerprint footnotes, settings and a glossary.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from sdtp.reports.compare_seeds import seed_order
from sdtp.reports.method_comparisons import FOCUS, family
from sdtp.reports.method_runs import DENSE, LOWER_IS_BETTER
from sdtp.reports.paired_tables import PAIRED_METHODS, interval_text, p_text

FOOTNOTE = "†"  # marks a row whose runs differ from dense's beyond the method


# --------------------------------------------------------------------------------------------
# Table


def page_order(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Dense first, then methods by name, KV rows after token pruners, each seed row right after its mean row."""
    def key(name: str) -> tuple:
        base = rows[name]["seed_of"] or name
        return name != DENSE, "+" in base, base, seed_order(rows[name]["seed"])
    return sorted(rows, key=key)


def lm_eval_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The lm-eval accuracy columns of dense (of every row when there is no dense run)."""
    source = [rows[DENSE]] if DENSE in rows else list(rows.values())
    return sorted({col for row in source for col, ev in row["column_eval"].items() if ev == "lm_eval"})


def delta_columns(ev: str) -> list[str]:
    return [f"{ev}_delta", f"{ev}_delta_low", f"{ev}_delta_high", f"{ev}_delta_p", f"{ev}_delta_p_holm",
            f"{ev}_delta_n"]


def delta_values(ev: str, name: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    """The flat ``<ev>_delta*`` columns of method ``name`` (dense: difference 0 by definition, no interval)."""
    match = next((c for c in found if c["a"] == name), None)
    if match is not None:
        values = (match["mean"], match["low"], match["high"], match["p"], match["p_holm"], match["n"])
    else:
        values = (0.0 if name == DENSE else None, None, None, None, None, None)
    return dict(zip(delta_columns(ev), values))


def table(rows: dict[str, dict[str, Any]], compared: dict[str, dict[str, list[dict[str, Any]]]],
          issues: dict[str, dict[str, list[str]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and one dict per method (page order)."""
    metric_cols = sorted({col for row in rows.values() for col in row["metrics"]},
                         key=lambda c: (c in LOWER_IS_BETTER, c))
    acc_cols = lm_eval_columns(rows)
    records = []
    for name in page_order(rows):
        row = rows[name]
        record: dict[str, Any] = {"method": name, "seed_of": row["seed_of"], "seeds": row["seeds"]}
        record.update({col: row["metrics"].get(col) for col in metric_cols})
        accs = [row["metrics"][c] for c in acc_cols if c in row["metrics"]]
        # Accuracies only, and only when every dense task is there: a mean over fewer tasks is another number.
        record["lm_eval_mean_acc"] = fmean(accs) if acc_cols and len(accs) == len(acc_cols) else None
        for ev, found in compared["vs_dense"].items():
            record.update(delta_values(ev, name, found))
        record["fingerprint"] = "; ".join(issues.get(name, {}).get("differs", [])) or None
        record["tokens_per_layer"] = row.get("layer_fraction")
        record.update({key: row.get(key) for key in ("kv_cache", "analytic_speedup", "prefill_speedup")})
        records.append(record)
    deltas = [col for ev in compared["vs_dense"] for col in delta_columns(ev)]
    header = ["method", "seed_of", *metric_cols, "lm_eval_mean_acc", *deltas, "tokens_per_layer", "kv_cache",
              "analytic_speedup", "prefill_speedup", "fingerprint"]
    return header, [{col: r.get(col) for col in header} | {"seeds": r["seeds"]} for r in records]


def spread_columns(header: Sequence[str]) -> list[str]:
    """The columns listed per seed: scores, the lm-eval mean and each eval's difference to dense (not its
    interval: the spread over seeds is the point; not the costs, which no seed changes)."""
    costs = ("method", "seed_of", "fingerprint", "tokens_per_layer", "kv_cache", "analytic_speedup",
             "prefill_speedup")
    return [c for c in header if c not in costs and ("_delta" not in c or c.endswith("_delta"))]


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def row_label(record: dict[str, Any]) -> str:
    """The method cell: seed rows indented under their mean row, mismatched fingerprints marked."""
    name = record["method"]
    if record["seed_of"]:
        name = f"↳ {name}"
    elif record.get("seeds"):
        name = f"{name} (mean of {len(record['seeds'])} seeds)"
    return name + (f" {FOOTNOTE}" if record.get("fingerprint") else "")


def main_table(header: list[str], records: list[dict[str, Any]]) -> list[str]:
    """The score / cost table (the paired differences get tables of their own)."""
    shown = [c for c in header if c not in ("seed_of", "fingerprint") and "_delta" not in c]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in records:
        lines.append("| " + " | ".join([row_label(r), *(_fmt(r[c]) for c in shown[1:])]) + " |")
    return lines


def comparison_table(found: list[dict[str, Any]], digits: int, label: str, marked: set[str]) -> list[str]:
    """One eval's comparisons: ``label`` column, Δ [95% CI], p, p (Holm), n; ``marked``: methods to footnote."""
    lines = [f"| {label} | Δ [95% CI] | p | p (Holm) | n |", "|---|---|---:|---:|---:|"]
    for c in found:
        name = c["a"] if label == "method" else f"{c['a']} − {c['b']}"
        name += f" {FOOTNOTE}" if {c["a"], c["b"]} & marked else ""
        holm_cell = p_text(c["p_holm"], c) if c["in_holm"] else "(seed row, not in Holm)"
        lines.append(f"| {name} | {interval_text(c, digits)} | {p_text(c['p'], c)} | {holm_cell} | {c['n']} |")
    return lines


def comparison_lines(compared: dict[str, dict[str, list[dict[str, Any]]]], marked: set[str]) -> list[str]:
    """Markdown sections: every method minus dense per eval, then SDTP minus every other method per eval."""
    lines: list[str] = []
    if compared["vs_dense"]:
        seeds = any(not c["in_holm"] for found in compared["vs_dense"].values() for c in found)
        lines += ["## Paired differences to dense", "",
                  f"Δ = method − dense on the same documents: mean with a 95% paired interval ({PAIRED_METHODS}); p "
                  "two-sided; p (Holm) = Holm-corrected over the comparisons to dense within the eval."
                  + (" A seeded method's mean row (per-document mean over its seeds) is in the Holm family, its "
                     "single-seed rows are shown but not counted." if seeds else ""), ""]
        for ev, found in compared["vs_dense"].items():
            fam = family(ev)
            lines += [f"### {ev} (Δ in {fam.unit}; Holm over {sum(c['in_holm'] for c in found)})", "",
                      f"Pooling: {fam.pooling}.", "", *comparison_table(found, fam.digits, "method", marked), ""]
    if compared["focus"]:
        lines += [f"## {FOCUS} minus each method", "",
                  "Same documents, 95% paired interval as above, p-values Holm-corrected over the comparisons of "
                  f"{FOCUS} within the eval.", ""]
        for ev, found in compared["focus"].items():
            fam = family(ev)
            lines += [f"### {ev} (Δ in {fam.unit}; Holm over {len(found)})", "",
                      *comparison_table(found, fam.digits, "comparison", marked), ""]
    return lines


def missing_interval_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Which perplexity numbers have no interval (runs from before per-window NLLs were stored)."""
    without = sorted(n for n, row in rows.items() if "perplexity" in row["metrics"] and "perplexity" not in row["docs"])
    if not without:
        return []
    return [f"Perplexity: no interval for {', '.join(without)}: their metrics.json has no per-window NLL "
            "(window_nll / window_tokens, perplexity protocol 2); `STEPS=\"perplexity table\"` recomputes them."]


def fingerprint_lines(issues: dict[str, dict[str, list[str]]]) -> list[str]:
    """Markdown footnotes: rows whose runs differ from dense's beyond the method, rows not checkable."""
    lines = [f"* {FOOTNOTE} {name}: differs from dense in " + "; ".join(found["differs"])
             for name, found in sorted(issues.items()) if found["differs"]]
    if lines:
        lines[:0] = [f"{FOOTNOTE} Runs whose fingerprint differs from dense's run of the same eval in something "
                     "other than the method (pruning/kv config, predictor): their differences to dense mix the "
                     "method with that change.", ""]
    unchecked = [f"{name} ({', '.join(found['unchecked'])})" for name, found in sorted(issues.items())
                 if found["unchecked"]]
    if unchecked:
        lines += [""] if lines else []  # a paragraph, not a continuation of the last bullet
        lines.append("Fingerprints not checked (a run of the pair has none: written before provenance was recorded): "
                     + "; ".join(unchecked) + ".")
    return lines


def settings_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown bullet per eval: its settings, or every variant if methods were run differently."""
    by_eval: dict[str, set[str]] = {}
    for row in rows.values():
        for name, text in row.get("settings", {}).items():
            if text:
                by_eval.setdefault(name, set()).add(text)
    bullets = [f"* {name}: " + " | ".join(sorted(texts)) + (" (methods differ!)" if len(texts) > 1 else "")
               for name, texts in sorted(by_eval.items())]
    return ["Settings (newest run per method and eval):", *bullets] if bullets else []


GLOSSARY = (
    "Accuracy columns (%): higher is better; perplexity: lower is better. lm_eval_mean_acc = mean over the lm-eval "
    "accuracy tasks only (ROUGE-L, needle scores and perplexity are on other scales and are not averaged in); "
    "a seeds' mean row shows the mean over its seeds of every column. tokens_per_layer = average fraction of prompt "
    "tokens each layer processed; kv_cache = KV entries left after prefill relative to dense (token pruning, then "
    "the KV policy); analytic_speedup = 1 / tokens_per_layer (layer cost, attention ignored); prefill_speedup = "
    "measured by sdtp-bench at its longest prompt. In the csv/json, <eval>_delta[_low/_high/_p/_p_holm/_n] = the "
    "paired difference to dense above.")


def markdown(header: list[str], records: list[dict[str, Any]], notes: Sequence[Sequence[str]]) -> str:
    lines = ["# Method comparison", "", "Generated by `sdtp/reports/compare_methods.py` (`scripts/compare_methods.py`; "
             "do not edit by hand).", "", *main_table(header, records)]
    for block in notes:
        if block:
            lines += ["", *block]
    return "\n".join([*lines, "", GLOSSARY]) + "\n"
