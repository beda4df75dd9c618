"""Hooks that gather attention statistics during prefill and compress the cache at its end.

``with KVCompressor(policy)(model): ...`` installs a forward hook on every decoder layer's
attention and one on the base model. During a prefill (empty cache at the start), each attention
hook hands the policy's score (:mod:`sdtp.kv.scores`) the layer's input and cache
(:class:`~sdtp.kv.scores.LayerPrefill`), which reduces them to one importance per cached entry and
KV head; attention is re-projected from the layer's own modules when a score needs it, never
materialised beyond one query chunk:

* ``h2o``: attention accumulated over every prompt query (causal), chunked over queries;
* ``snapkv``: attention of the last ``window`` queries, average-pooled along the key axis;
* ``streaming``: no statistic, recency only;
* your own ``kv.score``: whatever its ``__call__`` computes.

When the base model's forward returns, :func:`compress_cache` cuts every (full-attention) layer. With a token
pruner active, each layer's statistics cover exactly the tokens that reached it, so the policy
applies "to whatever the pruned prefill left".

Later forwards on the compressed cache (decode steps, or a block of continuation tokens scored at
once) keep their computation; a pre-hook on every attention module only gathers the attention
mask, which HF builds over the logical key axis, down to the entries each KV head holds
(:meth:`sdtp.kv.cache.CompressedCache.layer_mask`). It runs after the token pruner's decoder-layer
hooks, which have sliced the same mask to the tokens that reached the layer, so both compose.

On models with sliding-window layers (Gemma3's interleaved local layers, Qwen2 with
``use_sliding_window``), only the full-attention layers are compressed: a sliding layer's cache is
bounded by its window already (HF keeps its last ``window - 1`` entries; under a token pruner, every
token that reached it, of which its mask shows the window). A model whose every layer slides
(Mistral v0.1) has nothing to compress and is refused. ``kv.layer_ratios`` still gives one ratio per
decoder layer; a sliding layer's is unused.

Prefills must not be left-padded: the budget, the protected first and recent entries and H2O's
statistics are per row of the prompt, and padding would count as prompt. A padded prefill is
refused (``NotImplementedError``); batch prompts of equal length, or one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from sdtp.kv.cache import CompressedCache, compress_cache
from sdtp.kv.policy import KVPolicy
from sdtp.kv.scores import KVScore, LayerPrefill
from sdtp.models import decoder_layers
from sdtp.models.compat import cache_from_kwargs, output_cache
from sdtp.models.layer_types import FULL, layer_kinds
from sdtp.utils import hook_owner


def kv_compression(policy: KVPolicy | None, model: nn.Module) -> AbstractContextManager:
    """``with kv_compression(build_kv_policy(cfg), model): ...`` -- a no-op when ``policy`` is None (kv=none)."""
    return KVCompressor(policy)(model) if policy is not None else nullcontext()


def full_attention_layers(model: nn.Module, component: str) -> frozenset[int]:
    """Indices of ``model``'s full-attention decoder layers; NotImplementedError naming ``component`` if none."""
    kinds = layer_kinds(model.config)
    full = frozenset(idx for idx, kind in enumerate(kinds) if kind == FULL)
    if not full:
        raise NotImplementedError(f"{component} compresses full-attention layers, and every layer of "
                                  f"{model.config.model_type!r} is a sliding-window one (window "
                                  f"{model.config.sliding_window}), whose cache its window bounds already")
    return full


