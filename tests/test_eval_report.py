"""sdtp.reports.eval_report (scripts/eval_report.py) picks the runs whose overrides set exactly the asked
limit / perplexity length."""

from __future__ import annotations

import json
import os

from sdtp.reports import eval_report


def _run(runs, eval_name, pruning, overrides, value, mtime):
    """A finished run in Hydra's layout (its directory named by its overrides), ``value`` in its metrics."""
    run = runs / eval_name / "tiny" / pruning / ",".join(overrides)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [f"eval={eval_name}", *overrides]))
    (run / "metrics.json").write_text(json.dumps({"value": value}))
    os.utime(run / "metrics.json", (mtime, mtime))


def test_runs_are_matched_on_their_parsed_overrides_not_a_substring(tmp_path, monkeypatch):
    report = eval_report
    monkeypatch.setattr(report, "RUNS", tmp_path)
    _run(tmp_path, "lm_eval", "none", ["eval.batch_size=4", "eval.limit=10"], "limit 10", 1e9)
    _run(tmp_path, "lm_eval", "none", ["eval.batch_size=4", "eval.limit=100"], "limit 100", 2e9)  # newer
    assert report.sdtp_runs("lm_eval", "tiny", "none", {"eval.limit": "10"})["value"] == "limit 10"
    assert report.sdtp_runs("lm_eval", "tiny", "none", {"eval.limit": "100"})["value"] == "limit 100"
    assert report.sdtp_runs("lm_eval", "tiny", "none", {"eval.limit": "1"}) is None
    _run(tmp_path, "perplexity", "none", ["eval.max_tokens=4096"], "4K", 1e9)
    _run(tmp_path, "perplexity", "none", ["eval.max_tokens=40960"], "40K", 2e9)  # newer, another length
    assert report.sdtp_runs("perplexity", "tiny", "none", {"eval.max_tokens": "4096"})["value"] == "4K"
    assert report.overrides_of(tmp_path / "lm_eval" / "tiny" / "none" / "eval.batch_size=4,eval.limit=10") == \
        {"eval": "lm_eval", "eval.batch_size": "4", "eval.limit": "10"}
