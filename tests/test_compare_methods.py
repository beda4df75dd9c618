"""The comparison table script renders fabricated sweep outputs (no model is run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sdtp.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("compare_methods", REPO_ROOT / "scripts" / "compare_methods.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(root: Path, method: str, eval_name: str, results: dict, kv: str | None = None) -> None:
    config = {"pruning": {"name": method}, "eval": {"limit": 20 if method != "random" else 10},
              **({"kv": {"method": kv, "ratio": 0.4}} if kv else {})}
    record = {"method": kv, "ratio": 0.4, "kept_fraction": 0.4} if kv else {"method": "none", "kept_fraction": 1.0}
    _write(root / "eval" / eval_name / method / (kv or "x") / "metrics.json",
           {"eval": eval_name, "pruning": {"name": method}, "kv": record, "results": results, "config": config})


def _samples(root: Path, method: str, outcomes: list[int]) -> None:
    """lm-eval's per-document log (samples_<task>.jsonl) beside the method's lm_eval metrics.json."""
    lines = [json.dumps({"doc_id": i, "acc": float(a), "acc_norm": 0.0}) for i, a in enumerate(outcomes)]
    (root / "eval" / "lm_eval" / method / "x" / "samples_sdtp_piqa.jsonl").write_text("\n".join(lines) + "\n")


def test_table_and_plot_from_fabricated_runs(tmp_path):
    root = tmp_path / "multiruns"
    for method, acc, ppl, frac in (("none", 0.6, 20.0, None), ("sdtp", 0.58, 22.0, 0.63), ("random", 0.5, 30.0, 0.63)):
        tasks = {"sdtp_piqa": {"acc,none": acc, "acc_norm,none": acc + 0.01}, "sdtp_arc_easy": {"acc": acc - 0.1}}
        extra = {"avg_layer_token_fraction": frac} if frac else {}
        _eval(root, method, "lm_eval", {"tasks": tasks, "n_samples": {"sdtp_piqa": 50, "sdtp_arc_easy": 40}, **extra})
        _eval(root, method, "perplexity", {"perplexity": ppl, **extra})
        _eval(root, method, "longbench", {"datasets": {"multi_news": acc / 3}, "avg": acc / 3})
    # Paired outcomes on 4 shared documents: sdtp loses doc 1 and gains doc 3 vs dense (delta 0); random loses 2.
    _samples(root, "none", [1, 1, 0, 0])
    _samples(root, "sdtp", [1, 0, 0, 1])
    _samples(root, "random", [0, 0, 0, 0])
    for method, scores in (("none", [0.3, 0.2]), ("sdtp", [0.2, 0.1])):
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
    assert compare.main(["--root", str(root), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "compare_methods.json").read_text())["rows"]}
    assert list(rows)[0] == "none"
    assert set(rows) == {"none", "sdtp", "random", "sdtp+h2o@0.4", "sdtp[pruning.first_layer=8]"}
    assert rows["sdtp[pruning.first_layer=8]"]["perplexity"] == 25.0 and rows["sdtp"]["perplexity"] == 22.0
    # lm-eval fractions become percentages, like the LongBench scores they are averaged with.
    assert abs(rows["sdtp"]["piqa"] - 58.0) < 1e-9 and abs(rows["sdtp"]["arc_easy"] - 48.0) < 1e-9
    assert abs(rows["sdtp"]["mean_acc"] - (58.0 + 48.0 + 0.58 / 3) / 3) < 1e-9
    assert rows["sdtp"]["perplexity"] == 22.0 and rows["sdtp"]["prefill_speedup"] == 1.5
    assert rows["random"]["prefill_speedup"] == 1.6
    assert abs(rows["sdtp"]["analytic_speedup"] - 1 / 0.63) < 1e-9 and rows["none"]["prefill_speedup"] == 1.0
    assert abs(rows["sdtp+h2o@0.4"]["kv_cache"] - 0.63 * 0.4) < 1e-9 and rows["sdtp"]["kv_cache"] == 0.63
    assert rows["sdtp+h2o@0.4"]["mean_acc"] is None  # only one of three accuracy columns present
    assert (out / "compare_methods.png").stat().st_size > 0
    md = (out / "compare_methods.md").read_text()
    assert "* perplexity: limit=10 | limit=20 (methods differ!)" in md  # random was run with another limit
    assert "* bench" not in md  # the fabricated bench files carry no settings
    assert md.splitlines()[0].startswith("| method | arc_easy | multi_news | piqa | perplexity | mean_acc")
    # Binomial 95% half-widths from the document counts: dense piqa 60% of 50, arc_easy 50% of 40.
    ci = json.loads((out / "compare_methods.json").read_text())["ci95"]
    assert abs(ci["none"]["piqa"] - 196 * (0.6 * 0.4 / 50) ** 0.5) < 0.01
    assert abs(ci["sdtp"]["arc_easy"] - 196 * (0.48 * 0.52 / 40) ** 0.5) < 0.01
    assert "multi_news" not in ci["none"]  # ROUGE is not a per-document 0/1 outcome
    assert "arc_easy ±15.5 (n=40), piqa ±13.6 (n=50)" in md
    # Paired deltas over the same documents: mean difference, t-free normal half-width of its mean.
    assert rows["sdtp"]["lm_eval_delta"] == 0.0 and rows["none"]["lm_eval_delta"] == 0.0
    assert rows["random"]["lm_eval_delta"] == -50.0
    sd = (4 * 0.25 / 3) ** 0.5  # diffs -1,-1,0,0: mean -0.5, sample variance 1/3
    assert abs(rows["random"]["lm_eval_delta_ci95"] - 100 * 1.959964 * sd / 2) < 1e-6
    assert "* lm_eval: sdtp - random: +50.00 ± " in md and "over 4 documents" in md
    # Generation evals pair their predictions.jsonl scores the same way (fractions -> points).
    assert abs(rows["sdtp"]["longbench_delta"] - (-10.0)) < 1e-9 and rows["random"]["longbench_delta"] is None
    assert md.splitlines()[0].split(" | ")[6:10] == ["lm_eval_delta", "lm_eval_delta_ci95", "longbench_delta",
                                                      "longbench_delta_ci95"]


def test_paired_delta_needs_common_documents():
    from sdtp.eval.stats import binomial_ci95, paired_delta

    assert paired_delta({("piqa", 0): 1.0}, {("piqa", 0): 0.0}) is None  # one document: no variance
    assert paired_delta({("piqa", 0): 1.0, ("piqa", 1): 1.0}, {("arc", 0): 0.0, ("arc", 1): 0.0}) is None
    assert paired_delta({("a", 0): 1.0, ("a", 1): 0.0}, {("a", 0): 1.0, ("a", 1): 0.0}) == (0.0, 0.0, 2)
    assert binomial_ci95(0.0, 50) == 0.0 and abs(binomial_ci95(50.0, 100) - 9.8) < 0.01


def test_outcomes_skip_a_torn_last_line(tmp_path):
    """A killed generation run leaves a half-written last line; the table still reads the finished samples."""
    from sdtp.eval.stats import prediction_outcomes

    (tmp_path / "predictions.jsonl").write_text('{"id": "a", "dataset": "multi_news", "score": 0.5}\n{"id": "b", "sco')
    assert prediction_outcomes(tmp_path) == {("multi_news", "a"): 0.5}


def _lm_eval_root(root: Path, n: int) -> Path:
    """Dense and sdtp lm-eval runs over ``n`` documents (per-document outcomes included)."""
    for method in ("none", "sdtp"):
        _eval(root, method, "lm_eval", {"tasks": {"sdtp_piqa": {"acc": 0.5}}, "n_samples": {"sdtp_piqa": n}})
        _samples(root, method, [i % 2 for i in range(n)])
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
