"""The analytic FLOPs model against torch's FlopCounterMode and the closed form."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.flops import ModelDims, compression_ratio, estimate, flop_counter_mapping
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.predictor import PredictorScorer

N, NEW = 97, 4
SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)


def _counted(model, run) -> int:
    with FlopCounterMode(display=False, custom_mapping=flop_counter_mapping()) as counter:
        run()
    return counter.get_total_flops()


def _generate_steps(model, ids, steps):
    """Prefill with logits for the last position, then ``steps`` single-token decode forwards."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    for t in range(steps):
        out = model(torch.tensor([[5 + t]]), **cache_kwargs(output_cache(out)), use_cache=True)


@torch.no_grad()
def test_dense_flops_equal_counter(tiny, prompt_ids):
    model, _, _ = tiny
    est = estimate(model.config, N, None, new_tokens=NEW, attention="full")
    assert _counted(model, lambda: model(prompt_ids, use_cache=True, logits_to_keep=1)) == est["dense"]["prefill"]["total"]
    assert _counted(model, lambda: _generate_steps(model, prompt_ids, NEW - 1)) == est["dense"]["end_to_end"]["total"]


@torch.no_grad()
def test_pruned_flops_with_predictor_equal_counter(tiny, prompt_ids):
    model, _, _ = tiny
    predictor = TokenPredictor(PredictorMeta(hidden_size=model.config.hidden_size, layers=list(SCHEDULE.layers)))
    pruner = TokenPruner(SCHEDULE, PredictorScorer(predictor=predictor))
    with pruner(model):
        counted = _counted(model, lambda: _generate_steps(model, prompt_ids, NEW - 1))
        tokens = pruner.last_prefill.tokens_per_layer
    assert tokens == SCHEDULE.tokens_per_layer(N, 4)
    est = estimate(model.config, N, tokens, NEW, predictor.num_flops_per_token(), SCHEDULE.layers, attention="full")
    assert counted == est["pruned"]["end_to_end"]["total"]
    assert est["pruned"]["prefill"]["predictor"] == predictor.num_flops_per_token() * sum(tokens[0:3])
    assert est["prefill_ratio"] > 1.0 and est["decode_ratio"] > 1.0


def test_dense_closed_form_smollm2_shape():
    config = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
              "vocab_size": 49152, "num_hidden_layers": 30}
    d, q, kv, f, v, layers, n = 576, 576, 192, 1536, 49152, 30, 2048
    causal = layers * (2 * n * (d * q + 2 * d * kv + q * d + 3 * d * f) + 4 * q * n * (n + 1) // 2) + 2 * d * v
    est = estimate(config, n, None, new_tokens=1)
    assert est["dense"]["prefill"]["total"] == causal
    assert est["dense"]["end_to_end"]["total"] == causal  # one new token comes from the prefill logits
    full = estimate(config, n, None, attention="full")["dense"]["prefill"]["attention"]
    assert full == layers * 4 * q * n * n
    assert ModelDims.from_config(config).linear_per_token == 2 * 576 * (576 * 2 + 2 * 192 + 3 * 1536)
    step = estimate(config, n, None, new_tokens=2)["dense"]["decode"]["total"]
    assert step == layers * (2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 4 * q * (n + 1)) + 2 * d * v


@pytest.mark.parametrize("attention", ["causal", "full"])
def test_flops_monotone_in_keep_ratio(attention):
    config = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
              "vocab_size": 49152, "num_hidden_layers": 30}
    totals, ratios = [], []
    for r in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        schedule = PruningSchedule(layers=tuple(range(2, 30, 3)), keep_fractions=tuple(r ** (s + 1) for s in range(10)))
        tokens = schedule.tokens_per_layer(4096, 30)
        est = estimate(config, 4096, tokens, new_tokens=16, attention=attention)
        totals.append(est["pruned"]["end_to_end"]["total"])
        ratios.append(compression_ratio(4096, tokens))
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] == 1.0


def test_compression_ratio_counts_protected_tokens():
    schedule = PruningSchedule(layers=(1,), keep_fractions=(0.01,), keep_first=4, keep_recent=0.1)
    tokens = schedule.tokens_per_layer(1000, 2)
    assert tokens == [1000, 104]  # the budget (10) is below the protected count (4 + 100)
    assert compression_ratio(1000, tokens) == pytest.approx(2000 / 1104)
