"""Trim a pruned prefill's sliding-window layers to the entries their window can still show.

Under the token pruner every sliding cache layer is a plain ``DynamicLayer`` holding all its kept
tokens (:func:`sdtp.engine.cache.unslide`), so that masks can be sliced in original positions. Most
of those entries are dead once the prompt is in: a query at position q >= L (every later token of a
row of real length L) sees keys at positions p > q - window (HF's rule), so an entry at p <= L - window
is never attended again. :func:`trim_to_window` drops them when the prefill returns, leaving at most
``window - 1`` entries per row, as HF's own ``DynamicSlidingWindowLayer`` keeps after a dense prefill.
Decode steps (and lm-eval continuations) append to these layers, so after every such forward the same rule
is applied again for the next query (:func:`with_decoded` adds the appended entries to the layout first):
the layers stay within ``window - 1`` entries, as HF's dense ones do, instead of growing by one per token.
This changes no logit (``tests/test_window.py``); it only frees memory and attention work.

A trimmed layer becomes a :class:`WindowedLayer`, which adds the dropped count to its reported length:
HF reads the past length from layer 0 (a sliding layer in Gemma3) and sizes each kind's mask from its
first layer, both in the prompt's logical column space, which must not move. The entries each trimmed
layer still holds are recorded in :attr:`sdtp.engine.pruner.PrefillRecord.cached_positions`, by which
later forwards slice the mask's key axis; ``layer_positions`` keeps meaning what *reached* the layer.
What a layer holds after decode trims is in :attr:`sdtp.engine.pruner.PrefillRecord.decode_layouts`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class WindowedLayer(DynamicLayer):
    """A ``DynamicLayer`` from which ``dropped`` leading entries were removed; reports the logical length."""

    dropped: int

    @classmethod
    def adopt(cls, layer: DynamicLayer, dropped: int) -> WindowedLayer:
        """Turn ``layer`` into a :class:`WindowedLayer` in place (same object, so every holder sees it)."""
        if not isinstance(layer, cls):
            layer.__class__ = cls
            layer.dropped = 0
        layer.dropped += dropped
        return layer

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped


def live_in_window(positions: torch.Tensor, valid: torch.Tensor | None, lengths: torch.Tensor,
                   window: int) -> torch.Tensor:
    """(B, k) bool: cached entries a later query can still see.

    Args:
        positions: (B, k) original positions of a layer's cached entries (masked slots: -1).
        valid: (B, k) bool real-token slots (None: all real).
        lengths: (B,) real prompt length of each row; later queries sit at positions >= L.
    """
    live = positions > (lengths - window).unsqueeze(1)
    return live if valid is None else live & valid


def trim_to_window(cache: Any, layer: int, positions: torch.Tensor, valid: torch.Tensor | None,
                   lengths: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Drop layer ``layer``'s dead entries (:func:`live_in_window`) from ``cache``, in place.

    Args:
        positions, valid: (B, k) what the layer caches now, in slot order.
    Returns:
        (B, k') positions and (B, k') validity (None: all real) of the entries kept, in slot order,
        masked slots -1 (rows that keep fewer entries are padded with trailing masked slots, unlike the
        pruner's ragged layers, whose masked slots lead); None if nothing was dropped.
    """
    live = live_in_window(positions, valid, lengths, window)
    if bool(live.all()):
        return None
    width = int(live.sum(-1).max())
    # A stable sort puts each row's live slots first, in their order; the rest pad the narrower rows.
    slots = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, k')
    kept_valid = live.gather(1, slots)
    entry = cache.layers[layer]
    index = slots[:, None, :, None].to(entry.keys.device)
    entry.keys = entry.keys.gather(2, index.expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1]))
    entry.values = entry.values.gather(2, index.expand(-1, entry.values.shape[1], -1, entry.values.shape[-1]))
    WindowedLayer.adopt(entry, positions.shape[1] - width)
    kept = positions.gather(1, slots).masked_fill(~kept_valid, -1)
    return kept, None if bool(kept_valid.all()) else kept_valid


def with_decoded(positions: torch.Tensor, valid: torch.Tensor | None, lengths: torch.Tensor, start: int,
                 stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's layout once decode appended the tokens ``start..stop-1`` places after each row's prompt.

    Every row appends at the same cache slot, and a row of real length L has its t-th appended token at
    position L + t (left padding shifts columns, not positions), so the new entries are all real.

    Args:
        positions, valid: (B, k) the entries the layer held before, in slot order (masked slots -1).
        lengths: (B,) real prompt length of each row.
    Returns:
        (B, k + stop - start) positions and validity (None: all real), the appended entries last.
    """
    offsets = torch.arange(start, stop, device=positions.device)
    appended = lengths.to(positions.device).unsqueeze(1) + offsets  # (B, stop - start)
    merged = torch.cat([positions, appended], dim=1)
    if valid is None:
        return merged, None
    return merged, torch.cat([valid, torch.ones_like(appended, dtype=torch.bool)], dim=1)
