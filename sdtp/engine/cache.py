"""The (ragged, per-layer) KV cache a pruned prefill leaves behind: inspection, row selection, an in-place layout."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, StaticLayer


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


def select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache whose row ``j`` is row ``rows[j]`` of ``cache`` (rows may repeat); ``cache`` stays intact.

    Each layer is shallow-copied and HF's own ``batch_select_indices`` then replaces the copy's
    keys/values (B, H_kv, T_l, hd) by indexed, i.e. new, (B', H_kv, T_l, hd) tensors: later appends
    to the result never write into ``cache``, so it can serve further selections.

    Args:
        rows: (B',) long indices into the cache's batch axis.
    """
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


class AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer with headroom, so appending is in place.

    HF's ``DynamicLayer.update`` concatenates, i.e. copies the whole layer cache at every decode
    step. Here ``keys``/``values`` are views ``buffer[..., :length, :]`` of (B, H_kv, capacity, hd)
    buffers; a new token is written into the next free slot and the buffer is reallocated (with
    ``headroom`` more slots) only when full. Anything that replaces ``keys`` (crop, batch select,
    beam reorder) is picked up at the next update, which then copies into a fresh buffer.
    """

    def __init__(self, headroom: int = 128) -> None:
        super().__init__()
        self.headroom = max(int(headroom), 1)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        buffer = self._key_buffer
        return buffer is not None and self.keys is not None and self.keys.data_ptr() == buffer.data_ptr() \
            and self.values.data_ptr() == self._value_buffer.data_ptr()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        if not self._owns_views() or total > self._key_buffer.shape[-2]:
            shape = (*key_states.shape[:-2], total + self.headroom, key_states.shape[-1])
            keys, values = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                keys[..., :length, :].copy_(self.keys)
                values[..., :length, :].copy_(self.values)
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[..., length:total, :].copy_(key_states)
        self._value_buffer[..., length:total, :].copy_(value_states)
        self.keys = self._key_buffer[..., :total, :]
        self.values = self._value_buffer[..., :total, :]
        return self.keys, self.values


def appendable_cache(model: Any, headroom: int = 128) -> DynamicCache:
    """An empty cache for ``model`` whose layers append in place (see :class:`AppendLayer`).

    Falls back to HF's own ``DynamicCache`` layers for models with sliding-window or other
    special layer types, which :class:`AppendLayer` does not implement.
    """
    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [AppendLayer(headroom) for _ in cache.layers]
    return cache


def unslide(cache: Any) -> None:
    """Replace the empty sliding-window layers of ``cache`` by plain ``DynamicLayer``s, in place.

    HF's ``DynamicSlidingWindowLayer`` keeps the last ``window - 1`` *slots*. After token pruning the
    slots of a layer are the kept tokens, whose original positions have gaps, so the last slots are
    not the window; and HF builds later masks over a contiguous range of cache positions, which the
    pruned layers' caches do not hold. Keeping every kept token leaves each layer's keys in the
    prompt's column space, where the engine slices HF's own window mask (:mod:`sdtp.models.layer_types`).
    When the prefill returns, the entries outside every later query's window are dropped
    (:mod:`sdtp.engine.window`), so a sliding layer ends up caching no more than HF's ``window - 1``.
    """
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            if layer.is_initialized and layer.get_seq_length():
                raise ValueError("unslide: the cache already holds tokens; it must be empty before the prefill")
            cache.layers[index] = DynamicLayer()


def refuse_static(cache: Any) -> None:
    """Raise if ``cache`` has fixed-size layers (``StaticCache``, ``cache_implementation="static"``).

    A static layer writes each token at its cache position in a buffer sized for the whole sequence, while a
    pruned layer caches fewer tokens than the prompt has columns: the two cannot line up (HF failed later with
    a bare shape mismatch). Pruning needs a cache that appends, like ``DynamicCache``.
    """
    layers = getattr(cache, "layers", None) or []
    if any(isinstance(layer, StaticLayer) for layer in layers):
        raise ValueError(f"token pruning needs a dynamic KV cache, got {type(cache).__name__} with fixed-size layers "
                         "(cache_implementation='static' is not supported); pass a DynamicCache or none")

