"""Seed aggregation of ablation points by hand: seed means per segment, intervals over seeds, trends over shared
seeds only, and verdicts that need the seeds to agree with the segments."""

from __future__ import annotations

import pytest

from sdtp.reports.ablation_seeds import (diff_text, points_by_row, seed_diff, seed_entry, seed_mean, seed_verdict,
                                         seeds_text)


def _point(seed, segments):
    return {"row": "r", "seed": seed, "metrics": {"avg_layer_token_fraction": 0.9}, "wall_s": 10,
            "train": {"spearman": 0.5 + seed / 10}, "segments": {str(i): v for i, v in enumerate(segments)}}


DENSE = {"row": "dense", "seed": None, "metrics": {}, "segments": {"0": 1.0, "1": 2.0, "2": 3.0}}


def test_points_by_row_keeps_the_asked_seeds_sorted():
    points = {("a", 2): _point(2, [1]), ("a", 0): _point(0, [1]), ("b", 5): _point(5, [1])}
    groups = points_by_row(points, [0, 2])
    assert list(groups) == ["a"] and list(groups["a"]) == [0, 2]


def test_seed_mean_averages_the_segments_every_seed_has():
    a, b = _point(0, [1.0, 2.0, 3.0]), _point(1, [2.0, 4.0])
    mean = seed_mean({0: a, 1: b})
    assert mean["segments"] == {"0": 1.5, "1": 3.0} and mean["seeds"] == [0, 1]


def test_seed_entry_by_hand():
    group = {0: _point(0, [1.1, 2.1, 3.1]), 1: _point(1, [1.3, 2.3, 3.3])}
    e = seed_entry(group, DENSE)
    assert e["per_seed"] == pytest.approx({"0": 0.1, "1": 0.3}) and e["seeds"] == [0, 1]
    assert e["delta_nll"]["mean"] == pytest.approx(0.2) and e["delta_nll"]["n"] == 3
    half = 12.706204736174698 * (0.2 / 2 ** 0.5) / 2 ** 0.5  # t_{0.975,1} x sd / sqrt(n)
    assert (e["delta_seeds"]["low"], e["delta_seeds"]["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert e["spearman"] == pytest.approx(0.55) and e["wall_s"] == 20 and e["measured_layer_fraction"] == 0.9
    no_dense = seed_entry(group, None)
    assert no_dense["delta_nll"] is None and no_dense["per_seed"] == {"0": None, "1": None}


def test_seed_diff_pairs_shared_seeds_only():
    a = {0: _point(0, [1.5, 2.5, 3.5]), 1: _point(1, [9.0, 9.0, 9.0])}
    b = {0: _point(0, [1.0, 2.0, 3.0]), 2: _point(2, [0.0, 0.0, 0.0])}
    d = seed_diff(a, b)
    assert d["seeds"] == [0] and d["diff"]["mean"] == pytest.approx(0.5) and d["diff_seeds"]["n"] == 1
    assert seed_diff(a, {2: b[2]}) == {"seeds": [], "diff": None, "diff_seeds": None}


def test_seed_verdict_needs_the_seeds_to_agree_with_the_segments():
    worse = {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 12}
    spans = {"mean": 0.2, "low": -0.5, "high": 0.9, "n": 3}
    assert seed_verdict(worse, None, "positive") == "**expected**"
    assert seed_verdict(worse, {"mean": 0.2, "low": None, "high": None, "n": 1}, "positive") == "**expected**"
    assert seed_verdict(worse, {"mean": 0.2, "low": 0.05, "high": 0.4, "n": 3}, "positive") == "**expected**"
    assert seed_verdict(worse, spans, "positive").startswith("unresolved over training seeds (**expected**")
    assert seed_verdict(worse, spans, "negative").startswith("unresolved over training seeds (**unexpected**")
    assert seed_verdict({"mean": 0.0, "low": -0.1, "high": 0.1, "n": 12}, worse, "positive").startswith("unresolved (")


def test_seeds_text_names_few_missing_points_and_counts_many():
    missing = {"0": [], "1": ["a", "b"], "2": [f"p{i}" for i in range(9)]}
    assert seeds_text([0, 1, 2], missing) == ("Training seeds asked for: 0, 1, 2 — seed 0: 0 missing; "
                                              "seed 1: 2 missing (a, b); seed 2: 9 missing.")


def test_diff_text_shows_the_seed_interval_only_with_two_seeds():
    one = {"seeds": [0], "diff": {"mean": 0.1, "low": 0.05, "high": 0.15, "n": 12}, "diff_seeds": None}
    assert diff_text(one) == "+0.1000 [+0.0500, +0.1500] (n=12) over segments (one training seed: 0)"
    two = {**one, "seeds": [0, 1], "diff_seeds": {"mean": 0.1, "low": -0.2, "high": 0.4, "n": 2}}
    assert diff_text(two).endswith(", +0.1000 [-0.2000, +0.4000] (n=2) over seeds 0, 1")
    none = {"seeds": [], "diff": None, "diff_seeds": None}
    assert diff_text(none) == "missing over segments (one training seed: none shared)"
