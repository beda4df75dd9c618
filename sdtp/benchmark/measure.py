"""Timing one generation (prefill, decode, end to end) and the scorer's share of the prefill."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from sdtp.engine.cache import cache_bytes, cache_lengths
from sdtp.engine.generation import generate, prefill
from sdtp.engine.pruner import TokenPruner
from sdtp.scorers.base import Scorer, ScoreContext


class TimedScorer(Scorer):
    """Wraps a scorer and adds up the wall time of its ``score`` calls during one prefill."""

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self.inner.bind(model, layers)

    def unbind(self) -> None:
        # The pruner's exit calls this; without forwarding, an attention scorer's capture hooks would stay on the
        # model and run in every later (dense) prefill and decode step the bench times.
        self.inner.unbind()

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        self.seconds, self.calls = 0.0, 0
        self.inner.begin(input_ids, extras)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        start = time.perf_counter()
        scores = self.inner.score(ctx)
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return scores


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements (``rel_spread`` = (max - min) / median)."""
    med = statistics.median(samples)
    return {
        "median": med,
        "min": min(samples),
        "max": max(samples),
        "rel_spread": (max(samples) - min(samples)) / med if med else 0.0,
        "n": len(samples),
        "samples": samples,
    }


def time_generation(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int, pruner: TokenPruner | None
) -> dict[str, float]:
    """One greedy generation of exactly ``new_tokens`` tokens (no EOS stop); seconds and ms/token.

    Prefill = time to first token's logits (``logits_to_keep=1`` for dense and pruned alike);
    decode = the ``new_tokens - 1`` single-token forwards after it.
    """
    result = generate(model, input_ids, new_tokens, pruner, eos_token_id=None)
    steps = max(len(result.tokens) - 1, 1)
    out = {
        "prefill_s": result.prefill_s,
        "decode_ms_per_token": 1000.0 * result.decode_s / steps,
        "end_to_end_s": result.prefill_s + result.decode_s,
    }
    if pruner is not None and isinstance(pruner.scorer, TimedScorer):
        out["predictor_s"] = pruner.scorer.seconds
    return out


def probe_prefill(model: nn.Module, input_ids: torch.Tensor, pruner: TokenPruner | None) -> dict[str, Any]:
    """One untimed prefill: KV-cache bytes and lengths it leaves, and the tokens each layer saw."""
    if pruner is None:
        _, cache, _ = prefill(model, input_ids)
        tokens = [int(input_ids.shape[1])] * len(cache_lengths(cache))
        kept: list[int] = []
    else:
        with pruner(model):
            _, cache, _ = prefill(model, input_ids)
        tokens, kept = list(pruner.last_prefill.tokens_per_layer), list(pruner.last_prefill.kept_per_stage)
    return {
        "kv_cache_bytes": cache_bytes(cache),
        "cache_lengths": cache_lengths(cache),
        "tokens_per_layer": tokens,
        "kept_per_stage": kept,
    }
