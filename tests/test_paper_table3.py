"""Paper Table 3 page on fabricated run outputs: paired intervals by hand, the paper's numbers, resume."""

from __future__ import annotations

import json
import math

import pytest

from sdtp.eval.stats import paired_binary_interval
from sdtp.provenance import locations_portable
from sdtp.reports import paper_table3
from sdtp.reports.run_summary import restore, summarise
from conftest import lm_eval_fingerprint, write_lm_eval_run

# Per-document 0/1 correctness (doc ids 0..n-1) and gold answers; COPA: SDTP loses docs 0 and 2, gains doc 1.
DENSE = {"sdtp_copa": [1, 0, 1], "sdtp_cb": [1, 1, 0, 0], "sdtp_wsc": [0, 1, 1, 1]}
SDTP = {"sdtp_copa": [0, 1, 0], "sdtp_cb": [1, 1, 0, 0], "sdtp_wsc": [1, 1, 1, 1]}
TARGETS = {"sdtp_copa": [0, 1, 1], "sdtp_cb": [0, 0, 0, 2], "sdtp_wsc": [0, 0, 0, 1]}
CHOICES = {"sdtp_copa": 2, "sdtp_cb": 3, "sdtp_wsc": 2}


def _run(path, outcomes: dict[str, list[int]], pruning: str):
    return write_lm_eval_run(path, outcomes, TARGETS, CHOICES, pruning)


@pytest.fixture
def page_dir(tmp_path):
    runs = {"dense": _run(tmp_path / "none", DENSE, "none"), "sdtp": _run(tmp_path / "sdtp", SDTP, "sdtp")}
    md = paper_table3.write_page(runs, tmp_path / "page", "bash experiments/paper_table3.sh", wall_s=120.0)
    return md.parent


def test_paired_interval_matches_a_hand_computation(page_dir):
    page = json.loads((page_dir / "tiny.json").read_text())
    rows = {r["task"]: r for r in page["table"]}
    copa = rows["COPA"]
    # One run's 0/1 outcomes: Newcombe's interval (checked against a published value in test_stats) and the
    # exact McNemar p of 1 gained / 2 lost, min(1, 2 * P(X <= 1 | 3, 1/2)) = 1.
    mean = -100 / 3
    newcombe = paired_binary_interval(SDTP["sdtp_copa"], DENSE["sdtp_copa"])
    assert copa["n"] == 3 and copa["dense_acc"] == pytest.approx(200 / 3) and copa["sdtp_acc"] == pytest.approx(100 / 3)
    assert copa["delta"]["mean"] == pytest.approx(mean) and copa["delta"]["method"] == "newcombe"
    assert (copa["delta"]["low"], copa["delta"]["high"]) == pytest.approx((100 * newcombe.low, 100 * newcombe.high))
    assert copa["delta"]["p"] == 1.0 and copa["delta"]["low"] >= -100.0
    assert (copa["gained"], copa["lost"]) == (1, 2)
    assert copa["dense_top_answer"] == 100.0  # every fabricated document's choices tie: lm-eval picks the first
    assert rows["CB"]["delta"]["identical"] and rows["CB"]["chance"] == pytest.approx(100 / 3)
    assert rows["CB"]["majority"] == 75.0 and rows["WSC"]["delta"]["mean"] == 25.0
    avg = rows["Avg"]
    assert avg["dense_acc"] == pytest.approx((200 / 3 + 50 + 75) / 3)
    assert avg["delta"]["mean"] == pytest.approx((mean + 0 + 25) / 3)
    # One run's 0/1 outcomes: the three tasks' Newcombe limits combined (MOVER for a mean of independent
    # estimates); p: exact McNemar on the pooled flips (COPA 1 gained / 2 lost, WSC 1 gained: 2 / 2, p = 1).
    parts = [paired_binary_interval(SDTP[t], DENSE[t]) for t in ("sdtp_copa", "sdtp_cb", "sdtp_wsc")]
    low = sum(p.mean for p in parts) / 3 - math.sqrt(sum((p.mean - p.low) ** 2 for p in parts)) / 3
    high = sum(p.mean for p in parts) / 3 + math.sqrt(sum((p.high - p.mean) ** 2 for p in parts)) / 3
    assert (avg["delta"]["low"], avg["delta"]["high"]) == pytest.approx((100 * low, 100 * high))
    assert avg["delta"]["p"] == 1.0
    assert [r["task"] for r in page["table"]] == ["COPA", "CB", "WSC", "Avg"]  # the paper's order


