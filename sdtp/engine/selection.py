"""Token selection: which alive tokens survive a pruning stage."""

from __future__ import annotations

import torch


def protected_mask(positions: torch.Tensor, seq_len: int, keep_first: int, num_recent: int) -> torch.Tensor:
    """Tokens that must survive every stage: the first ``keep_first`` and the last ``num_recent``.

    Args:
        positions: (B, n) original prompt positions of the alive tokens.
    Returns:
        (B, n) bool.
    """
    return (positions < keep_first) | (positions >= seq_len - num_recent)


def select_kept(scores: torch.Tensor, protected: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the tokens to keep: every protected token plus the top-scored others.

    Args:
        scores: (B, n) importance, higher = keep. Must be finite.
        protected: (B, n) bool, always kept; at most ``budget`` per row is expected, more are kept anyway.
        budget: tokens to keep per row (``<= n``).
    Returns:
        (B, k) long indices into the alive tokens, sorted ascending so causal order is preserved,
        with ``k = max(budget, protected.sum(-1).max())``.
    """
    n = scores.shape[-1]
    k = min(n, max(budget, int(protected.sum(-1).max().item()) if protected.numel() else 0))
    # +inf lifts protected tokens above any finite score; topk then fills the rest of the budget.
    ranked = scores.float().masked_fill(protected, float("inf"))
    kept = ranked.topk(k, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis.

    Args:
        x: (B, n, ...) tensor.
        index: (B, k) long.
    Returns:
        (B, k, ...) tensor.
    """
    if x.shape[0] == 1:
        # index_select avoids materialising an expanded index: measurably cheaper at batch 1.
        return x[0].index_select(0, index[0]).unsqueeze(0)
    expand = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expand)
