"""Evict entries from a Hugging Face ``DynamicCache`` while keeping positions and masks right.

After eviction a layer holds fewer entries than the prompt had, but the model derives the
position of the next token from ``cache.get_seq_length()``. :class:`CompressedCache` therefore
reports the *logical* length (stored + evicted) at the cache level, and sizes the attention mask
HF builds to that logical length too (:meth:`CompressedCache.get_mask_sizes`), i.e. in the same
column space an uncompressed (or token-pruned) cache would have. Every layer object (HF's
``DynamicLayer`` or the engine's in-place ``AppendLayer``) keeps its own *physical* length, which
is what layer appends use.

Each layer remembers which of its pre-compression entries every KV head kept
(:attr:`CompressedCache.kept`). :meth:`CompressedCache.layer_mask` gathers a layer's mask down to
those entries per head, plus every entry appended after the prefill:
:class:`sdtp.kv.compressor.KVCompressor` does so in a pre-hook on each attention module. Decode
steps and blocks of several new tokens alike (the continuation of an lm-eval request) are then
attended exactly: kept prompt entries as the mask allows them, new tokens causally. A block of
new tokens is accepted only when its mask was gathered so (:meth:`CompressedCache.update`);
single tokens without a mask (HF's SDPA decode) need none. Decoding continues at positions N,
N+1, ... with plain ``model(input_ids=token, **cache_kwargs(cache))`` calls (ours, HF
``generate()``; the keyword is ``past_key_values`` before transformers 5.24, ``cache`` from 5.24:
``sdtp.models.compat``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from transformers import DynamicCache

from sdtp.engine.selection import select_kept
from sdtp.kv.policy import KVPolicy


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` from whose layers ``evicted[l]`` prompt entries were removed.

    Attributes:
        evicted: entries removed from each layer.
        kept: per layer, (B, H_kv, k_l) long indices of the entries each KV head kept among the
            layer's ``source_lengths[l]`` pre-compression entries (ascending), None if not compressed.
        source_lengths: entries each layer held before compression.
    """

    evicted: list[int]
    kept: list[torch.Tensor | None]
    source_lengths: list[int]
    _masked_layer: int | None

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
        cache.kept = [None] * len(cache.layers)
        cache.source_lengths = [0] * len(cache.layers)
        cache._masked_layer = None
        return cache

    def _evicted(self, layer_idx: int) -> int:
        return self.evicted[layer_idx] if layer_idx < len(self.evicted) else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) + self._evicted(layer_idx)

    def get_mask_sizes(self, query: Any, layer_idx: int = 0, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """HF's (kv_length, kv_offset) in the logical column space (stored + evicted + new).

        ``query`` is the query length (transformers 5.24) or the cache positions (earlier 5.x):
        whatever the installed version passes, the layer answers and the evicted count is added.
        """
        kv_length, kv_offset = super().get_mask_sizes(query, layer_idx, *args, **kwargs)
        return kv_length + self._evicted(layer_idx), kv_offset

    def key_columns(self, layer_idx: int, new: int) -> torch.Tensor:
        """(B, H_kv, k_l + t + new) columns of the layer's logical key axis that its physical entries hold.

        The kept prompt entries first (per head), then the ``t`` entries appended since the
        prefill and the ``new`` ones about to be appended, which every head holds.
        """
        kept = self.kept[layer_idx]
        stored = self.layers[layer_idx].keys.shape[-2]
        source = self.source_lengths[layer_idx]
        appended = torch.arange(source, source + stored - kept.shape[-1] + new, device=kept.device)
        return torch.cat([kept, appended.expand(*kept.shape[:2], -1)], dim=-1)

    def layer_mask(self, mask: torch.Tensor, layer_idx: int, heads: int) -> torch.Tensor:
        """A 4D mask over the layer's logical keys (B or 1, 1, Q, K) gathered to its physical entries.

        Args:
            mask: bool (True = attend) or additive float, K = ``source_lengths[l]`` + entries
                appended since + Q new ones.
            heads: the attention module's query heads (a multiple of the KV heads).
        Returns:
            (B, heads, Q, k_l + t + Q): each query head sees its KV head's kept entries; marks the
            layer so :meth:`update` accepts a block of Q > 1 new entries.
        """
        columns = self.key_columns(layer_idx, mask.shape[-2])  # (B, H_kv, K')
        batch, kv_heads, width = columns.shape
        expected = self.source_lengths[layer_idx] + columns.shape[-1] - self.kept[layer_idx].shape[-1]
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != expected:
            raise NotImplementedError(f"layer {layer_idx}: expected a (B, 1, Q, {expected}) attention mask over the "
                                      f"logical keys, got {tuple(mask.shape)}")
        queries = mask.shape[2]
        mask = mask.expand(batch, kv_heads, queries, mask.shape[-1])
        gathered = mask.gather(3, columns[:, :, None, :].expand(batch, kv_heads, queries, width))
        self._masked_layer = layer_idx
        return gathered.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads KV head h // groups

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        masked, self._masked_layer = self._masked_layer == layer_idx, None
        compressed = layer_idx < len(self.kept) and self.kept[layer_idx] is not None
        if key_states.shape[-2] != 1 and compressed and not masked:
            # A block needs a mask over the kept entries (which differ per head) and causal among
            # the new tokens: the KVCompressor's attention hooks build it (layer_mask).
            raise NotImplementedError("a block of new tokens on a compressed KV cache needs the attention mask "
                                      "gathered by the KVCompressor's hooks (run it inside `with KVCompressor(...)`, "
                                      "with an attention mask); without them it is decoded token by token only")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Select rows of every layer and of the kept indices (``sdtp.engine.cache.select_rows``)."""
        super().batch_select_indices(indices)
        self.kept = [None if kept is None else kept.index_select(0, indices.to(kept.device)) for kept in self.kept]


def compress_cache(
    cache: Any, policy: KVPolicy, scores: dict[int, torch.Tensor] | None = None,
    layers: Collection[int] | None = None,
) -> list[tuple[int, int]]:
    """Keep ``policy.budget(T_l, l)`` entries of every layer ``l`` in ``layers``, per KV head (or one set for all
    heads, ``policy.per_head=False``), in place.

    Args:
        cache: a ``DynamicCache`` right after prefill (layers may hold different lengths T_l); it
            becomes a :class:`CompressedCache` (same object).
        scores: layer -> (B, H_kv, T_l) importance (higher = keep). Layers without scores keep
            the most recent entries (StreamingLLM). Protected entries are always kept.
        layers: the layers to compress (None = all); the others are left as they are (a sliding-window
            layer, whose window bounds its cache), and ``policy.nested`` chains the compressed ones.
    Returns:
        (T_l before, T_l after) per layer.
    """
    cache = CompressedCache.adopt(cache)
    sizes = []
    previous: torch.Tensor | None = None  # (B, H_kv, k) the last compressed layer's kept entries (policy.nested)
    previous_length = 0  # and how many it held before
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # (B, H_kv, T, hd)
        batch, heads, length, _ = keys.shape
        if layers is not None and idx not in layers:
            sizes.append((length, length))
            continue
        budget = policy.budget(length, idx)
        score = scores.get(idx) if scores else None
        if score is None:
            score = torch.arange(length, device=keys.device, dtype=torch.float32).expand(batch, heads, -1)
        elif not policy.per_head:  # one token set per layer: every head keeps the entries of the summed score
            score = score.sum(dim=1, keepdim=True).expand(-1, heads, -1)
        if policy.nested and previous is not None:
            score = _within(score, previous, previous_length, length)
            budget = min(budget, previous.shape[-1])
        protected = policy.protected(length, keys.device).expand(batch * heads, -1)
        keep = select_kept(score.reshape(batch * heads, length), protected, budget)  # (B*H_kv, k) sorted
        index = keep.view(batch, heads, -1, 1)
        kept_keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        kept_values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        # Replacing the tensors is enough: HF's layers concatenate onto them, the engine's AppendLayer
        # notices the foreign tensors and moves them into a fresh buffer at its next update.
        layer.keys, layer.values = kept_keys, kept_values
        cache.evicted[idx] += length - keep.shape[1]
        cache.kept[idx] = previous = index[..., 0]
        cache.source_lengths[idx] = previous_length = length
        sizes.append((length, keep.shape[1]))
    return sizes


def _within(score: torch.Tensor, previous: torch.Tensor, previous_length: int, length: int) -> torch.Tensor:
    """``score`` (B, H_kv, T) with -inf at every entry outside ``previous`` (B, H_kv, k), the layer before's kept
    entries, so that only those can be kept (``policy.nested``; protected entries are among them)."""
    if previous_length != length:
        raise ValueError(f"kv.nested: layers cache {previous_length} and {length} prompt entries (a pruned prefill); "
                         "nest the policy over a dense prefill")
    allowed = torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(2, previous, True)
    return score.float().masked_fill(~allowed, float("-inf"))
