"""`sdtp-bench` on a tiny model: JSON schema, outputs, validation (no timed assertions)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from sdtp.benchmark.measure import TimedScorer, probe_prefill, time_generation
from sdtp.cli.bench import SCHEMA, run
from sdtp.config import REPO_ROOT, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.models import decoder_layers
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.reports import paper_table2
from sdtp.scorers.attention import AttentionScorer

VARIANT_KEYS = {"prefill_s", "decode_ms_per_token", "end_to_end_s", "kv_cache_bytes", "cache_lengths",
                "tokens_per_layer", "kept_per_stage", "memory"}
STAT_KEYS = {"median", "min", "max", "rel_spread", "n", "samples"}
SPEEDUP_KEYS = {"prefill", "decode", "end_to_end", "analytic_prefill", "analytic_decode", "analytic_end_to_end",
                "prefill_vs_analytic", "flops_reduction_prefill", "flops_reduction_end_to_end", "compression_ratio",
                "kv_cache_reduction", "expected_kv_reduction", "predictor_time_share", "predictor_flops_share"}
ENV_KEYS = {"device", "dtype", "attn_implementation", "threads", "cpu_model", "torch", "transformers", "allocator",
            "git_commit"}


def _check_schema(report: dict, lengths: list[int], repeats: int, pruned: bool = True) -> None:
    assert report["schema"] == SCHEMA
    assert ENV_KEYS <= report["environment"].keys()
    assert [e["seq_len"] for e in report["results"]] == lengths
    for entry in report["results"]:
        assert set(entry["variants"]) == ({"dense", "pruned"} if pruned else {"dense"})
        for name, v in entry["variants"].items():
            assert VARIANT_KEYS <= v.keys(), name
            for key in ("prefill_s", "decode_ms_per_token", "end_to_end_s"):
                assert STAT_KEYS <= v[key].keys() and v[key]["n"] == repeats and v[key]["median"] > 0
        dense = entry["variants"]["dense"]
        assert dense["tokens_per_layer"] == [entry["seq_len"]] * len(dense["cache_lengths"])
        if pruned:
            p = entry["variants"]["pruned"]
            assert SPEEDUP_KEYS <= entry["speedup"].keys()
            # The cache holds exactly the tokens each layer processed, so KV bytes shrink by 1 - 1/tau.
            assert p["cache_lengths"] == p["tokens_per_layer"]
            assert entry["speedup"]["kv_cache_reduction"] == pytest.approx(entry["speedup"]["expected_kv_reduction"])
            assert entry["flops"]["tokens_per_layer"] == p["tokens_per_layer"]
            assert entry["flops"]["prefill_ratio"] > 1.0
            assert 0.0 <= p["predictor_time_share"] < 1.0


def test_smoke_two_repeats_in_process(tmp_path, capsys):
    cfg = compose("bench", ["model=tiny-llama", "pruning=sdtp", "pruning.scorer.path=null", "lengths=[64,160]",
                            "new_tokens=3", "repeats=2", "memory=false"])
    summary = run(cfg, run_dir=tmp_path)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    report = json.loads((tmp_path / "bench.json").read_text())
    _check_schema(report, [64, 160], repeats=2)
    assert report["pruning"]["predictor"].startswith("untrained")
    assert report["results"][0]["flops"]["pruned"]["prefill"]["predictor"] > 0
    assert {c["name"] for c in report["targets"]["checks"]} >= {"predictor_flops_share", "kv_cache_reduction"}
    md = (tmp_path / "bench.md").read_text()
    assert "| 160 | sdtp |" in md and "untrained" in md
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # resume: a second run in the same dir reuses both lengths (identical numbers)
    run(cfg, run_dir=tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == report["results"]
    # ... also when the list of lengths changes (each length is its own entry): 160 is reused, 96 measured, and 64,
    # not asked for, is kept (a run of a few lengths does not discard the others)
    more = compose("bench", ["model=tiny-llama", "pruning=sdtp", "pruning.scorer.path=null", "lengths=[96,160]",
                             "new_tokens=3", "repeats=2", "memory=false"])
    run(more, run_dir=tmp_path)
    stored = json.loads((tmp_path / "bench.json").read_text())
    again = stored["results"]
    assert [e["seq_len"] for e in again] == stored["settings"]["lengths"] == [64, 96, 160]
    assert again[0] == report["results"][0] and again[2] == report["results"][1]
    # ... but never the lengths of another machine or dtype: those of a bf16 run are measured again (none kept)
    (tmp_path / "bench.json").write_text(json.dumps({**stored, "environment": {**stored["environment"],
                                                                               "dtype": "bfloat16"}}))
    run(more, run_dir=tmp_path)
    remeasured = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [e["seq_len"] for e in remeasured] == [96, 160] and remeasured[1] != again[2]
    # the Table 2 page renders from this run: our rows, the paper's, and the ratios side by side
    page = paper_table2.write_page(tmp_path, tmp_path / "paper", "bash experiments/paper_table2.sh")
    text = page.read_text()
    assert "| ours | 96 |" in text and "| paper | 128K | 47.2% / 47.2% | 2.15× | 1.75× | 34.3% |" in text
    rows = list(csv.DictReader((tmp_path / "paper" / "tiny-llama.csv").open()))
    ours = [r for r in rows if r["source"].startswith("ours")]
    assert [(int(r["seq_len"]), r["method"]) for r in ours] == [(96, "dense"), (96, "sdtp"), (160, "dense"), (160, "sdtp")]
    assert float(ours[1]["gflops_prefill"]) < float(ours[0]["gflops_prefill"])
    assert (tmp_path / "paper" / "tiny-llama.png").stat().st_size > 1000


def test_timed_scorer_unbinds_the_scorer_it_wraps(tiny_llama, prompt_ids):
    """Leaving the pruner removes an attention scorer's capture hooks through the timing wrapper, so the dense
    generation timed after a pruned one runs none of them."""
    model = tiny_llama[0]
    scorer = AttentionScorer(num_queries=4)
    pruner = TokenPruner(PruningSchedule((1, 2), (0.8, 0.6)), TimedScorer(scorer))
    probe_prefill(model, prompt_ids, pruner)
    assert sum(len(layer.self_attn._forward_pre_hooks) for layer in decoder_layers(model)) == 0
    time_generation(model, prompt_ids, 2, None)
    assert scorer._captured == {}


def test_revive_ablation_flops_charge_the_predictor_for_every_prompt_token(tmp_path):
    """+pruning.revive=true re-ranks all N prompt tokens at every stage: the predictor's analytic FLOPs count them,
    not only the alive ones a nesting pruner scores."""
    cfg = compose("bench", ["model=tiny-llama", "pruning=sdtp", "pruning.scorer.path=null", "+pruning.revive=true",
                            "lengths=[64]", "new_tokens=2", "repeats=1", "warmup=0", "memory=false"])
    run(cfg, run_dir=tmp_path)
    report = json.loads((tmp_path / "bench.json").read_text())
    layers = report["pruning"]["stage_layers"]
    meta = PredictorMeta(hidden_size=cfg.model.arch.hidden_size, layers=layers)
    per_token = TokenPredictor(meta).num_flops_per_token()
    assert report["results"][0]["flops"]["pruned"]["prefill"]["predictor"] == per_token * 64 * len(layers)


def test_paper_table2_experiment_composes():
    cfg = compose("bench", ["experiment=paper_table2"])
    assert list(cfg.lengths) == [1024, 2048, 4096, 8192] and cfg.new_tokens == 128 and cfg.model.name == "smollm2-135m"


def test_dense_only(tmp_path):
    cfg = compose("bench", ["model=tiny-qwen2", "pruning=none", "lengths=[48]", "new_tokens=2", "repeats=1",
                            "warmup=0", "memory=false"])
    run(cfg, run_dir=tmp_path)
    _check_schema(json.loads((tmp_path / "bench.json").read_text()), [48], repeats=1, pruned=False)


def test_sliding_window_model_expects_the_cache_it_measures(tmp_path):
    """Gemma3 (window 16 < 96 tokens): the expected KV reduction counts only what each sliding layer keeps
    (its window), not 1 - tau, and matches the bytes the pruned prefill leaves."""
    cfg = compose("bench", ["model=tiny-gemma3", "pruning=random", "lengths=[96]", "new_tokens=2", "repeats=1",
                            "warmup=0", "memory=false"])
    run(cfg, run_dir=tmp_path)
    entry = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    speedup, flops = entry["speedup"], entry["flops"]
    assert flops["cached_per_layer"]["pruned"] == entry["variants"]["pruned"]["cache_lengths"]
    assert speedup["kv_cache_reduction"] == pytest.approx(speedup["expected_kv_reduction"])


def test_cli_subprocess_memory_and_allocator(tmp_path):
    cmd = [sys.executable, "-m", "sdtp.cli.bench", "model=tiny-mistral", "pruning=random", "lengths=[128]",
           "new_tokens=3", "repeats=2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pruning"] == "random" and summary["prefill_speedup"]["128"] > 0
    report = json.loads((tmp_path / "bench.json").read_text())
    _check_schema(report, [128], repeats=2)
    env = report["environment"]
    assert env["allocator"]["MALLOC_TRIM_THRESHOLD_"] and env["allocator_reexec"]
    for variant in report["results"][0]["variants"].values():
        memory = variant["memory"]
        assert memory["peak_rss_bytes"] >= memory["rss_before_bytes"] > 0


RETAINED_HEAP = """
import torch
from sdtp.benchmark.memory import _status_kib, release_free_heap
torch.ones(64 * 2**20).sum()  # 256 MiB on the heap (mmap threshold raised), freed at once
before = _status_kib("VmRSS")
assert release_free_heap()
print(before - _status_kib("VmRSS"))
"""


def test_release_free_heap_returns_freed_pages():
    """Under the benchmark's allocator setting, freed buffers stay resident until malloc_trim: otherwise a
    memory probe's activations reuse pages the model's loading left behind and its RSS delta is ~0."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", RETAINED_HEAP], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 200 * 1024  # KiB released


@pytest.mark.parametrize("override, key", [("lengths=[100000]", "lengths"), ("repeats=0", "repeats"),
                                           ("attention_flops=half", "attention_flops"),
                                           ("prompt_file=/nonexistent.txt", "prompt_file")])
def test_bad_settings_fail_before_loading(tmp_path, override, key):
    cfg = compose("bench", ["model=tiny-llama", "pruning=random", "lengths=[64]", override])
    with pytest.raises(ConfigError, match=key):
        run(cfg, run_dir=tmp_path)


def test_cli_without_predictor_fails_when_untrained_not_allowed(tmp_path):
    cmd = [sys.executable, "-m", "sdtp.cli.bench", "model=tiny-llama", "pruning=sdtp", "untrained_predictor=never",
           "pruning.scorer.path=/nonexistent/predictor", "tune_malloc=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode != 0 and "pruning.scorer.path" in proc.stderr
