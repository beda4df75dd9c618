"""Paper Tables 4/5 page on fabricated point summaries: intervals and paired differences by hand, missing
points shown, resume by setup, and the three rows' sdtp-train configs (with a seed override)."""

from __future__ import annotations

import json
import math

import pytest

from sdtp.config import compose
from sdtp.reports import paper_table45 as t45
from sdtp.reports.lm_eval_pages import write_page_files

T2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2}, closed form for 2 degrees of freedom
SETUP = {"row": "x", "train_steps": 120, "train_args": "", "eval_args": "eval.num_segments=2"}
DENSE = {"0": 2.0, "1": 3.0}
# (row, seed) -> (Spearman, top-k overlap, NLL of segments 0 and 1)
POINTS = {("full", 0): (0.70, 0.60, 2.1, 3.1), ("full", 1): (0.74, 0.62, 2.2, 3.2), ("full", 2): (0.72, 0.64, 2.3, 3.0),
          ("wo_rank", 0): (0.60, 0.55, 2.2, 3.2), ("wo_rank", 1): (0.66, 0.57, 2.4, 3.2),
          ("wo_rank", 2): (0.62, 0.59, 2.3, 3.3),
          ("wo_rank_mse", 0): (0.10, 0.40, 2.5, 3.5), ("wo_rank_mse", 1): (0.20, 0.41, 2.6, 3.4)}  # seed 2 missing


def _write(points_dir, row, seed, values=None, segments=None):
    point = {"schema": 1, "row": row, "seed": seed, "setup": {**SETUP, "row": row}, "command": f"sdtp-train {row}",
             "wall_s": 60.0, "metrics": {"dtype": "torch.bfloat16", "git_commit": "abc", "wall_s": 10.0,
                                         "machine": {"cpu_model": "Test CPU"}},
             "segments": segments}
    if values is not None:
        point["train"] = {"spearman": values[0], "topk_overlap": values[1]}
    points_dir.mkdir(parents=True, exist_ok=True)
    (points_dir / f"{row}_s{seed}.json" if row != "dense" else points_dir / "dense.json").write_text(json.dumps(point))


@pytest.fixture
def points_dir(tmp_path):
    d = tmp_path / "points"
    _write(d, "dense", None, segments=DENSE)
    for (row, seed), v in POINTS.items():
        _write(d, row, seed, v, {"0": v[2], "1": v[3]})
    return d