def test_page_holds_the_papers_numbers_and_the_setup(page_dir):
    md = (page_dir / "tiny.md").read_text()
    assert "| COPA | 83.00 | 85.00 | 90.00 | 91.00 | 69.00 | 69.00 |" in md  # the paper's Table 3, as printed
    assert "| Avg | 58.62 | 59.88 | 71.39 | 71.24 | 54.03 | 53.90 |" in md
    assert "90.00 → 91.00 (+1.00)" in md and "92.86 → 89.29 (-3.57)" in md  # beside ours: Mistral COPA, CB
    assert "-33.33 [" in md and "identical on all 4" in md
    assert "bash experiments/paper_table3.sh" in md and "c0ffee" in md and "Test CPU" in md and "bfloat16" in md
    assert "results/predictors/m" in md and "/clone/a" not in md  # shown relative to the clone
    assert "near chance" in md and "5.44 points" in md  # expected differences; the paper's largest |Δ|
    csv_lines = (page_dir / "tiny.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,lm_eval_task,n,dense_acc") and len(csv_lines) == 5
    assert (page_dir / "tiny.png").stat().st_size > 0
    page = json.loads((page_dir / "tiny.json").read_text())
    assert "config" not in page["runs"]["sdtp"]["metrics"] and page["runs"]["sdtp"]["documents"]["sdtp_copa"]["acc"] == "010"
    assert page["runs"]["sdtp"]["documents"]["sdtp_copa"]["pred"] == "000"


def test_committed_summary_restores_a_run_only_for_the_same_setup(page_dir, tmp_path):
    summary = json.loads((page_dir / "tiny.json").read_text())["runs"]["sdtp"]
    here = lm_eval_fingerprint("/home/u/other-clone", "sdtp")  # the same run, made in another clone
    assert restore(summary, tmp_path / "restored", here, "page.json")
    restored = summarise(tmp_path / "restored")
    assert restored["documents"] == summary["documents"]
    assert restored["metrics"]["fingerprint"] == locations_portable(here) and restored["metrics"]["restored_from"] == "page.json"
    assert not restore(summary, tmp_path / "restored", here, "page.json")  # a finished run is left alone
    other = dict(here, dtype="torch.float32")
    assert not restore(summary, tmp_path / "fp32", other, "page.json") and not (tmp_path / "fp32").exists()
    # A run of another setup in the directory (a smoke run, say) would be recomputed by sdtp-eval: the committed
    # summary replaces it, and none of its outputs mix into the restored run.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "metrics.json").write_text(json.dumps({"fingerprint": other}))
    (stale / "samples_sdtp_boolq.jsonl").write_text("{}\n")
    assert restore(summary, stale, here, "page.json") and not (stale / "samples_sdtp_boolq.jsonl").exists()
    assert summarise(stale)["documents"] == summary["documents"]


# Two more training seeds of SDTP: COPA's per-document correctness over the seeds (1st, 2nd, 3rd run).
SEED9 = {"sdtp_copa": [1, 1, 0], "sdtp_cb": [1, 1, 0, 0], "sdtp_wsc": [1, 1, 1, 1]}
SEED10 = {"sdtp_copa": [0, 1, 1], "sdtp_cb": [1, 0, 0, 0], "sdtp_wsc": [1, 1, 1, 1]}


def test_sdtp_over_training_seeds_pairs_its_per_document_mean(tmp_path):
    runs = {"dense": _run(tmp_path / "none", DENSE, "none"), "sdtp": _run(tmp_path / "sdtp", SDTP, "sdtp"),
            "sdtp@seed9": _run(tmp_path / "s9", SEED9, "sdtp"), "sdtp@seed10": _run(tmp_path / "s10", SEED10, "sdtp")}
    md = paper_table3.write_page(runs, tmp_path / "page", "bash experiments/paper_table3.sh")
    page = json.loads(md.with_suffix(".json").read_text())
    copa = {r["task"]: r for r in page["table"]}["COPA"]
    # mean correctness per document: (0+1+0)/3, (1+1+1)/3, (0+0+1)/3; dense 1, 0, 1
    diffs = [100 * (1 / 3 - 1), 100 * (1 - 0), 100 * (1 / 3 - 1)]
    assert copa["sdtp_acc"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 3) / 3)
    assert copa["delta"]["mean"] == pytest.approx(sum(diffs) / 3) and (copa["gained"], copa["lost"]) == (1, 2)
    seeds = page["seeds"]["sdtp"]
    assert seeds["members"] == ["sdtp", "sdtp@seed9", "sdtp@seed10"]
    avg = seeds["columns"]["Avg"]  # each seed's mean of the task accuracies
    expected = [(100 / 3 + 50 + 100) / 3, (200 / 3 + 50 + 100) / 3, (200 / 3 + 25 + 100) / 3]
    assert avg["values"] == pytest.approx(expected) and avg["mean"] == pytest.approx(sum(expected) / 3)
    sd = math.sqrt(sum((v - avg["mean"]) ** 2 for v in expected) / 2)
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * sd / math.sqrt(3)  # t_{0.975, 2}, closed form
    assert (avg["low"], avg["high"]) == pytest.approx((avg["mean"] - half, avg["mean"] + half))
    dense_avg = (200 / 3 + 50 + 75) / 3
    assert seeds["columns"]["Δ Avg vs dense"]["values"] == pytest.approx([v - dense_avg for v in expected])
    assert page["runs"].keys() == runs.keys()  # every seed's summary is kept: a fresh clone restores each
    text = md.read_text()
    assert "## Over training seeds" in text and "mean over 3 training seeds" in text
    assert "| row | number | shipped | seed9 | seed10 |" in text and "| SDTP | Avg |" in text
    with pytest.raises(SystemExit):  # a seed run without the row's own run
        paper_table3.main(["--run", f"dense={tmp_path / 'none'}", "--run", f"sdtp@seed9={tmp_path / 's9'}"])


