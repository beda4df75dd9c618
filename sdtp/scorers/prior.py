"""Priors blended into a learned scorer's ranking (``pruning.scorer.<recency|norm|attention|lexical>_weight``).

A per-token predictor guesses, from one token's state, whether a continuation it has not seen
will need that token. Its guesses are noisy far from the prompt end, where the positional rule
(keep the most recent tokens) is a strong default on plain text. Blending the two rankings shrinks
the predictor towards that default by a weight chosen on validation data
(``scripts/predictor_report.py --recency-weights``; see ``docs/predictor-learning.md``).

A second prior, the log L2 norm of the hidden state entering the stage (the ``norm`` scorer's
ranking), adds what the predictor cannot see: it RMS-normalises its input, so tokens whose residual
stream the model has made large (sinks, separators) look like any other to it, while on long
documents keeping them is what the training-free ``norm`` rule does best.

A third prior, the log of the attention the prompt's last few tokens (the question of a chat prompt
sits there) pay to each alive token at the layer before the stage (the ``lazyllm`` scorer's ranking with
``attention_queries`` queries, :class:`sdtp.scorers.attention.AttentionScorer`), adds what a per-token
MLP cannot see at all: what the prompt's end is asking about. On long-document QA it keeps more of an
early answer-bearing passage than the predictor, which ranks such prompts almost by position
(``python -m sdtp.eval.passage_kept``).

A fourth prior, the lexical query match (:mod:`sdtp.scorers.lexical`: rare words a token's surroundings share
with the prompt's last tokens), finds the passage a question is about by word overlap, which neither the
predictor nor the question's attention does in a small model; it is added as ``+ w_l * z(match)``.

Every term is standardised per row over the real (non-padding) alive tokens, so the weights are
scale-free: ``score = z(predictor) + w_r * z(-log(1 + distance to the prompt's last token))
+ w_n * z(log ||h||) + w_a * z(log attention from the last queries) + w_l * z(match)``.

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

    Masked slots get 0 (their scores are ignored by selection anyway). A constant row becomes 0. A masked slot's
    score is replaced, not multiplied by 0: a non-finite one (padding states on some kernels) must not reach the row.
    """
    scores = scores.float()
    if valid is not None:
        scores = torch.where(valid, scores, 0.0)
    weight = torch.ones_like(scores) if valid is None else valid.float()
    count = weight.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * weight).sum(-1, keepdim=True) / count
    var = ((scores - mean) ** 2 * weight).sum(-1, keepdim=True) / count
    return (scores - mean) / var.sqrt().clamp(min=1e-6) * weight


def recency(positions: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, n) original positions, (B,) prompt lengths -> (B, n) ``-log(1 + distance to the last token)``."""
    return -torch.log1p(distance_to_prompt_end(positions, prompt_len))


def log_norm(hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, n, D) hidden states -> (B, n) ``log ||h||_2`` (the log keeps massive activations from
    dominating the standardised term)."""
    return hidden_states.float().norm(dim=-1).clamp(min=1e-6).log()


def log_attention(probs: torch.Tensor) -> torch.Tensor:
    """(B, n) mean attention probabilities -> (B, n) their log (floored at 1e-12: a token no query
    attends to must not get -inf)."""
    return probs.float().clamp(min=1e-12).log()


def chat_rows(input_ids: torch.Tensor, suffix: tuple[int, ...] | None) -> torch.Tensor:
    """(B, S) prompt ids (left-padded if ragged) -> (B,) bool: the row ends with ``suffix`` (the chat
    template's generation prompt); all False when there is no suffix (no chat template)."""
    if not suffix or input_ids.shape[1] < len(suffix):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tail = torch.tensor(suffix, dtype=input_ids.dtype, device=input_ids.device)
    return (input_ids[:, -len(suffix):] == tail).all(dim=-1)


def blend(scores: torch.Tensor, terms: list[tuple[float | torch.Tensor, torch.Tensor]],
          valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) learned scores -> (B, n) ``z(scores) + sum_k weight_k * z(prior_k)``.

    ``terms``: (weight, (B, n) prior values) pairs; a weight is one float or (B,) per row. All weights
    zero returns the scores unchanged (a row with weight 0 in a mixed batch gets ``z(scores)``, the same
    ranking).
    """
    weights = [torch.as_tensor(w, dtype=torch.float32, device=scores.device) for w, _ in terms]
    if not any(bool(w.any()) for w in weights):
        return scores
    out = standardize(scores, valid)
    for weight, (_, values) in zip(weights, terms):
        if bool(weight.any()):
            out = out + (weight[:, None] if weight.dim() == 1 else weight) * standardize(values, valid)
    return out