def _ci(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = {2: 12.706204736174707, 3: T2}[n] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_row_intervals_match_a_hand_computation(points_dir):
    page = t45.build_page(points_dir, "tiny", [0, 1, 2])
    full = page["rows"]["full"]
    mean, low, high = _ci([0.70, 0.74, 0.72])
    assert full["spearman"]["mean"] == pytest.approx(mean)
    assert (full["spearman"]["low"], full["spearman"]["high"]) == pytest.approx((low, high))
    # Δ NLL vs dense per seed = mean over the two segments of (point − dense): 0.1, 0.2, 0.15
    mean, low, high = _ci([0.1, 0.2, 0.15])
    assert full["delta_nll"]["mean"] == pytest.approx(mean)
    assert (full["delta_nll"]["low"], full["delta_nll"]["high"]) == pytest.approx((low, high))
    assert full["delta_nll"]["n"] == 3
    # The seed mean paired with dense over the two segments: (2.2 - 2.0, 3.1 - 3.0), df = 1 (data noise).
    mean, low, high = _ci([0.2, 0.1])
    segments = full["delta_nll_segments"]
    assert segments["n"] == 2
    assert (segments["mean"], segments["low"], segments["high"]) == pytest.approx((mean, low, high))


def test_paired_differences_vs_full_by_seed_and_segment(points_dir):
    page = t45.build_page(points_dir, "tiny", [0, 1, 2])
    vs = page["rows"]["wo_rank"]["vs_full"]
    assert vs["seeds"] == [0, 1, 2]
    # per seed, mean over segments of wo_rank − full NLL: (0.1 + 0.1) / 2, (0.2 + 0) / 2, (0 + 0.3) / 2
    mean, low, high = _ci([0.1, 0.1, 0.15])
    assert vs["delta_nll"]["mean"] == pytest.approx(mean)
    assert (vs["delta_nll"]["low"], vs["delta_nll"]["high"]) == pytest.approx((low, high))
    # The seed means over segments: wo_rank (2.3, 3.2333) − full (2.2, 3.1), paired over the two segments.
    mean, low, high = _ci([(2.2 + 2.4 + 2.3) / 3 - 2.2, (3.2 + 3.2 + 3.3) / 3 - 3.1])
    segments = vs["delta_nll_segments"]
    assert (segments["mean"], segments["low"], segments["high"]) == pytest.approx((mean, low, high))
    mean, low, high = _ci([-0.10, -0.08, -0.10])
    assert vs["spearman"]["mean"] == pytest.approx(mean)
    assert (vs["spearman"]["low"], vs["spearman"]["high"]) == pytest.approx((low, high))
    # wo_rank_mse has seeds 0 and 1 only: paired on those two
    vs = page["rows"]["wo_rank_mse"]["vs_full"]
    assert vs["seeds"] == [0, 1] and vs["delta_nll"]["n"] == 2
    assert vs["delta_nll"]["mean"] == pytest.approx(((0.4 + 0.4) / 2 + (0.4 + 0.2) / 2) / 2)


def test_missing_points_are_shown_not_dropped(points_dir, tmp_path):
    (points_dir / "dense.json").unlink()
    page = t45.build_page(points_dir, "tiny", [0, 1, 2, 3])
    assert page["rows"]["wo_rank_mse"]["missing"] == [2, 3]
    assert page["rows"]["full"]["missing"] == [3]
    assert page["rows"]["full"]["delta_nll"] is None and page["dense"] is None
    md = write_page_files(tmp_path / "out", page, t45.render, t45.to_csv, t45.render_plot)
    text = md.read_text()
    assert "| wo_rank_mse_s2 | missing | missing | missing |" in text
    assert "| wo_rank_mse_s3 | missing | missing | missing |" in text
    assert "Dense reference: missing" in text
    assert "| w/o ranking & MSE | 0, 1 | 2, 3 |" in text
    for suffix in (".json", ".csv", ".png"):
        assert (tmp_path / "out" / f"tiny{suffix}").is_file()


def test_page_shows_paper_numbers_provenance_and_expectations(points_dir, tmp_path):
    page = t45.build_page(points_dir, "tiny", [0, 1, 2], command="bash experiments/paper_table45.sh", wall_s=90)
    text = t45.render(page)
    assert "66.27 (-0.55)" in text and "26.16 (-1.12)" in text  # Tables 4 and 5, deltas recomputed
    assert "bash experiments/paper_table45.sh" in text and "Test CPU" in text and "bfloat16" in text
    assert "abc" in text and "120 training steps" in text and "480" in text
    # Over seeds wo_rank − full excludes 0, over the two segments it does not: no verdict either way.
    assert ("w/o ranking vs full: the interval over seeds excludes 0, the one over segments (the seed means paired "
            "on the same text) does not — unresolved.") in text
    assert "agrees less with them than the full row — **expected**" in text
    rows = list(__import__("csv").DictReader(t45.to_csv(page).splitlines()))
    assert {r["row"] for r in rows} == set(t45.ROWS) and len(rows) == 9


def test_done_requires_the_same_setup(points_dir):
    point = points_dir / "full_s0.json"
    assert t45.done(point, {**SETUP, "row": "full"})
    assert not t45.done(point, {**SETUP, "row": "full", "train_steps": 240})
    assert not t45.done(points_dir / "full_s9.json", {**SETUP, "row": "full"})


def test_rows_compose_with_a_seed_override():
    cfgs = {row: compose("train", t45.train_overrides(row, 2, 120, "tiny-llama")) for row in t45.ROWS}
    for cfg in cfgs.values():
        assert cfg.seed == 2 and cfg.train.max_steps == 120 and cfg.train.target == "attention"
        assert cfg.train.keep_mode == "topk" and cfg.train.loss.ratio == 0.0
    loss = {row: (c.train.loss.ce, c.train.loss.mse, c.train.loss.ranking) for row, c in cfgs.items()}
    assert loss == {"full": (0.0, 1.0, 1.0), "wo_rank": (0.0, 1.0, 0.0), "wo_rank_mse": (1.0, 0.0, 0.0)}
    assert cfgs["wo_rank"].experiment_name == "sdtp_wo_rank"
    assert cfgs["wo_rank_mse"].experiment_name == "sdtp_wo_rank_mse"
