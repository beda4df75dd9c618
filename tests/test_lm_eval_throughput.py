"""The lm-eval throughput benchmark on a tiny model: every configuration timed, same requests, pages written."""

from __future__ import annotations

import json

import pytest

from sdtp.benchmark.lm_eval_throughput import parse_args, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_throughput_page_covers_every_configuration(tmp_path):
    out = tmp_path / "page"
    args = parse_args(["--model", "tiny-llama", "--tasks", "sdtp_copa", "--limit", "3", "--batch-sizes", "2",
                       "--pruning", "none", "shared", "random", "--threads", "1", "--out", str(out), "--no-warmup"])
    run(args, log=lambda _: None)
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["results"]
    assert [(row["batch_size"], row["pruning"]) for row in rows] == [(2, "none"), (2, "shared"), (2, "random")]
    # COPA has two choices per document: the same 6 requests (and tokens) reach every configuration.
    assert {(row["requests"], row["request_tokens"]) for row in rows} == {(6, rows[0]["request_tokens"])}
    assert all(row["model_s"] > 0 and row["wall_s"] >= row["model_s"] and row["requests_per_s"] > 0 for row in rows)
    assert [row["avg_kept_fraction"] < 1.0 for row in rows] == [False, False, True]
    assert rows[1]["tasks"] == rows[0]["tasks"]  # the adapter unpruned scores as HFLM does
    assert set(rows[0]["tasks"]["sdtp_copa"]) == {"acc"}
    assert report["environment"]["threads"] == 1 and report["setup"]["limit"] == 3
    page = out.with_suffix(".md").read_text()
    assert "python -m sdtp.benchmark.lm_eval_throughput" in page and "| 2 | random |" in page
    assert "| 2 | none |" in page and "1.00x" in page  # dense is its own reference
    shared_row = next(line for line in page.splitlines() if line.startswith("| 2 | shared |"))
    assert shared_row.split(" | ")[9] == "1.00x"  # vs shared: its own reference
