"""`sdtp-generate` end to end on a tiny model (in-process Hydra run and a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from sdtp.cli.generate import run
from sdtp.config import REPO_ROOT, compose
from sdtp.models import load_model

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def test_dense_matches_plain_transformers_greedy(capsys):
    cfg = compose("generate", ["model=tiny-qwen2", "pruning=none", f"prompt={PROMPT!r}", "max_new_tokens=10"])
    summary = run(cfg)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    model, tokenizer = load_model(cfg.model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert summary["text"] == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_random_pruning_json_follows_schedule(capsys):
    cfg = compose("generate", ["model=tiny-llama", "pruning=random", f"prompt={PROMPT!r}", "max_new_tokens=4"])
    summary = run(cfg)
    n = summary["prompt_tokens"]
    assert summary["kept_per_stage"] == [round(n * 0.9**s) for s in (1, 2, 3)]
    assert {"text", "prefill_s", "decode_s"} <= summary.keys()


def test_integral_float_top_k_samples_like_the_int():
    """top_k=5.0 passes the settings check, so it must sample exactly as top_k=5 does (not crash in topk)."""
    texts = []
    for top_k in ("5", "5.0"):
        cfg = compose("generate", ["model=tiny-llama", "do_sample=true", f"top_k={top_k}", f"prompt={PROMPT!r}",
                                   "max_new_tokens=4"])
        texts.append(run(cfg)["text"])
    assert texts[0] == texts[1]


def test_cli_subprocess_last_line_is_json(tmp_path):
    cmd = [sys.executable, "-m", "sdtp.cli.generate", "model=tiny-mistral", "pruning=random", "max_new_tokens=3",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["new_tokens"] == 3 and len(summary["kept_per_stage"]) == 3


def test_cli_rejects_bad_layer_before_loading(tmp_path):
    cmd = [sys.executable, "-m", "sdtp.cli.generate", "model=tiny-llama", "pruning=random", "pruning.layers=[1,7]",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode != 0 and "pruning.layers" in proc.stderr
