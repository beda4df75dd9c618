"""Oracle scorer: the true gradient x input saliency, computed on the fly with the full model.

At the start of each prefill (:meth:`Scorer.begin`) it runs one extra dense forward + backward of
the unpruned model on the prompt (:func:`sdtp.saliency.saliency_scores`) and then scores the alive
tokens at each stage by that stage layer's saliency. With a ``continuation``/``fidelity`` target the
prompt's last ``recent`` fraction (the tokens the pruner protects) stands in for the continuation.
With ``gold=True`` the continuation protocol (:mod:`sdtp.eval.continuation`) hands the scorer the
segment's real continuation before each prefill (:func:`reveal_continuation`), and the labels are
computed on prompt + continuation with the split at the prompt's end: the same label a predictor is
trained on (a Dolly response, a text window's last tokens), so this oracle is the ceiling of a perfect
student; the prompt-tail oracle instead asks what the prompt's own last tokens read.
This is the upper bound a learned predictor
approximates (and costs a full backward per prompt, so it is for analysis, not speed).

``begin`` runs inside the pruner's forward pre-hook, typically under ``torch.inference_mode``;
the saliency pass leaves inference mode, enables grad, and temporarily sets aside the hooks the
pruner installed on the model so the dense pass is not itself pruned (they are restored after).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sdtp.saliency import saliency_scores
from sdtp.scorers.base import Scorer, ScoreContext


@contextmanager
def hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """Temporarily detach every module's forward (pre-)hooks; restore them on exit."""
    saved = []
    for module in model.modules():
        saved.append((module, module._forward_pre_hooks, module._forward_hooks))
        module._forward_pre_hooks = type(module._forward_pre_hooks)()
        module._forward_hooks = type(module._forward_hooks)()
    try:
        yield
    finally:
        for module, pre, post in saved:
            module._forward_pre_hooks, module._forward_hooks = pre, post


class OracleScorer(Scorer):
    """Scores = gradient x input saliency of the full model at each stage layer's input."""

    def __init__(self, target: str = "continuation", absolute: bool = True, recent: float = 0.1,
                 gold: bool = False) -> None:
        self.target = target
        self.absolute = absolute
        self.recent = recent  # continuation targets: the CE of the prompt's last ``recent`` fraction
        self.gold = gold
        self.future: torch.Tensor | None = None  # (1, T) gold continuation of the next prefill (gold=True)
        self._model: nn.Module | None = None
        self._layers: tuple[int, ...] = ()
        self._saliency: torch.Tensor | None = None  # (B, S, num_stages)

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self._model, self._layers = model, tuple(layers)

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        if input_ids is None:
            raise ValueError("OracleScorer needs input_ids (not inputs_embeds)")
        with torch.inference_mode(False), hooks_set_aside(self._model):
            ids = input_ids.clone()  # a normal tensor even if the caller's is an inference tensor
            seq = ids.shape[1]
            if self.gold:
                ids, split = self._with_future(ids)
            else:
                split = torch.full((ids.shape[0],), seq - max(1, math.ceil(self.recent * seq - 1e-9)), device=ids.device)
            # The mask target is a signed loss change: its sign is meaningful, so no |.| there.
            absolute = self.absolute and self.target != "mask"
            self._saliency = saliency_scores(self._model, ids, self._layers, self.target, absolute,
                                             normalize=False, split=split)[:, :seq]

    def _with_future(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N + T) prompt + gold continuation and the split (1,) at N; the continuation is used once."""
        if self.future is None:
            raise ValueError("OracleScorer(gold=True) needs each prompt's continuation before its prefill; only "
                             "eval=continuation supplies it (sdtp.scorers.oracle.reveal_continuation)")
        if ids.shape[0] != 1:
            raise ValueError(f"OracleScorer(gold=True) scores one prompt at a time, got a batch of {ids.shape[0]}")
        future, self.future = self.future.to(ids.device), None
        return torch.cat([ids, future], dim=1), torch.tensor([ids.shape[1]], device=ids.device)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        stage_scores = self._saliency[..., ctx.stage].to(ctx.hidden_states.device)  # (B, S)
        return stage_scores.gather(1, ctx.positions)


def reveal_continuation(scorer: Scorer | None, cont_ids: torch.Tensor) -> None:
    """Hand a gold oracle the (1, T) continuation of the prompt about to be prefilled (no-op otherwise)."""
    if isinstance(scorer, OracleScorer) and scorer.gold:
        scorer.future = cont_ids
