"""Paper Table 6 page on fabricated run outputs (paired intervals by hand, Holm over the page, the paper's
numbers, measured kept fractions, the Table 3 pairing check), and the experiment config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import lm_eval_fingerprint, write_lm_eval_run

from sdtp.cli import evaluate
from sdtp.config import compose
from sdtp.eval.stats import paired_binary_interval
from sdtp.kv import build_kv_policy
from sdtp.reports import paper_table3, paper_table6
from sdtp.reports.run_summary import restore, summarise

REPO = Path(__file__).resolve().parents[1]
# Per-document 0/1 correctness (doc ids 0..n-1). H2O equals dense everywhere; SDTP w. H2O against H2O on
# COPA: +100, -100 on docs 1, 2 and 3 (diffs 0, +100, -100, -100). CB is only in the Table 3 runs.
RUNS = {
    "dense": {"sdtp_copa": [1, 0, 1, 1], "sdtp_mathqa": [0, 1, 0, 0, 1], "sdtp_cb": [1, 0, 1]},
    "sdtp": {"sdtp_copa": [1, 1, 1, 0], "sdtp_mathqa": [0, 1, 0, 0, 1], "sdtp_cb": [1, 1, 1]},
    "local": {"sdtp_copa": [0, 0, 1, 0], "sdtp_mathqa": [0, 0, 0, 0, 1]},
    "h2o": {"sdtp_copa": [1, 0, 1, 1], "sdtp_mathqa": [0, 1, 0, 0, 1]},
    "sdtp_h2o": {"sdtp_copa": [1, 1, 0, 0], "sdtp_mathqa": [1, 1, 0, 0, 1]},
    "sdtp_local": {"sdtp_copa": [0, 0, 0, 0], "sdtp_mathqa": [0, 0, 0, 0, 0]},
}
TARGETS = {"sdtp_copa": [0, 1, 0, 0], "sdtp_mathqa": [0, 1, 2, 3, 4], "sdtp_cb": [0, 1, 2]}
CHOICES = {"sdtp_copa": 2, "sdtp_mathqa": 5, "sdtp_cb": 3}
KV = {"local": ("none", "streaming"), "h2o": ("none", "h2o"), "sdtp_h2o": ("sdtp", "h2o"),
      "sdtp_local": ("sdtp", "streaming")}


def _kv_runs(tmp_path, fingerprint=None, outcomes=RUNS) -> dict[str, Path]:
    return {name: write_lm_eval_run(tmp_path / name, outcomes[name], TARGETS, CHOICES, pruning, kv, kv_kept=0.4,
                                    fingerprint=fingerprint(pruning, kv) if fingerprint else None)
            for name, (pruning, kv) in KV.items()}


@pytest.fixture
def table3(tmp_path):
    runs = {name: write_lm_eval_run(tmp_path / "t3" / name, RUNS[name], TARGETS, CHOICES, pruning)
            for name, pruning in (("dense", "none"), ("sdtp", "sdtp"))}
    md = paper_table3.write_page(runs, tmp_path / "table3", "t3")
    return md.with_suffix(".json")


@pytest.fixture
def page_dir(tmp_path, table3):
    md = paper_table6.write_page(table3, _kv_runs(tmp_path), tmp_path / "page", "bash experiments/paper_table6.sh",
                                 wall_s=300.0)
    return md.parent


def _rows(page_dir) -> dict[str, dict]:
    return {r["task"]: r for r in json.loads((page_dir / "tiny.json").read_text())["table"]}


def test_paired_interval_matches_a_hand_computation(page_dir):
    rows = _rows(page_dir)
    copa = rows["COPA"]["comparisons"]["sdtp_h2o-h2o"]
    # Per document (points) 0, +100, -100, -100: one run's 0/1 outcomes, so Newcombe's interval (checked against a
    # published value in test_stats) and the exact McNemar p of 1 gained / 2 lost, min(1, 2 * 4/8) = 1.
    newcombe = paired_binary_interval([1, 1, 0, 0], [1, 0, 1, 1])
    assert copa["n"] == 4 and copa["base_acc"] == 75.0 and copa["acc"] == 50.0
    assert copa["delta"]["mean"] == pytest.approx(-25.0) == 100 * newcombe.mean
    assert (copa["delta"]["low"], copa["delta"]["high"]) == pytest.approx((100 * newcombe.low, 100 * newcombe.high))
    assert copa["delta"]["p"] == 1.0
    assert (copa["gained"], copa["lost"]) == (1, 2)
    assert rows["COPA"]["comparisons"]["h2o-dense"]["delta"]["identical"]
    assert rows["COPA"]["acc"] == {"dense": 75.0, "local": 25.0, "h2o": 75.0, "sdtp_h2o": 50.0, "sdtp_local": 0.0,
                                   "sdtp": 75.0}
    assert rows["MathQA"]["chance"] == 20.0 and rows["MathQA"]["majority"] == 20.0
    avg = rows["Avg"]
    assert avg["acc"]["local"] == pytest.approx((25.0 + 20.0) / 2)
    assert avg["comparisons"]["local-dense"]["delta"]["mean"] == pytest.approx((-50.0 + -20.0) / 2)
    assert [r["task"] for r in json.loads((page_dir / "tiny.json").read_text())["table"]] == ["COPA", "MathQA", "Avg"]


def test_holm_runs_over_every_test_of_the_page(page_dir):
    rows = [r for r in _rows(page_dir).values() if r["task"] != "Avg"]
    tests = [c["delta"] for r in rows for c in r["comparisons"].values() if not c["delta"]["identical"]]
    assert len(tests) > len(paper_table6.COMPARISONS)  # a family larger than one task's comparisons
    smallest = min(tests, key=lambda d: d["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(tests) * smallest["p"]))
    assert all(d["p_holm"] >= d["p"] for d in tests)


def test_page_holds_the_papers_numbers_the_kept_fractions_and_the_setup(page_dir):
    md = (page_dir / "tiny.md").read_text()
    assert "| COPA | 83.00 | 50.00 | 85.00 | 85.00 |" in md and "| Pruning ratio | - | - | - | 65% |" in md
    assert "| COPA | 4 | 50 / 75 | 75.00 | 25.00 | 75.00 | 50.00 | 0.00 | 75.00 | 83.00 / 50.00 / 85.00 / 85.00 |" in md
    assert "| SDTP w. H2O − H2O | COPA | 4 | -25.00 [" in md and "| +0.00 |" in md  # paper: 85.00 − 85.00
    assert "| H2O − dense | COPA | 4 | identical on all 4 | 0 / 0 | – | +2.00 |" in md
    # Measured: 40% of the entries the prefill left; with SDTP that is 40% of 90% of the dense cache.
    assert "| SDTP w. H2O | h2o 40% | 40.0% | 81.0% | 90.0% | 36.0% | 300 |" in md
    assert "| dense | none | 100.0% | 100.0% | 100.0% | 100.0% | – |" in md
    assert "| Pruning ratio (measured) | | | - | - | - | 19.0% | 19.0% | 19.0% | - / - / - / 65% |" in md
    assert "bash experiments/paper_table6.sh" in md and "Test CPU" in md and "c0ffee" in md and "†" not in md
    assert "results/predictors/m" in md and "/clone/a" not in md
    assert "Llama2-7B on a GPU, this page tiny (cpu)" in md and "H2O − Full is at most 2.00 points" in md
    assert "within 10 points of chance here on: no task;" in md and "SDTP w. H2O keeps 36.0% of the dense" in md
    csv_lines = (page_dir / "tiny.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,lm_eval_task,comparison,n") and len(csv_lines) == 1 + 3 * 6
    assert (page_dir / "tiny.png").stat().st_size > 0
    page = json.loads((page_dir / "tiny.json").read_text())
    assert list(page["runs"]) == list(paper_table6.COLUMNS)
    assert set(page["runs"]["dense"]["documents"]) == {"sdtp_copa", "sdtp_mathqa"}  # CB left out
    assert "config" not in page["runs"]["h2o"]["metrics"]
    assert page["runs"]["sdtp_h2o"]["documents"]["sdtp_copa"]["acc"] == "1100"


def test_kv_runs_must_be_made_like_the_table3_runs(tmp_path, table3):
    fewshot = lambda pruning, kv: lm_eval_fingerprint("/clone/a", pruning, kv, num_fewshot=0)  # noqa: E731
    with pytest.raises(ValueError, match=r"not made like the Table 3 .*num_fewshot"):
        paper_table6.build_page(table3, _kv_runs(tmp_path / "fewshot", fewshot), "c", None)
    fewer = {**RUNS, "local": {**RUNS["local"], "sdtp_copa": [0, 0, 1]}}
    with pytest.raises(ValueError, match="different documents"):
        paper_table6.build_page(table3, _kv_runs(tmp_path / "fewer", outcomes=fewer), "c", None)
    # Another clone, another KV policy, more tasks in Table 3: still the same documents, scored alike.
    moved = lambda pruning, kv: lm_eval_fingerprint("/home/u/clone", pruning, kv)  # noqa: E731
    page = paper_table6.build_page(table3, _kv_runs(tmp_path / "moved", moved), "c", None)
    assert page["table"] and page["sdtp_differs"] == []


def test_sdtp_alone_made_with_another_predictor_is_marked(tmp_path, table3):
    """SDTP (no KV) enters no comparison: a predictor changed since Table 3 is named on the page, not refused."""
    def edited(pruning, kv):
        fp = lm_eval_fingerprint("/clone/a", pruning, kv)
        fp["predictor"] = {path: "456" for path in fp["predictor"]}
        return fp

    md = paper_table6.write_page(table3, _kv_runs(tmp_path / "edited", edited), tmp_path / "page", "c")
    text = md.read_text()
    assert "| SDTP (no KV) † |" in text and "predictor.results/predictors/m/predictor.safetensors" in text


def test_committed_kv_summary_restores_for_the_same_setup(page_dir, tmp_path):
    summary = json.loads((page_dir / "tiny.json").read_text())["runs"]["sdtp_h2o"]
    here = lm_eval_fingerprint("/home/u/other-clone", "sdtp", "h2o")
    assert restore(summary, tmp_path / "restored", here, "page.json")
    assert summarise(tmp_path / "restored")["documents"] == summary["documents"]
    assert not restore(summary, tmp_path / "other", lm_eval_fingerprint("/x", "sdtp", "streaming"), "page.json")


@pytest.mark.parametrize(("pruning", "kv"), [("none", "streaming"), ("none", "h2o"), ("sdtp", "h2o"),
                                             ("sdtp", "streaming")])
def test_experiment_composes_validates_and_matches_table3_documents(pruning, kv, tmp_path):
    cfg = compose("eval", ["experiment=paper_table6", f"pruning={pruning}", f"kv={kv}", f"run_dir={tmp_path}"])
    evaluate.validate_eval(cfg)  # the data files exist, kv=... is accepted by eval=lm_eval
    policy = build_kv_policy(cfg)
    assert policy is not None and policy.method == kv and policy.ratio == 0.4
    assert list(cfg.eval.tasks) == [t for t in paper_table6.TASKS if paper_table6.TASKS[t] in paper_table6.PAPER]
    table3 = compose("eval", ["experiment=paper_table3", f"pruning={pruning}"])
    for task in cfg.eval.tasks:  # the same documents as the Table 3 runs they pair with
        assert cfg.eval.limit.get(task) == table3.eval.limit.get(task)
    assert cfg.eval.num_fewshot == table3.eval.num_fewshot == 5 and cfg.seed == table3.seed


def test_script_runs_the_columns_the_page_reads():
    script = (REPO / "experiments" / "paper_table6.sh").read_text()
    runs = re.search(r"for run in ([^;]+);", script).group(1).split()
    assert {name: (pruning, kv) for name, pruning, kv in (r.split(":") for r in runs)} == KV
    assert tuple(r.split(":")[0] for r in runs) == paper_table6.KV_RUNS
    assert "paper-table6:" in (REPO / "Makefile").read_text()


def test_pruned_columns_over_training_seeds(tmp_path):
    # A second seed of SDTP (Table 3) and of both SDTP + KV runs; COPA's SDTP w. H2O: [1,1,0,0] and [0,1,1,0].
    seed = {"sdtp": {"sdtp_copa": [1, 1, 1, 1], "sdtp_mathqa": [0, 1, 0, 0, 1], "sdtp_cb": [1, 1, 1]},
            "sdtp_h2o": {"sdtp_copa": [0, 1, 1, 0], "sdtp_mathqa": [1, 1, 0, 0, 1]},
            "sdtp_local": {"sdtp_copa": [0, 0, 0, 0], "sdtp_mathqa": [0, 0, 0, 0, 1]}}
    t3 = {"dense": write_lm_eval_run(tmp_path / "t3" / "dense", RUNS["dense"], TARGETS, CHOICES, "none"),
          "sdtp": write_lm_eval_run(tmp_path / "t3" / "sdtp", RUNS["sdtp"], TARGETS, CHOICES, "sdtp"),
          "sdtp@seed9": write_lm_eval_run(tmp_path / "t3" / "s9", seed["sdtp"], TARGETS, CHOICES, "sdtp")}
    table3 = paper_table3.write_page(t3, tmp_path / "table3", "t3").with_suffix(".json")
    runs = _kv_runs(tmp_path)
    for name in ("sdtp_h2o", "sdtp_local"):
        runs[f"{name}@seed9"] = write_lm_eval_run(tmp_path / f"{name}9", seed[name], TARGETS, CHOICES, "sdtp",
                                                  KV[name][1], kv_kept=0.4)
    md = paper_table6.write_page(table3, runs, tmp_path / "page", "t6")
    page = json.loads(md.with_suffix(".json").read_text())
    copa = {r["task"]: r for r in page["table"]}["COPA"]
    assert copa["acc"]["sdtp_h2o"] == pytest.approx(100 * (0.5 + 1 + 0.5 + 0) / 4)  # the seeds' per-document mean
    assert copa["acc"]["sdtp"] == pytest.approx(100 * (1 + 1 + 1 + 0.5) / 4)
    versus_h2o = copa["comparisons"]["sdtp_h2o-h2o"]["delta"]  # h2o [1,0,1,1]: diffs -50, +100, -50, -100
    assert versus_h2o["mean"] == pytest.approx(-25.0)
    assert set(page["seeds"]) == {"sdtp", "sdtp_h2o", "sdtp_local"}
    h2o_seeds = page["seeds"]["sdtp_h2o"]["columns"]["Δ Avg vs H2O"]["values"]  # h2o Avg: (75 + 40) / 2
    assert h2o_seeds == pytest.approx([(50 + 60) / 2 - 57.5, (50 + 60) / 2 - 57.5])
    assert {"sdtp@seed9", "sdtp_h2o@seed9", "sdtp_local@seed9"} <= set(page["runs"])  # restorable
    assert "## Over training seeds" in md.read_text()
