"""A recency prior blended into a learned scorer's ranking (``pruning.scorer.recency_weight``).

A per-token predictor guesses, from one token's state, whether a continuation it has not seen
will need that token. Its guesses are noisy far from the prompt end, where the positional rule
(keep the most recent tokens) is a strong default on plain text. Blending the two rankings shrinks
the predictor towards that default by a weight chosen on validation data
(``scripts/predictor_report.py --recency-weights``; see ``docs/predictor-learning.md``).

Both terms are standardised per row over the real (non-padding) alive tokens, so the weight is
scale-free: ``score = z(predictor) + w * z(-log(1 + distance to the prompt's last token))``.

The weight may differ by prompt kind. After raw text the continuation is more of the same text, and
recency is a strong default; after a chat prompt (one that ends with the tokenizer's generation
prompt, e.g. ``<|im_start|>assistant\n``) the continuation is an answer drawn from wherever the
document holds it, and recency is not. :func:`chat_rows` tells the kinds apart per row, so a batch may
mix them.
"""

from __future__ import annotations

import torch

from sdtp.predictor import distance_to_prompt_end


def standardize(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) -> (B, n) zero mean, unit std per row over the ``valid`` (B, n) slots (all if None).

    Masked slots get 0 (their scores are ignored by selection anyway). A constant row becomes 0.
    """
    scores = scores.float()
    weight = torch.ones_like(scores) if valid is None else valid.float()
    count = weight.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * weight).sum(-1, keepdim=True) / count
    var = ((scores - mean) ** 2 * weight).sum(-1, keepdim=True) / count
    return (scores - mean) / var.sqrt().clamp(min=1e-6) * weight


def recency(positions: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, n) original positions, (B,) prompt lengths -> (B, n) ``-log(1 + distance to the last token)``."""
    return -torch.log1p(distance_to_prompt_end(positions, prompt_len))


def chat_rows(input_ids: torch.Tensor, suffix: tuple[int, ...] | None) -> torch.Tensor:
    """(B, S) prompt ids (left-padded if ragged) -> (B,) bool: the row ends with ``suffix`` (the chat
    template's generation prompt); all False when there is no suffix (no chat template)."""
    if not suffix or input_ids.shape[1] < len(suffix):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tail = torch.tensor(suffix, dtype=input_ids.dtype, device=input_ids.device)
    return (input_ids[:, -len(suffix):] == tail).all(dim=-1)


def blend_recency(scores: torch.Tensor, positions: torch.Tensor, prompt_len: torch.Tensor,
                  weight: float | torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) learned scores -> (B, n) ``z(scores) + weight * z(recency)``.

    ``weight``: one float, or (B,) per row. All zero returns the scores unchanged (a row with weight 0
    in a mixed batch gets ``z(scores)``, the same ranking).
    """
    weight = torch.as_tensor(weight, dtype=torch.float32, device=scores.device)
    if not bool(weight.any()):
        return scores
    if weight.dim() == 1:
        weight = weight[:, None]
    return standardize(scores, valid) + weight * standardize(recency(positions, prompt_len), valid)
