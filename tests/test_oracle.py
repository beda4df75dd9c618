"""Oracle scorer: saliency computed inside an inference-mode pruned prefill keeps the most salient tokens."""

from __future__ import annotations

import torch

from sdtp.engine.generation import prefill
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import protected_mask, select_kept
from sdtp.saliency import saliency_scores
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.oracle import OracleScorer

SCHEDULE = PruningSchedule(layers=(1,), keep_fractions=(0.5,), keep_first=2, keep_recent=0.1)


def test_oracle_inside_pruned_prefill(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, OracleScorer())
    with pruner(model):
        hooks_before = [dict(layer._forward_pre_hooks) for layer in model.model.layers]
        logits, _, _ = prefill(model, prompt_ids, pruner)
        hooks_after = [dict(layer._forward_pre_hooks) for layer in model.model.layers]
    assert hooks_before == hooks_after and logits.shape == (1, 1, model.config.vocab_size)
    # The kept set is the top-saliency set of the dense model at layer 1 (computed independently),
    # the default target being the CE of the prompt's protected last 10% (the continuation stand-in).
    n = prompt_ids.shape[1]
    split = torch.tensor([n - SCHEDULE.num_recent(n)])
    saliency = saliency_scores(model, prompt_ids, [1], "continuation", normalize=False, split=split)[..., 0]
    positions = torch.arange(n)[None]
    expected = select_kept(saliency, protected_mask(positions, n, 2, SCHEDULE.num_recent(n)), SCHEDULE.budget(0, n))
    assert torch.equal(pruner.last_prefill.final_positions, expected)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def test_norm_scorer_keeps_largest_norms(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, HiddenNormScorer())
    with pruner(model):
        prefill(model, prompt_ids, pruner)
    assert pruner.last_prefill.kept_per_stage == [SCHEDULE.budget(0, prompt_ids.shape[1])]
