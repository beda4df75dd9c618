"""The comparison page renders fabricated sweep outputs (no model is run)."""

from __future__ import annotations

import importlib.util
import json
import os
import math
from pathlib import Path

import pytest

from sdtp.config import REPO_ROOT
from sdtp.eval.stats import paired_binary_interval
from sdtp.reports import compare_methods as compare
from sdtp.reports.method_outputs import page_sizes, smaller_than_existing
from sdtp.reports.method_runs import collect, newest_outcomes

T975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # df = 2 has a closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2))


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(root: Path, method: str, eval_name: str, results: dict, kv: str | None = None, run: str = "x",
          config: dict | None = None, **extra) -> Path:
    """A fabricated sdtp-eval run directory (``metrics.json``); returns it."""
    config = {"pruning": {"name": method}, "eval": {"limit": 20 if method != "random" else 10},
              **({"kv": {"method": kv, "ratio": 0.4}} if kv else {}), **(config or {})}
    record = {"method": kv, "ratio": 0.4, "kept_fraction": 0.4} if kv else {"method": "none", "kept_fraction": 1.0}
    run_dir = root / "eval" / eval_name / method / (kv or run)
    _write(run_dir / "metrics.json", {"eval": eval_name, "pruning": {"name": method}, "kv": record,
                                      "results": results, "config": config, **extra})
    return run_dir


def _samples(run_dir: Path, outcomes: list[int], task: str = "piqa") -> None:
    """lm-eval's per-document log (samples_<task>.jsonl) beside a run's metrics.json."""
    lines = [json.dumps({"doc_id": i, "acc": float(a), "acc_norm": 0.0}) for i, a in enumerate(outcomes)]
    (run_dir / f"samples_sdtp_{task}.jsonl").write_text("\n".join(lines) + "\n")


def _lm_eval(root: Path, method: str, outcomes: list[int], run: str = "x", **kwargs) -> Path:
    """An lm-eval run over one task (piqa) with the given 0/1 document outcomes."""
    acc = sum(outcomes) / len(outcomes)
    results = {"tasks": {"sdtp_piqa": {"acc,none": acc}}, "n_samples": {"sdtp_piqa": len(outcomes)}}
    run_dir = _eval(root, method, "lm_eval", results, run=run, **kwargs)
    _samples(run_dir, outcomes)
    return run_dir


def _render(root: Path, out: Path) -> tuple[dict, str, dict]:
    """rows by method, the markdown page and the whole json of a render of ``root``."""
    assert compare.main(["--root", str(root), "--out", str(out)]) == 0
    page = json.loads((out / "compare_methods.json").read_text())
    return {r["method"]: r for r in page["rows"]}, (out / "compare_methods.md").read_text(), page


