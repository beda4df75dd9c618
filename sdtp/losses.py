"""SDTP training losses (paper Eqs. 4-8), each term per stage and summed explicitly.

    L = w_ce * CE(continuation | pruned prompt)
      + sum_s stage_weight[s] * (w_mse * MSE_s + w_rank * Rank_s + w_sel * Sel_s)
      + w_ratio * RatioLoss(D, rho) + w_kl * KL(dense || pruned on the continuation)

``pi_s`` is predictor s's score (keep - drop logit) and ``y_s`` the (transformed) saliency label of
stage s. MSE and ranking at stage s cover only the tokens that stage decides about: alive before it
(``D_{s-1} = 1``), in the prompt and not protected. The MSE is taken after centring both sides over
those tokens: only the ranking of scores matters at inference (top-k), and leaving the mean free
lets the ratio loss (``keep_mode=gumbel``) set the keep probability without fighting the MSE. The
ranking loss averages the pairwise logistic loss over pairs i < j of those tokens; with more than
``max_pairs`` pairs in a row it averages over ``max_pairs`` uniformly sampled pairs instead, so no
S x S tensor is built for long sequences. Pairs are pooled over the rows of a batch. With one row
(``train.batch_size=1``, the default) the sampled mean is an unbiased estimate of the all-pairs mean
(exactly so when no pair is dropped as tied: with ``ties="ignore"`` and tied labels it is a ratio
estimate). With several rows it is not: a sampled row counts ``max_pairs`` pairs instead of all of its
own, so shorter rows weigh more than in the all-pairs mean.
The optional selection loss (``selection`` weight; not in the paper) keeps only the pairs that cross
the stage's cut: the label's top-k of those tokens, k = how many of them the stage keeps, against the
rest. Uniform pairs spend most of their weight ordering tokens on the same side of the cut, which no
stage's decision depends on.
The paper's ablations are weight overrides: "w/o Rank" = ``ranking=0``, "w/o Rank & MSE" = also ``mse=0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

TIES = ("ignore", "include")
LOSS_TERMS = ("ce", "mse", "ranking", "selection", "ratio", "kl")  # the weights of train.loss


def centered_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of row-centred ``pred`` and ``target`` over ``mask`` tokens.

    Args:
        pred, target: (B, S); mask: (B, S) bool. Rows without a masked token contribute nothing.
    """
    weight = mask.float()
    count = weight.sum(1, keepdim=True).clamp(min=1)
    pred, target = pred.float(), target.float()
    pred_c = pred - (pred * weight).sum(1, keepdim=True) / count
    target_c = target - (target * weight).sum(1, keepdim=True) / count
    return (((pred_c - target_c) ** 2) * weight).sum() / weight.sum().clamp(min=1)


def _row_pairs(n: int, max_pairs: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i < j) into n items: all of them, or ``max_pairs`` sampled uniformly."""
    if n * (n - 1) // 2 <= max_pairs:
        return torch.triu_indices(n, n, offset=1)
    first = torch.randint(0, n, (max_pairs,), generator=generator)
    second = torch.randint(0, n - 1, (max_pairs,), generator=generator)
    second = second + (second >= first).long()  # uniform over j != i
    return torch.minimum(first, second), torch.maximum(first, second)


def ranking_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ties: str = "ignore",
                 max_pairs: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pairwise logistic ranking loss ``log(1 + exp(-(p_i - p_j) * sign(t_i - t_j)))`` (paper Eq. 6).

    Averaged over the pairs of ``mask`` tokens of every row, pooled (all pairs, or ``max_pairs`` sampled
    per row): for one row the sampled mean estimates the all-pairs mean without bias (dropped ties
    aside); over several rows a sampled row counts ``max_pairs`` pairs, not all of its own (module
    docstring). Tied labels contribute ``log 2`` each with ``ties="include"`` (the literal formula) and
    are left out with ``"ignore"``.

    Args:
        pred, target: (B, S); mask: (B, S) bool.
    """
    if ties not in TIES:
        raise ValueError(f"train.loss.ties: {ties!r} not in {TIES}")
    total, count = pred.new_zeros((), dtype=torch.float32), 0
    for row in range(pred.shape[0]):
        idx = mask[row].nonzero().squeeze(-1)
        if idx.numel() < 2:
            continue
        i, j = (idx[k.to(idx.device)] for k in _row_pairs(idx.numel(), max_pairs, generator))
        sign = torch.sign(target[row, i].float() - target[row, j].float())
        if ties == "ignore":
            keep = sign != 0
            i, j, sign = i[keep], j[keep], sign[keep]
        total = total + F.softplus(-(pred[row, i].float() - pred[row, j].float()) * sign).sum()
        count += int(sign.numel())
    return total / max(count, 1)


