"""Paired statistics for per-segment numbers: t interval, Holm, stratified bootstrap (hand-computed checks)."""

from __future__ import annotations

import math

import pytest

from sdtp.eval.stats import holm, paired_t_interval, stratified_bootstrap_ci, t_quantile


def test_paired_t_interval_matches_closed_form_for_two_degrees_of_freedom():
    # df = 2 has a closed-form t distribution: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so t_{0.975, 2} = 0.95 sqrt(2 / (1 - 0.95^2)) and the two-sided p is 1 - t / sqrt(2 + t^2).
    diffs = [1.0, 2.0, 6.0]  # mean 3, sample variance ((-2)^2 + (-1)^2 + 3^2) / 2 = 7
    se = math.sqrt(7 / 3)
    t_crit = 0.95 * math.sqrt(2 / (1 - 0.95**2))
    assert t_quantile(0.975, 2) == pytest.approx(t_crit, rel=1e-9)
    result = paired_t_interval(diffs)
    assert result.mean == 3.0 and result.n == 3 and not result.identical
    assert result.half_width == pytest.approx(t_crit * se, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((3 - t_crit * se, 3 + t_crit * se), rel=1e-9)
    t = 3 / se
    assert result.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_zero_variance_pairs():
    same = paired_t_interval([0.0, 0.0, 0.0])
    assert same.identical and same.half_width == 0.0 and same.p_value == 1.0
    shifted = paired_t_interval([0.5, 0.5])
    assert not shifted.identical and shifted.mean == 0.5 and shifted.half_width == 0.0 and shifted.p_value == 0.0
    single = paired_t_interval([1.0])
    assert single.mean == 1.0 and math.isnan(single.half_width) and math.isnan(single.p_value)


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
