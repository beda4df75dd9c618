"""Seeds on the method comparison page: one row per seed and a mean row per seeded method.

Two kinds of seed make a method's numbers vary between runs of the same setup:

* scorer seeds: ``random`` draws its scores from ``pruning.scorer.seed`` (read from the run's resolved
  config); rows ``random_s0``, ``random_s1``...
* training seeds: a run with ``pruning.scorer.path=<folder>`` on its command line scored with a predictor
  trained by the same recipe as the shipped one but with another seed (``experiments/compare_methods.sh``
  runs the folders listed in ``results/predictors/<model>/seeds.txt``); rows ``sdtp_<folder name>``. The
  same method's run with its configured (shipped) predictor becomes ``sdtp_shipped`` once such siblings exist.

The method's own row (``random``, ``sdtp``, ``sdtp+h2o@0.4``...) is then the per-document mean over its seed
rows: that row is paired with the other methods, while :func:`seed_spread_lines` lists each seed's numbers
with their mean and a 95% t interval over the seeds (the training noise, which a per-document interval of
one seed does not show).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from sdtp.reports.seed_runs import SEP, natural_key, seed_lines, spread

log = logging.getLogger("compare_methods")

# Scorers whose output depends on ``pruning.scorer.seed``: one row per seed plus their mean.
SEEDED_METHODS = ("random",)
# The command-line override naming another training seed's predictor folder.
PATH_OVERRIDE = "pruning.scorer.path="
SHIPPED = "shipped"  # the seed label of a run with the method's configured predictor
Seed = int | str


def scorer_seed(pruning: Any) -> int | None:
    """The scorer seed of an eval run of a seeded method, from its resolved ``config.pruning``, else None.

    Read from the config rather than from the overrides: a run without ``pruning.scorer.seed=`` on
    its command line used the config default, and must not collapse into another seed's row.
    """
    if not isinstance(pruning, dict) or pruning.get("name") not in SEEDED_METHODS:
        return None
    scorer = pruning.get("scorer")
    seed = scorer.get("seed") if isinstance(scorer, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def training_seed(overrides: Sequence[str]) -> str | None:
    """The predictor folder name a run's ``pruning.scorer.path=`` override points at ("seed9"), else None."""
    for override in overrides:
        if override.startswith(PATH_OVERRIDE):
            return Path(override.removeprefix(PATH_OVERRIDE).rstrip("/")).name or None
    return None


def run_seed(pruning: Any, overrides: Sequence[str], has_training_seeds: bool) -> Seed | None:
    """The seed an eval run stands for (``pruning``: its resolved ``config.pruning``): its scorer seed, its training
    seed, :data:`SHIPPED` for the configured predictor's run of a method that has training-seed siblings
    (``has_training_seeds``), else None."""
    seed = scorer_seed(pruning)
    if seed is not None:
        return seed
    return training_seed(overrides) or (SHIPPED if has_training_seeds else None)


def seed_suffix(seed: Seed) -> str:
    """The row-name suffix of a seed: ``_s3`` for a scorer seed, ``_seed9`` / ``_shipped`` for a training seed."""
    return f"_s{seed}" if isinstance(seed, int) else f"_{seed}"


def seed_order(seed: Seed | None) -> tuple:
    """Sort key of seed rows: the shipped predictor first, then seeds in natural order (seed9 before seed10)."""
    return (seed is not None, seed != SHIPPED, natural_key(str(seed)))


def _common_mean(dicts: Sequence[dict[Any, float]]) -> dict[Any, float]:
    """key -> mean over ``dicts`` for the keys every one of them has."""
    common = set.intersection(*(set(d) for d in dicts))
    return {key: fmean([d[key] for d in dicts]) for key in common}


def seed_group(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean row of a seeded method's seed rows.

    Columns and per-document outcomes are averaged over the seeds, on the columns / documents every
    seed has (a mean over fewer seeds would be another quantity); an eval one seed lacks is left out.
    """
    evals = set.intersection(*(set(m["docs"]) for m in members))
    fractions = [m["layer_fraction"] for m in members if m.get("layer_fraction")]
    group = {
        "metrics": _common_mean([m["metrics"] for m in members]),
        "column_eval": {k: v for m in members for k, v in m["column_eval"].items()},
        "counts": {col: min(m["counts"][col] for m in members)
                   for col in set.intersection(*(set(m["counts"]) for m in members))},
        "docs": {ev: _common_mean([m["docs"][ev] for m in members]) for ev in evals},
    }
    if fractions:  # the seeds share the schedule; the mean only smooths the per-prompt rounding
        group["layer_fraction"] = fmean(fractions)
    if any("kv_kept" in m for m in members):
        group["kv_kept"] = fmean([m.get("kv_kept", 1.0) for m in members])
    return group


def add_seed_groups(rows: dict[str, dict[str, Any]], new_row: Callable[[], dict[str, Any]]) -> None:
    """Add (or fill) one mean row per seeded method (``random`` from ``random_s0``, ``random_s1``...);
    ``new_row`` makes the empty row of a method that has no row of its own yet."""
    groups: dict[str, list[str]] = {}
    for name, row in rows.items():
        if row["seed_of"] is not None:
            groups.setdefault(row["seed_of"], []).append(name)
    for base, names in groups.items():
        names.sort(key=lambda n: seed_order(rows[n]["seed"]))
        row = rows.setdefault(base, new_row())  # may already hold the benchmark of the method
        if row["metrics"] or row["docs"]:
            log.warning("%s: runs without a recorded seed are replaced by the mean over %s", base, ", ".join(names))
        row.update(seed_group([rows[n] for n in names]))
        row["seeds"] = names


def seed_spread_lines(records: Sequence[dict[str, Any]], seeds: dict[str, Seed | None],
                      columns: Sequence[str]) -> list[str]:
    """Markdown: per mean row, each seed's value of every column in ``columns`` all its seeds have, their mean
    and a 95% Student t interval over the seeds (nothing when no row has seeds).

    ``records``: the page's table rows; ``seeds``: row name -> the seed it stands for."""
    by_name = {r["method"]: r for r in records}
    spreads = {}
    for record in records:
        if record.get("seeds"):
            # seed_lines labels each member by what follows SEP in its key: its seed.
            spreads[record["method"]] = spread({f"{SEP}{seed_suffix(seeds[m]).lstrip('_')}":
                                                {c: by_name[m].get(c) for c in columns} for m in record["seeds"]})
    if not spreads:
        return []
    return ["## Over seeds", "",
            "Each seeded row's seeds one by one (the rows above marked ↳), with their mean and a 95% Student t "
            "interval over the seeds (n − 1 degrees of freedom: with three seeds t = 4.30); `<eval>_delta` = the "
            "seed's paired difference to dense. For a trained predictor (sdtp: the shipped one and the other "
            "training seeds of its recipe) this interval is the training noise on these very documents: one that "
            "excludes 0 says every seed lands on the same side here, not that the method differs from dense on "
            "other documents. That is what the paired intervals above (over documents, seeds averaged per "
            "document) test.", "",
            *seed_lines(spreads, {}, digits=3), ""]
