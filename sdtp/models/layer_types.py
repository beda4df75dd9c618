"""Which attention each decoder layer runs: full causal, or causal within a sliding window.

Gemma3 interleaves sliding-window layers (local RoPE base) with global ones (``config.layer_types``);
Qwen2/Qwen3 may (``use_sliding_window``); Mistral with a ``sliding_window`` slides in every layer. HF
gives every layer the mask and RoPE tables of its own kind, so the pruning engine slices them per kind.

After pruning, a sliding window is measured in the kept tokens' **original** positions: a query at
position q sees the kept keys at positions p with ``q - window < p <= q``, as the unpruned model would
see them, minus the dropped tokens (not the last ``window`` *kept* tokens).
"""

from __future__ import annotations

from typing import Any

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


def layer_kinds(config: Any) -> tuple[str, ...]:
    """The attention kind of every decoder layer (``FULL`` or ``SLIDING``), in order."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(types)
    kind = SLIDING if getattr(config, "sliding_window", None) is not None else FULL
    return (kind,) * int(config.num_hidden_layers)


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """The sliding window of every decoder layer, in order (None for full causal attention)."""
    window = getattr(config, "sliding_window", None)
    return tuple(window if kind == SLIDING else None for kind in layer_kinds(config))


def visible_keys(offset: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys a query sees, from ``offset`` = query position - key position (any shape): causal, and
    within ``window`` when given (HF's rule: ``offset < window``). Positions are original ones."""
    return (offset >= 0) & (offset < window) if window is not None else offset >= 0


def has_sliding_layers(config: Any) -> bool:
    return SLIDING in layer_kinds(config)
