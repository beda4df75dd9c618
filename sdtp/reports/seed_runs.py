"""Rows of a result page that depend on training, over several training seeds.

A page row made with a trained predictor (``sdtp``, ``sdtp_h2o``...) may have sibling runs of the
same setup with a predictor of the same recipe trained with another seed, named ``<row>@<label>``
(``sdtp@seed9``). The row then stands for their per-document (per-sample) mean, which averages the
training noise out of the paired comparison with dense, as random's seeds do on the predictor pages
(:func:`merge_seed_runs`); each seed's own numbers are reported beside it with their mean and a 95%
Student t interval over the seeds (:func:`spread`, :func:`seed_lines`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sdtp.eval.stats import paired_t_interval

SEP = "@"
Summary = dict[str, Any]  # a run summary (sdtp.reports.run_summary.summarise)


def row_of(name: str) -> str:
    """The page row a run belongs to ("sdtp@seed9" -> "sdtp")."""
    return name.partition(SEP)[0]


def seed_label(name: str, shipped: str = "shipped") -> str:
    """The seed a run stands for ("sdtp@seed9" -> "seed9"; the row's own run -> ``shipped``)."""
    return name.partition(SEP)[2] or shipped


def natural_key(name: str) -> list[Any]:
    """Sort key putting "seed9" before "seed10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def seed_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """row -> [row, row@a, row@b, ...] for every row that has sibling seeds (the row's own run first)."""
    names = list(names)
    siblings = sorted((n for n in names if SEP in n), key=natural_key)
    groups: dict[str, list[str]] = {}
    for name in siblings:
        row = row_of(name)
        if row not in names:
            raise ValueError(f"run {name!r} has no run {row!r} (a row's other seeds need its own run)")
        groups.setdefault(row, [row]).append(name)
    return groups


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _majority(answers: Sequence[Any]) -> Any:
    """The answer most members chose; a tie goes to the earliest member's (the row's own run)."""
    counts = Counter(answers)
    top = max(counts.values())
    return next(a for a in answers if counts[a] == top)


def _document_mean(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One lm-eval task over the documents every member evaluated: mean 0/1 correctness, majority answer."""
    by_id = [dict(zip(m["doc_ids"], range(len(m["doc_ids"])))) for m in members]
    first = members[0]
    ids = [i for i in first["doc_ids"] if all(i in index for index in by_id)]
    out = {**first, "doc_ids": ids,
           "acc": [_mean([float(m["acc"][x[i]]) for m, x in zip(members, by_id)]) for i in ids]}
    if first.get("target"):
        out["target"] = [first["target"][by_id[0][i]] for i in ids]
    if all(m.get("pred") for m in members):  # digits ("0210", as summarise stores them) or a list
        picks = [_majority([m["pred"][x[i]] for m, x in zip(members, by_id)]) for i in ids]
        out["pred"] = "".join(picks) if isinstance(first["pred"], str) else picks
    else:
        out["pred"] = None
    return out


def _prediction_mean(members: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Generation predictions over the samples every member scored: mean score, the first member's costs."""
    def key(record: dict[str, Any]) -> tuple[str, str]:
        return str(record.get("dataset", record.get("task"))), str(record["id"])

    scored = [{key(r): r for r in records if isinstance(r.get("score"), int | float)} for records in members]
    shared = [k for k in scored[0] if all(k in s for s in scored)]
    return [{**scored[0][k], "score": _mean([float(s[k]["score"]) for s in scored])} for k in shared]


def seed_mean(members: Sequence[Summary]) -> Summary:
    """One summary standing for several seeds' runs of the same setup (the row's own run first).

    lm-eval documents: ``acc`` the mean correctness over the seeds (0, 1/3, 2/3 or 1 with three), ``pred``
    the answer most seeds chose. Generation predictions: ``score`` the mean over the seeds; their costs the
    first member's. Only documents (samples) every member has are kept. ``metrics``: the first member's,
    with ``seeds`` (the member count).
    """
    if not members:
        raise ValueError("seed_mean needs at least one run")
    first = members[0]
    tasks = [t for t in first["documents"] if all(t in m["documents"] for m in members)]
    out: Summary = {"metrics": {**first["metrics"], "seeds": len(members)},
                    "documents": {t: _document_mean([m["documents"][t] for m in members]) for t in tasks}}
    if all("predictions" in m for m in members):
        out["predictions"] = _prediction_mean([m["predictions"] for m in members])
    return out


def merge_seed_runs(summaries: Mapping[str, Summary]) -> tuple[dict[str, Summary], dict[str, list[str]]]:
    """(the page's runs with each row that has sibling seeds replaced by their :func:`seed_mean` and the
    siblings left out, the seed groups of :func:`seed_groups`)."""
    groups = seed_groups(summaries)
    runs = {name: summary for name, summary in summaries.items() if SEP not in name}
    for row, members in groups.items():
        runs[row] = seed_mean([summaries[m] for m in members])
    return runs, groups


def over_seeds(values: Sequence[float]) -> dict[str, Any]:
    """The mean of one number over the seeds with a 95% Student t interval (None bounds with one seed)."""
    t = paired_t_interval(list(values))
    bounded = math.isfinite(t.low)
    return {"values": list(values), "mean": t.mean, "low": t.low if bounded else None,
            "high": t.high if bounded else None}


def spread(values: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
    """member -> column -> value (every member the same columns) -> ``{"members", "columns": {column:
    :func:`over_seeds`}}``; a column some member lacks is left out."""
    members = list(values)
    columns = [c for c in values[members[0]] if all(values[m].get(c) is not None for m in members)]
    return {"members": members, "columns": {c: over_seeds([float(values[m][c]) for m in members]) for c in columns}}


def seed_lines(spreads: Mapping[str, Mapping[str, Any]], label: Mapping[str, str], digits: int = 2) -> list[str]:
    """Markdown: per row with seeds and per column, each seed's value, their mean and 95% interval over seeds.

    The header names the seeds when every row has the same ones; else each row names its own."""
    if not spreads:
        return []
    seeds = {tuple(seed_label(m) for m in s["members"]) for s in spreads.values()}
    shared = next(iter(seeds)) if len(seeds) == 1 else None
    width = max(len(s["members"]) for s in spreads.values())
    head = list(shared) if shared else [f"seed {i + 1}" for i in range(width)]
    lines = ["| row | number | " + " | ".join(head) + " | mean over seeds [95% CI] |",
             "|---|---|" + "---:|" * width + "---|"]
    for row, s in spreads.items():
        name = label.get(row, row) + ("" if shared else f" ({', '.join(seed_label(m) for m in s['members'])})")
        for column, c in s["columns"].items():
            cells = [f"{v:.{digits}f}" for v in c["values"]] + [""] * (width - len(c["values"]))
            bounds = f" [{c['low']:.{digits}f}, {c['high']:.{digits}f}]" if c["low"] is not None else ""
            lines.append(f"| {name} | {column} | " + " | ".join(cells) + f" | {c['mean']:.{digits}f}{bounds} |")
    return lines


def seed_section(spreads: Mapping[str, Mapping[str, Any]], label: Mapping[str, str],
                 predictors: Mapping[str, str | None], digits: int = 2) -> list[str]:
    """The page section on its rows over several training seeds (nothing when it has none).

    ``predictors``: member run -> the predictor it ran with (shown under the table)."""
    if not spreads:
        return []
    seeds = sorted({len(s["members"]) for s in spreads.values()})
    lines = ["## Over training seeds", "",
             f"Each row below was run with {' or '.join(map(str, seeds))} predictors trained by the same recipe with "
             "different seeds (the paper reports one training run). The tables above show the row's per-document "
             "mean over the seeds, paired with the other columns document by document; here each seed's own "
             "numbers (over the same documents), their mean and a 95% Student t interval over the seeds (n − 1 "
             "degrees of freedom: with three seeds t = 4.30, so the interval is wide unless the seeds agree).", "",
             *seed_lines(spreads, label, digits), ""]
    for row, s in spreads.items():
        lines.append(f"- {label.get(row, row)}: " + "; ".join(f"{seed_label(m)} `{predictors.get(m)}`"
                                                            for m in s["members"]) + ".")
    return lines + [""]
