"""A pruned prefill's sliding-window layers keep only what their window can still show (sdtp.engine.window)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

import sdtp.engine.pruner as pruner_module
from sdtp.engine.cache import cache_bytes, cache_lengths
from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.window import WindowedLayer, trim_to_window, with_decoded
from sdtp.models.layer_types import layer_windows
from sdtp.scorers.random import RandomScorer

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)


class _Cache:
    def __init__(self, layer: DynamicLayer) -> None:
        self.layers = [layer]


def test_trim_keeps_each_rows_entries_after_its_length_minus_window_in_slot_order():
    keys = torch.arange(2 * 8, dtype=torch.float32).view(2, 1, 8, 1).expand(-1, 2, -1, 3).clone()  # (B, H, k, hd)
    layer = DynamicLayer()
    layer.update(keys, keys + 100)
    positions = torch.tensor([[0, 3, 5, 6, 8, 9, 10, 11], [-1, -1, 0, 2, 3, 5, 7, 8]])  # row 1: left padding
    kept, valid = trim_to_window(_Cache(layer), 0, positions, positions >= 0, torch.tensor([12, 9]), window=5)
    # row 0 (L=12) keeps positions > 7, row 1 (L=9) positions > 4 and one masked slot to match row 0's width
    assert kept.tolist() == [[8, 9, 10, 11], [5, 7, 8, -1]]
    assert valid.tolist() == [[True] * 4, [True, True, True, False]]
    assert layer.keys[:, 0, :, 0].tolist() == [[4, 5, 6, 7], [13, 14, 15, 8]]  # the slots' own keys, in order
    assert torch.equal(layer.values, layer.keys + 100)
    assert isinstance(layer, WindowedLayer) and layer.get_seq_length() == 8  # the length it had: logical
    kept, valid = trim_to_window(_Cache(layer), 0, kept, valid, torch.tensor([12, 9]), window=3)
    assert kept.tolist() == [[10, 11], [7, 8]] and valid is None
    assert layer.keys[:, 0, :, 0].tolist() == [[6, 7], [14, 15]] and layer.get_seq_length() == 8
    assert trim_to_window(_Cache(layer), 0, kept, valid, torch.tensor([12, 9]), window=3) is None


@torch.no_grad()
def test_trimming_changes_no_logit_and_bounds_every_sliding_layer(tiny_gemma3, prompt_ids, monkeypatch):
    """Generation and its step logits equal the untrimmed pruner's; each sliding layer holds < window entries, the
    cache reports the prompt length, and the pruned cache is smaller than the dense one, as it should be."""
    gemma3 = tiny_gemma3[0]
    n, window = prompt_ids.shape[1], gemma3.config.sliding_window
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=3))
    trimmed = generate(gemma3, prompt_ids, 6, pruner, keep_logits=True)
    record = pruner.last_prefill
    windows = layer_windows(gemma3.config)
    widths = record.cache_widths(len(windows))
    assert [w < window for w, size in zip(widths, windows) if size] == [True] * 3
    assert all(isinstance(trimmed.cache.layers[idx], WindowedLayer) for idx, size in enumerate(windows) if size)
    # + 5 decode steps at the full layer; a sliding layer drops what the next query's window no longer reaches
    assert [length for length, size in zip(cache_lengths(trimmed.cache), windows) if not size] == \
        [w + 5 for w, size in zip(widths, windows) if not size]
    assert all(length < window for length, size in zip(cache_lengths(trimmed.cache), windows) if size)
    assert trimmed.cache.get_seq_length() == n + 5
    dense = generate(gemma3, prompt_ids, 6, keep_logits=True)
    assert cache_bytes(trimmed.cache) < cache_bytes(dense.cache)
    with monkeypatch.context() as patch:
        patch.setattr(pruner_module, "trim_to_window", lambda *args: None)
        untrimmed = generate(gemma3, prompt_ids, 6, TokenPruner(SCHEDULE, RandomScorer(seed=3)), keep_logits=True)
    assert cache_bytes(untrimmed.cache) > cache_bytes(dense.cache)  # what trimming saves
    assert trimmed.tokens == untrimmed.tokens
    for ours, reference in zip(trimmed.step_logits, untrimmed.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_whole_prompt_layout_is_made_on_the_cache_device(tiny_gemma3, prompt_ids):
    """Layer 0 (never pruned) caches the whole prompt: its positions, made here rather than recorded, must be on the
    cache's device, because the decode steps index the model's attention mask with them (a CPU tensor against a
    CUDA mask failed at the first decode step). ``meta`` stands in for another device on this CPU-only machine."""
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=3))
    ragged = torch.ones(2, prompt_ids.shape[1], dtype=torch.long)
    ragged[1, :5] = 0  # row 1: five left-padding columns
    for ids, mask in ((prompt_ids, None), (prompt_ids.expand(2, -1), ragged)):
        with torch.no_grad(), pruner(tiny_gemma3[0]):
            tiny_gemma3[0](input_ids=ids, attention_mask=mask, use_cache=True)
        meta = torch.device("meta")
        positions, valid = TokenPruner._whole_prompt(pruner.last_prefill, meta)
        assert positions.device == meta and (valid is None or valid.device == meta)
        assert (valid is None) == (mask is None)


def test_with_decoded_appends_each_rows_generated_positions_as_real_slots():
    positions = torch.tensor([[3, 5, 6], [-1, 2, 4]])  # row 1: one masked slot
    merged, valid = with_decoded(positions, positions >= 0, torch.tensor([7, 5]), 1, 3)
    assert merged.tolist() == [[3, 5, 6, 8, 9], [-1, 2, 4, 6, 7]]  # offsets 1, 2 after each row's length
    assert valid.tolist() == [[True] * 5, [False, True, True, True, True]]
    assert with_decoded(positions.clamp(min=0), None, torch.tensor([7, 5]), 0, 0)[1] is None


def _sliding_lengths(cache, windows) -> list[int]:
    return [length for length, size in zip(cache_lengths(cache), windows) if size]


@torch.no_grad()
def test_sliding_layers_stay_within_the_window_while_decoding(tiny_gemma3, prompt_ids, monkeypatch):
    """Decode appends to the pruned sliding layers: each step drops what the next query's window no longer
    reaches, so after many more steps than the window they hold window - 1 entries, as HF's dense sliding layers
    do (they grew by one per token), and every step's logits equal the never-trimmed pruner's."""
    gemma3 = tiny_gemma3[0]
    window, windows, steps = gemma3.config.sliding_window, layer_windows(gemma3.config), 3 * 16 + 5
    trimmed = generate(gemma3, prompt_ids, steps, TokenPruner(SCHEDULE, RandomScorer(seed=3)), keep_logits=True)
    dense = generate(gemma3, prompt_ids, steps)
    assert _sliding_lengths(trimmed.cache, windows) == _sliding_lengths(dense.cache, windows) == [window - 1] * 3
    assert trimmed.cache.get_seq_length() == prompt_ids.shape[1] + steps - 1  # the logical length stays
    record = trimmed.record
    assert all(record.decode_layouts[layer][2] == prompt_ids.shape[1] + steps - 1
               for layer, size in enumerate(windows) if size)
    with monkeypatch.context() as patch:
        patch.setattr(pruner_module, "trim_to_window", lambda *args: None)
        untrimmed = generate(gemma3, prompt_ids, steps, TokenPruner(SCHEDULE, RandomScorer(seed=3)),
                             keep_logits=True)
    assert min(_sliding_lengths(untrimmed.cache, windows)) > steps  # what the decode trims save
    assert trimmed.tokens == untrimmed.tokens
    for ours, reference in zip(trimmed.step_logits, untrimmed.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_trims_keep_a_left_padded_batchs_logits(tiny_gemma3, left_padded_batch, monkeypatch):
    """Rows of different lengths reach the window's edge at different steps (their prompt entries die
    unevenly, leaving masked slots): the bound and the logits still hold for every row."""
    gemma3 = tiny_gemma3[0]
    ids, mask = left_padded_batch
    window, windows, steps = gemma3.config.sliding_window, layer_windows(gemma3.config), 2 * 16 + 3
    trimmed = generate(gemma3, ids, steps, TokenPruner(SCHEDULE, RandomScorer(seed=5)), keep_logits=True,
                       attention_mask=mask)
    assert all(length < window for length in _sliding_lengths(trimmed.cache, windows))
    with monkeypatch.context() as patch:
        patch.setattr(pruner_module, "trim_to_window", lambda *args: None)
        untrimmed = generate(gemma3, ids, steps, TokenPruner(SCHEDULE, RandomScorer(seed=5)), keep_logits=True,
                             attention_mask=mask)
    assert trimmed.sequences == untrimmed.sequences
    for ours, reference in zip(trimmed.step_logits, untrimmed.step_logits, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
