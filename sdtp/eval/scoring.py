"""Score a continuation against a (pruned) context: the one computation every log-likelihood eval uses.

Protocol (lm-eval adapter and pruned perplexity alike):

1. the CONTEXT is prefilled with the pruner installed, so its tokens are dropped layer by layer
   exactly as at inference; the last context position is always kept (``keep_recent`` protects
   the end of the prompt) and its logits predict the first continuation token;
2. the CONTINUATION tokens are fed in one forward on top of the pruned cache, with an all-ones
   attention mask over (context + continuation); forwards with a non-empty cache are never
   pruned, so every continuation token is processed by every layer and attends to whatever
   context tokens survived at that layer.

With no pruner (or a schedule that keeps everything) this equals a single dense forward over
context + continuation up to floating-point reassociation.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.models.compat import cache_kwargs, output_cache


@dataclass
class PrefilledContext:
    """A context after (pruned) prefill, ready to score any number of continuations."""

    last_logits: torch.Tensor  # (1, V) logits of the last context position
    cache: Any  # the per-layer KV cache (ragged across layers when pruned)
    length: int  # context tokens N (the cache length the model sees, layer 0 is never pruned)
    record: PrefillRecord | None


@torch.inference_mode()
def prefill_context(model: nn.Module, ctx_ids: torch.Tensor, pruner: TokenPruner | None) -> PrefilledContext:
    """Prefill ``ctx_ids`` (1, N) with pruning; checks the last position survived.

    Raises:
        ValueError: if the pruner dropped the last context position (``pruning.keep_recent`` = 0),
            which would make the first continuation token's logits come from another position.
    """
    context = pruner(model) if pruner is not None else nullcontext()
    with context:
        out = model(input_ids=ctx_ids, use_cache=True, logits_to_keep=1)
    record = pruner.last_prefill if pruner is not None else None
    if record is not None and int(record.final_positions[0, -1]) != ctx_ids.shape[1] - 1:
        raise ValueError("pruning.keep_recent: the last context token was pruned; keep_recent must be > 0")
    return PrefilledContext(out.logits[:, -1], output_cache(out), int(ctx_ids.shape[1]), record)


@torch.inference_mode()
def score_continuation(
    model: nn.Module, ctx: PrefilledContext, cont_ids: torch.Tensor, pruner: TokenPruner | None, reuse: bool = False
) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``cont_ids`` (1, T) given the prefilled context.

    Args:
        reuse: deep-copy the cache first so ``ctx`` can score further continuations.
    Returns:
        per-token log-probs (T,) in the logits' dtype (as lm-eval's HFLM computes them) and whether
        every continuation token is the argmax (lm-eval's ``is_greedy``).
    """
    logits = ctx.last_logits.unsqueeze(1)  # (1, 1, V) predicts cont[0]
    if cont_ids.shape[1] > 1:
        cache = copy.deepcopy(ctx.cache) if reuse else ctx.cache
        feed = cont_ids[:, :-1]  # the last continuation token predicts nothing we score
        mask = torch.ones(1, ctx.length + feed.shape[1], dtype=torch.long, device=cont_ids.device)
        # Hooks must be installed so per-layer masks are sliced to each layer's (pruned) cache.
        context = pruner(model) if pruner is not None else nullcontext()
        with context:
            if pruner is not None:
                pruner.last_prefill = ctx.record
            out = model(input_ids=feed, **cache_kwargs(cache), attention_mask=mask, use_cache=True)
        logits = torch.cat([logits, out.logits], dim=1)  # (1, T, V)
    logprobs = F.log_softmax(logits, dim=-1)
    greedy = bool((logprobs.argmax(-1) == cont_ids).all())
    return logprobs.gather(2, cont_ids.unsqueeze(-1))[0, :, 0], greedy
