"""What a KV-cache policy ranks a layer's cached prefill entries by: the interface and the built-ins.

A :class:`KVScore` sees one decoder layer's attention at the end of a prefill (:class:`LayerPrefill`)
and returns one importance per cached entry and KV head. The policy (:class:`sdtp.kv.policy.KVPolicy`)
then keeps, per head, its protected entries (first ``keep_first``, last ``keep_recent``) plus the top
scored ones up to its budget. Built in: :class:`AccumulatedAttention` (``kv=h2o``) and
:class:`WindowAttention` (``kv=snapkv``); ``kv=streaming`` has no score (recency only). Your own:
subclass :class:`KVScore` and name it in ``kv.score._target_`` (docs/extending.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdtp.models.attention import attention_probs, project_queries

QUERY_CHUNK = 512  # queries per chunk in AccumulatedAttention: bounds the transient (B, H, chunk, T) probabilities


@dataclass(frozen=True)
class LayerPrefill:
    """One decoder layer's attention during a prefill, as a :class:`KVScore` sees it.

    With a token pruner active the layer saw only the tokens that reached it: ``T`` below is that
    count, and every tensor covers exactly those tokens.

    Attributes:
        layer: decoder layer index.
        attn: the layer's self-attention module.
        hidden: (B, T, D) the attention's input (post ``input_layernorm``).
        cos, sin: (B or 1, T, hd) rotary tables of those tokens' positions.
        keys: (B, H_kv, T, hd) the keys the layer cached (post-RoPE).
        values: (B, H_kv, T, hd) the values it cached.
    """

    layer: int
    attn: nn.Module
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def attention(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Causal softmax attention of queries ``start:stop`` over every cached key, recomputed from the
        layer's own projections (SDPA never materialises it).

        Returns:
            (B, H_kv, H // H_kv, m, T) float32 probabilities, m = the number of queries.
        """
        stop = self.length if stop is None else stop
        query = project_queries(self.attn, self.hidden[:, start:stop], self.cos[:, start:stop], self.sin[:, start:stop])
        index = torch.arange(start, stop, device=self.keys.device)
        return attention_probs(query, self.keys, index, self.attn.scaling)


class KVScore(ABC):
    """Importance of a layer's cached prefill entries (higher = keep).

    Attributes:
        recent: trailing entries this score always keeps on top of ``kv.keep_recent`` (SnapKV's
            observation window); 0 for most scores.
    """

    recent: int = 0

    @abstractmethod
    def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
        """(B, H_kv, T) float scores of ``prefill``'s cached entries, per KV head."""


class AccumulatedAttention(KVScore):
    """H2O's heavy hitters: attention accumulated over every prompt query (and grouped heads), causal."""

    def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
        total = torch.zeros(prefill.keys.shape[:3], dtype=torch.float32, device=prefill.keys.device)
        for start in range(0, prefill.length, QUERY_CHUNK):
            total += prefill.attention(start, min(start + QUERY_CHUNK, prefill.length)).sum(dim=(2, 3))
        return total


class WindowAttention(KVScore):
    """SnapKV: attention of the last ``window`` queries, average-pooled over ``kernel`` neighbouring keys.

    Pooling keeps whole phrases around a hit instead of isolated tokens (SnapKV's clustering); the
    window itself is always kept (:attr:`recent`).
    """

    def __init__(self, window: int, kernel: int) -> None:
        self.recent = window
        self.kernel = kernel

    def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
        start = max(prefill.length - self.recent, 0)
        votes = prefill.attention(start).sum(dim=(2, 3))  # (B, H_kv, T)
        # As SnapKV, pool the keys before the window only: the window's own (large, self-attention) votes would
        # otherwise spill into the kernel // 2 keys just before it. The window is kept anyway (``recent``).
        if start == 0:
            return votes
        pooled = F.avg_pool1d(votes[..., :start], kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        return torch.cat([pooled, votes[..., start:]], dim=-1)
