"""Scorer interface shared by SDTP's predictor and the training-free baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ScoreContext:
    """Everything a scorer may look at when stage ``stage`` prunes before decoder layer ``layer``.

    Attributes:
        layer: 0-based decoder layer about to run on the kept tokens.
        stage: 0-based pruning stage.
        hidden_states: (B, n, D) hidden states entering ``layer`` for the n alive tokens.
        positions: (B, n) original prompt positions of those tokens.
        seq_len: original prompt length N (the padded width in a left-padded batch).
        model: the causal LM being pruned.
        past_key_values: the prefill cache so far (layers < ``layer`` are filled).
        extras: per-forward data set by the scorer in :meth:`Scorer.begin` (e.g. input ids).
        seq_lens: (B,) real prompt length of each row of a left-padded batch, None when unpadded.
        valid: (B, n) bool real-token slots (False = padding or masked slot; their scores are
            ignored), None when all slots are real.
    """

    layer: int
    stage: int
    hidden_states: torch.Tensor
    positions: torch.Tensor
    seq_len: int
    model: nn.Module
    past_key_values: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    seq_lens: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) each row's real prompt length (``seq_lens`` of a ragged batch, else ``seq_len``), on the
        positions' device."""
        device = self.positions.device
        if self.seq_lens is not None:
            return self.seq_lens.to(device)
        return torch.full((self.positions.shape[0],), self.seq_len, device=device)


class Scorer:
    """Base class: override :meth:`score`; optionally :meth:`bind` and :meth:`begin`."""

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        """Called once when a pruner is attached to ``model`` with stages before ``layers``."""

    def unbind(self) -> None:
        """Called when the pruner detaches from the model: remove any hook :meth:`bind` installed."""

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        """Called at the start of every prefill, before layer 0; may fill ``extras``."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Return (B, n) finite scores for the alive tokens; higher = more important."""
        raise NotImplementedError
