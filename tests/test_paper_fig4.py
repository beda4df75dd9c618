"""Paper Figure 4 page on fabricated point summaries: per-point paired intervals by hand, missing points of the grid,
the paper's trends read off paired differences, the layer mapping and the run order, and bad inputs refused before
any work."""

from __future__ import annotations

import json
import math

import pytest

from sdtp.reports import paper_fig4 as f4
from sdtp.reports.lm_eval_pages import write_page_files

T2 = 4.302652729911275  # t_{0.975, 2}
DENSE = [2.0, 3.0, 4.0]
# (first layer, keep ratio) -> NLL of segments 0, 1, 2
POINTS = {(1, 0.9): [2.1, 3.1, 4.1], (1, 0.7): [2.5, 3.6, 4.7], (10, 0.9): [2.0, 3.05, 4.0],
          (10, 0.7): [2.1, 3.2, 4.0]}


def _write(d, row, segments, schedule="", seed=0, cpu="Test CPU"):
    d.mkdir(parents=True, exist_ok=True)
    setup = {"row": row, "train_steps": 60, "train_args": "", "eval_args": "eval.num_segments=3", "schedule": schedule}
    (d / (f"{row}_s{seed}.json" if row != "dense" else "dense.json")).write_text(json.dumps({
        "schema": 1, "row": row, "seed": None if row == "dense" else seed, "setup": setup, "command": "c", "wall_s": 300,
        "metrics": {"dtype": "torch.float32", "git_commit": "abc", "machine": {"cpu_model": cpu}},
        "train": {"spearman": 0.6}, "segments": {str(i): v for i, v in enumerate(segments)}}))


@pytest.fixture
def points_dir(tmp_path):
    d = tmp_path / "points"
    _write(d, "dense", DENSE)
    for (k, r), nll in POINTS.items():
        _write(d, f4.row_name(k, r), nll, f4.schedule(k, r))
    return d


def _ci(diffs):
    n, mean = len(diffs), sum(diffs) / len(diffs)
    half = T2 * math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def test_point_intervals_are_paired_by_segment(points_dir):
    page = f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7])
    d = page["points"]["first1_keep0.7"]["delta_nll"]
    mean, low, high = _ci([0.5, 0.6, 0.7])
    assert d["mean"] == pytest.approx(mean) and (d["low"], d["high"]) == pytest.approx((low, high)) and d["n"] == 3
    assert page["points"]["first1_keep0.7"]["first_layer"] == 1 and page["missing"] == []


def test_trends_pair_early_with_late_and_low_with_high_keep(points_dir):
    page = f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7])
    early = {t["keep_ratio"]: t for t in page["trends"]["early_vs_late"]}
    mean, low, high = _ci([0.4, 0.4, 0.7])  # keep 0.7: layer 1 − layer 10 per segment
    assert early[0.7]["layers"] == [1, 10] and early[0.7]["diff"]["mean"] == pytest.approx(mean)
    assert (early[0.7]["diff"]["low"], early[0.7]["diff"]["high"]) == pytest.approx((low, high))
    keep = {t["first_layer"]: t for t in page["trends"]["low_vs_high_keep"]}
    assert keep[1]["ratios"] == [0.7, 0.9] and keep[1]["diff"]["mean"] == pytest.approx(0.5)
    text = f4.render(page)
    assert "keep 0.7: first layer 1 − first layer 10" in text and "**expected**" in text
    # the paper's own contrast, from its table: 65.27 − 73.88 at layer 1, 73.48 − 73.88 at layer 10
    assert "(the paper: pruning early hurts more, at keep 0.7 -8.61 points at layer 1 vs -0.40 at layer 10)" in text


def test_missing_points_are_listed_and_the_page_files_written(points_dir, tmp_path):
    (points_dir / "dense.json").unlink()
    page = f4.build_page(points_dir, "tiny", [1, 2, 10], [0.9, 0.8, 0.7], command="bash experiments/paper_fig4.sh")
    assert page["missing"] == ["first2_keep0.9", "first1_keep0.8", "first2_keep0.8", "first10_keep0.8",
                               "first2_keep0.7"]
    assert page["dense"] is None and page["points"]["first1_keep0.9"]["delta_nll"] is None
    md = write_page_files(tmp_path / "out", page, f4.render, f4.to_csv, f4.render_plot)
    text = md.read_text()
    assert "| 2 | missing | missing | missing |" in text and "Dense reference: missing" in text
    assert "first2_keep0.8" in text and "bash experiments/paper_fig4.sh" in text
    for suffix in (".json", ".csv", ".png"):
        assert (tmp_path / "out" / f"tiny{suffix}").is_file()


