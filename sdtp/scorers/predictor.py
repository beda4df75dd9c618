"""SDTP's learned scorer: the per-stage MLP predictor applied to the alive hidden states.

Optionally blended with a recency prior (:mod:`sdtp.scorers.prior`) whose weight is stored in the
checkpoint's ``predictor.json`` (``recency_weight``) or overridden with ``pruning.scorer.recency_weight``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdtp.predictor import TokenPredictor
from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.scorers.prior import blend_recency


class PredictorScorer(Scorer):
    """Scores tokens with a trained :class:`TokenPredictor` (loaded from ``path`` or given directly).

    A given predictor (e.g. the one being trained) is moved to the model's device but never cast:
    it keeps its fp32 master weights and casts the hidden states instead.

    ``recency_weight``: weight of the recency prior (None = the checkpoint's ``meta.recency_weight``;
    0 = the predictor's raw scores).
    """

    def __init__(self, path: str | Path | None = None, predictor: TokenPredictor | None = None,
                 recency_weight: float | None = None) -> None:
        if path is None and predictor is None:
            raise ValueError("PredictorScorer needs a checkpoint path or a predictor")
        if recency_weight is not None and recency_weight < 0:
            raise ValueError(f"pruning.scorer.recency_weight: must be >= 0, got {recency_weight}")
        self.path = path
        self.predictor = predictor
        self._recency_override = recency_weight

    @property
    def recency_weight(self) -> float:
        """The prior weight in use: the override, else the checkpoint's."""
        if self._recency_override is not None:
            return float(self._recency_override)
        return float(self.predictor.meta.recency_weight) if self.predictor is not None else 0.0

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        hidden = model.config.hidden_size
        if self.predictor is None:
            self.predictor = TokenPredictor.load(
                self.path, hidden_size=hidden, layers=list(layers), base_model=getattr(model, "sdtp_name", None)
            ).eval()
        elif list(self.predictor.meta.layers) != list(layers) or self.predictor.meta.hidden_size != hidden:
            raise ValueError(
                f"predictor built for layers {self.predictor.meta.layers} / hidden {self.predictor.meta.hidden_size}, "
                f"pruner uses layers {list(layers)} / hidden {hidden}"
            )
        self.predictor.to(device=next(model.parameters()).device)

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        prompt_len = torch.full((ctx.positions.shape[0],), ctx.seq_len, device=ctx.positions.device)
        if ctx.seq_lens is not None:  # ragged batch: each row's own length
            prompt_len = ctx.seq_lens.to(ctx.positions.device)
        scores = self.predictor(ctx.stage, ctx.hidden_states, ctx.positions, prompt_len)
        return blend_recency(scores, ctx.positions, prompt_len, self.recency_weight, ctx.valid)
