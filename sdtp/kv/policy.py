"""What a KV-cache compression policy keeps: its score, budget and the always-kept entries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra
import torch

from sdtp.engine.selection import kept_count, protected_count, protected_mask, recent_count
from sdtp.errors import ConfigError
from sdtp.kv.scores import AccumulatedAttention, KVScore, WindowAttention
from sdtp.targets import import_target

KV_METHODS = ("h2o", "streaming", "snapkv")


@dataclass(frozen=True)
class KVPolicy:
    """Per-layer KV budget ``round(ratio * T)`` for a layer caching ``T`` entries.

    Attributes:
        method: ``h2o`` (accumulated attention of every prompt query), ``streaming`` (sinks +
            most recent entries) or ``snapkv`` (attention of the last ``window`` queries, pooled);
            with ``score`` set, any other name (the label runs and reports show).
        ratio: kept fraction of each layer's cache, in (0, 1].
        keep_first: leading entries always kept (attention sinks), inside the budget.
        keep_recent: fraction of each layer's entries, at its end, always kept (inside the budget);
            the same first-4 + local-10% convention as the token pruning schedule.
        window: SnapKV observation window (last queries), always kept.
        kernel: SnapKV pooling kernel along the key axis (odd).
        score: your own :class:`~sdtp.kv.scores.KVScore` (``kv.score._target_``); None = the built-in
            ``method``'s.
        layer_ratios: one kept fraction per decoder layer in (0, 1], overriding ``ratio`` layer by layer
            (``+kv.layer_ratios=[...]``): e.g. PyramidKV's budgets shrinking with depth, or a token-pruning
            schedule's tokens per layer, so a KV policy gets the same per-layer cache as a pruned prefill.
            None = ``ratio`` everywhere.
        per_head: each KV head keeps its own top entries (H2O, SnapKV); False (``+kv.per_head=false``) keeps
            one set per layer for all heads, ranked by the score summed over heads, i.e. token-level
            eviction as a token pruner does it (an ablation of the selection's granularity).
        nested: each layer keeps only entries the layer before kept (``+kv.nested=true``): an entry evicted at
            layer ``l`` stays evicted deeper, the constraint physical token pruning works under (an ablation;
            a layer's budget is capped at the layer before's, so give non-increasing ``layer_ratios``).
    """

    method: str
    ratio: float = 0.4
    keep_first: int = 4
    keep_recent: float = 0.1
    window: int = 32
    kernel: int = 5
    score: KVScore | None = None
    layer_ratios: tuple[float, ...] | None = None
    per_head: bool = True
    nested: bool = False

    def __post_init__(self) -> None:
        if self.score is None and self.method not in KV_METHODS:
            raise ConfigError(f"kv.method: {self.method!r} not in {KV_METHODS} (use kv=none for no compression, "
                              "or set kv.score._target_ to your own sdtp.kv.scores.KVScore)")
        if self.score is not None and self.method in (*KV_METHODS, "none"):
            raise ConfigError(f"kv.method: {self.method!r} names a built-in policy; give a policy with its own "
                              "kv.score a name of its own")
        if self.score is not None and not isinstance(self.score, KVScore):
            raise ConfigError(f"kv.score: {type(self.score).__name__} is not a sdtp.kv.scores.KVScore")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"kv.ratio: {self.ratio} is outside (0, 1]")
        layers = self.layer_ratios
        if layers is not None and (not layers or not all(0.0 < r <= 1.0 for r in layers)):
            raise ConfigError(f"kv.layer_ratios: {list(layers)} must be a non-empty list of ratios in (0, 1]")
        if self.keep_first < 0:
            raise ConfigError(f"kv.keep_first: must be >= 0, got {self.keep_first}")
        if not 0.0 <= self.keep_recent <= 1.0:
            raise ConfigError(f"kv.keep_recent: {self.keep_recent} is outside [0, 1]")
        if self.window < 1:
            raise ConfigError(f"kv.window: must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kv.kernel: must be an odd number >= 1, got {self.kernel}")

    @property
    def statistic(self) -> KVScore | None:
        """What entries are ranked by: ``score``, or the built-in method's (None: recency, ``streaming``)."""
        if self.score is not None:
            return self.score
        if self.method == "h2o":
            return AccumulatedAttention()
        return WindowAttention(self.window, self.kernel) if self.method == "snapkv" else None

    def num_recent(self, length: int) -> int:
        recent = recent_count(self.keep_recent, length)
        statistic = self.statistic
        if statistic is not None:  # e.g. SnapKV always keeps its observation window
            recent = min(length, max(recent, statistic.recent))
        return recent

    def protected(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(T,) bool: entries every head keeps (sinks and the recent tail)."""
        index = torch.arange(length, device=device)[None]
        return protected_mask(index, length, self.keep_first, self.num_recent(length))[0]

    def layer_ratio(self, layer: int | None) -> float:
        """Kept fraction of decoder layer ``layer`` (None: ``ratio``)."""
        return self.ratio if self.layer_ratios is None or layer is None else self.layer_ratios[layer]

    def check_layers(self, num_layers: int) -> None:
        """ConfigError unless ``layer_ratios`` (if set) has one ratio per decoder layer."""
        if self.layer_ratios is not None and len(self.layer_ratios) != num_layers:
            raise ConfigError(f"kv.layer_ratios: {len(self.layer_ratios)} ratios for a model with {num_layers} layers")

    def budget(self, length: int, layer: int | None = None) -> int:
        """Entries kept out of ``length`` in ``layer``; the protected ones alone may exceed its ratio."""
        protected = protected_count(length, self.keep_first, self.num_recent(length))
        return kept_count(length, self.layer_ratio(layer), protected)


def kv_enabled(cfg: Mapping[str, Any]) -> bool:
    """Whether a primary config compresses the KV cache (a ``kv`` group other than ``kv=none``), without
    building the policy (so a score of your own is not instantiated just to ask)."""
    kv = cfg.get("kv")
    return kv is not None and kv.get("method") not in (None, "none")


def build_kv_policy(cfg: Mapping[str, Any]) -> KVPolicy | None:
    """The policy of a primary config's ``kv`` group (None if absent or ``kv=none``)."""
    if not kv_enabled(cfg):
        return None
    kv = cfg["kv"]
    known = {"method", "ratio", "keep_first", "keep_recent", "window", "kernel", "per_head", "nested"}
    layers = kv.get("layer_ratios")
    policy = KVPolicy(**{key: kv[key] for key in known if kv.get(key) is not None}, score=build_kv_score(kv),
                      layer_ratios=None if layers is None else tuple(float(r) for r in layers))
    model = cfg.get("model") or {}
    if model.get("num_layers") is not None:  # checked again against the loaded model (KVCompressor)
        policy.check_layers(int(model["num_layers"]))
    return policy


def build_kv_score(kv: Mapping[str, Any]) -> KVScore | None:
    """The ``kv.score`` node's :class:`KVScore`, its class checked before it is built (None if absent)."""
    node = kv.get("score")
    if node is None:
        return None
    if "_target_" not in node:
        raise ConfigError("kv.score._target_: missing (which KVScore class to build)")
    import_target("kv.score._target_", str(node["_target_"]), KVScore)
    return hydra.utils.instantiate(node)
