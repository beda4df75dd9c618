"""Predictor shapes, checkpoint round trip, mismatch errors, and SDTP pruning with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdtp.config import build_pruner, build_schedule, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.predictor import PredictorMeta, TokenPredictor, context_mean, position_features, widen_inputs
from sdtp.scorers.predictor import PredictorScorer
from sdtp.training.loop import build_predictor, init_predictor


def _predictor(layers=(1, 2, 3), hidden=64, seed=0) -> TokenPredictor:
    torch.manual_seed(seed)
    return TokenPredictor(PredictorMeta(hidden_size=hidden, layers=list(layers), base_model="tiny-llama", num_layers=4))


def test_shapes_and_score_is_keep_minus_drop():
    p = _predictor()
    x = torch.randn(2, 7, 64)
    logits = p.logits(1, x)
    assert logits.shape == (2, 7, 2)
    torch.testing.assert_close(p(1, x), logits[..., 0] - logits[..., 1])
    assert p.stages[0].fc1.out_features == 16  # d -> d/4 -> 2


def test_save_load_round_trip(tmp_path):
    p = _predictor()
    p.save(tmp_path)
    q = TokenPredictor.load(tmp_path, hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama")
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(p(0, x), q(0, x))


def test_save_killed_between_files_is_refused_not_mixed(tmp_path, monkeypatch):
    """A save that dies after the weights must not leave them readable with the earlier description."""
    import sdtp.predictor as module

    old = _predictor()
    old.meta.recency_weight = 0.5
    old.save(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _predictor(seed=1).save(tmp_path)
    with pytest.raises(ConfigError, match="no predictor checkpoint"):
        TokenPredictor.load(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 32}, "hidden size"),
        ({"layers": [1, 3]}, "stage layers"),
        ({"base_model": "smollm2-135m"}, "base model"),
    ],
)
def test_loading_into_wrong_model_fails_clearly(tmp_path, kwargs, message):
    _predictor().save(tmp_path)
    with pytest.raises(ConfigError, match=message):
        TokenPredictor.load(tmp_path, **kwargs)


def test_sdtp_pruning_from_config_uses_the_checkpoint(tmp_path, tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    _predictor().save(tmp_path)
    cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}"])
    pruner = build_pruner(cfg)
    with torch.no_grad(), pruner(model):
        model(prompt_ids)
    assert pruner.last_prefill.kept_per_stage == [round(97 * 0.9**s) for s in (1, 2, 3)]
    # The kept tokens are the saved predictor's choice (not a fresh or other one's): same set as the predictor
    # given directly, and a differently initialised predictor chooses differently.
    kept = {}
    for name, predictor in (("saved", _predictor()), ("other", _predictor(seed=1))):
        direct = TokenPruner(pruner.schedule, PredictorScorer(predictor=predictor))
        with torch.no_grad(), direct(model):
            model(prompt_ids)
        kept[name] = direct.last_prefill.final_positions
    assert torch.equal(pruner.last_prefill.final_positions, kept["saved"])
    assert not torch.equal(kept["saved"], kept["other"])


def test_checkpoint_for_other_model_is_rejected_at_bind(tmp_path, tiny_llama):
    model, _, _ = tiny_llama
    _predictor(layers=(1, 2)).save(tmp_path)
    cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}"])
    with pytest.raises(ConfigError, match="stage layers"), build_pruner(cfg)(model):
        pass


def test_a_subset_schedule_scores_with_the_checkpoints_stages_at_its_layers(tmp_path, tiny_llama, prompt_ids):
    """select_stages: stage s of a predictor loaded for layers [1, 3] is the checkpoint's stage at that layer;
    without it (or for a layer the checkpoint lacks) loading fails naming the layers; from config the
    pruner then prunes before layers 1 and 3 only."""
    p = _predictor()
    p.save(tmp_path)
    q = TokenPredictor.load(tmp_path, layers=[1, 3], subset=True)
    x = torch.randn(1, 5, 64)
    assert q.meta.layers == [1, 3] and len(q.stages) == 2
    torch.testing.assert_close(q(0, x), p(0, x))
    torch.testing.assert_close(q(1, x), p(2, x))
    with pytest.raises(ConfigError, match="select_stages=true"):
        TokenPredictor.load(tmp_path, layers=[1, 3])
    with pytest.raises(ConfigError, match=r"schedule uses \[0, 3\]$"):
        TokenPredictor.load(tmp_path, layers=[0, 3], subset=True)
    model, _, _ = tiny_llama
    cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}",
                               "pruning.layers=[1,3]", "+pruning.scorer.select_stages=true"])
    pruner = build_pruner(cfg)
    with torch.no_grad(), pruner(model):
        model(prompt_ids)
    assert pruner.last_prefill.kept_per_stage == [round(97 * 0.9**s) for s in (1, 2)]


def test_norm_feature_is_the_log_rms_the_input_norm_removes(tmp_path):
    """With input_norm the MLP sees only the direction; norm_feature appends log RMS of the raw state,
    so two tokens that differ only in scale score differently, and the checkpoint round-trips."""
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=64, layers=[1, 2], input_norm=True, norm_feature=True)
    p = TokenPredictor(meta)
    assert p.stages[0].fc1.in_features == 65
    x = torch.randn(1, 3, 64)
    x[0, 1] = 10.0 * x[0, 0]  # same direction, 10x the norm
    mlp = p.stages[1]
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    log_rms = 0.5 * torch.log(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = mlp(torch.cat([unit, log_rms], dim=-1))
    torch.testing.assert_close(p.logits(1, x), expected)
    assert not torch.allclose(p(1, x)[0, 0], p(1, x)[0, 1])
    blind = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], input_norm=True))
    torch.testing.assert_close(blind(1, x)[0, 0], blind(1, x)[0, 1], rtol=1e-4, atol=1e-4)
    p.save(tmp_path)
    torch.testing.assert_close(TokenPredictor.load(tmp_path)(1, x), p(1, x))


def test_lexical_feature_is_the_log_match_after_the_other_inputs(tmp_path):
    """The lexical input is log(1 + match), the last column; it is required, and round-trips."""
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=64, layers=[1, 2], input_norm=True, position_features=True,
                         norm_feature=True, lexical_feature=True)
    p = TokenPredictor(meta)
    assert p.stages[0].fc1.in_features == 64 + 4
    x, pos, n, match = torch.randn(1, 5, 64), torch.arange(5)[None], torch.tensor([5]), 4.0 * torch.rand(1, 5)
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    log_rms = 0.5 * torch.log(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    features = torch.cat([unit, position_features(pos, n), log_rms, torch.log1p(match)[..., None]], dim=-1)
    torch.testing.assert_close(p.logits(1, x, pos, n, lexical=match), p.stages[1](features))
    with pytest.raises(ValueError, match="lexical"):
        p(1, x, pos, n)
    p.save(tmp_path)
    torch.testing.assert_close(TokenPredictor.load(tmp_path)(1, x, pos, n, lexical=match), p(1, x, pos, n, lexical=match))


def test_widen_inputs_inserts_zero_columns_where_the_new_inputs_go():
    """Adding the norm input to a predictor with the lexical one puts the zero column before it; the
    widened predictor scores as the original; dropping an input is refused."""
    torch.manual_seed(0)
    old_meta = PredictorMeta(hidden_size=16, layers=[1], position_features=True, lexical_feature=True)
    new_meta = PredictorMeta(hidden_size=16, layers=[1], position_features=True, norm_feature=True,
                             lexical_feature=True)
    old, new = TokenPredictor(old_meta), TokenPredictor(new_meta)
    new.load_state_dict(widen_inputs(old.state_dict(), old_meta, new_meta))
    weight = new.stages[0].fc1.weight
    assert torch.equal(weight[:, 18], torch.zeros(weight.shape[0]))  # 16 hidden + 2 position, then norm
    assert torch.equal(weight[:, 19], old.stages[0].fc1.weight[:, 18])  # the lexical column moved right
    x, pos, n, match = 5.0 * torch.randn(1, 4, 16), torch.arange(4)[None], torch.tensor([4]), torch.rand(1, 4)
    torch.testing.assert_close(new(0, x, pos, n, lexical=match), old(0, x, pos, n, lexical=match))
    with pytest.raises(ValueError, match="subset"):
        widen_inputs(new.state_dict(), new_meta, old_meta)


def test_query_branch_is_a_smooth_max_over_the_last_alive_prompt_tokens(tmp_path):
    """The branch adds logsumexp_t (K x_j).(Q x_t)/sqrt(r) - log|T| to the keep logit, T = the last m
    alive prompt tokens; it starts at exactly 0 (Q = 0), ignores dead and continuation tokens, and
    round-trips through a checkpoint."""
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=64, layers=[1, 2], input_norm=True, position_features=True,
                         query_tokens=3, query_rank=4)
    p = TokenPredictor(meta)
    plain = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], input_norm=True, position_features=True))
    plain.stages.load_state_dict(p.stages.state_dict())
    x, pos, n = torch.randn(1, 8, 64), torch.arange(8)[None], torch.tensor([6])  # 6 prompt + 2 continuation
    torch.testing.assert_close(p(1, x, pos, n), plain(1, x, pos, n))  # zero-initialised Q: no change
    torch.nn.init.normal_(p.queries[1].query.weight)
    alive = torch.tensor([[True, True, True, True, False, True, True, True]])  # token 4 was dropped
    unit = x[0] * torch.rsqrt(x[0].pow(2).mean(-1, keepdim=True) + 1e-6)
    k, q = p.queries[1].key(unit), p.queries[1].query(unit[[3, 5]])  # last 3 prompt tokens 3..5, 4 dead
    relevance = torch.logsumexp(k @ q.T / 2.0, dim=-1) - torch.log(torch.tensor(2.0))
    torch.testing.assert_close(p(1, x, pos, n, alive)[0], plain(1, x, pos, n)[0] + relevance)
    y = x.clone()
    y[0, [0, 4, 6, 7]] += 5.0 * torch.randn(4, 64)  # non-query tokens: only their own scores move
    changed = (p(1, y, pos, n, alive) - p(1, x, pos, n, alive)).abs()[0] > 1e-5
    assert changed.tolist() == [True, False, False, False, True, False, True, True]
    with pytest.raises(ValueError, match="positions"):
        p(1, x)
    p.save(tmp_path)
    torch.testing.assert_close(TokenPredictor.load(tmp_path)(1, x, pos, n, alive), p(1, x, pos, n, alive))
    with pytest.raises(ConfigError, match="query_tokens"):
        TokenPredictor(PredictorMeta(hidden_size=64, layers=[1], query_tokens=-1))


def test_context_input_is_the_windowed_mean_of_alive_prompt_states_masked_or_gathered(tmp_path):
    """The context input of token i is the mean normalised state of the alive prompt tokens within w positions
    of it (a hand loop); scoring all positions with an ``alive`` mask (masked training) equals scoring the
    gathered alive tokens (physical pruning) at the alive slots; a predictor widened to it from one without it
    scores as the original; it round-trips through a checkpoint."""
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=16, layers=[1], input_norm=True, position_features=True, context_window=2)
    p = TokenPredictor(meta)
    x = 3.0 * torch.randn(1, 12, 16)
    pos, n = torch.arange(12)[None], torch.tensor([10])  # positions 10, 11: a continuation, never averaged
    alive = torch.tensor([[True, False, True, True, False, True, True, True, False, True, True, True]])
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = torch.stack([normed[0, [j for j in range(max(0, i - 2), min(10, i + 3)) if alive[0, j]]].mean(0)
                            for i in range(12)])
    torch.testing.assert_close(context_mean(normed, pos, n, alive, 2)[0], expected)
    poisoned = normed.clone()
    poisoned[0, ~alive[0]] = float("nan")  # a masked slot's state (e.g. padding) must not reach its neighbours
    torch.testing.assert_close(context_mean(poisoned, pos, n, alive, 2)[0], expected)
    keep = alive[0].nonzero().squeeze(1)
    masked = p(0, x, pos, n, alive)[0, keep]
    gathered = p(0, x[:, keep], pos[:, keep], n)[0]
    torch.testing.assert_close(masked, gathered)
    plain_meta = PredictorMeta(hidden_size=16, layers=[1], input_norm=True, position_features=True)
    plain, widened = TokenPredictor(plain_meta), TokenPredictor(meta)
    widened.load_state_dict(widen_inputs(plain.state_dict(), plain_meta, meta))
    assert widened.stages[0].fc1.in_features == 16 + 2 + 16
    torch.testing.assert_close(widened(0, x, pos, n, alive), plain(0, x, pos, n, alive))
    p.save(tmp_path)
    torch.testing.assert_close(TokenPredictor.load(tmp_path)(0, x, pos, n, alive), p(0, x, pos, n, alive))


@pytest.mark.parametrize(
    ("num_layers", "layers", "message"),
    [
        (8, [1, 2, 3], r"trained for a model of 8 layers, model has 4$"),  # same hidden size, another depth
        (0, [1, 2, 6], r"stage layers \[6\] lie outside the 4-layer model"),  # an older checkpoint: depth unrecorded
    ],
)
def test_checkpoint_for_a_model_of_another_depth_is_refused(tmp_path, tiny_llama, num_layers, layers, message):
    """Base model unrecorded and the hidden size shared: the depth and stage layers still give it away, on load,
    at bind and for a train.init_from warm start (which passes no schedule layers)."""
    model, _, _ = tiny_llama
    cfg = compose("train", ["model=tiny-llama", "pruning=sdtp", f"train.init_from={tmp_path}"])
    fresh = build_predictor(cfg, model, build_schedule(cfg))
    # everything as a warm start from this config expects, except the model it was trained for
    TokenPredictor(replace(fresh.meta, base_model="", num_layers=num_layers, layers=layers)).save(tmp_path)
    with pytest.raises(ConfigError, match=r"^pruning\.scorer\.path: .*" + message):
        TokenPredictor.load(tmp_path, hidden_size=64, num_layers=4)
    with pytest.raises(ConfigError, match=r"^train\.init_from: .*" + message):  # the key that named the folder
        init_predictor(cfg, model, fresh)
    if layers == [1, 2, 3]:  # a schedule at layer 6 is refused before any load
        generate = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}"])
        with pytest.raises(ConfigError, match=message), build_pruner(generate)(model):
            pass