def test_table_and_plot_from_fabricated_runs(tmp_path):
    root = tmp_path / "multiruns"
    for method, acc, ppl, frac in (("none", 0.6, 20.0, None), ("sdtp", 0.58, 22.0, 0.63), ("random", 0.5, 30.0, 0.63)):
        tasks = {"sdtp_piqa": {"acc,none": acc, "acc_norm,none": acc + 0.01}, "sdtp_arc_easy": {"acc": acc - 0.1}}
        extra = {"avg_layer_token_fraction": frac} if frac else {}
        _eval(root, method, "lm_eval", {"tasks": tasks, "n_samples": {"sdtp_piqa": 50, "sdtp_arc_easy": 40}, **extra})
        _eval(root, method, "perplexity", {"perplexity": ppl, **extra})
        _eval(root, method, "longbench", {"datasets": {"multi_news": acc / 3}, "avg": acc / 3})
    # Paired outcomes on 4 shared documents: sdtp loses doc 1 and gains doc 3 vs dense (delta 0); random loses 2.
    for method, outcomes in (("none", [1, 1, 0, 0]), ("sdtp", [1, 0, 0, 1]), ("random", [0, 0, 0, 0])):
        _samples(root / "eval" / "lm_eval" / method / "x", outcomes)
    for method, scores in (("none", [0.5, 0.25]), ("sdtp", [0.375, 0.125])):  # exact in binary: diffs -1/8
        lines = [json.dumps({"id": f"s{i}", "dataset": "multi_news", "score": v}) for i, v in enumerate(scores)]
        (root / "eval" / "longbench" / method / "x" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    _eval(root, "sdtp", "longbench", {"tasks": {"multi_news": {"score": 0.15}}, "avg_layer_token_fraction": 0.63},
          kv="h2o")
    _write(root / "bench" / "a" / "bench.json", {  # sdtp-bench's schema, with a distracting `targets`
        "schema": "sdtp-bench/1", "pruning": {"name": "sdtp"}, "targets": {"prefill_speedup": {"8192": 1.85}},
        "results": [{"seq_len": 1024, "speedup": {"prefill": 1.2, "decode": 1.0}},
                    {"seq_len": 2048, "speedup": {"prefill": 1.5, "decode": 1.1}}]})
    _write(root / "bench" / "b" / "bench.json", {"pruning": "random", "targets": {"prefill_speedup": {"8192": 9.0}},
                                                 "prefill_speedup": {"1024": 1.1, "2048": 1.6}})
    # An ablation of sdtp (same pruning.name, another schedule) gets its own row, named by its overrides.
    _write(root / "eval" / "ppl_ablation" / "metrics.json", {"eval": "perplexity", "pruning": {"name": "sdtp"},
                                                             "results": {"perplexity": 25.0}})
    (root / "eval" / "ppl_ablation" / ".hydra").mkdir()
    (root / "eval" / "ppl_ablation" / ".hydra" / "overrides.yaml").write_text(
        "- model=smollm2-135m\n- pruning=sdtp\n- pruning.first_layer=8\n- kv.ratio=0.4\n- eval=perplexity\n")
    (root / "eval" / "broken").mkdir(parents=True)
    (root / "eval" / "broken" / "metrics.json").write_text("{not json")
    out = tmp_path / "compare"
    rows, md, page = _render(root, out)
    assert list(rows)[0] == "none"
    assert set(rows) == {"none", "sdtp", "random", "sdtp+h2o@0.4", "sdtp[pruning.first_layer=8]"}
    assert rows["sdtp[pruning.first_layer=8]"]["perplexity"] == 25.0 and rows["sdtp"]["perplexity"] == 22.0
    assert abs(rows["sdtp"]["piqa"] - 58.0) < 1e-9 and abs(rows["sdtp"]["arc_easy"] - 48.0) < 1e-9
    assert rows["sdtp"]["perplexity"] == 22.0 and rows["sdtp"]["prefill_speedup"] == 1.5
    assert rows["random"]["prefill_speedup"] == 1.6
    assert abs(rows["sdtp"]["analytic_speedup"] - 1 / 0.63) < 1e-9 and rows["none"]["prefill_speedup"] == 1.0
    assert abs(rows["sdtp+h2o@0.4"]["kv_cache"] - 0.63 * 0.4) < 1e-9 and rows["sdtp"]["kv_cache"] == 0.63
    assert (out / "compare_methods.png").stat().st_size > 0
    assert "* perplexity: limit=10 | limit=20 (methods differ!)" in md  # random was run with another limit
    assert "* bench" not in md  # the fabricated bench files carry no settings
    assert "| method | arc_easy | multi_news | piqa | perplexity | lm_eval_mean_acc | tokens_per_layer" in md
    # Paired lm-eval differences to dense (4 documents): sdtp's cancel out, random loses 2 of 4.
    assert rows["sdtp"]["lm_eval_delta"] == 0.0 and rows["none"]["lm_eval_delta"] == 0.0
    assert rows["random"]["lm_eval_delta"] == -50.0 and rows["random"]["lm_eval_delta_n"] == 4
    # 0/1 outcomes: Newcombe's interval (tested against a published value in test_stats) and McNemar's p,
    # 0 gained / 2 lost -> 2 * 0.5^2.
    newcombe = paired_binary_interval([0, 0, 0, 0], [1, 1, 0, 0])
    assert rows["random"]["lm_eval_delta_high"] == pytest.approx(100 * newcombe.high, rel=1e-12)
    assert rows["random"]["lm_eval_delta_low"] == pytest.approx(100 * newcombe.low, rel=1e-12)
    assert rows["random"]["lm_eval_delta_low"] >= -100.0
    assert rows["random"]["lm_eval_delta_p"] == 0.5
    assert "| sdtp − random | +50.00 [" in md
    # LongBench pairs predictions.jsonl scores the same way; sdtp is 12.5 points below dense on both samples.
    assert rows["sdtp"]["longbench_delta"] == -12.5 and rows["random"]["longbench_delta"] is None
    assert "constant difference on all 2" in md  # zero variance, non-zero: no p-value to speak of
    # No interval without per-window NLLs (runs from before perplexity protocol 2).
    assert "Perplexity: no interval for none, random, sdtp, sdtp[pruning.first_layer=8]" in md
    csv_header = (out / "compare_methods.csv").read_text().splitlines()[0].split(",")
    assert csv_header[:7] == ["method", "seed_of", "arc_easy", "multi_news", "piqa", "perplexity", "lm_eval_mean_acc"]


def test_no_cross_metric_mean(tmp_path):
    """lm_eval_mean_acc averages the lm-eval accuracy tasks only, never ROUGE-L, needle scores or perplexity."""
    root = tmp_path / "multiruns"
    for method, acc in (("none", 0.6), ("sdtp", 0.5)):
        tasks = {"sdtp_piqa": {"acc": acc}, "sdtp_arc_easy": {"acc": acc - 0.2}}
        _eval(root, method, "lm_eval", {"tasks": tasks})
        _eval(root, method, "longbench", {"datasets": {"multi_news": 13.0}})
        _eval(root, method, "needle", {"score": 100.0})
        _eval(root, method, "perplexity", {"perplexity": 20.0})
    _eval(root, "norm", "longbench", {"datasets": {"multi_news": 12.0}})  # no lm-eval run: no mean at all
    rows, md, page = _render(root, tmp_path / "out")
    assert "mean_acc" not in page["columns"] and "lm_eval_mean_acc" in page["columns"]
    assert rows["none"]["lm_eval_mean_acc"] == pytest.approx((60.0 + 40.0) / 2)
    assert rows["sdtp"]["lm_eval_mean_acc"] == pytest.approx((50.0 + 30.0) / 2)
    assert rows["norm"]["lm_eval_mean_acc"] is None
    assert "| mean_acc" not in md and " mean_acc " not in md


def test_intervals_holm_and_identical_against_closed_form(tmp_path):
    root = tmp_path / "multiruns"
    dense = [1] * 8 + [0] * 4
    _lm_eval(root, "none", dense)
    _lm_eval(root, "positional", [0] * 6 + [1, 1] + [0] * 4)  # loses 6, gains none: McNemar p = 2 / 2^6
    _lm_eval(root, "norm", [0] + [1] * 7 + [1] + [0] * 3)  # loses 1, gains 1: p = 1
    _lm_eval(root, "lazyllm", dense)  # never differs
    # Perplexity protocol 2: per-window NLL sums and token counts -> NLL per token per window.
    _eval(root, "none", "perplexity", {"perplexity": 10.0, "window_nll": [20.0, 30.0, 12.0],
                                       "window_tokens": [10, 10, 4]})
    _eval(root, "positional", "perplexity", {"perplexity": 11.0, "window_nll": [21.0, 30.5, 12.4],
                                             "window_tokens": [10, 10, 4]})
    rows, md, page = _render(root, tmp_path / "out")
    pos, norm, lazy = rows["positional"], rows["norm"], rows["lazyllm"]
    assert pos["lm_eval_delta"] == -50.0 and pos["lm_eval_delta_p"] == pytest.approx(2 / 2**6, rel=1e-12)
    newcombe = paired_binary_interval([0] * 6 + [1, 1] + [0] * 4, dense)
    assert (pos["lm_eval_delta_low"], pos["lm_eval_delta_high"]) == pytest.approx((100 * newcombe.low,
                                                                                   100 * newcombe.high), rel=1e-12)
    assert -100.0 <= pos["lm_eval_delta_low"] < -50.0 < pos["lm_eval_delta_high"] < 0.0
    assert norm["lm_eval_delta"] == 0.0 and norm["lm_eval_delta_p"] == 1.0
    # Holm over the three comparisons to dense (identical lazyllm counts, p = 1): 3 x 1/32, then capped at 1.
    assert pos["lm_eval_delta_p_holm"] == pytest.approx(3 / 32, rel=1e-12)
    assert norm["lm_eval_delta_p_holm"] == 1.0 and lazy["lm_eval_delta_p_holm"] == 1.0
    assert "| lazyllm | identical on all 12 | – |" in md and "± 0.00" not in md and "±" not in md
    assert "Holm over 3" in md
    # Per window NLL/token: dense 2, 3, 3; positional 2.1, 3.05, 3.1 -> diffs 0.1, 0.05, 0.1 (df = 2).
    diffs = [0.1, 0.05, 0.1]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert pos["perplexity_delta"] == pytest.approx(mean, rel=1e-9) and pos["perplexity_delta_n"] == 3
    assert pos["perplexity_delta_high"] == pytest.approx(mean + T975_DF2 * se, rel=1e-9)
    assert "### perplexity (Δ in nats/token" in md
    assert "Perplexity: no interval" not in md


def test_random_seeds_are_grouped_into_a_mean_row(tmp_path):
    root = tmp_path / "multiruns"
    _lm_eval(root, "none", [1, 1, 0, 0])
    _lm_eval(root, "sdtp", [1, 1, 0, 1])
    seeds = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [0, 0, 0, 0]}
    for seed, outcomes in seeds.items():
        # One multirun job per seed: its own directory, the seed in the overrides and in the resolved config.
        config = {"pruning": {"name": "random", "scorer": {"seed": seed}}, "eval": {"limit": 20}}
        run_dir = _lm_eval(root, "random", outcomes, run=f"pruning.scorer.seed={seed}", config=config)
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- pruning=random\n- pruning.scorer.seed={seed}\n")
    _write(root / "bench" / "r" / "bench.json", {"pruning": {"name": "random", "scorer": {"seed": 0}},
                                                 "prefill_speedup": 1.4})
    rows, md, page = _render(root, tmp_path / "out")
    assert set(rows) == {"none", "sdtp", "random", "random_s0", "random_s1", "random_s2"}
    assert list(rows) == ["none", "random", "random_s0", "random_s1", "random_s2", "sdtp"]
    assert rows["random"]["seeds"] == ["random_s0", "random_s1", "random_s2"]
    assert rows["random_s1"]["seed_of"] == "random" and rows["random"]["seed_of"] is None
    # The mean row pairs the per-document mean over seeds (2/3, 1/3, 0, 0) with dense (1, 1, 0, 0).
    assert rows["random"]["lm_eval_delta"] == pytest.approx(-25.0) and rows["random"]["lm_eval_delta_n"] == 4
    assert rows["random"]["piqa"] == pytest.approx(100 * (0.25 + 0.5 + 0.0) / 3)
    assert rows["random"]["prefill_speedup"] == 1.4  # the benchmark times the schedule, not a seed
    # Seed rows are shown with their own difference but are not in the Holm family; the mean row is.
    assert rows["random_s1"]["lm_eval_delta"] == 0.0 and rows["random_s1"]["lm_eval_delta_p_holm"] is None
    assert rows["random"]["lm_eval_delta_p_holm"] is not None
    assert "| random (mean of 3 seeds) |" in md and "| ↳ random_s0 |" in md
    assert "(seed row, not in Holm)" in md and "identical on all 4" in md
    focus = [c["b"] for c in page["comparisons"]["focus"]["lm_eval"]]
    assert focus == ["none", "random"]  # sdtp vs the seeds' mean, not vs each seed
    assert "pruning.scorer.seed" not in " ".join(rows)  # the seed is in the name, not a variant suffix
    assert "| s0 | s1 | s2 | mean over seeds [95% CI] |" in md and "| random | piqa | 25.000 | 50.000 | 0.000 |" in md


