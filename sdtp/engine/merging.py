"""Merging instead of dropping: each dropped token's hidden state is folded into the next kept token
(``+pruning.merge_weight=w``).

Pruning loses what the dropped tokens would have passed on to deeper layers. Token merging (ToMe) keeps some of
it by averaging the dropped states into kept ones. Here a stage replaces each kept token's state ``h_k`` with
``(1 - w) h_k + w * mean(h_k and the states of the tokens dropped between the previous kept token and it)``: the
dropped tokens precede the kept one, which could already attend to them, so nothing flows backwards in the
prompt; ``w = 1`` is the plain average. The last prompt token is always kept (``PruningSchedule.num_recent``),
so every dropped token has a kept successor.
Batches must be unpadded.
"""

from __future__ import annotations

import torch

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import gather_tokens
from sdtp.scorers.base import Scorer


def merge_tokens(hidden: torch.Tensor, keep: torch.Tensor, weight: float) -> torch.Tensor:
    """The kept tokens' states with the dropped ones before each folded in.

    Args:
        hidden: (B, n, D) states of the alive tokens.
        keep: (B, k) ascending indices into them.
        weight: w in [0, 1]; 0 returns the kept states unchanged.
    Returns:
        (B, k, D) in ``hidden``'s dtype (averaged in float32).
    """
    batch, n, dim = hidden.shape
    k = keep.shape[1]
    # Token i joins the group of the first kept index >= i (itself, if kept).
    group = torch.searchsorted(keep.contiguous(), torch.arange(n, device=keep.device).expand(batch, n).contiguous())
    inside = group < k  # False only after the last kept token
    group = group.clamp(max=k - 1)
    states = hidden.float() * inside.unsqueeze(-1)
    sums = states.new_zeros(batch, k, dim).scatter_add_(1, group.unsqueeze(-1).expand(-1, -1, dim), states)
    counts = states.new_zeros(batch, k).scatter_add_(1, group, inside.float())
    kept = gather_tokens(hidden, keep).float()
    merged = kept + weight * (sums / counts.unsqueeze(-1) - kept)
    return merged.to(hidden.dtype)


class MergingPruner(TokenPruner):
    """:class:`TokenPruner` that merges each stage's dropped tokens into the next kept one (see module doc)."""

    def __init__(self, schedule: PruningSchedule, scorer: Scorer, merge_weight: float) -> None:
        super().__init__(schedule, scorer)
        self.merge_weight = merge_weight

    def _gather_hidden(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self._alive.valid is not None:
            raise NotImplementedError("pruning.merge_weight: padded (ragged) batches are not supported")
        return merge_tokens(hidden, keep, self.merge_weight)
