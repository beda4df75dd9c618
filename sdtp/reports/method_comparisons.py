"""What the method comparison page compares: fingerprint checks and paired statistics.

Each row's runs are checked against dense's runs of the same eval (:func:`fingerprint_issues`: everything but
the method must match), and per eval every method is paired with dense and :data:`FOCUS` with every other
method on their common documents (:func:`comparisons`: paired intervals, Holm within an eval).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sdtp.eval.stats import paired_interval
from sdtp.provenance import changed_keys, portable
from sdtp.reports.method_runs import DENSE
from sdtp.reports.paired_tables import holm_adjust, paired_summary

FOCUS = "sdtp"  # the method compared against every other one
# Config groups that make up the method itself; the rest of a fingerprint must match dense's. The
# predictor checkpoint hashes belong to the method too (only sdtp has one).
METHOD_CONFIG_KEYS = ("pruning", "kv")
NON_METHOD_PARTS = ("dtype", "device", "packages", "git")


# --------------------------------------------------------------------------------------------
# Fingerprints


def comparable_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """The non-method parts of a run's fingerprint (see :data:`METHOD_CONFIG_KEYS`), locations factored out."""
    comparable = portable(fp)
    kept = {k: v for k, v in comparable["config"].items() if k not in METHOD_CONFIG_KEYS}
    return {"config": kept, "data": sorted(map(str, comparable["data"].values())),
            **{part: fp.get(part) for part in NON_METHOD_PARTS}}


def fingerprint_issues(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """method -> {"differs": [...], "unchecked": [...]}, one text per eval, against dense's run of that eval.

    A seeds' mean row inherits its seeds' differences (named by seed): its numbers mix them in.
    """
    reference = rows.get(DENSE, {}).get("fingerprints", {})
    issues: dict[str, dict[str, list[str]]] = {}
    for name, row in rows.items():
        found: dict[str, list[str]] = {"differs": [], "unchecked": []}
        for ev, fp in sorted(row.get("fingerprints", {}).items()):
            if name == DENSE or ev not in reference:
                continue
            if not isinstance(fp, dict) or not isinstance(reference[ev], dict):
                found["unchecked"].append(ev)
                continue
            keys = changed_keys(comparable_fingerprint(reference[ev]), comparable_fingerprint(fp))
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                found["differs"].append(f"{ev}: {shown}")
        issues[name] = found
    for name, row in rows.items():
        for seed in row.get("seeds") or []:
            issues[name]["differs"] += [f"{seed} {text}" for text in issues[seed]["differs"]]
    return issues

# --------------------------------------------------------------------------------------------
# Paired statistics


@dataclass(frozen=True)
class Family:
    """How one eval's paired differences are expressed and what their units are."""

    unit: str
    scale: float  # outcome difference -> unit
    digits: int
    pooling: str


def family(ev: str) -> Family:
    if ev == "perplexity":
        return Family("nats/token", 1.0, 4,
                      "paired t over the WikiText windows (per window: mean NLL per scored token). Consecutive "
                      "windows share context, so they are not independent samples and the interval may be too narrow")
    if ev == "lm_eval":
        return Family("points", 100.0, 2,
                      "paired over the documents of all tasks pooled (one 0/1 outcome per document, every "
                      "document weighs the same)")
    return Family("points", 100.0, 2, "paired over the samples (all datasets / lengths / depths pooled)")


def paired(a: dict[Any, float], b: dict[Any, float], scale: float) -> dict[str, Any] | None:
    """``a - b`` over their common units, in ``scale`` units: mean, 95% interval, p (None below 2 units); 0/1
    outcomes get Newcombe's interval and an exact McNemar p (:func:`sdtp.eval.stats.paired_interval`)."""
    common = a.keys() & b.keys()
    if len(common) < 2:
        return None
    return paired_summary(paired_interval([a[key] for key in common], [b[key] for key in common], scale))


def with_holm(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``p_holm``: Holm over the comparisons with ``in_holm`` (per-seed rows are shown, not counted)."""
    out = [{**c, "p_holm": None} for c in comparisons]
    holm_adjust([c for c in out if c["in_holm"]])
    return out


def compare_family(rows: dict[str, dict[str, Any]], ev: str, pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """Paired comparisons ``a - b`` on eval ``ev`` (pairs without two common units are left out), Holm-adjusted."""
    scale = family(ev).scale
    found = []
    for a, b in pairs:
        result = paired(rows[a]["docs"].get(ev, {}), rows[b]["docs"].get(ev, {}), scale)
        if result is not None:
            found.append({"a": a, "b": b, **result, "in_holm": rows[a]["seed_of"] is None})
    return with_holm(found)


def eval_order(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The evals with paired units, lm_eval first."""
    evals = {ev for row in rows.values() for ev in row["docs"]}
    return sorted(evals, key=lambda ev: (ev != "lm_eval", ev))


def comparisons(rows: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{"vs_dense": {eval: [...]}, "focus": {eval: [...]}} for the methods ``names`` (in page order)."""
    result: dict[str, dict[str, list[dict[str, Any]]]] = {"vs_dense": {}, "focus": {}}
    for ev in eval_order(rows):
        if DENSE in rows:
            result["vs_dense"][ev] = compare_family(rows, ev, [(n, DENSE) for n in names if n != DENSE])
        if FOCUS in rows:
            others = [n for n in names if n != FOCUS and rows[n]["seed_of"] is None]
            result["focus"][ev] = compare_family(rows, ev, [(FOCUS, n) for n in others])
    return {kind: {ev: found for ev, found in by_eval.items() if found} for kind, by_eval in result.items()}