def test_a_page_from_fewer_documents_never_replaces_the_committed_one(page_dir, tmp_path):
    committed = (page_dir / "tiny.json").read_text()
    assert json.loads(committed)["sizes"]["sdtp_cb_documents"] == 4
    few = {task: docs[:2] for task, docs in DENSE.items()}
    few_sdtp = {task: docs[:2] for task, docs in SDTP.items()}
    runs = {"dense": _run(tmp_path / "few_none", few, "none"), "sdtp": _run(tmp_path / "few_sdtp", few_sdtp, "sdtp")}
    with pytest.raises(FileExistsError, match="built from more data"):
        paper_table3.write_page(runs, page_dir, "smoke")
    md = paper_table3.write_page(runs, page_dir, "smoke", smaller_out=tmp_path / "smoke")
    assert md.parent == tmp_path / "smoke" and (page_dir / "tiny.json").read_text() == committed
    paper_table3.write_page(runs, page_dir, "smoke", replace=True)  # on purpose
    assert json.loads((page_dir / "tiny.json").read_text())["sizes"]["sdtp_cb_documents"] == 2


def test_runs_made_on_different_setups_are_named_not_one_runs_machine(tmp_path):
    dense = _run(tmp_path / "none", DENSE, "none")
    sdtp = _run(tmp_path / "sdtp", SDTP, "sdtp")
    metrics = json.loads((sdtp / "metrics.json").read_text())  # SDTP ran elsewhere, in another dtype
    metrics.update(dtype="torch.float32", machine={"cpu_model": "Other CPU", "device": "cpu"})
    metrics["fingerprint"]["dtype"] = "torch.float32"
    (sdtp / "metrics.json").write_text(json.dumps(metrics))
    text = paper_table3.write_page({"dense": dense, "sdtp": sdtp}, tmp_path / "page", "c").read_text()
    assert ("**the runs were made on different setups**: dense on Test CPU (cpu), bfloat16; sdtp on Other CPU (cpu), "
            "float32 (2 threads)") in text
    assert "- **Setups differ.** These runs are paired with dense" in text and "sdtp: dtype." in text
    alike = _run(tmp_path / "alike", SDTP, "sdtp")
    same = paper_table3.write_page({"dense": dense, "sdtp": alike}, tmp_path / "same", "c").read_text()
    assert "Test CPU (cpu, 2 threads), bfloat16" in same and "Setups differ" not in same


def test_machine_text_lists_every_machine_not_the_last_runs():
    from sdtp.reports.lm_eval_pages import machine_text

    runs = [{"machine": {"cpu_model": "Xeon"}, "git_commit": "b"},
            {"machine": {"cpu_model": "EPYC", "gpu": "A100"}, "git_commit": "a"},
            {"machine": {"cpu_model": "EPYC"}, "git_commit": "a"}]
    assert machine_text(runs) == ("A100, EPYC, Xeon", "a, b")


def test_a_render_of_the_same_runs_keeps_the_wall_time_of_the_command_that_computed_them(page_dir, tmp_path):
    """A resumed script finds every run done and renders again in seconds: the page keeps the computing time."""
    runs = {"dense": tmp_path / "none", "sdtp": tmp_path / "sdtp"}
    paper_table3.write_page(runs, page_dir, "bash experiments/paper_table3.sh", wall_s=3.0)
    assert json.loads((page_dir / "tiny.json").read_text())["wall_s"] == 120.0
    assert "this command 2.0 min" in (page_dir / "tiny.md").read_text()
    other = {"dense": tmp_path / "none", "sdtp": _run(tmp_path / "sdtp2", DENSE, "sdtp")}  # other runs: its own time
    paper_table3.write_page(other, page_dir, "bash experiments/paper_table3.sh", wall_s=3.0)
    assert json.loads((page_dir / "tiny.json").read_text())["wall_s"] == 3.0
