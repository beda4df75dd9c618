"""Token selection keeps the protected tokens plus the top-scored others, in causal order."""

from __future__ import annotations

import torch

from sdtp.engine.selection import gather_tokens, protected_mask, select_kept


def test_select_kept_is_protected_plus_topk():
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 0.5]])
    positions = torch.arange(8).unsqueeze(0)
    protect = protected_mask(positions, seq_len=8, keep_first=1, num_recent=1)
    kept = select_kept(scores, protect, budget=4)
    assert kept.tolist() == [[0, 1, 3, 7]]  # 0 and 7 protected, then the two best: 1 (9.0), 3 (8.0)


def test_nan_scores_never_push_out_protected_tokens():
    """topk ranks NaN above the protected tokens' +inf: a scorer's NaN counts as the lowest score instead."""
    scores = torch.tensor([[0.0, 9.0, float("nan"), 8.0, float("nan"), 7.0, 3.0, 0.5]])
    protect = protected_mask(torch.arange(8).unsqueeze(0), seq_len=8, keep_first=1, num_recent=1)
    assert select_kept(scores, protect, budget=4).tolist() == [[0, 1, 3, 7]]


def test_select_kept_batch_rows_independent():
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0], [1.0, 5.0, 4.0, 0.0]])
    protect = torch.zeros_like(scores, dtype=torch.bool)
    assert select_kept(scores, protect, budget=2).tolist() == [[0, 3], [1, 2]]


def test_gather_tokens_batch_one_and_many():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3)
    idx = torch.tensor([[0, 4], [1, 2]])
    out = gather_tokens(x, idx)
    assert torch.equal(out[0], x[0, [0, 4]]) and torch.equal(out[1], x[1, [1, 2]])
    assert torch.equal(gather_tokens(x[:1], idx[:1]), x[:1, [0, 4]])
