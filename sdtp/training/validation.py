"""Held-out checks of a token scorer: ranking agreement with saliency labels, pruned perplexity.

* :func:`ranking_agreement` runs the dense model once per labelled sequence, feeds each stage
  layer's input hidden states to a score function and compares with the labels: Spearman rank
  correlation and top-k overlap with k = the stage's kept fraction of the sequence.
* :func:`recent_perplexity` measures how well a (pruned) prefill predicts the last
  ``keep_recent`` tokens of each window. Those tokens are protected, so they reach the output under
  every schedule and the dense, learned and random runs are scored on exactly the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.saliency import capture_layer_inputs

# (stage, hidden (1, S, D), input_ids (1, S)) -> (1, S) scores
ScoreFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank) of a 1D tensor."""
    sorted_x, order = x.sort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    # average ties
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


@torch.no_grad()
def ranking_agreement(
    model: nn.Module,
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
    schedule: PruningSchedule,
    score_fn: ScoreFn,
) -> dict[str, float]:
    """Mean Spearman / top-k overlap per stage (and overall) of ``score_fn`` vs the labels.

    Args:
        items: [(ids (S,), labels (S, num_stages)), ...].
    """
    device = next(model.parameters()).device
    per_stage_rho = [[] for _ in schedule.layers]
    per_stage_top = [[] for _ in schedule.layers]
    for ids, labels in items:
        with capture_layer_inputs(model, schedule.layers) as captured:
            model.base_model(input_ids=ids[None].to(device), use_cache=False)
        for s, layer in enumerate(schedule.layers):
            score = score_fn(s, captured[layer], ids[None])[0].float().cpu()
            label = labels[:, s].float()
            per_stage_rho[s].append(spearman(score, label))
            k = round(len(ids) * schedule.keep_fractions[s])
            per_stage_top[s].append(topk_overlap(score, label, k))
    out: dict[str, float] = {}
    for s in range(len(schedule.layers)):
        out[f"spearman/{s}"] = sum(per_stage_rho[s]) / len(per_stage_rho[s])
        out[f"topk_overlap/{s}"] = sum(per_stage_top[s]) / len(per_stage_top[s])
    out["spearman"] = sum(out[f"spearman/{s}"] for s in range(len(schedule.layers))) / len(schedule.layers)
    out["topk_overlap"] = sum(out[f"topk_overlap/{s}"] for s in range(len(schedule.layers))) / len(schedule.layers)
    return out


@torch.no_grad()
def recent_perplexity(
    model: nn.Module, windows: Sequence[torch.Tensor], pruner: TokenPruner | None, schedule: PruningSchedule
) -> dict[str, float]:
    """Perplexity of the next-token predictions at the protected recent positions of each window.

    Args:
        windows: [(S,) ids, ...]; position p predicts token p+1 for the last ``num_recent(S) - 1``
            positions (the final token has no target).
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    context = pruner(model) if pruner is not None else nullcontext()
    with context:
        for ids in windows:
            seq = ids.shape[0]
            first = seq - schedule.num_recent(seq)
            out = model(input_ids=ids[None].to(device), use_cache=False)
            if pruner is not None:
                positions = pruner.last_prefill.final_positions[0].cpu()
            else:
                positions = torch.arange(seq)
            rows = ((positions >= first) & (positions < seq - 1)).nonzero().squeeze(-1)
            logits = out.logits[0, rows.to(device)].float()
            targets = ids[positions[rows] + 1].to(device)
            nll += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int(rows.numel())
    mean = nll / max(count, 1)
    return {"nll": mean, "ppl": math.exp(mean), "tokens": count}
