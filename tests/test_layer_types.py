"""Layer kinds (full vs sliding-window attention), and Gemma3's specifics.

The pruning engine (tests/test_pruner.py, tests/test_window.py), predictor training's masks
(tests/test_masking.py), the saliency labels (tests/test_saliency.py), the attention scorers
(tests/test_baseline_scorers.py) and KV compression (tests/test_kv.py) support Gemma3's sliding layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sdtp.errors import ConfigError
from sdtp.models import check_supported
from sdtp.models.layer_types import FULL, SLIDING, layer_kinds


@pytest.fixture(scope="module")
def gemma3(tiny_gemma3):
    return tiny_gemma3[0]


def test_layer_kinds_per_family():
    assert layer_kinds(SimpleNamespace(num_hidden_layers=2)) == (FULL, FULL)  # Llama: no window
    assert layer_kinds(SimpleNamespace(num_hidden_layers=2, sliding_window=4096)) == (SLIDING, SLIDING)  # Mistral v0.1
    assert layer_kinds(SimpleNamespace(num_hidden_layers=2, sliding_window=None)) == (FULL, FULL)  # Mistral v0.2
    explicit = SimpleNamespace(num_hidden_layers=2, sliding_window=8, layer_types=[SLIDING, FULL])
    assert layer_kinds(explicit) == (SLIDING, FULL)  # Gemma3 / Qwen2 / Qwen3: the config lists them


def test_gemma3_tiny_model_has_both_kinds_and_its_specifics(gemma3):
    config = gemma3.config
    assert config.model_type == "gemma3_text" and layer_kinds(config) == (SLIDING, SLIDING, FULL, SLIDING)
    assert config.rope_parameters[SLIDING]["rope_theta"] != config.rope_parameters[FULL]["rope_theta"]
    assert gemma3.model.layers[0].self_attn.scaling == pytest.approx(config.query_pre_attn_scalar ** -0.5)
    check_supported(gemma3)


def test_multimodal_gemma3_is_refused_naming_the_supported_families():
    with pytest.raises(ConfigError, match="'gemma3'.*llama, qwen2, mistral, qwen3, gemma3"):
        check_supported(SimpleNamespace(config=SimpleNamespace(model_type="gemma3")))