def test_page_shows_the_papers_numbers_provenance_and_caveats(points_dir):
    page = f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7], wall_s=60)
    text = f4.render(page)
    assert "65.27 (-8.61)" in text and "73.88" in text  # Figure 4, keep 0.7 at layer 1, vs dense
    assert "Test CPU" in text and "float32" in text and "abc" in text and "60 training steps" in text
    assert "480" in text and "near chance on WinoGrande" in text and "0-based layer k" in text
    rows = list(__import__("csv").DictReader(f4.to_csv(page).splitlines()))
    assert len(rows) == 4 and rows[0]["paper_accuracy"] == "72.22"


def test_layer_mapping_is_the_papers_number_within_the_models_depth():
    assert [f4.stage_layer(k, 30) for k in (1, 4, 10)] == [1, 4, 10]
    assert f4.stage_layer(10, 32) == 10
    with pytest.raises(ValueError, match=r"FIRST_LAYERS: first layer 30 is beyond smollm2-135m's depth \(30 layers"):
        f4.stage_layer(30, 30, "smollm2-135m")
    with pytest.raises(ValueError, match="FIRST_LAYERS: first layer 0"):
        f4.stage_layer(0, 30)


def test_plan_orders_outer_ratios_first_and_checks_every_input_before_work():
    rows = [row for row, _ in f4.plan(list(range(1, 11)), [0.9, 0.8, 0.7], 30)]
    assert rows[:4] == ["first1_keep0.9", "first1_keep0.7", "first10_keep0.9", "first10_keep0.7"]
    assert len(rows) == 30 and rows[20:22] == ["first1_keep0.8", "first10_keep0.8"]
    assert dict(f4.plan([3], [0.7], 30)) == {"first3_keep0.7": "pruning.layers=[3] pruning.keep_ratio=0.7"}
    with pytest.raises(ValueError, match="RATIOS: keep ratio 1.0"):
        f4.plan([1], [1.0], 30)
    with pytest.raises(ValueError, match="FIRST_LAYERS"):
        f4.plan([1, 2, 3, 4], [0.9], 4)


def test_points_cli_refuses_a_layer_beyond_the_depth(capsys):
    with pytest.raises(SystemExit) as err:
        f4.main(["points", "--model", "tiny-llama", "--first-layers", "1 4"])
    assert err.value.code == 2
    assert "FIRST_LAYERS: first layer 4 is beyond tiny-llama's depth (4 layers" in capsys.readouterr().err
    f4.main(["points", "--model", "tiny-llama", "--first-layers", "1 3", "--ratios", "0.9"])
    assert capsys.readouterr().out.split("\n")[0] == "first1_keep0.9\tpruning.layers=[1] pruning.keep_ratio=0.9"


def test_a_trend_resolved_over_segments_but_not_over_seeds_reads_unresolved(points_dir):
    # seed 1 reverses the early-vs-late ordering at keep 0.7: layer 1 now better than layer 10
    _write(points_dir, "first1_keep0.7", [2.0, 3.0, 4.0], f4.schedule(1, 0.7), seed=1)
    _write(points_dir, "first10_keep0.7", [2.6, 3.6, 4.9], f4.schedule(10, 0.7), seed=1)
    page = f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7], seeds=[0, 1])
    early = {t["keep_ratio"]: t for t in page["trends"]["early_vs_late"]}[0.7]
    assert early["seeds"] == [0, 1] and early["diff_seeds"]["n"] == 2
    # per seed: +0.5 (seed 0) and −0.7 (seed 1): the interval over seeds spans 0
    assert early["diff_seeds"]["mean"] == pytest.approx((0.5 - 0.7) / 2)
    assert page["points"]["first1_keep0.7"]["per_seed"] == pytest.approx({"0": 0.6, "1": 0.0})
    assert page["missing_by_seed"]["1"] == ["first1_keep0.9", "first10_keep0.9"]
    text = f4.render(page)
    assert "over seeds 0, 1 —" in text and "(one training seed: 0)" in text
    assert "seed 1: 2 missing (first1_keep0.9, first10_keep0.9)" in text
    # keep 0.9 has seed 0 only: judged over segments alone, as before
    assert {t["keep_ratio"]: t for t in page["trends"]["early_vs_late"]}[0.9]["seeds"] == [0]


def test_page_says_when_dense_and_the_points_ran_on_different_machines(points_dir):
    assert "Machines differ" not in f4.render(f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7]))
    _write(points_dir, "dense", DENSE, cpu="Xeon")  # the reference elsewhere, one point's second seed there too
    _write(points_dir, "first1_keep0.9", POINTS[(1, 0.9)], f4.schedule(1, 0.9), seed=1, cpu="Xeon")
    page = f4.build_page(points_dir, "tiny", [1, 10], [0.9, 0.7], seeds=[0, 1])
    assert page["machine_split"] == {"dense": "Xeon", "summaries": {"Test CPU": 4, "Xeon": 1}, "points": 4,
                                     "points_crossing": 4}
    assert ("**Machines differ:** the dense reference ran on Xeon, the point summaries (point x training seed) 4 on "
            "Test CPU, 1 on Xeon; every point's Δ vs dense (the seed mean) includes NLLs computed on another machine "
            "than dense's.") in f4.render(page)