def _with_overrides(run_dir: Path, *overrides: str) -> Path:
    """Hydra's record of the run's command-line overrides."""
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def test_training_seeds_are_grouped_with_the_shipped_predictor(tmp_path):
    root = tmp_path / "multiruns"
    _lm_eval(root, "none", [1, 1, 0, 0])
    _lm_eval(root, "lazyllm", [1, 0, 0, 0])
    _with_overrides(_lm_eval(root, "sdtp", [1, 1, 0, 1], run="shipped"), "pruning=sdtp")  # the configured predictor
    seeds = {"seed9": [1, 0, 0, 1], "seed10": [1, 1, 1, 1]}  # with seed10 second, as in seeds.txt
    for folder, outcomes in seeds.items():
        run_dir = _lm_eval(root, "sdtp", outcomes, run=folder)
        _with_overrides(run_dir, "pruning=sdtp", f"pruning.scorer.path=results/predictors/news/{folder}/")
    for folder in ("", "seed9"):  # KV rows: the shipped predictor and one other seed
        run_dir = _eval(root / f"kv{folder}", "sdtp", "longbench", {"datasets": {"multi_news": 10.0}}, kv="h2o")
        _with_overrides(run_dir, "pruning=sdtp", "kv=h2o", *([f"pruning.scorer.path=p/{folder}"] if folder else []))
    _write(root / "bench" / "s" / "bench.json", {"pruning": {"name": "sdtp"}, "prefill_speedup": 1.5})
    rows, md, page = _render(root, tmp_path / "out")
    assert list(rows) == ["none", "lazyllm", "sdtp", "sdtp_shipped", "sdtp_seed9", "sdtp_seed10", "sdtp+h2o@0.4",
                          "sdtp_shipped+h2o@0.4", "sdtp_seed9+h2o@0.4"]
    assert rows["sdtp"]["seeds"] == ["sdtp_shipped", "sdtp_seed9", "sdtp_seed10"]
    assert rows["sdtp+h2o@0.4"]["seeds"] == ["sdtp_shipped+h2o@0.4", "sdtp_seed9+h2o@0.4"]
    assert rows["sdtp_seed10"]["seed_of"] == "sdtp" and rows["sdtp"]["prefill_speedup"] == 1.5
    # The mean row pairs the per-document mean over the seeds (1, 2/3, 1/3, 1) with dense (1, 1, 0, 0).
    assert rows["sdtp"]["lm_eval_delta"] == pytest.approx(100 * (0 - 1 / 3 + 1 / 3 + 1) / 4)
    focus = [c["b"] for c in page["comparisons"]["focus"]["lm_eval"]]
    assert focus == ["none", "lazyllm"]  # sdtp's seed mean against the others, not against its own seeds
    # Over seeds: piqa per seed 75 / 50 / 100, mean 75, 95% t interval 75 ± 4.303 * 25 / sqrt(3).
    half = 4.302652729911275 * 25 / math.sqrt(3)
    assert "| row | number | seed 1 | seed 2 | seed 3 | mean over seeds [95% CI] |" in md  # rows' seeds differ
    assert (f"| sdtp (shipped, seed9, seed10) | piqa | 75.000 | 50.000 | 100.000 | 75.000 [{75 - half:.3f}, "
            f"{75 + half:.3f}] |") in md
    assert "| sdtp+h2o@0.4 (shipped, seed9) | multi_news | 10.000 | 10.000 |  | 10.000 [10.000, 10.000] |" in md
    assert "pruning.scorer.path" not in " ".join(rows)  # the training seed is in the name, not a variant suffix


