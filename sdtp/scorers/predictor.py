"""SDTP's learned scorer: the per-stage MLP predictor applied to the alive hidden states.

Optionally blended with priors (:mod:`sdtp.scorers.prior`): recency, the hidden-state norm, the
attention the prompt's last tokens pay to each token and the lexical match of each token's surroundings
with the prompt's last tokens (:mod:`sdtp.scorers.lexical`). Their
weights are stored in the checkpoint's ``predictor.json`` (``<prior>_weight`` for raw text,
``<prior>_weight_chat`` for chat prompts) or overridden with ``pruning.scorer.<prior>_weight`` /
``pruning.scorer.<prior>_weight_chat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtp.predictor import TokenPredictor
from sdtp.scorers.attention import AttentionScorer
from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.scorers.lexical import WINDOW, LexicalScorer
from sdtp.scorers.pooling import pool_scores
from sdtp.scorers.prior import blend, chat_rows, log_attention, log_norm, recency

PRIORS = ("recency", "norm", "attention", "lexical")


class PredictorScorer(Scorer):
    """Scores tokens with a trained :class:`TokenPredictor` (loaded from ``path`` or given directly).

    A given predictor (e.g. the one being trained) is moved to the model's device but never cast:
    it keeps its fp32 master weights and casts the hidden states instead.

    ``recency_weight``: weight of the recency prior for every prompt (None = the checkpoint's
    ``meta.recency_weight`` for raw text and ``meta.recency_weight_chat`` for chat prompts; 0 = no
    prior). ``recency_weight_chat``: the chat-prompt weight alone (None = as above). ``norm_weight`` /
    ``norm_weight_chat``: the same for the hidden-state-norm prior, ``attention_weight`` /
    ``attention_weight_chat`` for the attention prior, which reads the last ``attention_queries``
    prompt tokens (None = the checkpoint's ``attention_queries``), ``lexical_weight`` /
    ``lexical_weight_chat`` for the lexical query-match prior (:class:`LexicalScorer` defaults, except
    ``lexical_window``: the tokens each side its match is averaged over; None = the default). A prompt is a
    chat prompt when it ends with the model's ``sdtp_chat_suffix`` (set by :func:`sdtp.models.load_model` from
    the tokenizer's chat template; absent = every prompt is text). ``pool_window``: the predictor's scores are
    averaged over that many alive tokens each side before the blend (:func:`pool_scores`; None or 0 = not).
    ``select_stages``: a checkpoint trained for more stage layers scores a schedule whose layers are a subset of
    its own with its stages at those layers (:meth:`TokenPredictor.load`); otherwise the layers must match.
    """

    def __init__(self, path: str | Path | None = None, predictor: TokenPredictor | None = None,
                 recency_weight: float | None = None, recency_weight_chat: float | None = None,
                 norm_weight: float | None = None, norm_weight_chat: float | None = None,
                 attention_weight: float | None = None, attention_weight_chat: float | None = None,
                 attention_queries: int | None = None, lexical_weight: float | None = None,
                 lexical_weight_chat: float | None = None, lexical_window: int | None = None,
                 pool_window: int | None = None, select_stages: bool = False) -> None:
        if path is None and predictor is None:
            raise ValueError("PredictorScorer needs a checkpoint path or a predictor")
        self._overrides = {"recency_weight": recency_weight, "recency_weight_chat": recency_weight_chat,
                           "norm_weight": norm_weight, "norm_weight_chat": norm_weight_chat,
                           "attention_weight": attention_weight, "attention_weight_chat": attention_weight_chat,
                           "lexical_weight": lexical_weight, "lexical_weight_chat": lexical_weight_chat}
        for key, value in self._overrides.items():
            if value is not None and value < 0:
                raise ValueError(f"pruning.scorer.{key}: must be >= 0, got {value}")
        if attention_queries is not None and attention_queries < 1:
            raise ValueError(f"pruning.scorer.attention_queries: must be >= 1, got {attention_queries}")
        if lexical_window is not None and lexical_window < 1:
            raise ValueError(f"pruning.scorer.lexical_window: must be >= 1, got {lexical_window}")
        if pool_window is not None and pool_window < 0:
            raise ValueError(f"pruning.scorer.pool_window: must be >= 0, got {pool_window}")
        self.pool_window = int(pool_window or 0)
        self.select_stages = bool(select_stages)
        self._attention_queries = attention_queries
        self.lexical_window = WINDOW if lexical_window is None else int(lexical_window)
        self._attention: AttentionScorer | None = None  # bound only when the attention prior is used
        self._lexical: LexicalScorer | None = None  # likewise for the lexical prior
        self.path = path
        self.predictor = predictor
        self._chat_suffix: tuple[int, ...] | None = None
        self._is_chat: torch.Tensor | None = None

    def prior_weight(self, prior: str, chat: bool) -> float:
        """Weight of ``prior`` (one of :data:`PRIORS`) for raw-text or chat prompts.

        Raw text: the override, else the checkpoint's ``<prior>_weight`` (0 without a checkpoint).
        Chat: its own override, the raw-text override, the checkpoint's ``<prior>_weight_chat``, else
        the raw-text weight.
        """
        meta = self.predictor.meta if self.predictor is not None else None
        override = self._overrides[f"{prior}_weight"]
        text = override if override is not None else getattr(meta, f"{prior}_weight", 0.0)
        if not chat:
            return float(text)
        chat_override = self._overrides[f"{prior}_weight_chat"]
        meta_chat = getattr(meta, f"{prior}_weight_chat", None)
        if chat_override is not None:
            return float(chat_override)
        return float(text if override is not None or meta_chat is None else meta_chat)

    @property
    def attention_queries(self) -> int:
        """How many of the prompt's last tokens the attention prior reads: the override, else the checkpoint's."""
        return self._attention_queries or self.predictor.meta.attention_queries

    @property
    def recency_weight(self) -> float:
        return self.prior_weight("recency", chat=False)

    @property
    def recency_weight_chat(self) -> float:
        return self.prior_weight("recency", chat=True)

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        hidden = model.config.hidden_size
        if self.predictor is None:
            self.predictor = TokenPredictor.load(
                self.path, hidden_size=hidden, layers=list(layers), base_model=getattr(model, "sdtp_name", None),
                num_layers=getattr(model.config, "num_hidden_layers", None), subset=self.select_stages,
            ).eval()
        elif list(self.predictor.meta.layers) != list(layers) or self.predictor.meta.hidden_size != hidden:
            raise ValueError(
                f"predictor built for layers {self.predictor.meta.layers} / hidden {self.predictor.meta.hidden_size}, "
                f"pruner uses layers {list(layers)} / hidden {hidden}"
            )
        if self.predictor.meta.lexical_feature and self.lexical_window != WINDOW:
            # the input and the prior read one match; the input must see what it was trained on
            raise ValueError(f"pruning.scorer.lexical_window={self.lexical_window}: this checkpoint has the lexical "
                             f"input, trained with the default window {WINDOW}; leave lexical_window unset")
        self.predictor.to(device=next(model.parameters()).device)
        self._chat_suffix = getattr(model, "sdtp_chat_suffix", None)
        self.unbind()
        if self.prior_weight("attention", chat=False) or self.prior_weight("attention", chat=True):
            self._attention = AttentionScorer(num_queries=self.attention_queries)
            self._attention.bind(model, layers)
        if self.predictor.meta.lexical_feature or self.prior_weight("lexical", chat=False) \
                or self.prior_weight("lexical", chat=True):
            self._lexical = LexicalScorer(window=self.lexical_window)  # the input and the prior read one match

    def unbind(self) -> None:
        if self._attention is not None:
            self._attention.unbind()
            self._attention = None
        self._lexical = None

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        self._is_chat = chat_rows(input_ids, self._chat_suffix) if input_ids is not None else None
        if self._attention is not None:
            self._attention.begin(input_ids, extras)
        if self._lexical is not None:
            self._lexical.begin(input_ids, extras)

    def _row_weights(self, prior: str, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) the weight of ``prior`` for each row by its prompt kind."""
        weights = torch.full((batch,), self.prior_weight(prior, chat=False), device=device)
        if self._is_chat is not None and self._is_chat.shape[0] == batch:
            weights[self._is_chat.to(device)] = self.prior_weight(prior, chat=True)
        return weights

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        batch, device = ctx.positions.shape[0], ctx.positions.device
        prompt_len = ctx.prompt_lengths()
        match = self._lexical.score(ctx) if self._lexical is not None else None  # (B, n)
        scores = self.predictor(ctx.stage, ctx.hidden_states, ctx.positions, prompt_len, ctx.valid, match)
        scores = pool_scores(scores, ctx.valid, self.pool_window)
        terms = [(self._row_weights("recency", batch, device), recency(ctx.positions, prompt_len))]
        norm = self._row_weights("norm", batch, device)
        if bool(norm.any()):  # the norm term only when used (it reads the full hidden states)
            terms.append((norm, log_norm(ctx.hidden_states)))
        attention = self._row_weights("attention", batch, device)
        if self._attention is not None and bool(attention.any()):
            terms.append((attention, log_attention(self._attention.score(ctx))))
        lexical = self._row_weights("lexical", batch, device)
        if match is not None and bool(lexical.any()):
            terms.append((lexical, match))
        return blend(scores, terms, ctx.valid)
