"""Predictor shapes, checkpoint round trip, mismatch errors, and SDTP pruning with it."""

from __future__ import annotations

import pytest
import torch

from sdtp.config import build_pruner, compose
from sdtp.errors import ConfigError
from sdtp.predictor import PredictorMeta, TokenPredictor


def _predictor(layers=(1, 2, 3), hidden=64) -> TokenPredictor:
    torch.manual_seed(0)
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


def test_checkpoint_for_other_model_is_rejected_at_bind(tmp_path, tiny_llama):
    model, _, _ = tiny_llama
    _predictor(layers=(1, 2)).save(tmp_path)
    cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}"])
    with pytest.raises(ConfigError, match="stage layers"), build_pruner(cfg)(model):
        pass


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
