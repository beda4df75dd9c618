"""Per-document accuracy of lm-eval run summaries, paired between two runs over the same documents.

A run summary (:mod:`sdtp.reports.run_summary`) holds, per task, the evaluated document ids with their 0/1
correctness, chosen and gold answers. Two runs of the same documents pair up document by document:
:func:`paired_difference` gives both accuracies over the shared documents, the mean difference in points with a 95%
interval (:func:`sdtp.eval.stats.paired_interval`: Newcombe's score interval and an exact McNemar p for one run's
0/1 outcomes, a Student t interval for outcomes averaged over seeds) and how many documents flipped each way
(:func:`sdtp.reports.paired_tables.holm_adjust` corrects the p-values of a family of such tests);
:func:`average_difference` is the mean over tasks (each task weighs the same, as the paper's Avg) with a stratified
interval (:func:`sdtp.eval.stats.stratified_interval`). :func:`majority_share` and :func:`top_answer_share` say
when a model answers near-constantly. Used by the paper pages (``paper_table3``, ``paper_table6``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sdtp.eval.stats import paired_interval, stratified_interval
from sdtp.reports.paired_tables import paired_summary

Summary = dict[str, Any]  # a run summary: {"metrics": ..., "documents": {task: {doc_ids, acc, pred, target, choices}}}


def outcomes(summary: Summary, task: str) -> dict[int, float]:
    """doc_id -> 0/1 correctness of one task of a run summary ({} if the task is missing)."""
    docs = summary["documents"].get(task)
    return {} if docs is None else {i: float(a) for i, a in zip(docs["doc_ids"], docs["acc"])}


def paired_outcomes(base: Summary, other: Summary, task: str) -> tuple[list[int], list[float], list[float]]:
    """The documents of ``task`` both runs evaluated (ascending ids), with ``other``'s and ``base``'s 0/1
    correctness on them, in that order."""
    a, b = outcomes(base, task), outcomes(other, task)
    shared = sorted(a.keys() & b.keys())
    return shared, [b[i] for i in shared], [a[i] for i in shared]


def shared_documents(base: Summary, other: Summary, task: str) -> list[int]:
    """The ids of the documents of ``task`` that both runs evaluated, ascending."""
    return paired_outcomes(base, other, task)[0]


def accuracy(summary: Summary, task: str, documents: Sequence[int]) -> float | None:
    """Accuracy (%) of a run over ``documents`` (None when there are none)."""
    if not documents:
        return None
    acc = outcomes(summary, task)
    return 100.0 * math.fsum(acc[i] for i in documents) / len(documents)


def paired_difference(base: Summary, other: Summary, task: str) -> dict[str, Any]:
    """``other`` against ``base`` on ``task``'s shared documents.

    Returns ``{n, base_acc, acc, delta, gained, lost}``: ``delta`` is a
    :func:`sdtp.reports.paired_tables.paired_summary` (mean, 95% interval, p, identical,
    constant; None without shared documents), ``gained``/``lost`` count the documents ``other``
    gets right/wrong where ``base`` does not/does.
    """
    shared, other_hits, base_hits = paired_outcomes(base, other, task)
    delta = paired_interval(other_hits, base_hits, 100.0)
    return {"n": len(shared), "base_acc": accuracy(base, task, shared), "acc": accuracy(other, task, shared),
            "delta": paired_summary(delta) if shared else None,
            "gained": sum(1 for x, y in zip(other_hits, base_hits) if x > y),
            "lost": sum(1 for x, y in zip(other_hits, base_hits) if x < y)}


def average_difference(base: Summary, other: Summary, tasks: Sequence[str]) -> dict[str, Any]:
    """Mean over ``tasks`` of the per-task mean difference (points): a :func:`paired_summary` of
    :func:`sdtp.eval.stats.stratified_interval` over the tasks' shared documents (with one task, that task's own
    interval)."""
    pairs = [paired_outcomes(base, other, task)[1:] for task in tasks]
    return paired_summary(stratified_interval([x for x, _ in pairs], [y for _, y in pairs], 100.0))


def majority_share(docs: dict[str, Any] | None) -> float | None:
    """Share of the most frequent gold choice among the documents (None without class targets)."""
    targets = (docs or {}).get("target")
    if not targets:
        return None
    return max(targets.count(t) for t in set(targets)) / len(targets)


def top_answer_share(summary: Summary, task: str, shared: Sequence[int]) -> float | None:
    """Share (%) of the shared documents given the run's most frequent answer (100 = one answer to all)."""
    docs = summary["documents"].get(task) or {}
    if not docs.get("pred") or not shared:
        return None
    picks = dict(zip(docs["doc_ids"], docs["pred"]))
    chosen = [picks[i] for i in shared]
    return 100.0 * max(chosen.count(c) for c in set(chosen)) / len(chosen)


def chance(summary: Summary, task: str) -> float | None:
    """Accuracy (%) of a uniform guess: 100 / number of choices (None when unknown)."""
    choices = (summary["documents"].get(task) or {}).get("choices")
    return 100.0 / choices if choices else None


def seed_values(member: Summary, base: Summary, tasks: Sequence[str], names: dict[str, str],
                base_label: str = "dense") -> dict[str, float | None]:
    """One training seed's numbers for the seeds table of a page (:mod:`sdtp.reports.seed_runs`): its
    accuracy per task (column ``names[task]``) over the documents it shares with ``base``, their mean
    (``Avg``) and that mean minus ``base``'s over the same documents (``Δ Avg vs <base_label>``), in points."""
    shared = {t: shared_documents(base, member, t) for t in tasks}
    acc = {t: accuracy(member, t, shared[t]) for t in tasks}
    base_acc = {t: accuracy(base, t, shared[t]) for t in tasks}
    if any(a is None for a in acc.values()):
        return {names.get(t, t): a for t, a in acc.items()}
    avg = math.fsum(acc.values()) / len(tasks)
    return {**{names.get(t, t): a for t, a in acc.items()}, "Avg": avg,
            f"Δ Avg vs {base_label}": avg - math.fsum(base_acc.values()) / len(tasks)}
