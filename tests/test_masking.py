"""Training-time masking: parity with physical gathering, protected continuation, gradients, noise."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.losses import sdtp_loss
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.predictor import PredictorScorer
from sdtp.training.loop import annealed
from sdtp.training.masking import PolicyMasker, _gumbel, causal_additive_mask

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.4), keep_first=2, keep_recent=0.1)


def _predictor(hidden: int, position_features: bool = False, query_tokens: int = 0,
               lexical_feature: bool = False) -> TokenPredictor:
    """query_tokens > 0: with a query branch whose (zero-initialised) query weights are randomised,
    reading more tokens than the protected tail, so which of them are alive matters. lexical_feature:
    with the lexical input, its weights scaled up so that the match decides the ranking."""
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=hidden, layers=list(SCHEDULE.layers),
                                             position_features=position_features, query_tokens=query_tokens,
                                             query_rank=8, lexical_feature=lexical_feature))
    if query_tokens:
        for branch in predictor.queries:
            torch.nn.init.normal_(branch.query.weight, std=2.0)
    if lexical_feature:
        with torch.no_grad():
            for stage in predictor.stages:
                stage.fc1.weight[:, -1] *= 50.0
    return predictor


def test_hard_mask_matches_gather_at_kept_positions(tiny_engine, prompt_ids):
    """Every family the engine prunes, Gemma3's sliding-window layers (window 16 < 97 tokens) included."""
    model, _, _ = tiny_engine
    for position_features, query_tokens in ((False, 0), (True, 0), (True, 40)):
        predictor = _predictor(model.config.hidden_size, position_features, query_tokens)
        masker = PolicyMasker(SCHEDULE, predictor, mode="topk", noise_scale=0.0)
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


def test_keep_ratio_one_masks_reproduce_the_models_own_logits(tiny_engine, prompt_ids):
    """With every token kept, the masks the hooks install (each layer's own kind) are the model's own."""
    model, _, _ = tiny_engine
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0), keep_first=2, keep_recent=0.1)
    masker = PolicyMasker(schedule, _predictor(model.config.hidden_size), mode="topk", noise_scale=0.0)
    with torch.no_grad():
        dense = model(input_ids=prompt_ids).logits
        with masker(model):
            masked = model(input_ids=prompt_ids).logits
            policies = masker.state.policies
    assert len(policies) == 3 and all(bool((p == 1).all()) for p in policies)
    torch.testing.assert_close(masked, dense, rtol=1e-4, atol=1e-4)


def test_sliding_causal_mask_closes_keys_outside_the_window():
    valid = torch.ones(1, 6, dtype=torch.bool)
    open_ = causal_additive_mask(valid, window=3)[0, 0] == 0  # (S, S) visible keys
    expected = torch.tensor([[1 if 0 <= i - j < 3 else 0 for j in range(6)] for i in range(6)], dtype=torch.bool)
    assert torch.equal(open_, expected)
    assert torch.equal(causal_additive_mask(valid)[0, 0] == 0, torch.ones(6, 6, dtype=torch.bool).tril())


