"""Pruning without nesting: a stage may re-admit tokens an earlier stage dropped (``+pruning.revive=true``).

A token pruner nests: a token dropped before layer l stays dropped in every deeper layer. The kv_gap page
(``results/compare/kv_gap/``) found nesting to be most of what separates H2O, which picks each layer's cache from
a dense prefill, from SDTP on multi_news. This pruner lifts the constraint at the same tokens per layer: a dropped
token is *parked* with the hidden state it had when it was dropped, and every later stage ranks all prompt tokens
(the alive ones with their current states, the parked ones with their stale states) and keeps its budget among
them. A re-admitted token skips the layers it was parked for (its residual stream misses their updates, as in
layer skipping); from its new stage on it runs, and is cached, like any kept token. Each layer's cache then holds
that stage's choice, which need not be a subset of the layer before's; decoding is unchanged, since the masks are
sliced per layer by the positions each layer cached (:attr:`PrefillRecord.layer_positions`).

Scorers that rank by position or by the prompt's text alone (positional, lexical) give the same order at every
stage, so for them this is the nested pruner; scorers that read the previous layer's cache (lazyllm) cannot rate
parked tokens, which have no keys there, and are refused at their first stage. Batches must be unpadded: every
row re-ranks the same prompt columns.
"""

from __future__ import annotations

import torch

from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.scorers.base import Scorer


class RevivingPruner(TokenPruner):
    """:class:`TokenPruner` whose every stage chooses among all prompt tokens, not only the alive ones."""

    def __init__(self, schedule: PruningSchedule, scorer: Scorer) -> None:
        super().__init__(schedule, scorer)
        self._parked: torch.Tensor | None = None  # (B, N, D) each token's latest hidden state

    def _candidates(self, hidden: torch.Tensor) -> torch.Tensor:
        """Park the alive tokens' states and make every prompt column alive again: (B, n, D) -> (B, N, D)."""
        alive = self._alive
        if alive.valid is not None:
            raise NotImplementedError("pruning.revive: padded (ragged) batches are not supported")
        if not alive.pruned:  # the first stage that prunes (of every prefill): every prompt token is still alive
            self._parked = hidden.clone()  # so nothing parked from an earlier prompt survives
            return hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        self._parked[rows, alive.columns] = hidden
        everything = torch.arange(self._parked.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        alive.columns, alive.positions = everything, everything
        return self._parked


def revived_fraction(record: PrefillRecord) -> float:
    """Share of the tokens each pruned layer caches that the layer before did not (0 for a nested prefill).

    Counted over every pruned layer after the first, for row 0 of ``record`` (one unpadded prompt).
    """
    layers = sorted(record.layer_positions)
    new = total = 0
    for before, after in zip(layers, layers[1:]):
        previous = set(record.layer_positions[before][0].tolist())
        current = record.layer_positions[after][0].tolist()
        new += sum(position not in previous for position in current)
        total += len(current)
    return new / total if total else 0.0
