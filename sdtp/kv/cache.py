"""Evict entries from a Hugging Face ``DynamicCache`` while keeping decode positions right.

After eviction a layer holds fewer entries than the prompt had, but the model derives the
position of the next token from ``cache.get_seq_length()``. :class:`CompressedCache` therefore
reports the *logical* length (stored + evicted) at the cache level, while every layer object (HF's
``DynamicLayer`` or the engine's in-place ``AppendLayer``) keeps its own *physical* length, which
is what layer appends and attention-mask sizing use. Decoding thus continues at positions N, N+1,
... with plain ``model(input_ids=token, **cache_kwargs(cache))`` calls (ours, HF ``generate()``;
the keyword is ``past_key_values`` before transformers 5.24, ``cache`` from 5.24: ``sdtp.models.compat``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from sdtp.engine.selection import select_kept
from sdtp.kv.policy import KVPolicy


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` from whose layers ``evicted[l]`` prompt entries were removed."""

    evicted: list[int]

    @classmethod
    def adopt(cls, cache: Any) -> CompressedCache:
        """Turn the prefill's ``DynamicCache`` into a :class:`CompressedCache` in place (same object)."""
        if isinstance(cache, cls):
            return cache
        if type(cache) is not DynamicCache:
            raise NotImplementedError(f"KV compression supports DynamicCache, got {type(cache).__name__}")
        # Same object, so the caller's reference (e.g. generate()'s) sees the compressed cache.
        cache.__class__ = cls
        cache.evicted = [0] * len(cache.layers)
        return cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        evicted = self.evicted[layer_idx] if layer_idx < len(self.evicted) else 0
        return super().get_seq_length(layer_idx) + evicted

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[-2] != 1:
            # A multi-token extension needs a mask over the kept entries, which differ per head.
            raise NotImplementedError("a compressed KV cache supports token-by-token decoding only")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def compress_cache(
    cache: Any, policy: KVPolicy, scores: dict[int, torch.Tensor] | None = None
) -> list[tuple[int, int]]:
    """Keep ``policy.budget(T_l)`` entries of every layer, per KV head, in place.

    Args:
        cache: a ``DynamicCache`` right after prefill (layers may hold different lengths T_l); it
            becomes a :class:`CompressedCache` (same object).
        scores: layer -> (B, H_kv, T_l) importance (higher = keep). Layers without scores keep
            the most recent entries (StreamingLLM). Protected entries are always kept.
    Returns:
        (T_l before, T_l after) per layer.
    """
    cache = CompressedCache.adopt(cache)
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
        # Replacing the tensors is enough: HF's layers concatenate onto them, the engine's AppendLayer
        # notices the foreign tensors and moves them into a fresh buffer at its next update.
        layer.keys, layer.values = kept_keys, kept_values
        cache.evicted[idx] += length - keep.shape[1]
        sizes.append((length, keep.shape[1]))
    return sizes
