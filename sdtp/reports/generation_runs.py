"""Per-dataset scores of generation runs (LongBench, synthetic tasks) paired against a reference run, and
what each run cost, from their run summaries (:mod:`sdtp.reports.run_summary`, ``predictions``).

Predictions are keyed ``run -> dataset -> sample id -> record`` (:func:`by_run`), the dataset being the
LongBench dataset or the synthetic task. :func:`dataset_rows` gives per dataset each run's score (x100)
over the samples all runs have and its paired difference to the reference (95% interval and p of
:func:`sdtp.eval.stats.paired_interval`, p Holm-corrected over the table); :func:`average` the mean over the
LongBench datasets (LongBench's AVG) with a stratified t interval (one dataset: that dataset's own);
:func:`cost_ratios` compression ratio 1/τ and as-run speedups. Used by the Table 1 page (``paper_table1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sdtp.eval.longbench_tasks import CATEGORIES, DATASETS
from sdtp.eval.stats import paired_interval, stratified_t_interval
from sdtp.reports.paired_tables import holm_adjust, paired_summary

Predictions = dict[str, dict[str, dict[str, Any]]]  # dataset -> sample id -> prediction record (one run)


def outcomes(summary: dict[str, Any]) -> Predictions:
    """One run summary's scored predictions: dataset (LongBench) or task (synthetic) -> sample id -> record."""
    out: Predictions = {}
    for record in summary.get("predictions", []):
        if isinstance(record.get("score"), int | float):
            out.setdefault(str(record.get("dataset", record.get("task"))), {})[str(record["id"])] = record
    return out


def by_run(runs: dict[str, dict[str, Any]]) -> dict[str, Predictions]:
    """``{"<eval>/<run>": summary}`` -> run -> its predictions over every eval (dataset names are distinct)."""
    merged: dict[str, Predictions] = {}
    for key, summary in runs.items():
        merged.setdefault(key.split("/")[1], {}).update(outcomes(summary))
    return merged


def is_longbench(dataset: str) -> bool:
    """A LongBench dataset of the paper's kind (not LongBench's synthetic category, not our tasks)."""
    return dataset in DATASETS and DATASETS[dataset].category != "synthetic"


def ordered_datasets(found: set[str]) -> list[str]:
    """LongBench datasets in the category order of the paper's columns, then the others (sorted)."""
    longbench = sorted((d for d in found if is_longbench(d)),
                       key=lambda d: (CATEGORIES.index(DATASETS[d].category), list(DATASETS).index(d)))
    return longbench + sorted(found - set(longbench))


def shared_ids(preds: dict[str, Predictions], names: Sequence[str], dataset: str) -> list[str]:
    """The sample ids of ``dataset`` that every run in ``names`` predicted."""
    return sorted(set.intersection(*(set(preds[n][dataset]) for n in names)))


def dataset_rows(preds: dict[str, Predictions], order: Sequence[str], reference: str) -> list[dict[str, Any]]:
    """Per dataset: ``n`` shared samples, each run's ``score`` (x100) over them, ``delta`` to ``reference``
    (points; a :func:`paired_summary` with ``p_holm``) and the per-sample ``diffs`` behind it."""
    names = [r for r in order if r in preds]
    table = []
    for dataset in ordered_datasets({d for run in preds.values() for d in run}):
        present = [r for r in names if dataset in preds[r]]
        shared = shared_ids(preds, present, dataset)
        if not shared:
            continue
        raw = {r: [float(preds[r][dataset][i]["score"]) for i in shared] for r in present}
        scores = {r: [100.0 * s for s in raw[r]] for r in present}
        compared = [r for r in present if r != reference and reference in scores]
        diffs = {r: [a - b for a, b in zip(scores[r], scores[reference])] for r in compared}
        deltas = {r: paired_summary(paired_interval(raw[r], raw[reference], 100.0)) for r in compared}
        table.append({"dataset": dataset, "category": DATASETS[dataset].category if dataset in DATASETS else "synthetic",
                      "longbench": is_longbench(dataset), "n": len(shared),
                      "score": {r: math.fsum(s) / len(s) for r, s in scores.items()},
                      "delta": deltas, "diffs": diffs})
    holm_adjust([d for row in table for d in row["delta"].values()])
    return table


