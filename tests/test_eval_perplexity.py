"""Sliding-window perplexity: window tiling, dense/pruned protocol invariants, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdtp.config import compose
from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.eval import perplexity
from sdtp.eval.kept import KeptStats
from sdtp.eval.perplexity import STATE_FILE, window_nll, window_spans, wikitext_rows
from sdtp.models import load_model
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

KEEP_ALL = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
PRUNE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35))


@pytest.mark.parametrize("n,window,stride", [(1000, 256, 128), (1000, 256, 255), (257, 256, 100), (50, 40, 30),
                                             (1001, 300, 7), (129, 128, 1)])
def test_windows_score_every_token_after_a_full_context_exactly_once(n, window, stride):
    spans = window_spans(n, window, stride)
    context = window - stride
    scored = [p for _, first, end in spans for p in range(first, end)]
    assert scored == list(range(context, n))  # the first `context` tokens are never scored
    for begin, first, end in spans:
        assert first - begin == context  # every window's scored tokens follow a full context
        assert end - begin <= window and 0 < end - first <= stride


@pytest.mark.parametrize("n", [1, 100, 128])
def test_no_window_without_a_full_context(n):
    assert window_spans(n, 256, 128) == []  # n <= window - stride: nothing can be scored


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


@pytest.mark.parametrize("pruner", [None, TokenPruner(PRUNE, RandomScorer())], ids=["dense", "pruned"])
def test_lm_head_runs_only_on_scored_positions(tiny_llama, prompt_ids, pruner):
    """No full-vocabulary logits for a position whose next token is not scored (the context's)."""
    model, _, _ = tiny_llama
    n_ctx, positions = 60, []
    record = lambda _module, args, _out: positions.append(args[0].shape[1])  # (1, positions, hidden) into the head
    handle = model.get_output_embeddings().register_forward_hook(record)
    try:
        window_nll(model, prompt_ids, n_ctx, pruner)
    finally:
        handle.remove()
    assert sum(positions) == prompt_ids.shape[1] - n_ctx


def _cfg(tmp_path, *overrides):
    text = tmp_path / "wiki.test.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 12)
    return compose("eval", ["eval=perplexity", "model=tiny-llama", f"eval.data_file={text}", "eval.window=128",
                            "eval.stride=48", "eval.max_tokens=null", *overrides])


def test_run_scores_only_full_context_tokens_and_reports_per_window_numbers(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    dense = perplexity.run(_cfg(tmp_path), model, tokenizer, None, tmp_path / "dense")
    context = 128 - 48
    assert dense["protocol"] == perplexity.PROTOCOL_VERSION
    assert dense["min_context_tokens"] == context and dense["num_tokens"] > 3 * context
    assert dense["scored_tokens"] == dense["num_tokens"] - context
    assert len(dense["window_nll"]) == len(dense["window_tokens"]) == dense["windows"] > 2
    assert sum(dense["window_tokens"]) == dense["scored_tokens"]
    assert math.fsum(dense["window_nll"]) / dense["scored_tokens"] == pytest.approx(dense["nll_per_token"])
    assert dense["perplexity"] == pytest.approx(math.exp(dense["nll_per_token"]))
    assert dense["avg_kept_fraction"] == 1.0
    # Every pruned prefill is a full context (the record sees the prompt the pruner got).
    pruned = perplexity.run(_cfg(tmp_path, "pruning=random"), model, tokenizer, TokenPruner(PRUNE, RandomScorer()),
                            tmp_path / "pruned")
    assert pruned["avg_pruned_prompt_tokens"] == context and pruned["pruned_prefills"] == pruned["windows"]
    assert pruned["min_context_tokens"] == context and pruned["scored_tokens"] == dense["scored_tokens"]


def test_run_keep_ratio_one_equals_dense_and_pruning_differs(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    dense = perplexity.run(_cfg(tmp_path), model, tokenizer, None, tmp_path / "dense")
    cfg = _cfg(tmp_path, "pruning=random", "pruning.keep_ratio=1.0")
    kept = perplexity.run(cfg, model, tokenizer, TokenPruner(KEEP_ALL, RandomScorer()), tmp_path / "kept")
    assert kept["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert kept["window_nll"] == pytest.approx(dense["window_nll"], rel=1e-6)
    assert kept["avg_kept_fraction"] == 1.0 and kept["pruned_prefills"] == dense["windows"]
    cfg = _cfg(tmp_path, "pruning=random", "eval.checkpoint_every=1")
    pruner = TokenPruner(PRUNE, RandomScorer())
    pruned = perplexity.run(cfg, model, tokenizer, pruner, tmp_path / "pruned")
    assert pruned["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-4)
    assert 0.35 <= pruned["avg_kept_fraction"] < 1.0


def test_bf16_keep_all_equals_dense(tmp_path):
    """Dense and pruned take log-probs in the same dtype. Measured on this text: a bf16 log-softmax on the
    pruned side only shifts the mean NLL by ~1.2e-4 relative; with both in float32 the two forwards
    differ by ~3e-6 (bf16 reassociation), so 2e-5 separates them."""
    cfg = _cfg(tmp_path, "model.dtype=bfloat16")
    model, tokenizer = load_model(cfg.model)
    assert next(model.parameters()).dtype == torch.bfloat16
    dense = perplexity.run(cfg, model, tokenizer, None, tmp_path / "dense")
    kept = perplexity.run(cfg, model, tokenizer, TokenPruner(KEEP_ALL, RandomScorer()), tmp_path / "kept")
    assert kept["nll_per_token"] == pytest.approx(dense["nll_per_token"], rel=2e-5)


def _assert_same_metrics(got: dict, expected: dict) -> None:
    """Equal keys; numbers and per-window lists equal to 1e-9 relative."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


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
    _assert_same_metrics(resumed, full)
    # force=true recomputes every window instead of trusting the finished checkpoint.
    calls.clear()
    forced = perplexity.run(_cfg(tmp_path, "pruning=random", "eval.checkpoint_every=1", "force=true"), model,
                            tokenizer, pruner, tmp_path / "resumed")
    assert len(calls) == full["windows"]
    _assert_same_metrics(forced, full)


def test_old_protocol_state_file_is_not_reused(tiny_llama, tmp_path, monkeypatch):
    """A protocol-1 checkpoint (same run settings, HF-guide windows, scalar sums) is recomputed, not resumed."""
    model, tokenizer, _ = tiny_llama
    cfg = _cfg(tmp_path, "eval.checkpoint_every=1")
    fresh = perplexity.run(cfg, model, tokenizer, None, tmp_path / "fresh")
    num_tokens = perplexity.token_ids(cfg, tokenizer).shape[1]
    old_windows = len(range(0, num_tokens, 48))  # what protocol 1 opened, all finished
    old = {"signature": {"tokens": num_tokens, "window": 128, "stride": 48,
                         "pruning": OmegaConf.to_container(cfg.pruning, resolve=True), "model": cfg.model.name},
           "next_window": old_windows, "nll": 1.0, "tokens": num_tokens - 1, "kept": []}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / STATE_FILE).write_text(json.dumps(old))
    calls, real = [], perplexity.window_nll
    monkeypatch.setattr(perplexity, "window_nll", lambda *args: calls.append(1) or real(*args))
    rerun = perplexity.run(cfg, model, tokenizer, None, tmp_path / "old")
    assert len(calls) == fresh["windows"]
    assert rerun["nll_per_token"] == pytest.approx(fresh["nll_per_token"], rel=1e-9)
    state = json.loads((tmp_path / "old" / STATE_FILE).read_text())
    assert state["signature"]["protocol"] == perplexity.PROTOCOL_VERSION and "nll" not in state


@pytest.mark.parametrize("override,key", [("eval.max_tokens=80", "eval.max_tokens"),
                                          ("eval.protocol=1", "eval.protocol")])
def test_validate_refuses_unscorable_lengths_and_other_protocols(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        perplexity.validate(_cfg(tmp_path, override))
    perplexity.validate(_cfg(tmp_path, "eval.max_tokens=81"))  # one token after a full 80-token context


def test_text_shorter_than_a_context_is_refused(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    with pytest.raises(ConfigError, match="full context"):
        perplexity.run(_cfg(tmp_path, "eval.window=1024", "eval.stride=8"), model, tokenizer, None, tmp_path / "run")


def test_kept_fraction_is_token_weighted():
    stats = KeptStats()
    assert stats.summary()["avg_kept_fraction"] == 1.0  # dense
    stats.add(PrefillRecord(seq_len=1, kept_per_stage=[1], tokens_per_layer=[1, 1]))
    stats.add(PrefillRecord(seq_len=99, kept_per_stage=[66, 33], tokens_per_layer=[99, 33]))
    summary = stats.summary()
    assert summary["avg_kept_fraction"] == pytest.approx(34 / 100)
    assert summary["avg_layer_token_fraction"] == pytest.approx((2 + 132) / 200)
    assert summary["pruned_prefills"] == 2
