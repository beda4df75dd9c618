"""StreamingLLM-like positional baseline: keep the attention sinks and the most recent tokens.

The engine always keeps the protected tokens (first ``keep_first`` and the last ``keep_recent``
fraction); this scorer fills the rest of each stage's budget with the tokens closest to the end of
the prompt, i.e. the kept set is always a sink block plus one contiguous recent window.
"""

from __future__ import annotations

import torch

from sdtp.scorers.base import Scorer, ScoreContext


class PositionalScorer(Scorer):
    """Score = original position: later tokens rank higher (content-blind, deterministic)."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) float scores equal to the tokens' original prompt positions."""
        return ctx.positions.to(torch.float32)
