"""Token selection: which alive tokens survive a pruning stage (and how many, for token pruning and KV policies)."""

from __future__ import annotations

import math

import torch


def recent_count(fraction: float, length: int) -> int:
    """Protected tokens at the end of a ``length``-token sequence: ceil(``fraction`` x length), at most length."""
    return min(length, math.ceil(fraction * length - 1e-9))  # the epsilon keeps 0.1 x 30 at 3, not 4


def protected_count(length: int, keep_first: int, num_recent: int) -> int:
    """The first ``keep_first`` and the last ``num_recent`` of ``length`` tokens, overlaps counted once."""
    return min(length, min(keep_first, length) + num_recent)


def kept_count(length: int, fraction: float, protected: int) -> int:
    """round(``fraction`` x length) kept, at most length; the ``protected`` tokens alone may exceed it."""
    return max(min(round(length * fraction), length), protected)


def protected_mask(
    positions: torch.Tensor, seq_len: int | torch.Tensor, keep_first: int, num_recent: int | torch.Tensor
) -> torch.Tensor:
    """Tokens that must survive every stage: the first ``keep_first`` and the last ``num_recent``.

    Args:
        positions: (B, n) original prompt positions of the alive tokens.
        seq_len, num_recent: ints, or (B,) tensors when the rows of a ragged batch differ in length.
    Returns:
        (B, n) bool.
    """
    if isinstance(seq_len, torch.Tensor) or isinstance(num_recent, torch.Tensor):
        last = torch.as_tensor(seq_len, device=positions.device) - torch.as_tensor(num_recent, device=positions.device)
        return (positions < keep_first) | (positions >= last.reshape(-1, 1))
    return (positions < keep_first) | (positions >= seq_len - num_recent)


def select_kept(scores: torch.Tensor, protected: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the tokens to keep: every protected token plus the top-scored others.

    Args:
        scores: (B, n) importance, higher = keep. Finite, except that unprotected entries may be -inf
            (never kept in preference to a finite one) when each row has ``budget`` others to keep; NaN counts
            as -inf.
        protected: (B, n) bool, always kept; at most ``budget`` per row is expected, more are kept anyway.
        budget: tokens to keep per row (``<= n``).
    Returns:
        (B, k) long indices into the alive tokens, sorted ascending so causal order is preserved,
        with ``k = max(budget, protected.sum(-1).max())``.
    """
    n = scores.shape[-1]
    k = min(n, max(budget, int(protected.sum(-1).max().item()) if protected.numel() else 0))
    # +inf lifts protected tokens above any finite score; topk then fills the rest of the budget. topk ranks NaN
    # above +inf, so a scorer's NaN (a broken or overflowing one) counts as -inf: it must not push out protected tokens.
    ranked = scores.float().nan_to_num(nan=float("-inf")).masked_fill(protected, float("inf"))
    kept = ranked.topk(k, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values


def select_kept_rows(
    scores: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row selection for a ragged batch: each row keeps its own number of real tokens.

    Row b keeps ``k_b = min(valid_b, max(budgets[b], protected_b))`` real tokens (its protected
    ones plus its top-scored others), chosen by :func:`select_kept` on its real slots alone, so that
    a row keeps what it would keep run by itself, ties included. Invalid slots (padding) are never
    chosen as real tokens. So that the result stays rectangular, rows with ``k_b < K = max_b k_b``
    get ``K - k_b`` extra *masked* slots (unchosen indices, whose contents the caller must mask out).

    Args:
        scores: (B, n) importance, higher = keep; finite on valid slots.
        protected: (B, n) bool, always kept (only where ``valid``).
        valid: (B, n) bool, which alive slots hold real tokens.
        budgets: (B,) long, real tokens to keep per row.
    Returns:
        keep (B, K) long indices into the alive slots and kept_valid (B, K) bool. In each row the
        masked slots come first (left padding), then the kept real tokens in ascending order, so
        causal order is preserved and the last slot is the row's last kept real token.
    """
    n = scores.shape[-1]
    protected = protected & valid
    chosen = torch.zeros_like(valid)  # (B, n) the real tokens each row keeps
    for row in range(scores.shape[0]):
        slots = valid[row].nonzero().squeeze(1)  # (n_b,) the row's real slots, in order
        picked = select_kept(scores[row, slots][None], protected[row, slots][None], int(budgets[row]))
        chosen[row, slots[picked[0]]] = True
    k = int(chosen.sum(-1).max().item())
    # Sort key: unchosen slots (< n) before chosen ones (>= n), each group by index; the last k per row
    # are its chosen tokens in order, preceded by as many unchosen (masked) slots as it keeps fewer.
    index = torch.arange(n, device=scores.device).expand_as(chosen)
    order = torch.where(chosen, index + n, index).argsort(dim=-1)[:, n - k:]  # (B, K)
    return order, chosen.gather(1, order)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis.

    Args:
        x: (B, n, ...) tensor, or (1, n, ...) shared by every row of ``index``.
        index: (B, k) long.
    Returns:
        (B, k, ...) tensor.
    """
    if x.shape[0] == 1 and index.shape[0] == 1:
        # index_select avoids materialising an expanded index: measurably cheaper at batch 1.
        return x[0].index_select(0, index[0]).unsqueeze(0)
    if x.shape[0] == 1:
        # A tensor shared by the batch (e.g. RoPE cos/sin from (1, n) position ids): each row of
        # ``index`` must select from it independently, not reuse row 0's selection.
        x = x.expand(index.shape[0], *x.shape[1:])
    expand = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expand)
