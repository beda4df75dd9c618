"""Held-out checks of a token scorer during and after training.

* :func:`continuation_nll`: the inference protocol on held-out examples: prefill the prompt with
  the pruner installed, score the continuation on the pruned cache (:mod:`sdtp.eval.continuation`);
  mean NLL per continuation token. Dense (no pruner) and random are the references.
* :func:`ranking_agreement`: Spearman rank correlation and top-k overlap of the predictor's scores
  with the saliency labels over each example's choosable tokens (prompt, not protected), with k =
  the share of those tokens the stage keeps; the predictor reads the dense model's hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import protected_mask
from sdtp.eval.continuation import score_segment
from sdtp.predictor import TokenPredictor
from sdtp.saliency import capture_layer_inputs
from sdtp.scorers.lexical import prompt_match


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank) of a 1D tensor."""
    sorted_x, order = x.sort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.double() + (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1D tensors (NaN-free: 0 if either is constant)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def topk_overlap(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """|top-k(pred) & top-k(target)| / k for 1D tensors."""
    k = max(1, min(k, pred.numel()))
    a = set(pred.topk(k).indices.tolist())
    b = set(target.topk(k).indices.tolist())
    return len(a & b) / k


def choosable(schedule: PruningSchedule, split: int) -> torch.Tensor:
    """(split,) bool: the prompt tokens a stage chooses among (not protected)."""
    positions = torch.arange(split)
    return ~protected_mask(positions, split, schedule.keep_first, schedule.num_recent(split))


@torch.no_grad()
def ranking_agreement(model: nn.Module, items: Sequence[tuple[torch.Tensor, int, torch.Tensor]],
                      schedule: PruningSchedule, predictor: TokenPredictor) -> dict[str, float]:
    """Mean Spearman / top-k overlap per stage (and overall) of the predictor vs the labels.

    Args:
        items: [(ids (S,), split, labels (S, num_stages)), ...]; the labels are what tokens should rank by
            (:func:`sdtp.training.loop.held_out`: magnitudes, or signed labels under ``label_transform=signed``).
    """
    device = next(model.parameters()).device
    rho = [[] for _ in schedule.layers]
    top = [[] for _ in schedule.layers]
    for ids, split, labels in items:
        region = choosable(schedule, split)
        if int(region.sum()) < 2:
            continue
        with capture_layer_inputs(model, schedule.layers) as captured:
            model.base_model(input_ids=ids[None, :split].to(device), use_cache=False)
        positions = torch.arange(split, device=device)[None]
        prompt_len = torch.tensor([split], device=device)
        prompt_ids = ids[None, :split].to(device)
        match = prompt_match(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool)) \
            if predictor.meta.lexical_feature else None
        for s, layer in enumerate(schedule.layers):
            score = predictor(s, captured[layer], positions, prompt_len, lexical=match)[0].float().cpu()[region]
            label = labels[:split, s][region]
            rho[s].append(spearman(score, label))
            kept_share = (schedule.budget(s, split) - schedule.num_protected(split)) / int(region.sum())
            top[s].append(topk_overlap(score, label, round(kept_share * int(region.sum()))))
    out: dict[str, float] = {}
    for s in range(len(schedule.layers)):
        out[f"spearman/{s}"] = sum(rho[s]) / max(len(rho[s]), 1)
        out[f"topk_overlap/{s}"] = sum(top[s]) / max(len(top[s]), 1)
    stages = len(schedule.layers)
    out["spearman"] = sum(out[f"spearman/{s}"] for s in range(stages)) / stages
    out["topk_overlap"] = sum(out[f"topk_overlap/{s}"] for s in range(stages)) / stages
    return out


@torch.no_grad()
def continuation_nll(model: nn.Module, examples: Sequence[tuple[torch.Tensor, int]],
                     pruner: TokenPruner | None) -> list[float]:
    """Per example, mean NLL of the continuation ``ids[split:]`` given the (pruned) prompt ``ids[:split]``."""
    return [score_segment(model, ids[None, :split], ids[None, split:], pruner).nll for ids, split in examples]
