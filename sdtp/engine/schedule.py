"""Pruning schedule: at which decoder layers tokens are dropped and how many survive.

Stage ``s`` (1-based) runs just *before* decoder layer ``layers[s-1]`` and keeps
``round(N * keep_fractions[s-1])`` of the original ``N`` prompt tokens (protected tokens
included in that budget). The paper's default is geometric: ``keep_fractions[s-1] = r**s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdtp.checks import integer, number
from sdtp.engine.selection import kept_count, protected_count, recent_count
from sdtp.errors import ConfigError

POSITION_MODES = ("original", "renumber")


@dataclass(frozen=True)
class PruningSchedule:
    """A validated multi-stage pruning schedule.

    Attributes:
        layers: sorted, unique 0-based decoder-layer indices; pruning happens before each.
        keep_fractions: cumulative kept fraction of the original prompt after each stage,
            non-increasing, each in (0, 1].
        keep_first: number of leading tokens always kept (attention sinks).
        keep_recent: fraction of the prompt, at its end, always kept (the last token always is).
        position_ids: ``original`` keeps prompt positions for RoPE, ``renumber`` uses 0..k-1.
    """

    layers: tuple[int, ...]
    keep_fractions: tuple[float, ...]
    keep_first: int = 4
    keep_recent: float = 0.1
    position_ids: str = "original"

    def validate(self, num_layers: int) -> None:
        """Raise :class:`ConfigError` naming the key if the schedule does not fit the model."""
        if not self.layers:
            raise ConfigError("pruning.layers: the schedule has no stage")
        bad = [layer for layer in self.layers if not 1 <= layer < num_layers]
        if bad:
            # Layer 0 is excluded: its cache length is what decoding uses as the prompt length.
            raise ConfigError(
                f"pruning.layers: {bad} out of range for a {num_layers}-layer model "
                f"(valid stage layers are 1..{num_layers - 1})"
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"pruning.layers: must be strictly increasing, got {list(self.layers)}")
        if len(self.keep_fractions) != len(self.layers):
            raise ConfigError(
                f"pruning.keep_ratio: {len(self.keep_fractions)} ratios for {len(self.layers)} stage layers"
            )
        for value in self.keep_fractions:
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"pruning.keep_ratio: {value} is outside (0, 1]")
        if any(b > a + 1e-12 for a, b in zip(self.keep_fractions, self.keep_fractions[1:])):
            raise ConfigError(f"pruning.keep_ratio: cumulative fractions must not increase: {self.keep_fractions}")
        if self.keep_first < 0:
            raise ConfigError(f"pruning.keep_first: must be >= 0, got {self.keep_first}")
        if not 0.0 <= self.keep_recent <= 1.0:
            raise ConfigError(f"pruning.keep_recent: {self.keep_recent} is outside [0, 1]")
        if self.position_ids not in POSITION_MODES:
            raise ConfigError(f"pruning.position_ids: {self.position_ids!r} not in {POSITION_MODES}")

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def stage_of_layer(self) -> dict[int, int]:
        """Map stage layer index -> 0-based stage number."""
        return {layer: stage for stage, layer in enumerate(self.layers)}

    def num_recent(self, seq_len: int) -> int:
        """Number of protected tokens at the end of a ``seq_len``-token prompt: at least the last one (its hidden
        state yields the next-token logits), also with ``keep_recent=0``."""
        return max(recent_count(self.keep_recent, seq_len), min(seq_len, 1))

    def num_protected(self, seq_len: int) -> int:
        return protected_count(seq_len, self.keep_first, self.num_recent(seq_len))

    def budget(self, stage: int, seq_len: int) -> int:
        """Tokens alive after ``stage`` (0-based) for a ``seq_len``-token prompt.

        Protected tokens count inside the budget; if they alone exceed it they are all kept.
        """
        return kept_count(seq_len, self.keep_fractions[stage], self.num_protected(seq_len))

    def tokens_per_layer(self, seq_len: int, num_layers: int) -> list[int]:
        """How many prompt tokens each decoder layer processes during prefill."""
        counts, alive = [], seq_len
        stage_of = self.stage_of_layer()
        for layer in range(num_layers):
            if layer in stage_of:
                alive = min(alive, self.budget(stage_of[layer], seq_len))
            counts.append(alive)
        return counts

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], num_layers: int) -> PruningSchedule:
        """Build and validate from a ``pruning`` config node (see ``conf/pruning/_schedule.yaml``)."""
        layers = _stage_layers(cfg)
        fractions = _keep_fractions(cfg.get("keep_ratio", 0.9), len(layers))
        schedule = cls(
            layers=tuple(layers),
            keep_fractions=fractions,
            keep_first=integer(cfg.get("keep_first", 4), "pruning.keep_first"),
            keep_recent=number(cfg.get("keep_recent", 0.1), "pruning.keep_recent"),
            position_ids=str(cfg.get("position_ids", "original")),
        )
        schedule.validate(num_layers)
        return schedule


def _stage_layers(cfg: Mapping[str, Any]) -> list[int]:
    if cfg.get("layers") is not None:
        layers = cfg["layers"]
        if isinstance(layers, int | float | str | bool):
            raise ConfigError(f"pruning.layers: expected a list of layer indices, got {layers!r}")
        return [integer(x, f"pruning.layers[{i}]") for i, x in enumerate(layers)]
    for key in ("first_layer", "layer_step", "num_stages"):
        if cfg.get(key) is None:
            raise ConfigError(f"pruning.{key}: required when pruning.layers is not given")
    first, step, stages = (integer(cfg[key], f"pruning.{key}") for key in ("first_layer", "layer_step", "num_stages"))
    if step < 1:
        raise ConfigError(f"pruning.layer_step: must be >= 1, got {step}")
    if stages < 1:
        raise ConfigError(f"pruning.num_stages: must be >= 1, got {stages}")
    return [first + i * step for i in range(stages)]


def _keep_fractions(keep_ratio: Any, num_stages: int) -> tuple[float, ...]:
    """r -> (r, r^2, ...) or an explicit list of cumulative fractions (checked in ``validate``)."""
    if isinstance(keep_ratio, str | bool | int | float) or keep_ratio is None:
        r = number(keep_ratio, "pruning.keep_ratio")
        if not 0.0 < r <= 1.0:
            raise ConfigError(f"pruning.keep_ratio: {r} is outside (0, 1]")
        return tuple(r ** (s + 1) for s in range(num_stages))
    if not isinstance(keep_ratio, Iterable):
        raise ConfigError(f"pruning.keep_ratio: expected a number or a list, got {keep_ratio!r}")
    return tuple(number(x, f"pruning.keep_ratio[{i}]") for i, x in enumerate(keep_ratio))
