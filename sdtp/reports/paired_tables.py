"""Paired tables of per-segment NLLs: each scorer against dense, each predictor against every scorer.

Input: for one dataset x context, ``{scorer: [NLL per segment]}`` over the *same* segments (the
caller guarantees the pairing). Output: JSON-ready dicts, rendered to Markdown by
:func:`render_markdown`.

* scorer rows: mean NLL, exp(mean), the paired difference to dense with a 95% t interval;
* seed groups (random's seeds, or one predictor trained with several seeds): their per-segment mean is
  the group's row used for pairing (it averages the mask or training noise out of the comparison); each
  seed keeps a row of its own;
* predictor comparisons: ``predictor - other`` with a 95% t interval and Holm-corrected p-values
  over all comparisons of the dataset x context (pairs that never differ are "identical");
* pooled over datasets (per context): the mean of the dataset means, intervals from a paired
  bootstrap that resamples segments within each dataset (no p-values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sdtp.eval.stats import PairedInterval, holm, paired_t_interval, stratified_bootstrap_ci

RANDOM = "random"
ZERO_NOISE = 1e-12  # |x| below this is summation noise around an exact zero, shown as +0


def _clean(value: float) -> float | None:
    """NaN/inf -> None, so eval.json stays strict JSON."""
    return value if isinstance(value, float) and math.isfinite(value) else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _diffs(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"unpaired: {len(a)} vs {len(b)} segments")
    return [x - y for x, y in zip(a, b)]


def paired_summary(result: PairedInterval) -> dict[str, Any]:
    """A JSON-ready dict of ``result``; ``method`` is named only when it is not the t interval."""
    method = {} if result.method == "t" else {"method": result.method}
    return {"mean": result.mean, "low": _clean(result.low), "high": _clean(result.high), "p": _clean(result.p_value),
            "n": result.n, "identical": result.identical, "constant": result.constant, **method}


def with_seed_means(nll: dict[str, list[float]], groups: Mapping[str, Sequence[str]]) -> dict[str, list[float]]:
    """``nll`` plus one entry per seed group (``random``, or a predictor trained with several seeds): the
    per-segment mean over the group's members present (groups with none present are left out)."""
    out = dict(nll)
    for name, members in groups.items():
        present = [m for m in members if m in nll]
        if present:
            out[name] = [_mean(values) for values in zip(*(nll[m] for m in present))]
    return out


