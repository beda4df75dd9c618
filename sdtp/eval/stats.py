"""Paired statistics for method comparisons: per-document outcomes, t intervals, Holm, bootstrap.

Method comparisons run with ``limit`` (tens of documents per task), where a few points of accuracy
are noise. What resolves a difference is pairing: both methods are scored on the *same* documents
(lm-eval writes one 0/1 outcome per document to ``samples_<task>.jsonl``; the generation runners one
score in [0, 1] per sample to ``predictions.jsonl``; the perplexity runner one NLL per window), and
the per-document differences are much less noisy than two independent accuracies because both
methods get the easy documents right.

A mean of paired differences gets a Student t interval and a two-sided t test
(:func:`paired_t_interval`; at n = 20-30 the normal z = 1.96 interval is too narrow), the p-values
of one method against several are Holm-corrected (:func:`holm`), and a mean pooled over datasets
gets a bootstrap interval that resamples within each dataset (:func:`stratified_bootstrap_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtp.utils import parse_jsonl


def document_outcomes(run_dir: Path, metric: str = "acc") -> dict[tuple[str, int], float]:
    """(task, doc_id) -> per-document ``metric`` (0/1) from the ``samples_<task>.jsonl`` files of a run."""
    outcomes: dict[tuple[str, int], float] = {}
    for path in sorted(run_dir.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_").removeprefix("sdtp_")
        for record in parse_jsonl(path.read_text()):
            value = record.get(metric)
            if isinstance(record.get("doc_id"), int) and isinstance(value, int | float):
                outcomes[(task, record["doc_id"])] = float(value)
    return outcomes


def prediction_outcomes(run_dir: Path) -> dict[tuple[str, str], float]:
    """(dataset or task, sample id) -> score in [0, 1] from a generation run's ``predictions.jsonl``."""
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return {}
    outcomes: dict[tuple[str, str], float] = {}
    for record in parse_jsonl(path.read_text()):  # a killed run's torn last line is skipped, as on resume
        if "id" in record and isinstance(record.get("score"), int | float):
            outcomes[(str(record.get("dataset", record.get("task", ""))), str(record["id"]))] = float(record["score"])
    return outcomes



def window_outcomes(results: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    """("window", index, scored tokens) -> mean NLL per scored token, from a perplexity run's results.

    Perplexity protocol 2 stores each window's NLL sum (``window_nll``) and scored-token count
    (``window_tokens``); earlier runs have neither, and give {}. The token count is part of the key,
    so runs over other windows do not pair.
    """
    sums, counts = results.get("window_nll"), results.get("window_tokens")
    if not isinstance(sums, list) or not isinstance(counts, list) or len(sums) != len(counts):
        return {}
    return {("window", i, int(n)): float(nll) / n for i, (nll, n) in enumerate(zip(sums, counts))
            if isinstance(nll, int | float) and isinstance(n, int) and n > 0}


@dataclass(frozen=True)
class PairedT:
    """Mean of paired differences with its t interval and two-sided p-value (H0: mean = 0).

    ``identical``: every difference is exactly 0 (p = 1). A constant non-zero difference has zero
    variance too: half-width 0 and p = 0. With fewer than two pairs half-width and p are NaN.
    """

    mean: float
    half_width: float
    p_value: float
    n: int
    identical: bool

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom (t_{0.975, 2} = 4.303)."""
    from scipy import stats  # imported here: only the continuous-statistics callers need scipy

    return float(stats.t.ppf(prob, df))


def paired_t_interval(diffs: Sequence[float], level: float = 0.95) -> PairedT:
    """Paired t interval of ``mean(diffs)`` (diffs = method - reference, one per shared segment)."""
    from scipy import stats

    n = len(diffs)
    mean = math.fsum(diffs) / n if n else math.nan
    if n < 2:
        return PairedT(mean, math.nan, math.nan, n, False)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    if var == 0.0:  # every pair differs by the same amount: no sampling noise to speak of
        identical = all(d == 0.0 for d in diffs)
        return PairedT(mean, 0.0, 1.0 if identical else 0.0, n, identical)
    se = math.sqrt(var / n)
    p_value = float(2.0 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedT(mean, t_quantile(0.5 + level / 2.0, n - 1) * se, p_value, n, False)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted).

    The i-th smallest of m p-values is multiplied by (m - i), capped at 1, and made monotone.
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(finite)
    for rank, (p, index) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def stratified_bootstrap_ci(
    strata: Sequence[Sequence[float]], level: float = 0.95, iters: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over strata of each stratum's mean, with a percentile bootstrap interval.

    Each replicate resamples every stratum (e.g. the segments of one dataset) with replacement
    within itself, so the pooled number weights datasets equally and its interval reflects only
    within-dataset sampling. Returns (estimate, low, high).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    estimate = float(np.mean([np.mean(s) for s in strata]))
    replicates = np.zeros(iters)
    for values in strata:
        values = np.asarray(values, dtype=np.float64)
        picks = rng.integers(0, len(values), size=(iters, len(values)))  # (iters, n_s) resampled indices
        replicates += values[picks].mean(axis=1) / len(strata)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)
