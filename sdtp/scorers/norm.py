"""Hidden-state-norm scorer: keep the tokens whose entering hidden state has the largest L2 norm.

A training-free heuristic baseline for the learned predictor (no extra forward, no parameters).
"""

from __future__ import annotations

import torch

from sdtp.scorers.base import Scorer, ScoreContext


class HiddenNormScorer(Scorer):
    """Score = ||h_i||_2 of the hidden state entering the stage layer."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.hidden_states.float().norm(dim=-1)
