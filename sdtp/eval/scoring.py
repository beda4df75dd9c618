"""Score a continuation against a (pruned) context: the one computation every log-likelihood eval uses.

Protocol (lm-eval adapter and pruned perplexity alike):

1. the CONTEXT is prefilled with the pruner installed, so its tokens are dropped layer by layer
   exactly as at inference; the last context position is always kept (the schedule protects
   it, ``PruningSchedule.num_recent``) and its logits predict the first continuation token;
2. the CONTINUATION tokens are fed in one forward on top of the pruned cache, with an all-ones
   attention mask over (context + continuation); forwards with a non-empty cache are never
   pruned, so every continuation token is processed by every layer and attends to whatever
   context tokens survived at that layer.

With no pruner (or a schedule that keeps everything) this equals a single dense forward over
context + continuation up to floating-point reassociation.

Batches (:func:`prefill_contexts`, :func:`score_continuations`): contexts of different lengths are
left-padded and prefilled together, each row pruned by its own budget; then any number of
continuations, several per context if wanted (the answer choices of a question), are right-padded
and fed in one forward on a copy of the cache whose rows are the contexts they follow (the
prefill record's rows are selected alike, so every row's masks match its own pruned cache). Every
row continues at its own context length. The numbers equal the one-at-a-time path up to float
noise (``tests/test_eval_lm_harness.py``, ``tests/test_eval_continuation.py``).

Log-probabilities are taken by :func:`token_logprobs` only, on logits of scored positions only (the
prefill keeps the last position's logits, the continuation forward feeds exactly the tokens whose
next token is scored). Its ``dtype`` is the dtype ``log_softmax`` runs in: a caller that compares
against another code path (the perplexity eval's dense forward, HFLM's ``softmax_dtype``) passes
the same value to both, so a bf16 model is not scored in bf16 on one side and float32 on the other.
Likewise ``autocast``: the dtype the model forwards (not the log-softmax) run in under ``torch.autocast``, as
HFLM's ``mixed_precision_dtype`` runs its own (None: off).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdtp.engine.cache import select_rows
from sdtp.engine.generation import padding_kwargs
from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.models.compat import cache_kwargs, output_cache


@dataclass
class PrefilledContext:
    """One or more contexts after (pruned) prefill, ready to score any number of continuations."""

    last_logits: torch.Tensor  # (B, V) logits of each row's last context position
    cache: Any  # the per-layer KV cache (ragged across layers when pruned)
    length: int  # context width N (the cache length the model sees, layer 0 is never pruned)
    record: PrefillRecord | None
    attention_mask: torch.Tensor | None = None  # (B, N) real tokens of a left-padded batch; None = unpadded

    def lengths(self) -> torch.Tensor:
        """(B,) real context length of each row."""
        if self.attention_mask is not None:
            return self.attention_mask.sum(-1)
        return torch.full((self.last_logits.shape[0],), self.length, device=self.last_logits.device)


def _forward_autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device`` for a model forward; disabled when ``dtype`` is None."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def prefill_context(model: nn.Module, ctx_ids: torch.Tensor, pruner: TokenPruner | None,
                    attention_mask: torch.Tensor | None = None, autocast: torch.dtype | None = None
                    ) -> PrefilledContext:
    """Prefill ``ctx_ids`` (B, N) with pruning; checks every row's last position survived.

    Args:
        attention_mask: (B, N) real-token mask of a left-padded batch (None = unpadded).
        autocast: the forward's ``torch.autocast`` dtype (module docstring; None = off).
    Raises:
        ValueError: if the pruner dropped a row's last context position (a custom pruner; the schedule
            protects it), which would make the first continuation token's logits come from another position.
    """
    context = pruner(model) if pruner is not None else nullcontext()
    with context, _forward_autocast(ctx_ids.device, autocast):
        out = model(input_ids=ctx_ids, use_cache=True, logits_to_keep=1,
                    **padding_kwargs(attention_mask, ctx_ids.shape[1]))
    record = pruner.last_prefill if pruner is not None else None
    prefilled = PrefilledContext(out.logits[:, -1], output_cache(out), int(ctx_ids.shape[1]), record, attention_mask)
    if record is not None and not bool((record.final_positions[:, -1] == prefilled.lengths() - 1).all()):
        raise ValueError("the pruner dropped the last context token, whose hidden state yields the next-token "
                         "logits; a pruner must keep it (PruningSchedule.num_recent protects it)")
    return prefilled


def _pad(rows: Sequence[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) ids of the (1, n_b) rows padded with 0 to N = max n_b (on the left or the right), and the
    (B, N) real-token mask."""
    width = max(row.shape[1] for row in rows)
    ids = rows[0].new_zeros(len(rows), width)
    mask = rows[0].new_zeros(len(rows), width)
    for index, row in enumerate(rows):
        span = slice(width - row.shape[1], None) if left else slice(0, row.shape[1])
        ids[index, span] = row[0]
        mask[index, span] = 1
    return ids, mask


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N) ids with each (1, n_b) row right-aligned (N = max n_b), and the (B, N) real-token mask.

    The mask is None when every row is N long (an unpadded batch takes the unpadded code path).
    """
    ids, mask = _pad(rows, left=True)
    return ids, None if bool(mask.all()) else mask


def prefill_contexts(model: nn.Module, contexts: Sequence[torch.Tensor],
                     pruner: TokenPruner | None, autocast: torch.dtype | None = None) -> PrefilledContext:
    """:func:`prefill_context` of contexts (1, n_b) of any lengths as one left-padded batch.

    Each row is pruned by its own budget (see :mod:`sdtp.engine.pruner`); numbers equal the
    contexts prefilled one at a time up to float noise.
    """
    ids, mask = left_pad(contexts)
    return prefill_context(model, ids, pruner, mask, autocast)


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


def _feed_continuations(model: nn.Module, ctx: PrefilledContext, feeds: Sequence[torch.Tensor], rows: torch.Tensor,
                        pruner: TokenPruner | None, consume: bool, autocast: torch.dtype | None) -> torch.Tensor:
    """Logits (R, W, V) of feeds (1, w_r) (right-padded to W) run after context rows ``rows`` (R,).

    ``consume``: ``rows`` is every context row in order, so the forward appends to ``ctx.cache``
    itself; otherwise those rows of the cache (and of the prefill record) are selected into new
    ones, leaving ``ctx`` intact for further continuations. Right padding is harmless: a padded
    token comes after every real one of its row, so causal attention keeps it out of them.
    """
    ids, _ = _pad(feeds, left=False)
    width = ids.shape[1]
    cache = ctx.cache if consume else select_rows(ctx.cache, rows)
    record = ctx.record if consume or ctx.record is None else ctx.record.select(rows)
    context_mask = ctx.attention_mask.index_select(0, rows) if ctx.attention_mask is not None else \
        ids.new_ones(len(feeds), ctx.length)
    mask = torch.cat([context_mask, ids.new_ones(ids.shape)], dim=1)  # (R, N + W)
    # Every row continues from its own context length (left padding shifts none of its positions).
    positions = ctx.lengths().index_select(0, rows).unsqueeze(1) + torch.arange(width, device=ids.device)
    # Hooks must be installed so per-layer masks are sliced to each row's (pruned) cache.
    with pruner(model) if pruner is not None else nullcontext(), _forward_autocast(ids.device, autocast):
        if pruner is not None:
            pruner.last_prefill = record
        return model(input_ids=ids, **cache_kwargs(cache), attention_mask=mask, position_ids=positions,
                     use_cache=True).logits


@torch.inference_mode()
def score_continuations(
    model: nn.Module,
    ctx: PrefilledContext,
    conts: Sequence[torch.Tensor],
    pruner: TokenPruner | None,
    rows: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
) -> list[tuple[torch.Tensor, bool]]:
    """Log-probabilities of each continuation ``conts[j]`` (1, T_j) after context row ``rows[j]``, in one forward.

    All continuations longer than one token are fed together (their first token is predicted by
    the prefill's logits, so a 1-token continuation needs no forward at all).

    Args:
        rows: the context row each continuation follows (rows may repeat: several answer choices of
            one context); ``ctx`` is left intact and can score further continuations. None = one
            continuation per context row, in order, appending to ``ctx.cache`` (no copy).
        dtype: the log-softmax dtype (:func:`token_logprobs`); None = the logits' dtype, which is
            lm-eval HFLM's default (``softmax_dtype=None``).
        autocast: the continuation forward's ``torch.autocast`` dtype (module docstring; None = off).
    Returns:
        per continuation: log-probs (T_j,) in ``dtype`` and whether every token is the argmax
        (lm-eval's ``is_greedy``).
    """
    device = ctx.last_logits.device
    if rows is None and len(conts) != ctx.last_logits.shape[0]:
        raise ValueError(f"{len(conts)} continuations for {ctx.last_logits.shape[0]} context rows: pass rows=")
    source = torch.arange(len(conts), device=device) if rows is None else torch.tensor(list(rows), device=device)
    longer = [j for j, cont in enumerate(conts) if cont.shape[1] > 1]
    step: dict[int, torch.Tensor] = {}
    if longer:
        # The last continuation token predicts nothing we score.
        logits = _feed_continuations(model, ctx, [conts[j][:, :-1] for j in longer], source[longer], pruner,
                                     consume=rows is None and len(longer) == len(conts), autocast=autocast)
        step = {j: logits[k, : conts[j].shape[1] - 1] for k, j in enumerate(longer)}  # (T_j - 1, V)
    scored = []
    for j, cont in enumerate(conts):
        first = ctx.last_logits[source[j]].unsqueeze(0)  # (1, V) predicts cont[0]
        logits = torch.cat([first, step[j]]) if j in step else first  # (T_j, V)
        scored.append(token_logprobs(logits.unsqueeze(0), cont, dtype))
    return scored


def score_continuation(
    model: nn.Module,
    ctx: PrefilledContext,
    cont_ids: torch.Tensor,
    pruner: TokenPruner | None,
    reuse: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``cont_ids`` (1, T) given a one-row prefilled context (:func:`score_continuations`).

    Args:
        reuse: leave ``ctx`` intact so it can score further continuations (the cache is copied).
    Returns:
        per-token log-probs (T,) in ``dtype`` and whether every continuation token is the argmax.
    """
    return score_continuations(model, ctx, [cont_ids], pruner, rows=[0] if reuse else None, dtype=dtype)[0]
