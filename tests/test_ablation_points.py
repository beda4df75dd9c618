"""The point machinery shared by paper Tables 4/5 and Figures 4/5 (sdtp/reports/ablation_points.py): setups that
decide reuse (Tables 4/5's keys unchanged), a point recorded from fabricated run folders, paired NLL intervals by
hand, the run order and the v3 recipe's training overrides."""

from __future__ import annotations

import json
import math

import pytest

from sdtp.config import compose
from sdtp.reports import ablation_points as ap

T1 = 12.706204736174707  # t_{0.975, 1}


def test_setup_keeps_table45_keys_and_adds_the_schedule_only_when_given():
    assert ap.setup("full", 120, "", "eval.num_segments=2") == {
        "row": "full", "train_steps": 120, "train_args": "", "eval_args": "eval.num_segments=2"}
    with_schedule = ap.setup("first3_keep0.7", 60, "", "x", "pruning.layers=[3] pruning.keep_ratio=0.7")
    assert with_schedule["schedule"] == "pruning.layers=[3] pruning.keep_ratio=0.7"


def test_setup_cli_prints_the_json_table45_scripts_used_to_build(capsys):
    ap.main(["setup", "--row", "full", "--steps", "120", "--eval-args", "eval.num_segments=2 threads=1"])
    expected = json.dumps({"row": "full", "train_steps": 120, "train_args": "",
                           "eval_args": "eval.num_segments=2 threads=1"}, sort_keys=True)
    assert capsys.readouterr().out.strip() == expected


def _run(tmp_path, name, nll, train=None):
    run = tmp_path / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "eval": "continuation", "model": "tiny", "dtype": "torch.float32", "git_commit": "abc", "wall_s": 3.0,
        "machine": {"cpu_model": "Test CPU"}, "avg_kept_fraction": 0.9, "config": {"big": "left out"},
        "results": {"avg_layer_token_fraction": 0.95, "context_len": 512, "cont_len": 32, "nll": 9.0}}))
    (run / "eval" / "segments.jsonl").write_text("".join(json.dumps({"id": i, "nll": v}) + "\n" for i, v in enumerate(nll)))
    if train is not None:
        (run / "train").mkdir()
        (run / "train" / "metrics.json").write_text(json.dumps(train))
    return run


def test_record_then_done_and_paired_delta_by_hand(tmp_path):
    dense_run = _run(tmp_path, "dense", [2.0, 3.0, 4.0])
    point_run = _run(tmp_path, "p", [2.1, 3.3, 4.2], train={"spearman": 0.7, "flag": True, "curve": [1, 2]})
    setup = ap.setup("p", 2, "", "e", "pruning.layers=[1] pruning.keep_ratio=0.9")
    dense = ap.record(None, None, None, dense_run / "eval", ap.setup("dense", 2, "", "e"), tmp_path / "pts/dense.json")
    point = ap.record("p", 0, point_run / "train", point_run / "eval", setup, tmp_path / "pts/p_s0.json", "cmd", 7.0)
    assert point["train"] == {"spearman": 0.7}  # numbers and text only: no flags, no curves
    assert point["metrics"]["avg_layer_token_fraction"] == 0.95 and point["metrics"]["context_len"] == 512
    assert "config" not in point["metrics"] and point["segments"] == {"0": 2.1, "1": 3.3, "2": 4.2}
    assert ap.done(tmp_path / "pts/p_s0.json", setup)
    assert not ap.done(tmp_path / "pts/p_s0.json", {**setup, "schedule": "pruning.layers=[2] pruning.keep_ratio=0.9"})
    assert not ap.done(tmp_path / "pts/missing.json", setup)
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half width t_{0.975,2} * 0.1 / sqrt(3)
    d = ap.paired_delta(point, dense)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.2) and d["n"] == 3
    assert (d["low"], d["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    points, found_dense = ap.load_points(tmp_path / "pts", lambda row: row == "p")
    assert list(points) == [("p", 0)] and found_dense["row"] == "dense"
    assert ap.paired_delta(point, None) is None


def test_interval_of_two_values_by_hand():
    d = ap.interval([0.1, 0.3])
    half = T1 * math.sqrt(0.02) / math.sqrt(2)
    assert d["mean"] == pytest.approx(0.2) and (d["low"], d["high"]) == pytest.approx((0.2 - half, 0.2 + half))


def test_verdict_reads_the_interval_against_the_papers_direction():
    assert ap.verdict({"mean": 1, "low": 0.5, "high": 1.5}, "positive") == "**expected**"
    assert ap.verdict({"mean": -1, "low": -1.5, "high": -0.5}, "positive") == "**unexpected**"
    assert ap.verdict({"mean": 0, "low": -1, "high": 1}, "positive").startswith("unresolved")
    assert ap.verdict(None, "positive") == "not enough data to judge"


def test_coarse_to_fine_spans_the_axis_first():
    assert ap.coarse_to_fine(list(range(1, 11))) == [1, 10, 5, 3, 7, 2, 4, 6, 8, 9]
    assert ap.coarse_to_fine([1, 2, 3, 4, 5, 6, 7]) == [1, 7, 4, 2, 5, 3, 6]
    assert ap.coarse_to_fine([0.9, 0.8, 0.7]) == [0.9, 0.7, 0.8]
    assert sorted(ap.coarse_to_fine(list(range(13)))) == list(range(13))


def test_recipe_overrides_compose_with_a_schedule():
    overrides = ap.train_overrides("tiny-llama", 60, 1, [*ap.FULL_LOSSES, "pruning.layers=[2]", "pruning.keep_ratio=0.7"])
    cfg = compose("train", overrides)
    assert cfg.train.target == "attention" and cfg.train.loss.ce == 0 and cfg.train.max_steps == 60 and cfg.seed == 1
    assert list(cfg.pruning.layers) == [2] and cfg.pruning.keep_ratio == 0.7
    assert ap.model_depth("smollm2-135m") == (30, {"first_layer": 2, "layer_step": 3, "num_stages": 10})


def test_interval_side_says_which_side_of_zero_the_interval_lies_on():
    assert ap.interval_side({"mean": 1, "low": 0.5, "high": 1.5}) == 1
    assert ap.interval_side({"mean": -1, "low": -1.5, "high": -0.5}) == -1
    assert ap.interval_side({"mean": 0, "low": -1, "high": 1}) == 0
    assert ap.interval_side({"mean": 0.2, "low": None, "high": None}) is None
    assert ap.interval_side(None) is None
