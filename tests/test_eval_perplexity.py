"""Sliding-window perplexity: window tiling, dense/pruned protocol invariants, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sdtp.config import compose
from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.eval import perplexity
from sdtp.eval.kept import KeptStats
from sdtp.eval.perplexity import STATE_FILE, window_nll, window_spans, wikitext_rows
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

KEEP_ALL = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
PRUNE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35))


@pytest.mark.parametrize("n,window,stride", [(1000, 256, 128), (1000, 256, 255), (257, 256, 100), (50, 256, 64),
                                             (1001, 300, 7)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [p for _, first, end in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, first, end in spans:
        assert end - begin <= window and first > begin  # every scored token has context inside its window
        assert begin == 0 or end - first <= stride


def test_stride_must_leave_context_in_every_window():
    with pytest.raises(ValueError, match="stride"):
        window_spans(1000, 256, 256)


def test_wikitext_rows_follow_hf_convention(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_text(" \n = Title = \n \n Body text . \n")
    assert wikitext_rows(path) == ["", " = Title = \n", "", " Body text . \n"]


@torch.no_grad()
def test_window_nll_dense_equals_full_forward_and_keep_all_equals_dense(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    n_ctx = 60
    logits = model(prompt_ids).logits
    ref = -F.log_softmax(logits[0, n_ctx - 1 : -1], -1).gather(1, prompt_ids[0, n_ctx:, None]).sum()
    dense, record = window_nll(model, prompt_ids, n_ctx, None)
    assert record is None and dense == pytest.approx(float(ref), rel=1e-6)
    kept, record = window_nll(model, prompt_ids, n_ctx, TokenPruner(KEEP_ALL, RandomScorer()))
    assert kept == pytest.approx(dense, rel=1e-5)
    assert record.seq_len == n_ctx  # only the context went through the pruned prefill
    pruned, record = window_nll(model, prompt_ids, n_ctx, TokenPruner(PRUNE, RandomScorer()))
    assert record.seq_len == n_ctx and record.kept_per_stage[-1] == round(n_ctx * 0.35)
    assert pruned != pytest.approx(dense, rel=1e-4)


def _cfg(tmp_path, *overrides):
    text = tmp_path / "wiki.test.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 12)
    return compose("eval", ["eval=perplexity", "model=tiny-llama", f"eval.data_file={text}", "eval.window=128",
                            "eval.stride=48", "eval.max_tokens=null", *overrides])


def test_run_keep_ratio_one_equals_dense_and_pruning_differs(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    dense = perplexity.run(_cfg(tmp_path), model, tokenizer, None, tmp_path / "dense")
    assert dense["scored_tokens"] == dense["num_tokens"] - 1 and dense["avg_kept_fraction"] == 1.0
    assert dense["perplexity"] == pytest.approx(math.exp(dense["nll_per_token"]))
    cfg = _cfg(tmp_path, "pruning=random", "pruning.keep_ratio=1.0")
    kept = perplexity.run(cfg, model, tokenizer, TokenPruner(KEEP_ALL, RandomScorer()), tmp_path / "kept")
    assert kept["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    cfg = _cfg(tmp_path, "pruning=random", "eval.checkpoint_every=1")
    pruner = TokenPruner(PRUNE, RandomScorer())
    pruned = perplexity.run(cfg, model, tokenizer, pruner, tmp_path / "pruned")
    assert pruned["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-4)
    assert 0.35 <= pruned["avg_kept_fraction"] < 1.0


def test_interrupted_run_resumes_from_checkpoint(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny_llama
    cfg = _cfg(tmp_path, "pruning=random", "eval.checkpoint_every=1")
    # A deterministic scorer: a random one draws a fresh mask per prompt, so a resumed run would differ.
    pruner = TokenPruner(PRUNE, HiddenNormScorer())
    full = perplexity.run(cfg, model, tokenizer, pruner, tmp_path / "full")
    calls, real, resuming = [], perplexity.window_nll, False

    class Interrupted(Exception):
        pass

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3 and not resuming:
            raise Interrupted
        return real(*args)

    monkeypatch.setattr(perplexity, "window_nll", flaky)
    with pytest.raises(Interrupted):
        perplexity.run(cfg, model, tokenizer, pruner, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / STATE_FILE).read_text())["next_window"] == 2
    calls.clear()
    resuming = True
    resumed = perplexity.run(cfg, model, tokenizer, pruner, tmp_path / "resumed")
    assert len(calls) == full["windows"] - 2
    assert resumed == pytest.approx(full, rel=1e-9)
    # force=true recomputes every window instead of trusting the finished checkpoint.
    calls.clear()
    forced = perplexity.run(_cfg(tmp_path, "pruning=random", "eval.checkpoint_every=1", "force=true"), model,
                            tokenizer, pruner, tmp_path / "resumed")
    assert len(calls) == full["windows"] and forced == pytest.approx(full, rel=1e-9)


def test_kept_fraction_is_token_weighted():
    stats = KeptStats()
    assert stats.summary()["avg_kept_fraction"] == 1.0  # dense
    stats.add(PrefillRecord(seq_len=1, kept_per_stage=[1], tokens_per_layer=[1, 1]))
    stats.add(PrefillRecord(seq_len=99, kept_per_stage=[66, 33], tokens_per_layer=[99, 33]))
    summary = stats.summary()
    assert summary["avg_kept_fraction"] == pytest.approx(34 / 100)
    assert summary["avg_layer_token_fraction"] == pytest.approx((2 + 132) / 200)
    assert summary["pruned_prefills"] == 2