def _fingerprint(root: str = "/clone", commit: str = "c1", limit: int = 20, pruning: str = "none") -> dict:
    data = f"{root}/../shared/data/mc/piqa.jsonl"
    return {"config": {"paths": {"root": root, "data_dir": f"{root}/../shared/data"}, "model": {"name": "m"},
                       "eval": {"limit": limit, "data_root": f"{root}/../shared/data/mc"},
                       "pruning": {"name": pruning}},
            "dtype": "torch.float32", "device": "cpu", "predictor": {}, "data": {data: "abc"},
            "packages": {"torch": "2.6"}, "git": {"commit": commit, "dirty": False}}


def test_mismatched_fingerprint_is_marked(tmp_path):
    root = tmp_path / "multiruns"
    _lm_eval(root, "none", [1, 1, 0, 0], fingerprint=_fingerprint())
    # Only the method differs (pruning config, predictor), and the sweep ran in another clone: not marked.
    same = _fingerprint(root="/elsewhere", pruning="sdtp") | {"predictor": {"/w/p.safetensors": "f00"}}
    _lm_eval(root, "sdtp", [1, 0, 0, 0], fingerprint=same)
    _lm_eval(root, "positional", [1, 1, 0, 1], fingerprint=_fingerprint(commit="c2", limit=10, pruning="positional"))
    _lm_eval(root, "norm", [1, 1, 1, 0])  # written before fingerprints existed
    rows, md, page = _render(root, tmp_path / "out")
    assert rows["sdtp"]["fingerprint"] is None and rows["norm"]["fingerprint"] is None
    marked = rows["positional"]["fingerprint"]
    assert "git.commit" in marked and "config.eval.limit" in marked and "config.pruning" not in marked
    assert "| positional † |" in md and "| sdtp |" in md and "| sdtp − positional † |" in md
    assert "* † positional: differs from dense in lm_eval: config.eval.limit, git.commit" in md
    assert "Fingerprints not checked" in md and "norm (lm_eval)" in md


