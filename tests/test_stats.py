"""Paired statistics for per-segment numbers: t interval, Holm, stratified bootstrap (hand-computed checks)."""

from __future__ import annotations

import math
import random

import pytest

from sdtp.eval.stats import (document_outcomes, holm, mcnemar_exact_p, paired_binary_interval, paired_interval,
                             paired_t_interval, stratified_binary_interval, stratified_bootstrap_ci,
                             stratified_interval, stratified_t_interval, t_quantile, window_outcomes)
from sdtp.reports.paired_tables import interval_text, paired_summary, uncorrected_p_text


def test_paired_t_interval_matches_closed_form_for_two_degrees_of_freedom():
    # df = 2 has a closed-form t distribution: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so t_{0.975, 2} = 0.95 sqrt(2 / (1 - 0.95^2)) and the two-sided p is 1 - t / sqrt(2 + t^2).
    diffs = [1.0, 2.0, 6.0]  # mean 3, sample variance ((-2)^2 + (-1)^2 + 3^2) / 2 = 7
    se = math.sqrt(7 / 3)
    t_crit = 0.95 * math.sqrt(2 / (1 - 0.95**2))
    assert t_quantile(0.975, 2) == pytest.approx(t_crit, rel=1e-9)
    result = paired_t_interval(diffs)
    assert result.mean == 3.0 and result.n == 3 and not result.identical
    assert (result.low, result.high) == pytest.approx((3 - t_crit * se, 3 + t_crit * se), rel=1e-9)
    t = 3 / se
    assert result.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_zero_variance_pairs():
    same = paired_t_interval([0.0, 0.0, 0.0])
    assert same.identical and (same.low, same.high) == (0.0, 0.0) and same.p_value == 1.0 and not same.constant
    shifted = paired_t_interval([0.5, 0.5])
    assert not shifted.identical and shifted.constant and shifted.mean == 0.5 and shifted.p_value == 0.0
    assert (shifted.low, shifted.high) == (0.5, 0.5)
    # 0.2 * 3 / 3 rounds to 0.20000000000000004: a variance test would see a tiny spread and p = 1e-32.
    rounded = paired_t_interval([0.2] * 3)
    assert rounded.constant and rounded.mean == 0.2 and rounded.p_value == 0.0
    single = paired_t_interval([1.0])
    assert single.mean == 1.0 and math.isnan(single.low) and math.isnan(single.p_value)


def test_differences_equal_up_to_rounding_have_no_spread():
    # Means over three seeds: 2/3 - 1 and 1/3 - 2/3 differ in the last bit; an exact test gave them p ~ 1e-16.
    seeds = paired_interval([2 / 3, 1 / 3], [1.0, 2 / 3], 100.0)
    assert seeds.method == "t" and seeds.constant and seeds.p_value == 0.0
    assert seeds.low == seeds.high == seeds.mean == pytest.approx(-100 / 3, rel=1e-12)
    zero = paired_t_interval([0.1 + 0.2 - 0.3, 0.0])  # 5.6e-17 and 0: no difference at all
    assert zero.identical and zero.p_value == 1.0 and (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0)
    spread = paired_t_interval([1.0, 1.0 + 1e-9])  # far above rounding: a real (if tiny) spread
    assert not spread.constant and spread.low < spread.mean < spread.high and spread.p_value > 0.0
    strata = stratified_t_interval([[2 / 3 - 1, 1 / 3 - 2 / 3], [0.5, 0.5]])
    assert strata.constant and strata.p_value == 0.0


def test_perplexity_windows_pair_only_over_the_same_spans():
    """Window k scores the tokens from k * stride + window - stride on: another window length or stride scores
    other text under the same index and token count, so it must not pair."""
    dense = {"window_nll": [1000.0, 1100.0], "window_tokens": [512, 512], "window": 1024, "stride": 512}
    units = window_outcomes(dense)
    assert units == {("window", 1024, 512, 0, 512): 1000.0 / 512, ("window", 1024, 512, 1, 512): 1100.0 / 512}
    assert not window_outcomes({**dense, "window": 2048}).keys() & units.keys()
    assert not window_outcomes({**dense, "stride": 256}).keys() & units.keys()
    assert window_outcomes({**dense, "window_nll": [1200.0, 1000.0]}).keys() == units.keys()  # another method
    assert window_outcomes({"perplexity": 20.0}) == {}  # protocol 1: no per-window NLLs


