"""Lexical query match: how strongly the text around a token shares rare words with the prompt's end.

On long-document QA the answer sits in one passage that only the question at the end of the prompt
identifies. A causal model's hidden state of a passage token cannot see that question, and neither can
a per-token predictor reading it (``results/predictors/smollm2-135m-qa/``: a learned low-rank query
branch did not learn to find the passage). Word overlap can: a passage about the question's subject
repeats the question's rare words. This scorer rates token ``j`` by

    match_i = idf(id_i) ** power  if id_i occurs among the prompt's last ``query_tokens`` real tokens, else 0
    score_j = mean of match_i over the ``2 * window + 1`` tokens around j

with ``idf(t) = log(L / count of t in the prompt)`` (L = the prompt's real length), so words the whole
prompt repeats (articles, the template's own words) count little, and the box mean spreads a passage's
matches over the passage, which is what the answer needs kept, not only the matching words. The query
span itself gets no match (the pruner protects it anyway). It reads token ids only: training-free, one
pass over the prompt in :meth:`begin`, cheap next to one decoder layer.

Used alone (``pruning=lexical``) it is a training-free baseline; blended into the learned scorer it is
its ``lexical`` prior (:mod:`sdtp.scorers.prior`, ``pruning.scorer.lexical_weight[_chat]``).
"""

from __future__ import annotations

from typing import Any

import torch

from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.scorers.pooling import box_sum

# Defaults chosen on passage-QA validation records 64..127 only (token ids, no model run): the share of the
# answer-bearing passage a one-shot 34.9% keep retains, over query_tokens 16-128, window 16-256, power 1-3,
# peaked at 32 / 128 / 3 (0.78; the positional rule keeps 0.01 of a passage in the prompt's first half); see
# results/predictors/smollm2-135m-v3/README.md, "Lexical prior".
QUERY_TOKENS, WINDOW, POWER = 32, 128, 3.0


def query_match(input_ids: torch.Tensor, valid: torch.Tensor | None, query_tokens: int, window: int,
                power: float = 1.0) -> torch.Tensor:
    """(B, S) prompt ids (left-padded when ``valid`` (B, S) is given) -> (B, S) smoothed query match.

    Padding slots get 0 and contribute nothing to their neighbours' means.
    """
    ids = input_ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    batch, seq = ids.shape
    vocab = int(ids.max()) + 1
    counts = torch.zeros(batch, vocab, device=ids.device).scatter_add_(1, ids, real.float())
    length = real.sum(dim=1, keepdim=True).float()
    idf = torch.log(length / counts.gather(1, ids).clamp(min=1)).clamp(min=0) ** power  # (B, S)
    query = torch.zeros(seq, dtype=torch.bool, device=ids.device)
    query[-min(query_tokens, seq):] = True  # left padding: every row's last tokens are its real end
    # Counted, not scatter_-ed booleans: a token id both in and before the query would get True and False writes,
    # whose order scatter_ leaves undefined (CUDA).
    in_query = torch.zeros(batch, vocab, device=ids.device).scatter_add_(1, ids, (query[None] & real).float()) > 0
    match = idf * in_query.gather(1, ids) * (real & ~query[None])  # (B, S)
    return box_sum(match, window) / (2 * window + 1) * real


def prompt_match(input_ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """(B, S) ids, (B, S) bool prompt tokens (any padding, e.g. a training continuation after them) ->
    (B, S) :func:`query_match` with the default settings of each row's prompt alone, 0 elsewhere.

    What the scorer's :meth:`LexicalScorer.begin` computes for a prefill of that prompt: the training
    loop feeds it to a predictor with the lexical feature.
    """
    out = torch.zeros(prompt.shape, device=input_ids.device)
    for row in range(input_ids.shape[0]):
        index = prompt[row].nonzero().squeeze(1)
        if index.numel():
            out[row, index] = query_match(input_ids[row, index][None], None, QUERY_TOKENS, WINDOW, POWER)[0]
    return out


class LexicalScorer(Scorer):
    """Keeps the tokens whose surroundings share the most rare words with the prompt's last tokens."""

    def __init__(self, query_tokens: int = QUERY_TOKENS, window: int = WINDOW, power: float = POWER) -> None:
        for key, value in (("query_tokens", query_tokens), ("window", window)):
            if value < 1:
                raise ValueError(f"pruning.scorer.{key}: must be >= 1, got {value}")
        if power <= 0:
            raise ValueError(f"pruning.scorer.power: must be > 0, got {power}")
        self.query_tokens, self.window, self.power = query_tokens, window, power
        self._match: torch.Tensor | None = None  # (B, S) for the current prefill

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        if input_ids is None:
            raise ValueError("the lexical scorer needs input_ids (not inputs_embeds)")
        self._match = query_match(input_ids, extras.get("attention_mask"), self.query_tokens, self.window,
                                  self.power)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) :func:`query_match` of each alive token, read at its column in the padded prompt."""
        if self._match is None:
            raise RuntimeError("LexicalScorer.score before begin(): no prompt seen")
        columns = ctx.positions.clamp(min=0)
        if ctx.seq_lens is not None:  # positions count from each row's first real token
            columns = columns + (ctx.seq_len - ctx.seq_lens.to(columns.device))[:, None]
        return self._match.to(columns.device).gather(1, columns.clamp(max=self._match.shape[1] - 1))