def _cross_pairs(top: torch.Tensor, bottom: torch.Tensor, max_pairs: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (top, bottom) index pair, or ``max_pairs`` of them sampled uniformly."""
    if top.numel() * bottom.numel() <= max_pairs:
        return top.repeat_interleave(bottom.numel()), bottom.repeat(top.numel())
    i = torch.randint(0, top.numel(), (max_pairs,), generator=generator)
    j = torch.randint(0, bottom.numel(), (max_pairs,), generator=generator)
    return top[i.to(top.device)], bottom[j.to(bottom.device)]


def selection_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor,
                   max_pairs: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pairwise logistic loss across a stage's cut: ``softplus(-(p_i - p_j))`` averaged over i in the
    label's top ``kept[b]`` tokens of ``mask`` (what an oracle would keep at the stage's budget) and j in
    the rest (all pairs, or ``max_pairs`` sampled per row). Rows where the stage keeps all or none of
    ``mask`` contribute nothing; label ties at the cut are broken by ``argsort``.

    Args:
        pred, target: (B, S); mask: (B, S) bool; kept: (B,) how many ``mask`` tokens the stage keeps.
    """
    total, count = pred.new_zeros((), dtype=torch.float32), 0
    for row in range(pred.shape[0]):
        idx = mask[row].nonzero().squeeze(-1)
        k = int(kept[row])
        if not 0 < k < idx.numel():
            continue
        order = idx[target[row, idx].float().argsort(descending=True)]
        i, j = _cross_pairs(order[:k], order[k:], max_pairs, generator)
        total = total + F.softplus(-(pred[row, i].float() - pred[row, j].float())).sum()
        count += int(i.numel())
    return total / max(count, 1)


def ratio_loss(policies: Sequence[torch.Tensor], fractions: Sequence[float], prompt: torch.Tensor) -> torch.Tensor:
    """DynamicViT's keep-ratio loss: mean over stages and rows of (kept prompt fraction - rho_s)^2.

    Args:
        policies: per stage (B, S) cumulative keep policy; prompt: (B, S) bool prompt tokens.
    """
    count = prompt.sum(1).clamp(min=1).float()
    total = prompt.new_zeros((), dtype=torch.float32)
    for policy, rho in zip(policies, fractions):
        kept = (policy * prompt).sum(1) / count
        total = total + ((kept - rho) ** 2).mean()
    return total / max(len(policies), 1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged. logits: (n, V)."""
    log_p = F.log_softmax(student_logits.float(), -1)
    log_q = F.log_softmax(teacher_logits.float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def sdtp_loss(
    scores: Sequence[torch.Tensor],
    labels: torch.Tensor,
    decided: Sequence[torch.Tensor],
    weights: Mapping[str, float],
    ce: torch.Tensor | None = None,
    policies: Sequence[torch.Tensor] = (),
    fractions: Sequence[float] = (),
    prompt: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    stage_weights: Sequence[float] | None = None,
    kept: Sequence[torch.Tensor] = (),
    ties: str = "ignore",
    max_pairs: int = 4096,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and a dict of its (detached) terms, ``mse/s``, ``rank/s`` and ``sel/s`` per stage.

    Args:
        scores: per stage (B, S) predictor scores.
        labels: (B, S, num_stages) transformed saliency labels.
        decided: per stage (B, S) bool, the tokens stage s decides about (alive, prompt, unprotected).
        weights: ``ce``, ``mse``, ``ranking``, ``selection``, ``ratio``, ``kl`` (missing = 0).
        kept: per stage (B,) how many ``decided`` tokens the stage kept (for the selection loss).
        prompt: (B, S) bool prompt tokens (for the ratio loss).
    """
    stage_weights = list(stage_weights) if stage_weights is not None else [1.0] * len(scores)
    total = labels.new_zeros((), dtype=torch.float32)
    terms: dict[str, float] = {}
    w_mse, w_rank = float(weights.get("mse", 0.0)), float(weights.get("ranking", 0.0))
    w_sel = float(weights.get("selection", 0.0))
    if w_sel and len(kept) != len(scores):
        raise ValueError("sdtp_loss: the selection loss needs every stage's kept count")
    for s, score in enumerate(scores):
        if w_mse:
            mse = centered_mse(score, labels[..., s], decided[s])
            total = total + stage_weights[s] * w_mse * mse
            terms[f"mse/{s}"] = mse.item()
        if w_rank:
            rank = ranking_loss(score, labels[..., s], decided[s], ties, max_pairs, generator)
            total = total + stage_weights[s] * w_rank * rank
            terms[f"rank/{s}"] = rank.item()
        if w_sel:
            sel = selection_loss(score, labels[..., s], decided[s], kept[s], max_pairs, generator)
            total = total + stage_weights[s] * w_sel * sel
            terms[f"sel/{s}"] = sel.item()
    for name in ("mse", "rank", "sel"):
        per_stage = [v for k, v in terms.items() if k.startswith(f"{name}/")]
        if per_stage:
            terms[name] = sum(per_stage) / len(per_stage)
    if ce is not None and weights.get("ce", 0.0):
        total = total + float(weights["ce"]) * ce
        terms["ce"] = ce.item()
    if policies and prompt is not None and weights.get("ratio", 0.0):
        ratio = ratio_loss(policies, fractions, prompt)
        total = total + float(weights["ratio"]) * ratio
        terms["ratio"] = ratio.item()
    if kl is not None and weights.get("kl", 0.0):
        total = total + float(weights["kl"]) * kl
        terms["kl"] = kl.item()
    terms["loss"] = total.item()
    return total, terms