def scorer_rows(nll: dict[str, list[float]], fractions: dict[str, tuple[float, float, float | None]],
                order: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One row per scorer in ``order`` that has numbers; ``fractions``: scorer -> (kept, per-layer, KV cache),
    the KV cache's share of dense None without a KV policy (it is then the per-layer share);
    ``groups``: seed-group row -> its member rows (:func:`with_seed_means`)."""
    member_of = {m: name for name, members in groups.items() for m in members}
    rows = []
    for name in order:
        if name not in nll:
            continue
        mean = _mean(nll[name])
        delta = paired_summary(paired_t_interval(_diffs(nll[name], nll["dense"]))) if "dense" in nll else None
        kept = fractions.get(name)
        if name in groups:  # the members share the schedule, so any member's fractions are the row's
            kept = next((fractions[s] for s in groups[name] if s in fractions), None)
        rows.append({
            "scorer": name, "n": len(nll[name]), "nll": mean, "ppl": math.exp(mean),
            "delta_vs_dense": None if name == "dense" else delta,
            "kept_fraction": kept[0] if kept else None, "layer_fraction": kept[1] if kept else None,
            "kv_fraction": kept[2] if kept else None,
            "seed_of": member_of.get(name),
            "seeds": [s for s in groups[name] if s in nll] if name in groups else None,
        })
    return rows


def comparison_pairs(names: Sequence[str], predictors: Sequence[str]) -> list[tuple[str, str]]:
    """(predictor, other) for every predictor against every other scorer, each unordered pair once."""
    pairs, seen = [], set()
    for pred in predictors:
        for other in names:
            if other != pred and frozenset((pred, other)) not in seen:
                seen.add(frozenset((pred, other)))
                pairs.append((pred, other))
    return pairs


def predictor_comparisons(nll: dict[str, list[float]], predictors: Sequence[str],
                          order: Sequence[str]) -> list[dict[str, Any]]:
    """Paired t comparisons ``predictor - other`` with Holm-adjusted p over all of them."""
    names = [n for n in order if n in nll]
    pairs = comparison_pairs(names, [p for p in predictors if p in nll])
    results = [{"a": a, "b": b, **paired_summary(paired_t_interval(_diffs(nll[a], nll[b])))} for a, b in pairs]
    holm_adjust(results)
    return results


def pooled(per_dataset: dict[str, dict[str, list[float]]], order: Sequence[str],
           predictors: Sequence[str]) -> dict[str, Any]:
    """Rows and predictor comparisons pooled over datasets (scorers present in every dataset only)."""
    datasets = sorted(per_dataset)
    names = [n for n in order if all(n in per_dataset[d] for d in datasets)]

    def boot(a: str, b: str) -> dict[str, Any]:
        strata = [_diffs(per_dataset[d][a], per_dataset[d][b]) for d in datasets]
        mean, low, high = stratified_bootstrap_ci(strata)
        return {"mean": mean, "low": low, "high": high, "identical": all(x == 0.0 for s in strata for x in s)}

    rows = [{"scorer": n, "nll": _mean([_mean(per_dataset[d][n]) for d in datasets]),
             "delta_vs_dense": boot(n, "dense") if n != "dense" and "dense" in names else None} for n in names]
    pairs = comparison_pairs(names, [p for p in predictors if p in names])
    comparisons = [{"a": a, "b": b, **boot(a, b)} for a, b in pairs]
    return {"datasets": datasets, "rows": rows, "comparisons": comparisons}


# --------------------------------------------------------------------------------------------
# Markdown


def interval_text(d: dict[str, Any] | None, digits: int = 4) -> str:
    """``mean [low, high]`` of a :func:`paired_summary`-like dict; "identical on all n" when every pair is equal."""
    if d is None:
        return "–"
    if d.get("identical"):
        return f"identical on all {d['n']}" if "n" in d else "identical"

    def signed(x: float) -> str:
        # A float-noise zero (a mean of seed averages can be -1e-15) shows as +0.00; a real value keeps its sign, so a
        # bound of -0.00004 reads -0.0000: just below zero, not on it.
        return f"{x if abs(x) > ZERO_NOISE else 0.0:+.{digits}f}"

    if d.get("low") is None:
        return signed(d["mean"])
    return f"{signed(d['mean'])} [{signed(d['low'])}, {signed(d['high'])}]"


# How the pages' paired intervals are made (sdtp.eval.stats.paired_interval), said once for all of them.
PAIRED_METHODS = ("outcomes all 0 or 1 (one run's correctness, or seeds that agree on every document): Newcombe's "
                  "score interval with an exact McNemar p, the more conservative of the two (an interval just "
                  "excluding 0 can come with p above 0.05); other outcomes (scores, correctness averaged over seeds "
                  "that differ): a paired Student t interval and t test")
AVERAGE_METHOD = ("a stratified interval (0/1 outcomes: the tasks' Newcombe limits combined by MOVER, exact McNemar p "
                  "on the pooled flips; other outcomes: t with each task's document variance and Welch-Satterthwaite "
                  "degrees of freedom; with one task, that task's own interval), p not Holm-corrected")


def holm_adjust(deltas: Sequence[dict[str, Any] | None]) -> None:
    """Set ``p_holm`` on each :func:`paired_summary` of one family: Holm over their p-values. A pair that never
    differs counts with p = 1 (its hypothesis was tested too); a missing delta or p is left out."""
    ps = [math.nan if d is None or d.get("p") is None else d["p"] for d in deltas]
    for delta, p in zip(deltas, holm(ps)):
        if delta is not None:
            delta["p_holm"] = None if math.isnan(p) else p


def uncorrected_p_text(d: dict[str, Any] | None) -> str:
    """The p cell of a pooled (Avg) row: its own p, marked as outside the Holm family."""
    if d is None:
        return "–"
    text = p_text(d.get("p"), d)
    return text if text == "–" or d.get("constant") else f"{text} (uncorrected)"


def p_text(value: float | None, d: dict[str, Any]) -> str:
    """A p-value cell: "–" for identical pairs (no test), a note for a constant difference (p = 0 says nothing)."""
    if d.get("identical"):
        return "–"
    if d.get("constant"):
        return f"constant difference on all {d['n']}"
    return "–" if value is None else (f"{value:.2g}" if value >= 1e-4 else "<1e-4")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def cell_markdown(cell: dict[str, Any]) -> list[str]:
    lines = [f"### {cell['dataset']}, context {cell['context_len']} ({cell['segments']} segments)", ""]
    if not cell["rows"]:
        return lines + ["No scorer computed yet.", ""]
    # The KV cache column only in cells with a KV policy: elsewhere it equals tokens/layer.
    kv = any(row.get("kv_fraction") is not None for row in cell["rows"])
    lines += ["| scorer | mean NLL | exp(NLL) | Δ vs dense [95% t CI] | context kept | tokens/layer |"
              + (" KV cache |" if kv else ""), "|---|---:|---:|---|---:|---:|" + ("---:|" if kv else "")]
    for row in cell["rows"]:
        name = f"  ↳ {row['scorer']}" if row["seed_of"] else row["scorer"]
        if row["seeds"]:
            name = f"{row['scorer']} (mean of {len(row['seeds'])} seeds)"
        cache = row.get("kv_fraction")
        lines.append(f"| {name} | {row['nll']:.4f} | {row['ppl']:.3f} | {interval_text(row['delta_vs_dense'])} | "
                     f"{_pct(row['kept_fraction'])} | {_pct(row['layer_fraction'])} |"
                     + (f" {_pct(row['layer_fraction'] if cache is None else cache)} |" if kv else ""))
    if cell["comparisons"]:
        lines += ["", f"Predictor comparisons (Δ = first − second; Holm over the {len(cell['comparisons'])} "
                      "comparisons of this table):", "",
                  "| comparison | Δ NLL [95% t CI] | p | p (Holm) |", "|---|---|---:|---:|"]
        for c in cell["comparisons"]:
            lines.append(f"| {c['a']} − {c['b']} | {interval_text(c)} | {p_text(c['p'], c)} | "
                         f"{p_text(c['p_holm'], c)} |")
    if cell["missing"]:
        lines += ["", "Not computed (or cache fingerprint mismatch): " + ", ".join(cell["missing"])]
    return lines + [""]


def pooled_markdown(block: dict[str, Any]) -> list[str]:
    lines = [f"### pooled over {', '.join(block['datasets'])}, context {block['context_len']}", "",
             "Mean of the dataset means; intervals: paired bootstrap (10,000 resamples of segments within "
             "each dataset), no p-values.", "",
             "| scorer | mean NLL | Δ vs dense [95% bootstrap CI] |", "|---|---:|---|"]
    label = {RANDOM: "random (mean of seeds)"}
    lines += [f"| {label.get(r['scorer'], r['scorer'])} | {r['nll']:.4f} | {interval_text(r['delta_vs_dense'])} |"
              for r in block["rows"]]
    if block["comparisons"]:
        lines += ["", "| comparison | Δ NLL [95% bootstrap CI] |", "|---|---|"]
        lines += [f"| {c['a']} − {c['b']} | {interval_text(c)} |" for c in block["comparisons"]]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """The page: header (protocol, schedule, machine, command), then one section per context."""
    lines = [f"# {report['title']}", "", "Generated by `sdtp/reports/predictor_eval.py` (do not edit by hand):", "",
             "```bash", report["command"], "```", ""]
    lines += [f"- **{key}.** {text}" for key, text in report["header"].items()]
    lines.append("")
    for ctx in report["contexts"]:
        lines += [f"## context {ctx} tokens", ""]
        for cell in report["cells"]:
            if cell["context_len"] == ctx:
                lines += cell_markdown(cell)
        for block in report["pooled"]:
            if block["context_len"] == ctx and len(block["datasets"]) > 1 and block["rows"]:
                lines += pooled_markdown(block)
    return "\n".join(lines).rstrip() + "\n"
