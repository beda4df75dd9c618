"""Evict entries from a Hugging Face ``DynamicCache`` while keeping decode positions right.

After eviction a layer holds fewer entries than the prompt had, but the model derives the
position of the next token from ``cache.get_seq_length()`` (layer 0). :class:`CompressedLayer`
therefore reports the *logical* length (kept + evicted) there, and the *physical* length where
attention masks are sized, so decoding continues at position N, N+1, ... with plain
``model(input_ids=token, past_key_values=cache)`` calls (ours, ``generate()``, HF's).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from sdtp.engine.selection import select_kept
from sdtp.kv.policy import KVPolicy


class CompressedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose first ``evicted`` logical entries are no longer stored."""

    evicted: int = 0

    @classmethod
    def from_layer(cls, layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor, evicted: int) -> CompressedLayer:
        new = cls()
        new.__dict__.update(layer.__dict__)  # dtype/device/init flags set by lazy_initialization
        new.keys, new.values = keys, values
        new.evicted = int(getattr(layer, "evicted", 0)) + evicted
        return new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            # A multi-token extension needs a mask over the kept entries, which differ per head.
            raise NotImplementedError("a compressed KV cache supports token-by-token decoding only")
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return super().get_seq_length() + query_length, 0


def compress_cache(
    cache: Any, policy: KVPolicy, scores: dict[int, torch.Tensor] | None = None
) -> list[tuple[int, int]]:
    """Keep ``policy.budget(T_l)`` entries of every layer, per KV head, in place.

    Args:
        cache: a ``DynamicCache`` right after prefill (layers may hold different lengths T_l).
        scores: layer -> (B, H_kv, T_l) importance (higher = keep). Layers without scores keep
            the most recent entries (StreamingLLM). Protected entries are always kept.
    Returns:
        (T_l before, T_l after) per layer.
    """
    sizes = []
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # (B, H_kv, T, hd)
        batch, heads, length, _ = keys.shape
        budget = policy.budget(length)
        score = scores.get(idx) if scores else None
        if score is None:
            score = torch.arange(length, device=keys.device, dtype=torch.float32).expand(batch, heads, -1)
        protected = policy.protected(length, keys.device).expand(batch * heads, -1)
        keep = select_kept(score.reshape(batch * heads, length), protected, budget)  # (B*H_kv, k) sorted
        index = keep.view(batch, heads, -1, 1)
        kept_keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        kept_values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        cache.layers[idx] = CompressedLayer.from_layer(layer, kept_keys, kept_values, length - keep.shape[1])
        sizes.append((length, keep.shape[1]))
    return sizes
