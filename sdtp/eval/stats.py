"""Paired statistics for method comparisons: per-document outcomes, paired intervals, Holm, pooled means.

Method comparisons run with ``limit`` (tens of documents per task), where a few points of accuracy
are noise. What resolves a difference is pairing: both methods are scored on the *same* documents
(lm-eval writes one 0/1 outcome per document to ``samples_<task>.jsonl``; the generation runners one
score in [0, 1] per sample to ``predictions.jsonl``; the perplexity runner one NLL per window), and
the per-document differences are much less noisy than two independent accuracies because both
methods get the easy documents right.

A mean of paired differences gets a Student t interval and a two-sided t test
(:func:`paired_t_interval`; at n = 20-30 the normal z = 1.96 interval is too narrow). Paired 0/1 outcomes
(one run's correctness per document) get Newcombe's score interval and an exact McNemar test instead
(:func:`paired_binary_interval`): when only a few documents flip, a t interval on -1/0/+1 differences leaves
the feasible range, has zero width when every flip goes one way, and covers the truth far less than 95% of the
time. :func:`paired_interval` picks between the two. The p-values of one method against several are
Holm-corrected (:func:`holm`). A mean over tasks, each weighing the same, gets a stratified t interval
(:func:`stratified_t_interval`); the per-segment NLL pages pool datasets with a bootstrap that resamples
within each dataset (:func:`stratified_bootstrap_ci`; 64 segments per dataset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtp.utils import parse_jsonl

# Differences whose spread is at most this (relative to max(1, their size)) are equal: rounding, not variation.
SPREAD_RTOL = 1e-12


def document_outcomes(run_dir: Path, metric: str = "acc") -> dict[tuple[str, int], float]:
    """(task, doc_id) -> per-document ``metric`` (0/1) from the ``samples_<task>.jsonl`` files of a run.

    The task keeps its name as run: an offline ``sdtp_<task>`` never pairs with lm-eval's built-in ``<task>``,
    whose doc_ids number other documents (``sdtp_hellaswag`` is a random 1,000 of HellaSwag's validation set).
    """
    outcomes: dict[tuple[str, int], float] = {}
    for path in sorted(run_dir.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_")
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



def window_outcomes(results: dict[str, Any]) -> dict[tuple[str, int | None, int | None, int, int], float]:
    """("window", window, stride, index, scored tokens) -> mean NLL per scored token, from a perplexity run's results.

    Perplexity protocol 2 stores each window's NLL sum (``window_nll``) and scored-token count
    (``window_tokens``); earlier runs have neither, and give {}. Window ``index`` scores the tokens from
    ``index * stride + window - stride`` on, so the window length and stride (the results' ``window`` and
    ``stride``) are part of the key with the token count: runs over other spans do not pair.
    """
    sums, counts = results.get("window_nll"), results.get("window_tokens")
    if not isinstance(sums, list) or not isinstance(counts, list) or len(sums) != len(counts):
        return {}
    window, stride = _int_or_none(results.get("window")), _int_or_none(results.get("stride"))
    return {("window", window, stride, i, int(n)): float(nll) / n for i, (nll, n) in enumerate(zip(sums, counts))
            if isinstance(nll, int | float) and isinstance(n, int) and n > 0}


def _int_or_none(value: Any) -> int | None:
    """``value`` if it is an int (not a bool), else None: a setting missing from a run's results pairs only with
    runs missing it too."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PairedInterval:
    """Mean of paired differences with its 95% interval and two-sided p-value (H0: mean = 0).

    ``method``: ``t`` (Student t on the differences) or ``newcombe`` (0/1 outcomes: Newcombe's score interval
    with an exact McNemar p; asymmetric, inside the feasible range). ``identical``: every difference is 0, up to
    rounding (p = 1). A constant non-zero difference of continuous outcomes (equal up to rounding, :func:`no_spread`)
    has no spread: low = high = mean and p = 0. With fewer than two pairs the bounds and p are NaN.
    """

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    identical: bool
    method: str = "t"

    @property
    def constant(self) -> bool:
        """Every pair differs by the same non-zero amount (a t interval of zero width)."""
        return self.low == self.high and not self.identical

    def scaled(self, factor: float) -> PairedInterval:
        """The same result in units ``factor`` times larger (e.g. points from 0/1 outcomes); p is unit-free."""
        return PairedInterval(factor * self.mean, factor * self.low, factor * self.high, self.p_value, self.n,
                              self.identical, self.method)


def t_quantile(prob: float, df: float) -> float:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom (t_{0.975, 2} = 4.303)."""
    from scipy import stats  # imported here: only the continuous-statistics callers need scipy

    return float(stats.t.ppf(prob, df))


def _t_result(mean: float, var_of_mean: float, df: float, n: int, level: float) -> PairedInterval:
    """The t interval and two-sided p of ``mean`` with variance ``var_of_mean`` (> 0) on ``df`` degrees of freedom."""
    from scipy import stats

    se = math.sqrt(var_of_mean)
    half = t_quantile(0.5 + level / 2.0, df) * se
    return PairedInterval(mean, mean - half, mean + half, float(2.0 * stats.t.sf(abs(mean) / se, df)), n, False)


def no_spread(values: Sequence[float]) -> bool:
    """Every value equal up to rounding: a spread of at most ``SPREAD_RTOL * max(1, max |value|)``.

    Not an exact test: differences equal in exact arithmetic can differ in their last bits (means over three seeds:
    2/3 - 1 and 1/3 - 2/3), and a t test on that rounding noise would print p ~ 1e-16. Nor a variance test: the
    mean of equal values rounds too (0.2 * 3 / 3), which leaves a tiny variance.
    """
    return max(values) - min(values) <= SPREAD_RTOL * max(1.0, max(abs(v) for v in values))


def all_zero(values: Sequence[float]) -> bool:
    """Every value is 0 up to rounding (within ``SPREAD_RTOL``, the floor of :func:`no_spread`'s tolerance)."""
    return all(abs(v) <= SPREAD_RTOL for v in values)


def paired_t_interval(diffs: Sequence[float], level: float = 0.95) -> PairedInterval:
    """Paired t interval of ``mean(diffs)`` (diffs = method - reference, one per shared segment)."""
    n = len(diffs)
    mean = math.fsum(diffs) / n if n else math.nan
    if n < 2:
        return PairedInterval(mean, math.nan, math.nan, math.nan, n, False)
    if no_spread(diffs):  # zero width; the first difference stands for them all (their mean may be rounded)
        identical = all_zero(diffs)
        value = 0.0 if identical else diffs[0]
        return PairedInterval(value, value, value, 1.0 if identical else 0.0, n, identical)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    return _t_result(mean, var / n, n - 1, n, level)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval (low, high) for a proportion of ``successes`` out of ``n`` > 0."""
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + level / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p: the discordant pairs split ``gained`` / ``lost`` under Binomial(m, 1/2)."""
    from scipy import stats

    m = gained + lost
    return 1.0 if m == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(gained, lost), m, 0.5)))


