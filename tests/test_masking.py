"""Training-time masking: parity with physical gathering, gradients through the mask, cleanup."""

from __future__ import annotations

import torch

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.losses import sdtp_loss
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.predictor import PredictorScorer
from sdtp.training.masking import PolicyMasker

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.4), keep_first=2, keep_recent=0.1)


def _predictor(hidden: int) -> TokenPredictor:
    torch.manual_seed(0)
    return TokenPredictor(PredictorMeta(hidden_size=hidden, layers=list(SCHEDULE.layers)))


def test_hard_mask_matches_gather_at_kept_positions(tiny, prompt_ids):
    model, _, _ = tiny
    predictor = _predictor(model.config.hidden_size)
    masker = PolicyMasker(SCHEDULE, predictor, mode="topk", noise=False)
    with torch.no_grad():
        with masker(model):
            hidden = model.base_model(input_ids=prompt_ids).last_hidden_state
            policy = masker.state.policies[-1][0]
        masked_logits = model.lm_head(hidden)
        pruner = TokenPruner(SCHEDULE, PredictorScorer(predictor=predictor))
        with pruner(model):
            pruned_logits = model(input_ids=prompt_ids, use_cache=True).logits
    kept = pruner.last_prefill.final_positions[0]
    assert torch.equal(policy.nonzero().squeeze(-1), kept)  # same kept set at the last stage
    assert kept.numel() == SCHEDULE.budget(2, prompt_ids.shape[1])
    torch.testing.assert_close(masked_logits[0, kept], pruned_logits[0], rtol=1e-4, atol=1e-4)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)
    assert len(model.model._forward_pre_hooks) == 0


def test_gradients_reach_every_predictor_through_the_mask(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    for mode in ("topk", "gumbel"):
        predictor = _predictor(model.config.hidden_size)
        masker = PolicyMasker(SCHEDULE, predictor, mode=mode, generator=torch.Generator().manual_seed(0))
        with masker(model):
            hidden = model.base_model(input_ids=prompt_ids).last_hidden_state
            policies = masker.state.policies
        ce = torch.nn.functional.cross_entropy(model.lm_head(hidden)[0, :-1], prompt_ids[0, 1:])
        valid = torch.ones_like(prompt_ids, dtype=torch.bool)
        # CE only: every predictor gets its gradient through the attention mask alone.
        loss, _ = sdtp_loss([], torch.zeros(1, 97, 3), valid, {"ce": 1.0}, ce=ce)
        loss.backward()
        for stage in predictor.stages:
            assert stage.fc1.weight.grad is not None and stage.fc1.weight.grad.abs().sum() > 0, mode
        protect = torch.zeros(97, dtype=torch.bool)
        protect[:2] = True
        protect[-10:] = True
        assert bool((policies[-1][0][protect] == 1).all())  # protected tokens always kept
        assert all(bool(((p == 0) | (p == 1)).all()) for p in policies)  # hard masks
        assert all(bool((later <= earlier).all()) for earlier, later in zip(policies, policies[1:]))
