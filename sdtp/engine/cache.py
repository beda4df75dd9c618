"""Inspect the (ragged, per-layer) KV cache a pruned prefill leaves behind."""

from __future__ import annotations

from typing import Any


def _layer_keys_values(cache: Any):
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is not None and values is not None:
            yield keys, values


def cache_lengths(cache: Any) -> list[int]:
    """Cached tokens per layer (keys are (B, H_kv, T, hd))."""
    return [int(keys.shape[-2]) for keys, _ in _layer_keys_values(cache)]


def cache_bytes(cache: Any) -> int:
    """Bytes held by keys and values across all layers."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in _layer_keys_values(cache))
