"""Uniformly random scores: the sanity baseline every learned scorer must beat."""

from __future__ import annotations

import torch

from sdtp.distributed import World, rank_seed
from sdtp.scorers.base import Scorer, ScoreContext


class RandomScorer(Scorer):
    """Random scores from one generator seeded once per scorer (i.e. per run).

    Every prefill draws fresh scores from the running generator, so each prompt gets its own mask,
    a run is reproducible for a given ``seed`` and prompt order, and different seeds give
    different masks. Re-seeding at every prefill instead would give one mask per prompt
    length for the whole run, which would make "random" a single fixed positional pattern. A resumed run
    restarts the stream, so it is reproducible but not identical to an uninterrupted one. Under torchrun
    each rank draws its own stream (:func:`sdtp.distributed.rank_seed`; rank 0 keeps ``seed``), so ranks
    do not repeat each other's masks; such a run is not the single-process run (its fingerprint says so).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # Seeded here and never in begin()/bind(): the pruner re-binds on every `with pruner(model)`.
        self._generator = torch.Generator().manual_seed(rank_seed(int(seed), World.from_env().rank))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) scores in [0, 1) for the alive tokens."""
        shape = ctx.positions.shape
        return torch.rand(shape, generator=self._generator).to(ctx.hidden_states.device)
