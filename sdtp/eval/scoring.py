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

Log-probabilities are taken by :func:`token_logprobs` only, on logits of scored positions only (the
prefill keeps the last position's logits, the continuation forward feeds exactly the tokens whose
next token is scored). Its ``dtype`` is the dtype ``log_softmax`` runs in: a caller that compares
against another code path (the perplexity eval's dense forward, HFLM's ``softmax_dtype``) passes
the same value to both, so a bf16 model is not scored in bf16 on one side and float32 on the other.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdtp.engine.generation import padding_kwargs
from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.models.compat import cache_kwargs, output_cache


@dataclass
class PrefilledContext:
    """A context after (pruned) prefill, ready to score any number of continuations."""

    last_logits: torch.Tensor  # (B, V) logits of each row's last context position
    cache: Any  # the per-layer KV cache (ragged across layers when pruned)
    length: int  # context tokens N (the cache length the model sees, layer 0 is never pruned)
    record: PrefillRecord | None


@torch.inference_mode()
def prefill_context(model: nn.Module, ctx_ids: torch.Tensor, pruner: TokenPruner | None,
                    attention_mask: torch.Tensor | None = None) -> PrefilledContext:
    """Prefill ``ctx_ids`` (B, N) with pruning; checks every row's last position survived.

    Args:
        attention_mask: (B, N) real-token mask of a left-padded batch (None = unpadded).
    Raises:
        ValueError: if the pruner dropped a row's last context position (``pruning.keep_recent`` = 0),
            which would make the first continuation token's logits come from another position.
    """
    context = pruner(model) if pruner is not None else nullcontext()
    with context:
        out = model(input_ids=ctx_ids, use_cache=True, logits_to_keep=1,
                    **padding_kwargs(attention_mask, ctx_ids.shape[1]))
    record = pruner.last_prefill if pruner is not None else None
    lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full(
        (ctx_ids.shape[0],), ctx_ids.shape[1], device=ctx_ids.device)
    if record is not None and not bool((record.final_positions[:, -1] == lengths - 1).all()):
        raise ValueError("pruning.keep_recent: the last context token was pruned; keep_recent must be > 0")
    return PrefilledContext(out.logits[:, -1], output_cache(out), int(ctx_ids.shape[1]), record)


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype | None
) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``targets`` (1, T) under ``logits`` (1, T, V), position by position.

    Args:
        dtype: the dtype ``log_softmax`` runs in (and returns); None keeps the logits' dtype. The
            upcast happens inside ``log_softmax`` so the normaliser is accumulated in ``dtype``.
    Returns:
        log-probs (T,) and whether every target is the argmax of its log-probs (lm-eval's
        ``is_greedy``, taken after the log-softmax as HFLM does, so ties rounded in bf16 agree).
    """
    logprobs = F.log_softmax(logits, dim=-1, dtype=dtype)  # (1, T, V)
    greedy = bool((logprobs.argmax(-1) == targets).all())
    return logprobs.gather(2, targets.unsqueeze(-1))[0, :, 0], greedy


@torch.inference_mode()
def score_continuation(
    model: nn.Module,
    ctx: PrefilledContext,
    cont_ids: torch.Tensor,
    pruner: TokenPruner | None,
    reuse: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``cont_ids`` (1, T) given the prefilled context.

    Args:
        reuse: deep-copy the cache first so ``ctx`` can score further continuations.
        dtype: the log-softmax dtype (:func:`token_logprobs`); None = the logits' dtype, which is
            lm-eval HFLM's default (``softmax_dtype=None``).
    Returns:
        per-token log-probs (T,) in ``dtype`` and whether every continuation token is the argmax
        (lm-eval's ``is_greedy``).
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
    return token_logprobs(logits, cont_ids, dtype)