def test_continuation_is_never_pruned_and_budget_is_the_prompts(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    predictor = _predictor(model.config.hidden_size, position_features=True)
    split = 70  # prompt 0..69, continuation 70..96
    masker = PolicyMasker(SCHEDULE, predictor, mode="topk", noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masker(model, torch.tensor([split])):
        model.base_model(input_ids=prompt_ids)
        policies, decided = masker.state.policies, masker.state.decided
    for stage, policy in enumerate(policies):
        assert bool((policy[0, split:] == 1).all())  # continuation always alive
        assert bool((policy[0, :2] == 1).all()) and bool((policy[0, split - SCHEDULE.num_recent(split) : split] == 1).all())
        assert int(policy[0, :split].sum()) == SCHEDULE.budget(stage, split)
        assert not decided[stage][0, split:].any() and not decided[stage][0, :2].any()


def test_lexical_input_reads_the_prompt_alone_as_inference_does(tiny_llama):
    """With a continuation after the prompt, training computes the lexical match over the prompt only:
    the masked forward keeps exactly the prompt tokens that pruning the prompt alone keeps, and the
    match changes that set (the prompt is longer than the match's window, so it varies by token)."""
    model, _, _ = tiny_llama
    ids = torch.randint(4, 260, (1, 440), generator=torch.Generator().manual_seed(2))
    split = 400
    kept = {}
    for weight in (1.0, 0.0):
        predictor = _predictor(model.config.hidden_size, position_features=True, lexical_feature=True)
        with torch.no_grad():
            for stage in predictor.stages:
                stage.fc1.weight[:, -1] *= weight
            masker = PolicyMasker(SCHEDULE, predictor, mode="topk", noise_scale=0.0)
            with masker(model, torch.tensor([split])):
                model.base_model(input_ids=ids)
                policy = masker.state.policies[-1][0, :split]
            pruner = TokenPruner(SCHEDULE, PredictorScorer(predictor=predictor))
            with pruner(model):
                model(input_ids=ids[:, :split], use_cache=True)
        kept[weight] = pruner.last_prefill.final_positions[0]
        assert torch.equal(policy.nonzero().squeeze(-1), kept[weight])
    assert not torch.equal(kept[1.0], kept[0.0])


def test_gradients_reach_every_predictor_through_the_mask(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    for mode in ("topk", "gumbel"):
        predictor = _predictor(model.config.hidden_size)
        masker = PolicyMasker(SCHEDULE, predictor, mode=mode, generator=torch.Generator().manual_seed(0))
        with masker(model):
            hidden = model.base_model(input_ids=prompt_ids).last_hidden_state
            policies = masker.state.policies
        ce = torch.nn.functional.cross_entropy(model.lm_head(hidden)[0, :-1], prompt_ids[0, 1:])
        # CE only: every predictor gets its gradient through the attention mask alone.
        loss, _ = sdtp_loss([], torch.zeros(1, 97, 3), [], {"ce": 1.0}, ce=ce)
        loss.backward()
        for stage in predictor.stages:
            assert stage.fc1.weight.grad is not None and stage.fc1.weight.grad.abs().sum() > 0, mode
        protect = torch.zeros(97, dtype=torch.bool)
        protect[:2] = True
        protect[-10:] = True
        assert bool((policies[-1][0][protect] == 1).all())  # protected tokens always kept
        assert all(bool(((p == 0) | (p == 1)).all()) for p in policies)  # hard masks
        assert all(bool((later <= earlier).all()) for earlier, later in zip(policies, policies[1:]))


def test_rescored_scores_equal_the_forward_scores(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    predictor = _predictor(model.config.hidden_size, position_features=True, query_tokens=40)
    masker = PolicyMasker(SCHEDULE, predictor, noise_scale=0.5, generator=torch.Generator().manual_seed(0))
    with masker(model, torch.tensor([80])):
        with torch.no_grad():
            model.base_model(input_ids=prompt_ids)
        rescored = masker.rescore()
        assert len(rescored) == len(masker.state.scores) == len(SCHEDULE.layers)
        for a, b in zip(rescored, masker.state.scores):
            torch.testing.assert_close(a, b)
        assert all(r.requires_grad for r in rescored)


def test_noise_annealing_reaches_zero_and_then_agrees_with_noise_free(tiny_llama, prompt_ids):
    spec = OmegaConf.create({"start": 0.8, "end": 0.0})
    # The loop asks for steps 0..99 of 100: the last one (99) trains at the end value.
    assert annealed(spec, 0, 101) == 0.8 and annealed(spec, 50, 101) == 0.4
    assert annealed(spec, 99, 100) == 0.0 and annealed(spec, 150, 100) == 0.0 and annealed(spec, 98, 100) > 0
    model, _, _ = tiny_llama
    masker = PolicyMasker(SCHEDULE, _predictor(model.config.hidden_size), generator=torch.Generator().manual_seed(0))
    agreement = {}
    for scale in (4.0, 0.0):
        masker.noise_scale = scale
        with torch.no_grad(), masker(model):
            model.base_model(input_ids=prompt_ids)
            agreement[scale] = sum(masker.state.drop_agreement) / 3
    assert agreement[0.0] == 1.0 and agreement[4.0] < 1.0


def test_rescore_rebuilds_gumbel_policies_with_gradients(tiny_llama, prompt_ids):
    """Without autograd through the LLM, the ratio loss still reaches the predictors (gumbel mode)."""
    from sdtp.losses import ratio_loss

    model, _, _ = tiny_llama
    predictor = _predictor(model.config.hidden_size)
    masker = PolicyMasker(SCHEDULE, predictor, mode="gumbel", generator=torch.Generator().manual_seed(0))
    with masker(model):
        with torch.no_grad():
            model.base_model(input_ids=prompt_ids)
        forward_policies = [p.clone() for p in masker.state.policies]
        masker.rescore()
        policies, prompt = masker.state.policies, masker.state.prompt
    for a, b in zip(policies, forward_policies):
        torch.testing.assert_close(a.detach(), b)  # same hard decisions
    ratio_loss(policies, SCHEDULE.keep_fractions, prompt).backward()
    assert all(stage.fc1.weight.grad is not None and stage.fc1.weight.grad.abs().sum() > 0 for stage in predictor.stages)


def test_gumbel_mode_keeps_a_token_when_score_plus_scaled_noise_is_positive(tiny_llama, prompt_ids):
    """keep_mode=gumbel as documented: keep iff score + noise_scale * (G1 - G2) > 0, the same mask at any tau (Eq. 2's
    hard Gumbel-softmax at noise_scale 1); at noise_scale 0, where the default anneal ends, the plain score > 0."""
    model, _, _ = tiny_llama
    predictor = _predictor(model.config.hidden_size)
    with torch.no_grad():  # an untrained predictor scores every token about alike: spread them around 0
        for stage in predictor.stages:
            stage.fc2.weight *= 50.0
            stage.fc2.bias.zero_()
    kept = {}
    for scale, tau in ((1.0, 1.0), (1.0, 0.25), (0.0, 1.0), (0.0, 0.25)):
        masker = PolicyMasker(SCHEDULE, predictor, mode="gumbel", tau=tau, noise_scale=scale,
                              generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), masker(model):
            model.base_model(input_ids=prompt_ids)
            state = masker.state
        replay = torch.Generator().manual_seed(0)  # the masker's draws, two Gumbel samples per stage in order
        for score, (hard, noise) in zip(state.scores, state.draws):
            expected = scale * (_gumbel(score.shape, score, replay) - _gumbel(score.shape, score, replay))
            torch.testing.assert_close(torch.as_tensor(noise, dtype=score.dtype).expand_as(score), expected)
            assert torch.equal(hard, (score + expected > 0).float())
        kept[scale, tau] = [hard for hard, _ in state.draws]
        assert 0 < float(kept[scale, tau][0].mean()) < 1  # tokens on both sides: the equality above is not trivial
    for scale in (1.0, 0.0):
        assert all(torch.equal(a, b) for a, b in zip(kept[scale, 1.0], kept[scale, 0.25]))  # tau: backward only
    assert not all(torch.equal(a, b) for a, b in zip(kept[1.0, 1.0], kept[0.0, 1.0]))  # the noise matters at scale 1