def test_outcomes_skip_a_torn_last_line(tmp_path):
    """A killed generation run leaves a half-written last line; the table still reads the finished samples."""
    from sdtp.eval.stats import prediction_outcomes

    (tmp_path / "predictions.jsonl").write_text('{"id": "a", "dataset": "multi_news", "score": 0.5}\n{"id": "b", "sco')
    assert prediction_outcomes(tmp_path) == {("multi_news", "a"): 0.5}


def _lm_eval_root(root: Path, n: int) -> Path:
    """Dense and sdtp lm-eval runs over ``n`` documents (per-document outcomes included)."""
    for method in ("none", "sdtp"):
        _lm_eval(root, method, [i % 2 for i in range(n)])
    return root


def test_smaller_page_never_replaces_a_bigger_one(tmp_path):
    out, smoke = tmp_path / "compare", tmp_path / "smoke"
    assert compare.main(["--root", str(_lm_eval_root(tmp_path / "big", 10)), "--out", str(out)]) == 0
    committed = (out / "compare_methods.json").read_text()
    assert json.loads(committed)["sizes"] == {"lm_eval_documents": 10, "piqa_documents": 10}
    small = str(_lm_eval_root(tmp_path / "small", 2))
    with pytest.raises(SystemExit):
        compare.main(["--root", small, "--out", str(out)])
    assert (out / "compare_methods.json").read_text() == committed
    assert compare.main(["--root", small, "--out", str(out), "--smaller-out", str(smoke)]) == 0
    assert (out / "compare_methods.json").read_text() == committed
    assert json.loads((smoke / "compare_methods.json").read_text())["sizes"]["piqa_documents"] == 2
    assert compare.main(["--root", small, "--out", str(out), "--replace"]) == 0
    assert json.loads((out / "compare_methods.json").read_text())["sizes"]["piqa_documents"] == 2
    # A page as large (or larger) replaces without a flag; a page that recorded no sizes is protected.
    assert compare.main(["--root", small, "--out", str(out)]) == 0
    (out / "compare_methods.json").write_text(json.dumps({"columns": [], "rows": [], "ci95": {}}))
    with pytest.raises(SystemExit):
        compare.main(["--root", small, "--out", str(out)])


