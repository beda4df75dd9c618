"""Merging instead of dropping (``+pruning.merge_weight=w``, :mod:`sdtp.engine.merging`)."""

from __future__ import annotations

import pytest
import torch
from conftest import PositionScorer

from sdtp.config import build_pruner, compose
from sdtp.engine.merging import MergingPruner, merge_tokens
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.models import decoder_layers

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.6, 0.5, 0.4), keep_first=4, keep_recent=0.1)


def test_merge_tokens_matches_hand_computed_group_means():
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [4.0, 4.0], [0.0, 6.0], [3.0, 3.0], [6.0, 0.0]]])  # (1, 6, 2)
    keep = torch.tensor([[0, 2, 5]])  # groups {0}, {1, 2}, {3, 4, 5}
    full = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [3.0, 3.0]]])
    assert torch.equal(merge_tokens(hidden, keep, 1.0), full)
    kept = hidden[:, [0, 2, 5]]
    assert torch.equal(merge_tokens(hidden, keep, 0.0), kept)
    torch.testing.assert_close(merge_tokens(hidden, keep, 0.25), kept + 0.25 * (full - kept))
    # nothing after the last kept token flows backwards: token 5 is dropped unmerged
    assert torch.equal(merge_tokens(hidden, torch.tensor([[0, 2, 4]]), 1.0)[0, 2], torch.tensor([1.5, 4.5]))


def test_merge_tokens_rows_are_independent():
    hidden = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[0, 3, 8], [1, 2, 8]])
    both = merge_tokens(hidden, keep, 0.7)
    for row in range(2):
        torch.testing.assert_close(both[row : row + 1], merge_tokens(hidden[row : row + 1], keep[row : row + 1], 0.7))


@torch.no_grad()
def test_merged_states_reach_the_next_layer_at_the_kept_positions(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    table = torch.rand(512, generator=torch.Generator().manual_seed(3))
    stage_layer = SCHEDULE.layers[0]
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("inputs", []).append((args[0] if args else kwargs["hidden_states"]).clone())

    layer = decoder_layers(model)[stage_layer]
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    model(prompt_ids)  # dense: the stage layer's input for every token
    handle.remove()
    dense_in = seen.pop("inputs")
    pruner = MergingPruner(SCHEDULE, PositionScorer(table), merge_weight=1.0)
    plain = TokenPruner(SCHEDULE, PositionScorer(table))
    with pruner(model):
        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)  # after the pruner's: sees its output
        merged_logits = model(prompt_ids).logits
        handle.remove()
    with plain(model):
        plain_logits = model(prompt_ids).logits
    keep = pruner.last_prefill.layer_positions[stage_layer]
    assert torch.equal(keep, plain.last_prefill.layer_positions[stage_layer])  # the same choice, other states
    torch.testing.assert_close(seen["inputs"][0], merge_tokens(dense_in[0], keep, 1.0))
    assert not torch.allclose(merged_logits, plain_logits)


@torch.no_grad()
def test_keep_ratio_one_is_the_dense_model(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    whole = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
    with MergingPruner(whole, PositionScorer(torch.rand(512)), merge_weight=1.0)(model):
        pruned = model(prompt_ids).logits
    assert torch.equal(pruned, model(prompt_ids).logits)


@torch.no_grad()
def test_padded_batches_are_refused(tiny_llama, left_padded_batch):
    model, _, _ = tiny_llama
    ids, mask = left_padded_batch
    with pytest.raises(NotImplementedError, match="pruning.merge_weight"):
        with MergingPruner(SCHEDULE, PositionScorer(torch.rand(512)), merge_weight=0.5)(model):
            model(ids, attention_mask=mask, use_cache=True)


def test_config_selects_the_merging_pruner_and_refuses_bad_weights():
    def pruner(weight: str):
        overrides = ["model=tiny-llama", "pruning=random", f"+pruning.merge_weight={weight}"]
        return build_pruner(compose("generate", overrides))

    assert type(pruner("0.5")) is MergingPruner and pruner("0.5").merge_weight == 0.5
    assert type(pruner("0")) is TokenPruner
    for bad in ("1.5", "-0.1", "true", "half"):
        with pytest.raises(ConfigError, match="pruning.merge_weight"):
            pruner(bad)


def test_batched_evaluation_is_refused_at_composition():
    with pytest.raises(ConfigError, match="pruning.merge_weight: prompts are pruned one at a time"):
        compose("eval", ["model=tiny-llama", "pruning=random", "+pruning.merge_weight=1", "eval.batch_size=4"])