class KVCompressor:
    """Compress the KV cache after every prefill of the wrapped model by ``policy``."""

    def __init__(self, policy: KVPolicy) -> None:
        self.policy = policy
        self.last_sizes: list[tuple[int, int]] = []  # (entries before, after) per layer
        self.entries_before = 0  # summed over the compressed layers and every prefill since construction
        self.entries_after = 0
        self._scores: dict[int, torch.Tensor] = {}
        self._prefill = False
        self._layers: frozenset[int] = frozenset()  # the full-attention layers: the ones compressed

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[KVCompressor]:
        self._layers = full_attention_layers(model, f"KV compression (kv={self.policy.method})")
        self.policy.check_layers(len(decoder_layers(model)))
        base = model.base_model
        handles = [
            base.register_forward_pre_hook(self._on_start, with_kwargs=True),
            base.register_forward_hook(self._on_end, with_kwargs=True),
        ]
        statistic = self.policy.statistic
        for idx, layer in enumerate(decoder_layers(model)):
            if idx not in self._layers:
                continue
            handles.append(layer.self_attn.register_forward_pre_hook(self._make_mask_hook(idx), with_kwargs=True))
            if statistic is not None:  # None: recency only, nothing to gather
                hook = self._make_attn_hook(idx, statistic)
                handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._scores = {}

    @staticmethod
    def installed_on(model: nn.Module) -> bool:
        """Whether a KVCompressor's hooks are on ``model`` now (inside ``with KVCompressor(policy)(model)``).

        Read from the base model's forward hooks, which ``__call__`` registers and removes on exit
        (:func:`sdtp.utils.hook_owner`).
        """
        return hook_owner(model.base_model._forward_hooks.values(), KVCompressor) is not None

    @property
    def kept_fraction(self) -> float | None:
        """Cache entries kept / entries the prefills left in the compressed (full-attention) layers, over every
        prefill so far (None before any)."""
        return self.entries_after / self.entries_before if self.entries_before else None

    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_from_kwargs(kwargs)
        self._prefill = cache is None or cache.get_seq_length() == 0
        self._scores = {}
        mask = kwargs.get("attention_mask")
        if self._prefill and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise NotImplementedError("KV compression of a left-padded prefill: the budgets and statistics would "
                                      "count the padding as prompt; prefill prompts of equal length together")

    def _on_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._prefill:
            return
        cache = output_cache(output)
        if cache is None:
            raise RuntimeError("KV compression needs the prefill cache: run the model with use_cache=True")
        self.last_sizes = compress_cache(cache, self.policy, self._scores, self._layers)
        # Only the compressed layers count: a sliding layer's length depends on whether a token pruner has
        # trimmed it to its window yet (the nesting order of the two hooks), not on the policy.
        compressed = [sizes for idx, sizes in enumerate(self.last_sizes) if idx in self._layers]
        self.entries_before += sum(before for before, _ in compressed)
        self.entries_after += sum(after for _, after in compressed)
        self._scores, self._prefill = {}, False

    def _make_mask_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            cache = cache_from_kwargs(kwargs)
            mask = kwargs.get("attention_mask")
            if not isinstance(cache, CompressedCache) or cache.kept[idx] is None or mask is None:
                return None  # prefill, or a single query over an unmasked cache (attends everything)
            if not isinstance(mask, torch.Tensor):
                raise NotImplementedError(f"attention mask of type {type(mask).__name__} on a compressed KV cache")
            heads = module.config.num_attention_heads
            return args, {**kwargs, "attention_mask": cache.layer_mask(mask, idx, heads)}

        return hook

    def _make_attn_hook(self, idx: int, statistic: KVScore):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            cache = cache_from_kwargs(kwargs)
            if not self._prefill or cache is None:  # no cache: _on_end reports it
                return
            cos, sin = kwargs["position_embeddings"]
            layer = cache.layers[idx]  # exactly this prefill's tokens
            prefill = LayerPrefill(idx, module, args[0] if args else kwargs["hidden_states"], cos, sin,
                                   layer.keys, layer.values)
            score = statistic(prefill)
            if score.shape != layer.keys.shape[:3]:
                raise ValueError(f"kv.score {type(statistic).__name__} returned shape {tuple(score.shape)} at layer "
                                 f"{idx}; expected (B, H_kv, T) = {tuple(layer.keys.shape[:3])}")
            self._scores[idx] = score

        return hook
