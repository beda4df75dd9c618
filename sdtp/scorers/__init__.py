"""Token scorers: given the hidden states of the alive tokens at a stage, say which matter.

A scorer is any object with ``score(ctx: ScoreContext) -> Tensor (B, n)``; higher means keep.
Scorers are built from config with ``hydra.utils.instantiate`` (``pruning.scorer._target_``).
"""

from sdtp.scorers.base import Scorer, ScoreContext

__all__ = ["ScoreContext", "Scorer"]