def test_holm_step_down():
    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.2
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def test_stratified_bootstrap_weights_strata_equally():
    estimate, low, high = stratified_bootstrap_ci([[1.0] * 10, [3.0, 3.0]])
    assert (estimate, low, high) == pytest.approx((2.0, 2.0, 2.0))  # constant strata: no spread
    estimate, low, high = stratified_bootstrap_ci([[0.0, 1.0] * 20, [5.0] * 40], iters=4000)
    assert estimate == pytest.approx(2.75) and low < 2.75 < high and high - low < 0.5


def _table(both: int, only_x: int, only_y: int, neither: int) -> tuple[list[int], list[int]]:
    """Paired 0/1 outcomes (x, y) with the given 2x2 counts."""
    x = [1] * both + [1] * only_x + [0] * only_y + [0] * neither
    y = [1] * both + [0] * only_x + [1] * only_y + [0] * neither
    return x, y


def test_newcombe_interval_matches_a_published_value():
    # contingencytables (Fagerland, Lydersen & Laake), Newcombe_square_and_add_CI_paired_2x2 on
    # matrix(c(59, 6, 16, 80), 2, byrow=TRUE): estimate -0.0621, 95% CI -0.1186 to -0.0046.
    result = paired_binary_interval(*_table(59, 6, 16, 80))
    assert result.method == "newcombe" and result.n == 161
    assert (result.mean, result.low, result.high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)


def test_exact_mcnemar_p_is_the_binomial_tail_of_the_discordant_pairs():
    assert mcnemar_exact_p(0, 3) == pytest.approx(2 * 0.5**3)
    assert mcnemar_exact_p(4, 10) == pytest.approx(2 * sum(math.comb(14, k) for k in range(5)) / 2**14)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def test_binary_interval_stays_feasible_where_a_t_interval_does_not():
    x, y = _table(0, 19, 0, 1)  # 19 of 20 gained
    t = paired_t_interval([a - b for a, b in zip(x, y)])
    assert t.high > 1.0  # the t interval leaves the feasible range
    result = paired_binary_interval(x, y)
    assert -1.0 <= result.low < result.mean == 0.95 < result.high <= 1.0
    lost = paired_binary_interval(*_table(0, 0, 20, 0))  # every document lost: the t interval has zero width
    assert lost.low == -1.0 and lost.mean == -1.0 < lost.high < -0.5 and not lost.constant
    same = paired_binary_interval(*_table(3, 0, 0, 4))
    assert same.identical and same.p_value == 1.0 and same.mean == 0.0
    assert same.low < -0.1 and same.high > 0.1  # 7 documents that never differ still bound the difference loosely


def _one_way_flips(rng: random.Random, rate: float, n: int = 100) -> tuple[list[int], list[int]]:
    """Paired 0/1 outcomes of n documents: x loses a ``rate`` share to y (true mean(x - y) = -rate), the rest agree."""
    x, y = [], []
    for _ in range(n):
        if rng.random() < rate:
            x.append(0), y.append(1)
        else:
            same = int(rng.random() < 0.6)
            x.append(same), y.append(same)
    return x, y


def test_binary_interval_keeps_its_coverage_when_few_documents_flip():
    """3% of 100 documents flip one way: the t interval covers the true difference about 80% of the time."""
    rng = random.Random(0)
    covered = {"t": 0, "newcombe": 0}
    trials = 600
    for _ in range(trials):
        x, y = _one_way_flips(rng, 0.03)
        t = paired_t_interval([a - b for a, b in zip(x, y)])
        covered["t"] += t.low <= -0.03 <= t.high
        binary = paired_binary_interval(x, y)
        covered["newcombe"] += binary.low <= -0.03 <= binary.high
    assert covered["t"] / trials < 0.86 and covered["newcombe"] / trials >= 0.93


def test_paired_interval_picks_the_method_by_the_outcomes():
    x, y = _table(5, 3, 1, 6)
    binary = paired_interval(x, y, 100.0)
    reference = paired_binary_interval(x, y)
    assert binary.method == "newcombe" and binary.low == pytest.approx(100 * reference.low)
    averaged = [v * 2 / 3 for v in x]  # correctness averaged over three seeds: not 0/1
    t = paired_interval(averaged, y, 100.0)
    assert t.method == "t" and t.mean == paired_t_interval([100.0 * (a - b) for a, b in zip(averaged, y)]).mean