def paired_binary_interval(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> PairedInterval:
    """``mean(x - y)`` for paired 0/1 outcomes: Newcombe's square-and-add score interval and an exact McNemar p.

    Newcombe (1998, Stat. Med. 17:2635, method 10): Wilson intervals (l1, u1) of mean(x) and (l2, u2) of mean(y)
    combined with the continuity-corrected correlation phi of the 2x2 table. Unlike a t interval on the -1/0/+1
    differences, it stays inside [-1, 1], has width when every pair differs the same way, and keeps its coverage
    when only a few documents flip (where the t interval's falls to about 80%).
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"unpaired: {n} vs {len(y)} outcomes")
    if n < 2:
        return PairedInterval(math.nan if n == 0 else x[0] - y[0], math.nan, math.nan, math.nan, n, False, "newcombe")
    a = sum(1 for u, v in zip(x, y) if u and v)
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson_interval(a + b, n, level), wilson_interval(a + c, n, level)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    # Newcombe's correction: a positive cross-product shrinks by n / 2, and one within n / 2 counts as none.
    corrected = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    mean = (b - c) / n
    # A pair that never differs still has an interval (how large a difference n documents could hide).
    return PairedInterval(mean, max(-1.0, mean - delta), min(1.0, mean + epsilon), mcnemar_exact_p(b, c), n,
                          b == c == 0, "newcombe")


def is_binary(values: Sequence[float]) -> bool:
    """Every value is 0 or 1 (one document's correctness)."""
    return all(v in (0.0, 1.0) for v in values)


def paired_interval(x: Sequence[float], y: Sequence[float], scale: float = 1.0,
                    level: float = 0.95) -> PairedInterval:
    """``scale * mean(x - y)`` over paired outcomes: :func:`paired_binary_interval` when both are 0/1,
    else :func:`paired_t_interval` on the scaled differences."""
    if len(x) != len(y):
        raise ValueError(f"unpaired: {len(x)} vs {len(y)} outcomes")
    if not (is_binary(x) and is_binary(y)):
        return paired_t_interval([scale * (u - v) for u, v in zip(x, y)], level)
    return paired_binary_interval(x, y, level).scaled(scale)


def stratified_binary_interval(x_strata: Sequence[Sequence[float]], y_strata: Sequence[Sequence[float]],
                               level: float = 0.95) -> PairedInterval:
    """Mean over strata of each stratum's ``mean(x - y)`` for paired 0/1 outcomes.

    Interval: the strata's Newcombe limits combined by MOVER (Zou & Donner 2008) for a mean of independent
    estimates, ``theta -/+ sqrt(sum_k (theta_k - l_k)^2) / K`` (upper: ``u_k``); with one stratum, Newcombe's own.
    p: exact McNemar on the discordant pairs of every stratum pooled (a test of no difference in any stratum).
    """
    parts = [paired_binary_interval(x, y, level) for x, y in zip(x_strata, y_strata, strict=True)]
    n, k = sum(r.n for r in parts), len(parts)
    if any(r.n < 2 for r in parts) or not parts:
        return PairedInterval(math.nan, math.nan, math.nan, math.nan, n, False, "newcombe")
    mean = math.fsum(r.mean for r in parts) / k
    low = mean - math.sqrt(math.fsum((r.mean - r.low) ** 2 for r in parts)) / k
    high = mean + math.sqrt(math.fsum((r.high - r.mean) ** 2 for r in parts)) / k
    gained = sum(1 for x, y in zip(x_strata, y_strata) for u, v in zip(x, y) if u and not v)
    lost = sum(1 for x, y in zip(x_strata, y_strata) for u, v in zip(x, y) if v and not u)
    return PairedInterval(mean, low, high, mcnemar_exact_p(gained, lost), n, gained == lost == 0, "newcombe")


def stratified_interval(x_strata: Sequence[Sequence[float]], y_strata: Sequence[Sequence[float]],
                        scale: float = 1.0, level: float = 0.95) -> PairedInterval:
    """``scale`` x the mean over strata of each stratum's ``mean(x - y)``: :func:`stratified_binary_interval`
    when every outcome is 0/1, else :func:`stratified_t_interval` on the scaled differences."""
    if all(is_binary(x) and is_binary(y) for x, y in zip(x_strata, y_strata, strict=True)):
        return stratified_binary_interval(x_strata, y_strata, level).scaled(scale)
    return stratified_t_interval([[scale * (u - v) for u, v in zip(x, y, strict=True)]
                                  for x, y in zip(x_strata, y_strata)], level)


def stratified_t_interval(strata: Sequence[Sequence[float]], level: float = 0.95) -> PairedInterval:
    """Mean over strata of each stratum's mean difference, with a t interval (Welch-Satterthwaite df).

    Each stratum (e.g. one task's per-document differences) weighs the same, as a table's Avg column does;
    var = sum_k s_k^2 / n_k / K^2. With one stratum this is :func:`paired_t_interval` exactly. ``n`` counts
    every difference.
    """
    if len(strata) == 1:
        return paired_t_interval(strata[0], level)
    n = sum(len(s) for s in strata)
    if not strata:
        return PairedInterval(math.nan, math.nan, math.nan, math.nan, 0, False)
    means = [math.fsum(s) / len(s) if s else math.nan for s in strata]
    mean = math.fsum(means) / len(strata)
    if any(len(s) < 2 for s in strata):
        return PairedInterval(mean, math.nan, math.nan, math.nan, n, False)
    if all(no_spread(s) for s in strata):  # no spread within any stratum: zero width (see no_spread)
        identical = all(all_zero(s) for s in strata)
        value = 0.0 if identical else mean
        return PairedInterval(value, value, value, 1.0 if identical else 0.0, n, identical)
    parts = [math.fsum((d - m) ** 2 for d in s) / (len(s) - 1) / len(s) for s, m in zip(strata, means)]  # s_k^2 / n_k
    df = math.fsum(parts) ** 2 / math.fsum(v * v / (len(s) - 1) for v, s in zip(parts, strata) if v)
    return _t_result(mean, math.fsum(parts) / len(strata) ** 2, df, n, level)


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
