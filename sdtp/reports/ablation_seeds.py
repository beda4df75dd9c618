"""Training seeds of retrained-predictor ablation points (paper Figures 4/5): one point, several seeds.

A figure point trained with several seeds (``<row>_s<seed>.json`` each, :mod:`sdtp.reports.ablation_points`)
is shown as its *seed mean* (per segment the mean NLL over its seeds, so it still pairs with dense segment by
segment: the interval over segments is data noise) and *over seeds* (the per-seed Δ NLL with a t interval over
seeds: training noise). A trend between two points uses the seeds both have, and reads expected / unexpected only
when the interval over seeds, where there is one, agrees with the one over segments (:func:`seed_verdict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sdtp.reports.ablation_points import cell, delta_nll, interval, interval_side, paired_delta, verdict
from sdtp.reports.lm_eval_pages import num


def points_by_row(points: Mapping[tuple[str, int], dict[str, Any]], seeds: Iterable[int]
                  ) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> {seed: summary} of the points trained with one of ``seeds`` (rows without any are left out)."""
    wanted, groups = set(seeds), {}
    for (row, seed), p in points.items():
        if seed in wanted:
            groups.setdefault(row, {})[seed] = p
    return {row: dict(sorted(g.items())) for row, g in groups.items()}


def seed_mean(group: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """One summary standing for a row trained with several seeds: per segment every seed evaluated, the mean NLL
    over seeds (so paired intervals over segments still pair with dense); the first seed's setup and metrics."""
    members = list(group.values())
    shared = set.intersection(*(set(p["segments"]) for p in members))
    segments = {i: sum(p["segments"][i] for p in members) / len(members) for i in sorted(shared, key=int)}
    return {**members[0], "seed": None, "seeds": list(group), "segments": segments}


def seed_verdict(d: dict[str, Any] | None, d_seeds: dict[str, Any] | None, expected: str) -> str:
    """:func:`verdict` of a difference between seed means (``d``, paired over segments), downgraded to unresolved
    when the interval over training seeds (``d_seeds``, two seeds or more) does not exclude 0 on the same side."""
    by_segment = verdict(d, expected)
    side, seeds_side = interval_side(d), interval_side(d_seeds)
    if side in (None, 0) or seeds_side is None or seeds_side == side:
        return by_segment
    return f"unresolved over training seeds ({by_segment} over segments alone)"


def _mean_of(group: Mapping[int, dict[str, Any]], key: str) -> float | None:
    values = [p.get("train", {}).get(key) for p in group.values()]
    values = [v for v in values if isinstance(v, int | float)]
    return sum(values) / len(values) if values else None


def seed_entry(group: Mapping[int, dict[str, Any]], dense: dict[str, Any] | None) -> dict[str, Any]:
    """What a figure page shows of one point over its training seeds: Δ NLL vs dense of the seed mean (95% paired t
    over segments), the same over seeds (t over per-seed Δ) and per seed, mean Spearman / top-k overlap, measured
    tokens per layer (the schedule's: equal across seeds) and the compute of all seeds."""
    first = next(iter(group.values()))
    per_seed = {str(s): None if dense is None else delta_nll(p, dense) for s, p in group.items()}
    deltas = [d for d in per_seed.values() if d is not None]
    return {"seeds": list(group), "delta_nll": paired_delta(seed_mean(group), dense),
            "delta_seeds": interval(deltas), "per_seed": per_seed,
            "spearman": _mean_of(group, "spearman"), "topk_overlap": _mean_of(group, "topk_overlap"),
            "measured_layer_fraction": first["metrics"].get("avg_layer_token_fraction"),
            "wall_s": sum(p.get("wall_s") or 0 for p in group.values())}


def per_seed_text(entry: Mapping[str, Any]) -> str:
    """A :func:`seed_entry`'s per-seed Δ NLL as ``s0 +0.0123, s1 +0.0150``."""
    return ", ".join(f"s{s} {num(d, '+.4f')}" for s, d in entry["per_seed"].items()) or "–"


SEED_CSV_COLUMNS = ["seeds", "seeds_delta_nll", "seeds_low", "seeds_high", "per_seed_delta_nll"]


def seed_csv_cells(entry: Mapping[str, Any] | None) -> list[Any]:
    """The :data:`SEED_CSV_COLUMNS` of a :func:`seed_entry` (blanks for a missing point)."""
    e = entry or {}
    d = e.get("delta_seeds") or {}
    per_seed = " ".join(f"{s}:{v:.6g}" for s, v in (e.get("per_seed") or {}).items() if v is not None)
    return [" ".join(map(str, e.get("seeds", []))), d.get("mean"), d.get("low"), d.get("high"), per_seed]


def plot_seed_dots(ax: Any, entries: Iterable[Mapping[str, Any]], x_key: str, color: str) -> None:
    """Each training seed's Δ NLL as a small dot beside the seed mean's error bar (the spread over seeds)."""
    xs, ys = [], []
    for e in entries:
        values = [v for v in e["per_seed"].values() if v is not None]
        if len(values) > 1:
            xs += [e[x_key]] * len(values)
            ys += values
    if xs:
        ax.scatter(xs, ys, s=9, color=color, alpha=0.45, zorder=3)


def seed_diff(a: Mapping[int, dict[str, Any]], b: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Row a − row b over the seeds both have: paired over segments of their seed means, and over seeds."""
    shared = [s for s in a if s in b]
    if not shared:
        return {"seeds": [], "diff": None, "diff_seeds": None}
    a_, b_ = {s: a[s] for s in shared}, {s: b[s] for s in shared}
    per_seed = [d for d in (delta_nll(a_[s], b_[s]) for s in shared) if d is not None]
    return {"seeds": shared, "diff": paired_delta(seed_mean(a_), seed_mean(b_)), "diff_seeds": interval(per_seed)}


def seeds_text(page_seeds: Sequence[int], missing: Mapping[str, list[str]]) -> str:
    """Which training seeds the page asks for and, per seed, the points not summarised yet."""
    parts = [f"seed {s}: {len(missing[str(s)])} missing" + (f" ({', '.join(missing[str(s)])})"
                                                             if 0 < len(missing[str(s)]) <= 8 else "")
             for s in page_seeds]
    return f"Training seeds asked for: {', '.join(map(str, page_seeds))} — " + "; ".join(parts) + "."


def diff_text(d: Mapping[str, Any]) -> str:
    """A :func:`seed_diff` as text: over segments, and over seeds when it has two or more."""
    by_segment = f"{cell(d['diff'], '+.4f')} over segments"
    if len(d["seeds"]) < 2:
        return f"{by_segment} (one training seed: {', '.join(map(str, d['seeds'])) or 'none shared'})"
    return f"{by_segment}, {cell(d['diff_seeds'], '+.4f')} over seeds {', '.join(map(str, d['seeds']))}"
