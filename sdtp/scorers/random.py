"""Uniformly random scores: the sanity baseline every learned scorer must beat."""

from __future__ import annotations

from typing import Any

import torch

from sdtp.scorers.base import Scorer, ScoreContext


class RandomScorer(Scorer):
    """Random scores from a generator re-seeded at every prefill, so runs are reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generator = torch.Generator()

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        self._generator.manual_seed(self.seed)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        shape = ctx.positions.shape
        return torch.rand(shape, generator=self._generator).to(ctx.hidden_states.device)
