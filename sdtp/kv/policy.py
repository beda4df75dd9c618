"""What a KV-cache compression policy keeps: method, budget and the always-kept entries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sdtp.errors import ConfigError

KV_METHODS = ("h2o", "streaming", "snapkv")


@dataclass(frozen=True)
class KVPolicy:
    """Per-layer KV budget ``round(ratio * T)`` for a layer caching ``T`` entries.

    Attributes:
        method: ``h2o`` (accumulated attention of every prompt query), ``streaming`` (sinks +
            most recent entries) or ``snapkv`` (attention of the last ``window`` queries, pooled).
        ratio: kept fraction of each layer's cache, in (0, 1].
        keep_first: leading entries always kept (attention sinks), inside the budget.
        keep_recent: fraction of each layer's entries, at its end, always kept (inside the budget);
            the same first-4 + local-10% convention as the token pruning schedule.
        window: SnapKV observation window (last queries), always kept.
        kernel: SnapKV pooling kernel along the key axis (odd).
    """

    method: str
    ratio: float = 0.4
    keep_first: int = 4
    keep_recent: float = 0.1
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        if self.method not in KV_METHODS:
            raise ConfigError(f"kv.method: {self.method!r} not in {KV_METHODS} (use kv=none for no compression)")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"kv.ratio: {self.ratio} is outside (0, 1]")
        if self.keep_first < 0:
            raise ConfigError(f"kv.keep_first: must be >= 0, got {self.keep_first}")
        if not 0.0 <= self.keep_recent <= 1.0:
            raise ConfigError(f"kv.keep_recent: {self.keep_recent} is outside [0, 1]")
        if self.window < 1:
            raise ConfigError(f"kv.window: must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kv.kernel: must be an odd number >= 1, got {self.kernel}")

    def num_recent(self, length: int) -> int:
        recent = math.ceil(self.keep_recent * length - 1e-9)
        if self.method == "snapkv":
            recent = max(recent, self.window)  # SnapKV always keeps its observation window
        return min(length, recent)

    def protected(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(T,) bool: entries every head keeps (sinks and the recent tail)."""
        index = torch.arange(length, device=device)
        return (index < self.keep_first) | (index >= length - self.num_recent(length))

    def budget(self, length: int) -> int:
        """Entries kept out of ``length``; the protected ones alone may exceed ``ratio``."""
        protected = min(length, min(self.keep_first, length) + self.num_recent(length))
        return max(min(round(length * self.ratio), length), protected)


def build_kv_policy(cfg: Mapping[str, Any]) -> KVPolicy | None:
    """The policy of a primary config's ``kv`` group (None if absent or ``kv=none``)."""
    kv = cfg.get("kv")
    if kv is None or kv.get("method") in (None, "none"):
        return None
    known = {"method", "ratio", "keep_first", "keep_recent", "window", "kernel"}
    return KVPolicy(**{key: kv[key] for key in known if kv.get(key) is not None})
