"""Random scorer: one generator per run, so every prompt gets a fresh mask, reproducibly per seed."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35))


@torch.no_grad()
def _masks(model: torch.nn.Module, prompts: list[torch.Tensor], seed: int) -> list[list[int]]:
    """Kept positions after the last stage for each prompt, prefilled in order by one pruner (= one run)."""
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=seed))
    kept = []
    for ids in prompts:
        with pruner(model):  # a new `with` per prompt, as prefill_context does: re-binding must not re-seed
            model(ids, use_cache=True, logits_to_keep=1)
        kept.append(pruner.last_prefill.final_positions[0].tolist())
    return kept


def test_masks_are_fresh_per_prompt_and_reproducible_per_seed(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    other = torch.flip(prompt_ids, dims=[1])  # same length, other content
    prompts = [prompt_ids, prompt_ids, other]
    run = _masks(model, prompts, seed=0)
    assert run == _masks(model, prompts, seed=0)  # same seed and order -> same masks
    assert run[0] != run[1] and run[1] != run[2]  # within a run, each prefill draws a new mask
    assert run != _masks(model, prompts, seed=1)  # another seed -> other masks
    assert all(len(mask) == len(run[0]) for mask in run)  # the budget never depends on the draw
