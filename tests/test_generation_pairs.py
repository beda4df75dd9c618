"""Paired generation-run comparison: hand-computed deltas, Holm, "identical", and the rendered page."""

from __future__ import annotations

import json

import pytest

from sdtp.reports.generation_pairs import main


def _run(tmp_path, name, scores):
    run = tmp_path / name
    run.mkdir()
    lines = [json.dumps({"id": f"d{i}", "dataset": "multi_news", "score": s}) for i, s in enumerate(scores)]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_paired_deltas_and_page(tmp_path):
    dense = _run(tmp_path, "dense", [0.2, 0.4, 0.6, 0.8])
    sdtp = _run(tmp_path, "sdtp", [0.1, 0.3, 0.6, 0.7])  # diffs -0.1, -0.1, 0, -0.1
    same = _run(tmp_path, "same", [0.1, 0.3, 0.6, 0.7])
    out = tmp_path / "page.md"
    result = main(["--run", f"dense={dense}", "--run", f"sdtp={sdtp}", "--run", f"same={same}",
                   "--focus", "sdtp", "--out", str(out)])
    assert result["n"] == 4
    delta = result["rows"][1]["delta"]
    assert delta.mean == pytest.approx(-0.075)
    # sd of (-0.1, -0.1, 0, -0.1) = 0.05; t(0.975, 3) = 3.182446
    assert delta.high - delta.mean == pytest.approx(3.182446 * 0.05 / 2, rel=1e-5) and delta.method == "t"
    assert [p["other"] for p in result["pairs"]] == ["dense", "same"]
    assert result["pairs"][1]["t"].identical
    page = out.read_text()
    assert "identical on all 4" in page and "| sdtp | 42.50 | -7.50 [" in page
    assert json.loads(out.with_suffix(".json").read_text())["n"] == 4


def test_one_shared_sample_has_no_interval_and_none_is_refused(tmp_path):
    dense, sdtp = _run(tmp_path, "dense", [0.5]), _run(tmp_path, "sdtp", [0.4])
    out = tmp_path / "page.md"
    main(["--run", f"dense={dense}", "--run", f"sdtp={sdtp}", "--out", str(out)])
    assert "| sdtp | 40.00 | -10.00 (n = 1, no interval) |" in out.read_text() and "nan" not in out.read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.jsonl").write_text(json.dumps({"id": "x", "dataset": "multi_news", "score": 1.0}) + "\n")
    with pytest.raises(SystemExit):
        main(["--run", f"dense={dense}", "--run", f"other={other}", "--out", str(tmp_path / "none.md")])
    assert not (tmp_path / "none.md").exists()