def test_stratified_t_interval_by_hand():
    one = stratified_t_interval([[1.0, 2.0, 6.0]])
    assert one == paired_t_interval([1.0, 2.0, 6.0])
    # means 3 and 2; s^2/n = 7/3 and 8/2; var of the mean of means = (7/3 + 4) / 4; Welch-Satterthwaite df
    result = stratified_t_interval([[1.0, 2.0, 6.0], [0.0, 4.0]])
    var = (7 / 3 + 4) / 4
    df = (7 / 3 + 4) ** 2 / ((7 / 3) ** 2 / 2 + 4**2 / 1)
    half = t_quantile(0.975, df) * math.sqrt(var)
    assert result.mean == 2.5 and result.n == 5
    assert (result.low, result.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)


def test_pooled_p_cell_and_bounds_that_round_to_zero():
    summary = paired_summary(paired_t_interval([-0.01, 2.0, 1.5, 0.3]))
    assert uncorrected_p_text(summary).endswith("(uncorrected)")
    # a bound just below zero keeps its sign (the interval does not reach 0); float noise around 0 prints +0.00
    assert interval_text({"mean": 1.3, "low": -0.004, "high": 2.6}, 2) == "+1.30 [-0.00, +2.60]"
    assert interval_text({"mean": 0.0074, "low": -3.7e-5, "high": 0.0149}) == "+0.0074 [-0.0000, +0.0149]"
    assert interval_text({"mean": -1e-15, "low": -1.0, "high": 1.0}, 2) == "+0.00 [-1.00, +1.00]"


def test_stratified_binary_interval_combines_the_tasks_newcombe_limits():
    tasks = [_table(40, 1, 4, 55), _table(30, 2, 2, 66), _table(10, 0, 3, 87)]
    parts = [paired_binary_interval(x, y) for x, y in tasks]
    result = stratified_binary_interval([x for x, _ in tasks], [y for _, y in tasks])
    mean = sum(p.mean for p in parts) / 3
    low = mean - math.sqrt(sum((p.mean - p.low) ** 2 for p in parts)) / 3  # MOVER for a mean of independent parts
    high = mean + math.sqrt(sum((p.high - p.mean) ** 2 for p in parts)) / 3
    assert (result.mean, result.low, result.high) == pytest.approx((mean, low, high), rel=1e-12)
    assert result.p_value == pytest.approx(mcnemar_exact_p(3, 9)) and result.n == 300  # flips pooled: 3 gained, 9 lost
    one = stratified_binary_interval([tasks[0][0]], [tasks[0][1]])
    assert (one.low, one.high, one.p_value) == (parts[0].low, parts[0].high, parts[0].p_value)
    scaled = stratified_interval([x for x, _ in tasks], [y for _, y in tasks], 100.0)
    assert scaled.method == "newcombe" and scaled.low == pytest.approx(100 * low)
    averaged = stratified_interval([[v / 2 for v in x] for x, _ in tasks], [y for _, y in tasks], 100.0)
    assert averaged.method == "t"  # outcomes averaged over seeds: t on the differences


def test_stratified_binary_interval_keeps_its_coverage_when_few_documents_flip():
    """4 tasks x 100 documents, 0.8% flip one way: the stratified t interval covers the truth about 83% of the time,
    the combined Newcombe limits (conservatively) nearly always."""
    rng = random.Random(1)
    covered = {"t": 0, "binary": 0}
    trials = 300
    truth = -0.008
    for _ in range(trials):
        xs, ys = zip(*(_one_way_flips(rng, -truth) for _ in range(4)))
        t = stratified_t_interval([[a - b for a, b in zip(x, y)] for x, y in zip(xs, ys)])
        covered["t"] += t.low <= truth <= t.high
        binary = stratified_binary_interval(xs, ys)
        covered["binary"] += binary.low <= truth <= binary.high
    assert covered["binary"] / trials >= 0.93 > covered["t"] / trials


def test_offline_task_outcomes_never_pair_with_the_builtin_tasks(tmp_path):
    """sdtp_hellaswag's doc 0 is another document than lm-eval's hellaswag doc 0: the keys must differ."""
    for name, run in (("sdtp_hellaswag", "offline"), ("hellaswag", "online")):
        (tmp_path / run).mkdir()
        (tmp_path / run / f"samples_{name}.jsonl").write_text('{"doc_id": 0, "acc": 1.0}\n{"doc_id": 1, "acc": 0}\n')
    offline, online = document_outcomes(tmp_path / "offline"), document_outcomes(tmp_path / "online")
    assert offline == {("sdtp_hellaswag", 0): 1.0, ("sdtp_hellaswag", 1): 0.0}
    assert not offline.keys() & online.keys()
