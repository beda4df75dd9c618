"""Paper Table 1: the SDTP-low schedule and the experiment configs, and the page rendered from fabricated
generation runs (paired intervals by hand, 1/τ, speedups, the paper's numbers, resume, the smaller-page guard)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from sdtp.config import build_schedule, compose
from sdtp.errors import ConfigError
from sdtp.predictor import TokenPredictor
from sdtp.reports import paper_table1
from sdtp.reports.run_summary import restore, restore_bench, summarise

# Per-sample scores (0..1) per row: multi_news (LongBench) and passage_count (ours, synthetic).
SCORES = {
    "dense": {"multi_news": [0.20, 0.10, 0.30], "passage_count": [0.0, 1.0]},
    "sdtp": {"multi_news": [0.10, 0.10, 0.20], "passage_count": [0.0, 0.0]},
    "sdtp_low": {"multi_news": [0.20, 0.15, 0.30], "passage_count": [0.0, 1.0]},
}
LAYER_FRACTION = {"dense": 1.0, "sdtp": 0.63, "sdtp_low": 0.765, "llmlingua2": 1.0}
PREFILL_S = {"dense": 2.0, "sdtp": 1.0, "sdtp_low": 1.5, "llmlingua2": 0.5}


# --------------------------------------------------------------------------------------------
# Configs


def test_sdtp_low_is_five_stages_over_the_same_depth():
    committed = compose("eval", ["pruning=sdtp_low"])  # the committed SDTP-low predictor of the embedded model
    assert Path(committed.pruning.scorer.path).name == "smollm2-135m-low"
    TokenPredictor.load(committed.pruning.scorer.path, layers=[2, 8, 14, 20, 26], base_model="smollm2-135m")
    with pytest.raises(ConfigError, match="pruning.scorer.path: .*mistral-7b-instruct-v0.2-low does not exist"):
        compose("eval", ["pruning=sdtp_low", "model=mistral-7b-instruct-v0.2", "model.device=cpu"])  # trained by the experiment
    cfg = compose("eval", ["pruning=sdtp_low", "pruning.scorer.path=/"])
    schedule = build_schedule(cfg)
    assert cfg.pruning.name == "sdtp_low" and schedule.layers == (2, 8, 14, 20, 26)
    assert schedule.keep_fractions == pytest.approx([0.9 ** s for s in range(1, 6)])
    counts = schedule.tokens_per_layer(4096, 30)
    assert 4096 * 30 / sum(counts) == pytest.approx(1.308, abs=1e-3)  # 1/τ; the paper's SDTP-low: 1.32
    mistral = compose("eval", ["pruning=sdtp_low", "pruning.scorer.path=/", "model=mistral-7b-instruct-v0.2",
                               "model.device=cpu"])
    assert build_schedule(mistral).layers == (4, 10, 16, 22, 28)  # the paper's first layer 4, step 3 -> 6
    with pytest.raises(ConfigError, match="pruning.layers"):
        compose("eval", ["pruning=sdtp_low", "pruning.scorer.path=/", "model=tiny-llama"])  # 4 layers, 5 stages
    train = compose("train", ["pruning=sdtp_low", "model=tiny-llama", "pruning.layers=[1,2]"])
    assert train.pruning.scorer.path is None  # trainable: no checkpoint is needed


def test_table1_experiments_compose():
    longbench = compose("eval", ["experiment=paper_table1", "pruning=sdtp"])
    assert longbench.eval.name == "longbench" and list(longbench.eval.datasets) == ["multi_news"]
    assert (longbench.eval.limit, longbench.eval.max_new_tokens, longbench.compression.method) == (50, 128, "none")
    lingua = compose("eval", ["experiment=paper_table1", "compression=llmlingua2", "compression.rate=0.63"])
    assert lingua.compression.method == "llmlingua2" and lingua.compression.force_tokens[0] == "\n"
    synthetic = compose("eval", ["experiment=paper_table1_synthetic", "eval=passage_count"])
    assert synthetic.eval.name == "passage_count" and list(synthetic.eval.lengths) == [2048] and synthetic.eval.num_samples == 10
    bench = compose("bench", ["experiment=paper_table1_bench", "pruning=sdtp"])
    assert list(bench.lengths) == [2048, 4096] and bench.new_tokens == 128 and not bench.memory
    assert paper_table1.tokens_per_layer_fraction("smollm2-135m") == pytest.approx(1 / 1.588, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Fabricated runs


def _fingerprint(root: str, row: str) -> dict:
    pruning = {"none": "none", "llmlingua2": "none"}.get(row, row)
    return {"config": {"paths": {"root": root}, "model": {"name": "tiny"}, "seed": 0,
                       "eval": {"name": "longbench", "datasets": ["multi_news"], "limit": 3, "max_new_tokens": 128},
                       "pruning": {"name": pruning, "scorer": {"path": f"{root}/results/predictors/tiny",
                                                               "recency_weight": 4.0, "recency_weight_chat": 2.0,
                                                               "norm_weight": 0.0, "norm_weight_chat": 2.0}},
                       "compression": {"method": "llmlingua2" if row == "llmlingua2" else "none", "rate": 0.63,
                                       "model": "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"}},
            "dtype": "torch.bfloat16", "device": "cpu", "packages": {"torch": "2"}, "data": {}, "predictor": {},
            "git": {"commit": "c0ffee"}}


def _write_run(path, evaluation: str, row: str, scores: dict[str, list[float]]) -> None:
    path.mkdir(parents=True)
    lines = []
    for dataset, values in scores.items():
        for i, score in enumerate(values):
            record = {"id": f"{dataset}/{i}", ("dataset" if evaluation == "longbench" else "task"): dataset,
                      "pred": "text", "score": score, "prompt_tokens": 1000, "new_tokens": 100,
                      "prefill_s": PREFILL_S[row], "decode_s": 3.0, "kept_fraction": 0.35,
                      "layer_token_fraction": LAYER_FRACTION[row], "truncated": False}
            if row == "llmlingua2":
                record.update(original_prompt_tokens=1600, prompt_tokens=1000, compress_s=2.5)
            lines.append(json.dumps(record) + "\n")
    (path / "predictions.jsonl").write_text("".join(lines))
    schedule = {"layers": [2, 5], "keep_fractions": [0.9, 0.81], "keep_first": 4, "keep_recent": 0.1}
    metrics = {"eval": evaluation, "model": "tiny", "dtype": "torch.bfloat16", "threads": 1, "wall_s": 90.0,
               "pruning": {"name": row, "schedule": schedule if row.startswith("sdtp") else None},
               "results": {"max_length": 7692}, "git_commit": "c0ffee",
               "machine": {"cpu_model": "Test CPU", "device": "cpu"}, "fingerprint": _fingerprint("/clone/a", row)}
    (path / "metrics.json").write_text(json.dumps(metrics))


def _bench(path, prefill: tuple[float, float]) -> None:
    """A bench report at 1024 and 4096 tokens; ``prefill``: (dense, pruned) median seconds at 1024."""
    def entry(n, dense, pruned):
        variant = {"decode_ms_per_token": {"median": 10.0}, "kv_cache_bytes": 100, "predictor_time_share": 0.01}
        return {"seq_len": n, "variants": {
            "dense": {**variant, "prefill_s": {"median": dense}, "end_to_end_s": {"median": dense + 1.0}},
            "pruned": {**variant, "prefill_s": {"median": pruned}, "end_to_end_s": {"median": pruned + 1.0},
                       "kv_cache_bytes": 63}},
            "flops": {"prefill_ratio": 1.6, "decode_ratio": 1.1, "end_to_end_ratio": 1.5, "prefill_reduction": 0.38,
                      "compression_ratio": 1.59, "predictor_share": 0.005}}

    path.mkdir(parents=True)
    report = {"schema": "sdtp-bench/1", "model": "tiny", "results": [entry(1024, *prefill), entry(4096, 8.0, 4.0)],
              "pruning": {"scorer": {"path": "/clone/a/results/predictors/tiny"}}}
    (path / "bench.json").write_text(json.dumps(report))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for row, scores in SCORES.items():
        _write_run(root / "longbench" / row, "longbench", row, {"multi_news": scores["multi_news"]})
        _write_run(root / "passage_count" / row, "passage_count", row, {"passage_count": scores["passage_count"]})
    _bench(root / "bench_sdtp", (2.0, 1.25))
    _bench(root / "bench_sdtp_low", (2.0, 1.6))
    low = tmp_path / "low"
    low.mkdir()
    (low / "predictor.json").write_text(json.dumps({"layers": [2, 8, 14, 20, 26], "extra": {"target": "attention"}}))
    (low / "train_metrics.json").write_text(json.dumps({"step": 480, "train_examples": 1402, "nll_dense": 2.0,
                                                        "nll_random": 3.0, "nll_sdtp": 2.8, "spearman": 0.7,
                                                        "command": "sdtp-train pruning=sdtp_low"}))
    return root, low


def _page(runs, skipped=None):
    root, low = runs
    return paper_table1.build_page(root, low, skipped or {}, "bash experiments/paper_table1.sh", wall_s=600.0)


def test_paired_difference_avg_and_speedups(runs):
    page = _page(runs, {"llmlingua2": "offline"})
    rows = {t["dataset"]: t for t in page["table"]}
    assert list(rows) == ["multi_news", "passage_count"] and rows["multi_news"]["longbench"]
    news = rows["multi_news"]
    assert news["n"] == 3 and news["score"]["dense"] == pytest.approx(20.0)
    # SDTP − dense per sample (points): -10, 0, -10; sd 5.7735; t_{0.975,2} = 4.3027 (closed form, 2 df).
    mean = -20 / 3
    half = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2)) * math.sqrt(((-10 - mean) ** 2 * 2 + mean ** 2) / 2) / math.sqrt(3)
    d = news["delta"]["sdtp"]
    assert d["mean"] == pytest.approx(mean) and (d["low"], d["high"]) == pytest.approx((mean - half, mean + half))
    assert news["delta"]["sdtp_low"]["mean"] == pytest.approx(5 / 3) and "p_holm" in d
    # AVG is over the LongBench datasets only: the synthetic task is shown, not averaged.
    assert page["average"]["datasets"] == ["multi_news"] and page["average"]["score"]["sdtp"] == pytest.approx(40 / 3)
    # one dataset: AVG is its interval and uncorrected p, outside the Holm family (the page shows that p); so is the CSV
    avg = page["average"]["delta"]["sdtp"]
    assert "p_holm" not in avg and avg["p"] == d["p"] and avg["low"] == d["low"]
    lines = {(r["method"], r["dataset"]): r for r in csv.DictReader(io.StringIO(paper_table1.to_csv(page)))}
    assert lines[("sdtp", "AVG")]["p_holm"] == "" and float(lines[("sdtp", "AVG")]["p"]) == pytest.approx(d["p"])
    assert float(lines[("sdtp", "multi_news")]["p_holm"]) == pytest.approx(d["p_holm"])
    stale = {**page, "average": {**page["average"], "delta": {"sdtp": {**avg, "p_holm": 0.5}}}}  # a page made before
    stale_lines = csv.DictReader(io.StringIO(paper_table1.to_csv(stale)))
    assert {r["p_holm"] for r in stale_lines if r["dataset"] == "AVG"} == {""}
    eff = page["efficiency"]
    assert eff["sdtp"]["compression_ratio"] == pytest.approx(1 / 0.63)
    assert eff["sdtp_low"]["compression_ratio"] == pytest.approx(1 / 0.765)
    assert eff["sdtp"]["prefill_as_run"] == pytest.approx(2.0)  # 3 x 2.0 s vs 3 x 1.0 s
    assert eff["sdtp"]["end_to_end_as_run"] == pytest.approx(15 / 12)
    # Bench: the length nearest the mean dense prompt (1000 tokens) -> 1024: 2.0 / 1.25.
    assert eff["sdtp"]["bench_length"] == 1024 and eff["sdtp"]["prefill_bench"] == pytest.approx(1.6)
    assert eff["sdtp"]["end_to_end_bench"] == pytest.approx(3.0 / 2.25)
    assert page["sizes"] == {"multi_news_documents": 3, "passage_count_documents": 2, "bench_lengths": 2,
                             "sdtp_low_train_steps": 480}
    # made portable (sdtp/paths.py); /clone/a is not this checkout, so the predictor is named by its folder only
    assert page["bench"]["sdtp"]["pruning"]["scorer"]["path"] == "<abs>/tiny"


def test_llmlingua_row_counts_compression_and_compressor_time(runs):
    root, _ = runs
    _write_run(root / "longbench" / "llmlingua2", "longbench", "llmlingua2", {"multi_news": [0.1, 0.1, 0.1]})
    page = _page(runs, {"llmlingua2": "offline"})
    assert page["skipped"] == {}  # a finished run beats the reason it could not run
    eff = page["efficiency"]["llmlingua2"]
    assert eff["compression_ratio"] == pytest.approx(1.6)  # 1600 prompt tokens -> 1000
    assert eff["prefill_as_run"] == pytest.approx(6.0 / (1.5 + 7.5))  # compressor seconds count
    assert eff["prefill_bench"] is None


def test_page_shows_the_papers_numbers_and_the_setup(runs, tmp_path):
    md_path = paper_table1.write_page(_page(runs, {"llmlingua2": "model.bin could not be loaded (offline)."}),
                                      tmp_path / "page")
    md = md_path.read_text()
    assert "| SDTP (10 stages) | 32.70 | 27.74 | 26.65 | 62.74 | 53.99 | 39.82 | 1.61× | 1.71× | 1.31× |" in md
    assert "| Original Token | 36.66 | 29.88 | 28.26 | 66.95 | 53.74 | 42.34 | - | - | - |" in md
    assert "| LLMLingua-2 | not run here: model.bin could not be loaded (offline)." in md
    assert "LLMLingua-2 was not run here" in md and "multi_news (n=3)" in md and "passage_count* (n=2)" in md
    assert "| SDTP (10 stages) | 13.33 (-6.67) |" in md and "1.59×" in md and "1.60×" in md  # score (Δ), 1/τ, bench
    assert "SDTP-low's schedule and predictor" in md and "480 steps" in md and "sdtp-train pruning=sdtp_low" in md
    assert "prior weights (raw text / chat) recency 4.0 / 2.0, norm 0.0 / 2.0" in md
    assert "Test CPU" in md and "c0ffee" in md and "bfloat16" in md and "10.0 min" in md
    assert "bash experiments/paper_table1.sh" in md and "Not expected" in md and "Expected to differ" in md
    assert "94.0%" in md  # the paper's SDTP keeps 94.0% of the original AVG
    csv_lines = (tmp_path / "page" / "tiny.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,dataset,n,score") and len(csv_lines) == 1 + 3 * 3
    assert (tmp_path / "page" / "tiny.png").stat().st_size > 0


def test_smaller_page_never_replaces_a_bigger_one(runs, tmp_path):
    out, smoke = tmp_path / "page", tmp_path / "smoke"
    paper_table1.write_page(_page(runs), out)
    committed = (out / "tiny.md").read_text()
    root, _ = runs
    lines = (root / "longbench" / "dense" / "predictions.jsonl").read_text().splitlines()
    (root / "longbench" / "dense" / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n")  # 2 shared samples
    with pytest.raises(FileExistsError, match="multi_news_documents: 3 -> 2"):
        paper_table1.write_page(_page(runs), out)
    assert paper_table1.write_page(_page(runs), out, smaller_out=smoke) == smoke / "tiny.md"
    assert (out / "tiny.md").read_text() == committed


def test_committed_generation_run_restores_for_the_same_setup(runs, tmp_path):
    page = _page(runs)
    summary = page["runs"]["longbench/sdtp"]
    assert [p["score"] for p in summary["predictions"]] == [0.1, 0.1, 0.2] and "pred" not in summary["predictions"][0]
    here = _fingerprint("/home/u/other-clone", "sdtp")  # the same run in another clone
    assert restore(summary, tmp_path / "restored", here, "page.json")
    again = summarise(tmp_path / "restored")
    assert again["predictions"] == summary["predictions"] and again["metrics"]["restored_from"] == "page.json"
    assert not restore(summary, tmp_path / "fp32", {**here, "dtype": "torch.float32"}, "page.json")
    # The bench reports come back the same way, and never over a run's own.
    page = json.loads(json.dumps(page))  # as committed
    assert restore_bench(page, "sdtp", tmp_path / "bench")
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == page["bench"]["sdtp"]
    assert not restore_bench(page, "sdtp", tmp_path / "bench") and not restore_bench(page, "other", tmp_path / "x")


def test_sdtp_over_training_seeds_scores_its_per_sample_mean(runs, tmp_path):
    root, _ = runs
    seed9 = {"multi_news": [0.30, 0.10, 0.20], "passage_count": [1.0, 0.0]}
    _write_run(root / "longbench" / "sdtp@seed9", "longbench", "sdtp", {"multi_news": seed9["multi_news"]})
    _write_run(root / "passage_count" / "sdtp@seed9", "passage_count", "sdtp", {"passage_count": seed9["passage_count"]})
    page = _page(runs)
    rows = {t["dataset"]: t for t in page["table"]}
    # per-sample mean of the seeds: (0.1+0.3)/2, 0.1, (0.2+0.2)/2 -> 16.67; dense 20.00
    assert rows["multi_news"]["score"]["sdtp"] == pytest.approx(100 * (0.2 + 0.1 + 0.2) / 3)
    assert rows["multi_news"]["delta"]["sdtp"]["mean"] == pytest.approx(100 * (0.2 + 0.1 + 0.2) / 3 - 20.0)
    assert rows["passage_count"]["score"]["sdtp"] == pytest.approx(25.0)
    seeds = page["seeds"]["sdtp"]
    assert seeds["members"] == ["sdtp", "sdtp@seed9"] and "sdtp_low" not in page["seeds"]
    assert seeds["columns"]["multi_news"]["values"] == pytest.approx([100 * 0.4 / 3, 20.0])
    assert seeds["columns"]["Δ AVG vs dense"]["values"] == pytest.approx([100 * 0.4 / 3 - 20.0, 0.0])
    assert page["efficiency"]["sdtp"]["compression_ratio"] == pytest.approx(1 / 0.63)  # the shipped seed's costs
    md = paper_table1.write_page(page, tmp_path / "out").read_text()
    assert "## Over training seeds" in md and "per-sample mean over 2 training seeds" in md
    assert "longbench/sdtp@seed9" in page["runs"]  # restorable


def test_sdtp_low_over_its_own_training_seeds(runs, tmp_path):
    root, low = runs
    seed1 = low / "seed1"
    seed1.mkdir()
    (seed1 / "predictor.json").write_text(json.dumps({"layers": [2, 8, 14, 20, 26]}))
    (seed1 / "train_metrics.json").write_text(json.dumps({"step": 480, "nll_random": 3.1, "nll_sdtp": 2.7,
                                                          "spearman": 0.72}))
    (low / "seed2").mkdir()  # a trained seed the page has no run of: not described (LOW_SEEDS="1")
    (low / "seed2" / "predictor.json").write_text(json.dumps({"layers": [2, 8, 14, 20, 26]}))
    _write_run(root / "longbench" / "sdtp_low@seed1", "longbench", "sdtp_low", {"multi_news": [0.10, 0.15, 0.20]})
    _write_run(root / "passage_count" / "sdtp_low@seed1", "passage_count", "sdtp_low", {"passage_count": [1.0, 1.0]})
    page = _page(runs)
    news = {t["dataset"]: t for t in page["table"]}["multi_news"]
    # per-sample mean of SDTP-low's two seeds: (0.20+0.10)/2, (0.15+0.15)/2, (0.30+0.20)/2
    assert news["score"]["sdtp_low"] == pytest.approx(100 * (0.15 + 0.15 + 0.25) / 3)
    assert page["seeds"]["sdtp_low"]["members"] == ["sdtp_low", "sdtp_low@seed1"] and "sdtp" not in page["seeds"]
    assert list(page["predictor_low"]["seeds"]) == ["seed1"]
    assert page["predictor_low"]["seeds"]["seed1"]["nll_sdtp"] == 2.7 and page["predictor_low"]["nll_sdtp"] == 2.8
    md = paper_table1.write_page(page, tmp_path / "out").read_text()
    assert "Training seed 1 (the same command with `seed=1`): SDTP-low 2.700, random 3.100, Spearman 0.72." in md
    assert "per-sample mean over 2 training seeds" in md


def test_runs_made_on_different_setups_are_named_not_one_runs_machine(runs):
    root, _ = runs
    run = root / "passage_count" / "sdtp" / "metrics.json"
    metrics = json.loads(run.read_text())  # one synthetic SDTP run on another machine, in another dtype
    metrics.update(dtype="torch.float32", machine={"cpu_model": "Other CPU", "device": "cpu"})
    metrics["fingerprint"]["dtype"] = "torch.float32"
    run.write_text(json.dumps(metrics))
    text = paper_table1.render(_page(runs))
    assert "**the runs were made on different setups**: " in text
    assert "passage_count/sdtp on Other CPU (cpu), float32" in text and "longbench/dense, longbench/sdtp" in text
    assert "their evaluation's dense run" in text and "passage_count/sdtp: dtype." in text
