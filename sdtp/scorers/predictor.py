"""SDTP's learned scorer: the per-stage MLP predictor applied to the alive hidden states.

Optionally blended with a recency prior (:mod:`sdtp.scorers.prior`) whose weights are stored in the
checkpoint's ``predictor.json`` (``recency_weight`` for raw text, ``recency_weight_chat`` for chat
prompts) or overridden with ``pruning.scorer.recency_weight`` / ``pruning.scorer.recency_weight_chat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtp.predictor import TokenPredictor
from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.scorers.prior import blend_recency, chat_rows


class PredictorScorer(Scorer):
    """Scores tokens with a trained :class:`TokenPredictor` (loaded from ``path`` or given directly).

    A given predictor (e.g. the one being trained) is moved to the model's device but never cast:
    it keeps its fp32 master weights and casts the hidden states instead.

    ``recency_weight``: weight of the recency prior for every prompt (None = the checkpoint's
    ``meta.recency_weight`` for raw text and ``meta.recency_weight_chat`` for chat prompts; 0 = the
    predictor's raw scores). ``recency_weight_chat``: the chat-prompt weight alone (None = as above).
    A prompt is a chat prompt when it ends with the model's ``sdtp_chat_suffix`` (set by
    :func:`sdtp.models.load_model` from the tokenizer's chat template; absent = every prompt is text).
    """

    def __init__(self, path: str | Path | None = None, predictor: TokenPredictor | None = None,
                 recency_weight: float | None = None, recency_weight_chat: float | None = None) -> None:
        if path is None and predictor is None:
            raise ValueError("PredictorScorer needs a checkpoint path or a predictor")
        for key, value in (("recency_weight", recency_weight), ("recency_weight_chat", recency_weight_chat)):
            if value is not None and value < 0:
                raise ValueError(f"pruning.scorer.{key}: must be >= 0, got {value}")
        self.path = path
        self.predictor = predictor
        self._recency_override = recency_weight
        self._chat_override = recency_weight_chat
        self._chat_suffix: tuple[int, ...] | None = None
        self._is_chat: torch.Tensor | None = None

    @property
    def recency_weight(self) -> float:
        """The prior weight for raw-text prompts: the override, else the checkpoint's."""
        if self._recency_override is not None:
            return float(self._recency_override)
        return float(self.predictor.meta.recency_weight) if self.predictor is not None else 0.0

    @property
    def recency_weight_chat(self) -> float:
        """The prior weight for chat prompts: its own override, the common override, the checkpoint's
        chat weight, else the raw-text weight."""
        if self._chat_override is not None:
            return float(self._chat_override)
        meta_chat = self.predictor.meta.recency_weight_chat if self.predictor is not None else None
        if self._recency_override is not None or meta_chat is None:
            return self.recency_weight
        return float(meta_chat)

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
        self._chat_suffix = getattr(model, "sdtp_chat_suffix", None)

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        self._is_chat = chat_rows(input_ids, self._chat_suffix) if input_ids is not None else None

    def _row_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) the prior weight of each row by its prompt kind."""
        weights = torch.full((batch,), self.recency_weight, device=device)
        if self._is_chat is not None and self._is_chat.shape[0] == batch:
            weights[self._is_chat.to(device)] = self.recency_weight_chat
        return weights

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        prompt_len = torch.full((ctx.positions.shape[0],), ctx.seq_len, device=ctx.positions.device)
        if ctx.seq_lens is not None:  # ragged batch: each row's own length
            prompt_len = ctx.seq_lens.to(ctx.positions.device)
        scores = self.predictor(ctx.stage, ctx.hidden_states, ctx.positions, prompt_len, ctx.valid)
        weights = self._row_weights(ctx.positions.shape[0], ctx.positions.device)
        return blend_recency(scores, ctx.positions, prompt_len, weights, ctx.valid)
