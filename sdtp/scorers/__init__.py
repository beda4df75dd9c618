"""Token scorers: given the hidden states of the alive tokens at a stage, say which matter.

A scorer subclasses :class:`Scorer` and overrides ``score(ctx: ScoreContext) -> Tensor (B, n)`` (higher means
keep), and optionally ``bind`` (once per model), ``begin`` (once per prefill) and ``unbind``.
Scorers are built from config with ``hydra.utils.instantiate`` (``pruning.scorer._target_``).
"""

from sdtp.scorers.base import Scorer, ScoreContext

__all__ = ["ScoreContext", "Scorer"]
