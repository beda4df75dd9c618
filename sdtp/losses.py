"""SDTP training losses (paper Eqs. 4-8), each term per stage and summed explicitly.

    L = w_ce * CE(pruned forward)
      + sum_s stage_weight[s] * (w_mse * MSE(pi_s, pi_hat_s) + w_rank * Rank(pi_s, pi_hat_s))
      + w_ratio * RatioLoss(D, rho) + w_kl * KL(dense || pruned)

``pi_s`` is predictor s's score (keep - drop logit) and ``pi_hat_s`` the saliency label of stage s.
The paper's ablations are weight overrides: "w/o Rank" = ``rank=0``, "w/o Rank & MSE" = also ``mse=0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

TIES = ("ignore", "include")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid tokens. pred, target: (B, S); valid: (B, S) bool."""
    diff = (pred.float() - target.float()) ** 2
    return (diff * valid).sum() / valid.sum().clamp(min=1)


def ranking_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, ties: str = "ignore") -> torch.Tensor:
    """Pairwise logistic ranking loss, averaged over the pairs i < j of valid tokens.

    ``log(1 + exp(-(p_i - p_j) * sign(t_i - t_j)))`` (paper Eq. 6). Tied labels (sign 0) contribute
    ``log 2`` each when ``ties="include"`` (the literal formula) and are left out when ``"ignore"``.

    Args:
        pred, target: (B, S); valid: (B, S) bool (padding False).
    """
    if ties not in TIES:
        raise ValueError(f"train.loss.ties: {ties!r} not in {TIES}")
    pred, target = pred.float(), target.float()
    dp = pred[:, :, None] - pred[:, None, :]  # (B, S, S) p_i - p_j
    sign = torch.sign(target[:, :, None] - target[:, None, :])
    seq = pred.shape[1]
    upper = torch.ones(seq, seq, dtype=torch.bool, device=pred.device).triu(1)
    pairs = upper[None] & valid[:, :, None] & valid[:, None, :]
    if ties == "ignore":
        pairs = pairs & (sign != 0)
    losses = F.softplus(-dp * sign)
    return (losses * pairs).sum() / pairs.sum().clamp(min=1)


def ratio_loss(policies: Sequence[torch.Tensor], fractions: Sequence[float], valid: torch.Tensor) -> torch.Tensor:
    """DynamicViT's keep-ratio loss: mean over stages and sequences of (kept fraction - rho_s)^2."""
    count = valid.sum(1).clamp(min=1).float()
    total = valid.new_zeros((), dtype=torch.float32)
    for policy, rho in zip(policies, fractions):
        kept = (policy * valid).sum(1) / count
        total = total + ((kept - rho) ** 2).mean()
    return total / max(len(policies), 1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over valid tokens. logits: (B, S, V)."""
    log_p = F.log_softmax(student_logits.float(), -1)
    log_q = F.log_softmax(teacher_logits.float(), -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def sdtp_loss(
    scores: Sequence[torch.Tensor],
    labels: torch.Tensor,
    valid: torch.Tensor,
    weights: Mapping[str, float],
    ce: torch.Tensor | None = None,
    policies: Sequence[torch.Tensor] = (),
    fractions: Sequence[float] = (),
    kl: torch.Tensor | None = None,
    stage_weights: Sequence[float] | None = None,
    ties: str = "ignore",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and a dict of its (detached) terms, ``mse/s`` and ``rank/s`` per stage.

    Args:
        scores: per stage (B, S) predictor scores.
        labels: (B, S, num_stages) saliency labels.
        valid: (B, S) bool.
        weights: ``ce``, ``mse``, ``ranking``, ``ratio``, ``kl`` (missing = 0).
    """
    stage_weights = list(stage_weights) if stage_weights is not None else [1.0] * len(scores)
    total = labels.new_zeros((), dtype=torch.float32)
    terms: dict[str, float] = {}
    w_mse, w_rank = float(weights.get("mse", 0.0)), float(weights.get("ranking", 0.0))
    for s, score in enumerate(scores):
        mse = masked_mse(score, labels[..., s], valid) if w_mse else None
        rank = ranking_loss(score, labels[..., s], valid, ties) if w_rank else None
        if mse is not None:
            total = total + stage_weights[s] * w_mse * mse
            terms[f"mse/{s}"] = mse.item()
        if rank is not None:
            total = total + stage_weights[s] * w_rank * rank
            terms[f"rank/{s}"] = rank.item()
    for name in ("mse", "rank"):
        per_stage = [v for k, v in terms.items() if k.startswith(f"{name}/")]
        if per_stage:
            terms[name] = sum(per_stage) / len(per_stage)
    if ce is not None and weights.get("ce", 0.0):
        total = total + float(weights["ce"]) * ce
        terms["ce"] = ce.item()
    if policies and weights.get("ratio", 0.0):
        ratio = ratio_loss(policies, fractions, valid)
        total = total + float(weights["ratio"]) * ratio
        terms["ratio"] = ratio.item()
    if kl is not None and weights.get("kl", 0.0):
        total = total + float(weights["kl"]) * kl
        terms["kl"] = kl.item()
    terms["loss"] = total.item()
    return total, terms
