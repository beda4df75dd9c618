"""Hidden-state norm baseline: tokens whose residual stream is large are assumed to matter.

A cheap content-aware heuristic (no extra matmul): the L2 norm of each alive token's hidden
state entering the stage layer. Known caveat, and the reason it is only a baseline: attention
sinks and delimiter tokens carry "massive activations", so the norm ranks them above content.
"""

from __future__ import annotations

import torch

from sdtp.scorers.base import Scorer, ScoreContext


class NormScorer(Scorer):
    """Score = L2 norm of the hidden state over the model dimension (higher = keep)."""

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) float32 norms of ``ctx.hidden_states`` (B, n, D)."""
        return ctx.hidden_states.float().norm(dim=-1)