def test_newest_run_replaces_the_paired_documents_of_an_older_one(tmp_path):
    """A newer eval.limit=2 smoke pass beside the full runs: its columns, paired documents and sizes are the page's,
    never the full runs' documents mixed in (the full runs' paths sort last: only the times say which is newer)."""
    root, out, smoke = tmp_path / "multiruns", tmp_path / "compare", tmp_path / "smoke"
    for method, outcomes in (("none", [1, 0] * 5), ("sdtp", [0] * 10)):  # full runs: sdtp loses 5 of 10
        full = _lm_eval(root, method, outcomes, run="z_full", config={"eval": {"limit": 10}})
        os.utime(full / "metrics.json", (1e9, 1e9))
    rows, _, _ = _render(root, out)
    assert rows["sdtp"]["lm_eval_delta"] == -50.0 and rows["sdtp"]["lm_eval_delta_n"] == 10
    for method in ("none", "sdtp"):  # the smoke pass: both methods right on both documents
        _lm_eval(root, method, [1, 1], run="a_smoke", config={"eval": {"limit": 2}})
    fresh = collect(root)
    assert {name: len(row["docs"]["lm_eval"]) for name, row in fresh.items()} == {"none": 2, "sdtp": 2}
    assert page_sizes(fresh) == {"lm_eval_documents": 2, "piqa_documents": 2}
    assert "lm_eval_documents: 10 -> 2" in smaller_than_existing(out, page_sizes(fresh))
    assert compare.main(["--root", str(root), "--out", str(out), "--smaller-out", str(smoke)]) == 0
    page = json.loads((smoke / "compare_methods.json").read_text())
    sdtp = {r["method"]: r for r in page["rows"]}["sdtp"]
    assert sdtp["piqa"] == 100.0 and sdtp["lm_eval_delta"] == 0.0 and sdtp["lm_eval_delta_n"] == 2
    assert "identical on all 2" in (smoke / "compare_methods.md").read_text()


