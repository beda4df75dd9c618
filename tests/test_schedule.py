"""Schedule arithmetic and config validation at composition time."""

from __future__ import annotations

import pytest

from sdtp.config import compose
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError


def test_paper_default_schedule_for_32_layers():
    s = PruningSchedule.from_config({"first_layer": 4, "layer_step": 3, "num_stages": 10, "keep_ratio": 0.9}, 32)
    assert s.layers == (4, 7, 10, 13, 16, 19, 22, 25, 28, 31)
    assert s.keep_fractions[-1] == pytest.approx(0.9**10)
    assert [s.budget(i, 1000) for i in range(10)] == [900, 810, 729, 656, 590, 531, 478, 430, 387, 349]


def test_smollm2_default_is_65_percent_pruned():
    cfg = compose("generate", ["model=smollm2-135m", "pruning=random"])
    s = PruningSchedule.from_config(cfg.pruning, cfg.model.num_layers)
    assert s.num_stages == 10 and max(s.layers) < 30
    assert 1 - s.keep_fractions[-1] == pytest.approx(0.651, abs=1e-3)


def test_protected_tokens_count_inside_budget_and_win_when_larger():
    s = PruningSchedule(layers=(1,), keep_fractions=(0.05,), keep_first=4, keep_recent=0.1)
    assert s.num_recent(100) == 10
    assert s.budget(0, 100) == 14  # 5 requested, 14 protected


@pytest.mark.parametrize("keep_recent", [0.0, 1e-12, 0.001])
def test_the_last_token_is_protected_however_small_keep_recent(keep_recent):
    s = PruningSchedule(layers=(1,), keep_fractions=(0.5,), keep_first=0, keep_recent=keep_recent)
    assert s.num_recent(100) == 1 and s.num_recent(1) == 1 and s.num_recent(0) == 0


def test_tokens_per_layer():
    s = PruningSchedule(layers=(1, 3), keep_fractions=(0.5, 0.25), keep_first=0, keep_recent=0.0)
    assert s.tokens_per_layer(100, 4) == [100, 50, 50, 25]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["pruning.layers=[1,9]"], "pruning.layers"),
        (["pruning.layers=[0,2]"], "pruning.layers"),
        (["pruning.layers=[3,2]"], "pruning.layers"),
        (["pruning.keep_ratio=1.5"], "pruning.keep_ratio"),
        (["pruning.keep_ratio=0"], "pruning.keep_ratio"),
        (["pruning.keep_ratio=[0.9,0.8]"], "pruning.keep_ratio"),
        (["pruning.keep_ratio=[0.5,0.8,0.4]"], "pruning.keep_ratio"),
        (["pruning.keep_recent=2"], "pruning.keep_recent"),
        (["pruning.position_ids=foo"], "pruning.position_ids"),
        (["model.family=gpt2"], "model.family"),
        (["model.dtype=int3"], "model.dtype"),
    ],
)
def test_invalid_configs_fail_at_composition(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("generate", ["model=tiny-llama", "pruning=random", *overrides])


def test_unsupported_family_message_names_supported_ones():
    with pytest.raises(ConfigError, match="llama, qwen2, mistral, qwen3, gemma3"):
        compose("generate", ["model=tiny-llama", "model.family=bloom"])


def test_missing_predictor_checkpoint_is_reported_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="pruning.scorer.path"):
        compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}/nope"])


@pytest.mark.parametrize("model", ["smollm2-135m", "llama2-7b", "mistral-7b-instruct-v0.2", "qwen2-7b", "llama3-8b",
                                   "gemma3-270m", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-gemma3"])
@pytest.mark.parametrize("pruning", ["none", "random"])
def test_every_model_composes_with_its_default_schedule(model, pruning):
    cfg = compose("generate", [f"model={model}", f"pruning={pruning}"])
    if pruning != "none":
        schedule = PruningSchedule.from_config(cfg.pruning, cfg.model.num_layers)
        assert max(schedule.layers) < cfg.model.num_layers