def average(table: list[dict[str, Any]], order: Sequence[str], reference: str) -> dict[str, Any] | None:
    """The mean over the LongBench datasets of the table (LongBench's AVG), per run present in all of them,
    and its difference to ``reference``: a stratified t interval over the datasets' samples (one dataset: its
    row's own interval)."""
    longbench = [t for t in table if t["longbench"]]
    if not longbench:
        return None
    names = [r for r in order if all(r in t["score"] for t in longbench)]
    delta = {}
    for r in names:
        if r != reference and all(r in t["diffs"] for t in longbench):
            # One dataset: its interval, but not its Holm p (the average is outside the table's Holm family).
            delta[r] = ({k: v for k, v in longbench[0]["delta"][r].items() if k != "p_holm"} if len(longbench) == 1
                        else paired_summary(stratified_t_interval([t["diffs"][r] for t in longbench])))
    return {"datasets": [t["dataset"] for t in longbench],
            "score": {r: math.fsum(t["score"][r] for t in longbench) / len(longbench) for r in names}, "delta": delta}


def cost_sums(preds: Predictions, ids: dict[str, list[str]]) -> dict[str, float]:
    """Sums over the samples ``ids`` (dataset -> ids): prompt tokens before compression (``original``), tokens
    per decoder layer (``per_layer``), prefill / decode / compressor seconds and new tokens."""
    rows = [preds[d][i] for d, keys in ids.items() for i in keys]
    sums = {"original": math.fsum(r.get("original_prompt_tokens", r["prompt_tokens"]) for r in rows),
            "per_layer": math.fsum(r["prompt_tokens"] * r.get("layer_token_fraction", 1.0) for r in rows)}
    for key in ("prefill_s", "decode_s", "compress_s", "new_tokens"):
        sums[key] = math.fsum(r.get(key, 0.0) for r in rows)
    return sums


def cost_ratios(run: dict[str, float], reference: dict[str, float]) -> dict[str, float | None]:
    """From two :func:`cost_sums` over the same samples: 1/τ = prompt tokens / average tokens per layer (the
    SDTP paper's compression ratio; prompt compression divides it further) and the as-run speedups over
    ``reference`` (compressor time counts as prefill)."""
    return {"compression_ratio": run["original"] / run["per_layer"] if run["per_layer"] else None,
            "prefill_as_run": reference["prefill_s"] / (run["prefill_s"] + run["compress_s"]),
            "end_to_end_as_run": (reference["prefill_s"] + reference["decode_s"])
            / (run["prefill_s"] + run["decode_s"] + run["compress_s"]),
            "new_tokens": run["new_tokens"], "compress_s": run["compress_s"]}


def seed_values(member: Predictions, reference: Predictions, table: list[dict[str, Any]],
                reference_name: str = "dense") -> dict[str, float | None]:
    """One training seed's numbers for the seeds table of a page (:mod:`sdtp.reports.seed_runs`): its score
    (x100) on each dataset of ``table`` over the samples it shares with ``reference``, the mean over the
    LongBench ones (``AVG``) and that mean minus ``reference``'s over the same samples (``Δ AVG vs dense``)."""
    out: dict[str, float | None] = {}
    longbench = []
    for t in table:
        dataset = t["dataset"]
        ids = sorted(set(member.get(dataset, {})) & set(reference.get(dataset, {})))
        if not ids:
            out[dataset] = None
            continue
        ours, theirs = ([100.0 * run[dataset][i]["score"] for i in ids] for run in (member, reference))
        out[dataset] = math.fsum(ours) / len(ids)
        if t["longbench"]:
            longbench.append((out[dataset], math.fsum(theirs) / len(ids)))
    if longbench and len(longbench) == sum(t["longbench"] for t in table):
        out["AVG"] = math.fsum(a for a, _ in longbench) / len(longbench)
        out[f"Δ AVG vs {reference_name}"] = out["AVG"] - math.fsum(b for _, b in longbench) / len(longbench)
    return out