def test_a_newer_run_replaces_the_units_of_the_columns_it_covers():
    """lm-eval and LongBench runs replace the tasks / datasets they report; other evals their whole set of units."""
    older = {("sdtp_piqa", 0): 1.0, ("sdtp_piqa", 1): 0.0, ("sdtp_arc_easy", 0): 1.0, ("hellaswag", 5): 1.0,
             ("sdtp_boolq", 0): 1.0}
    newer = {("sdtp_piqa", 0): 0.0, ("sdtp_hellaswag", 7): 0.0}  # the offline hellaswag: the same column
    # boolq is reported without per-document outcomes: the older run's documents go with its column.
    assert newest_outcomes(older, "lm_eval", newer, ["piqa", "hellaswag", "boolq"]) == {
        ("sdtp_piqa", 0): 0.0, ("sdtp_hellaswag", 7): 0.0, ("sdtp_arc_easy", 0): 1.0}
    longbench = {("multi_news", "a"): 0.5, ("multi_news", "b"): 0.25, ("qasper", "a"): 0.75}
    assert newest_outcomes(longbench, "longbench", {("multi_news", "a"): 0.125}, ["multi_news"]) == {
        ("multi_news", "a"): 0.125, ("qasper", "a"): 0.75}
    needle = {("needle", "l1024_d0.0_0"): 1.0, ("needle", "l2048_d0.0_0"): 1.0}
    assert newest_outcomes(needle, "needle", {("needle", "l1024_d0.0_0"): 0.0}, ["needle"]) == {
        ("needle", "l1024_d0.0_0"): 0.0}
    windows = {("window", 2048, 512, i, 512): 3.0 for i in range(4)}
    assert newest_outcomes(windows, "perplexity", {}, ["perplexity"]) == {}  # a run without per-window NLLs


def test_script_is_a_thin_wrapper():
    spec = importlib.util.spec_from_file_location("compare_script", REPO_ROOT / "scripts" / "compare_methods.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main is compare.main


def test_model_filter_keeps_one_model_per_page(tmp_path):
    """--model: a page never pairs one model's dense run with another model's pruned run."""
    root = tmp_path / "multiruns"
    _eval(root, "none", "perplexity", {"perplexity": 25.0}, run="b", model="tiny-qwen2")
    _eval(root, "positional", "perplexity", {"perplexity": 30.0}, run="a", model="tiny-qwen2")
    newest = _eval(root, "none", "perplexity", {"perplexity": 20.0}, run="a", model="tiny-llama")
    os.utime(newest / "metrics.json", (2e9, 2e9))  # the newest run, which would win the dense row unfiltered
    assert compare.main(["--root", str(root), "--model", "tiny-qwen2", "--out", str(tmp_path / "out")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "compare_methods.json").read_text())["rows"]}
    assert set(rows) == {"none", "positional"} and rows["none"]["perplexity"] == 25.0
    with pytest.raises(SystemExit):
        compare.main(["--root", str(root), "--model", "llama2-7b", "--out", str(tmp_path / "none")])
