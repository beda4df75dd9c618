"""The analytic FLOPs model against torch's FlopCounterMode and the closed form."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sdtp.engine.cache import cache_lengths
from sdtp.engine.generation import prefill
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.revival import RevivingPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.flops import (ModelDims, attention_pairs, compression_ratio, estimate, flop_counter_mapping, revived_scored,
                        window_pairs)
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.models.layer_types import layer_windows, visible_keys
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.predictor import PredictorScorer
from sdtp.scorers.random import RandomScorer

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


@torch.no_grad()
def test_reviving_pruner_flops_with_predictor_equal_counter(tiny_llama, prompt_ids):
    """+pruning.revive=true: every stage scores all N prompt tokens, and the estimate given them counts it."""
    model = tiny_llama[0]
    predictor = TokenPredictor(PredictorMeta(hidden_size=model.config.hidden_size, layers=list(SCHEDULE.layers)))
    pruner = RevivingPruner(SCHEDULE, PredictorScorer(predictor=predictor))
    with pruner(model):
        counted = _counted(model, lambda: _generate_steps(model, prompt_ids, NEW - 1))
        tokens = pruner.last_prefill.tokens_per_layer
    scored = revived_scored(N, tokens, SCHEDULE.layers)
    assert scored == [N] * 3
    est = estimate(model.config, N, tokens, NEW, predictor.num_flops_per_token(), SCHEDULE.layers, attention="full",
                   scored_per_stage=scored)
    assert counted == est["pruned"]["end_to_end"]["total"]


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


def _mask_pairs(positions: torch.Tensor, window: int | None) -> int:
    """(query, key) pairs the layer's mask admits, counted on the whole offset matrix."""
    return int(visible_keys(positions[:, None] - positions[None, :], window).sum())


@pytest.mark.parametrize("window", [None, 1, 5, 16, 200])
def test_window_pairs_count_the_mask(window):
    spread = torch.sort(torch.randperm(300, generator=torch.Generator().manual_seed(0))[:120]).values
    assert window_pairs(spread.tolist(), window) == _mask_pairs(spread, window)
    assert window_pairs(range(40, 140), window) == _mask_pairs(torch.arange(40, 140), window)
    assert attention_pairs(100, "causal", window) == _mask_pairs(torch.arange(100), window)


@torch.no_grad()
def test_dense_gemma3_flops_equal_counter(tiny_gemma3, prompt_ids):
    """Sliding layers (window 16 < 97 tokens): the SDPA kernel is charged n^2 at prefill, and a decode
    step reads HF's trimmed window (window - 1 cached keys and the new one)."""
    model, _, _ = tiny_gemma3
    est = estimate(model.config, N, None, new_tokens=NEW, attention="full")
    assert _counted(model, lambda: _generate_steps(model, prompt_ids, NEW - 1)) == est["dense"]["end_to_end"]["total"]
    _, cache, _ = prefill(model, prompt_ids)
    assert est["cached_per_layer"]["dense"] == cache_lengths(cache) == [15, 15, N, 15]


@torch.no_grad()
def test_pruned_gemma3_pairs_and_cache_from_positions(tiny_gemma3, prompt_ids):
    """With the positions each layer processed, the causal count is the mask's, layer by layer, and the
    expected cache is the one the pruned prefill leaves (sliding layers trimmed to their window)."""
    model, _, _ = tiny_gemma3
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=3))
    with pruner(model):
        _, cache, _ = prefill(model, prompt_ids)
    record, dims = pruner.last_prefill, ModelDims.from_config(model.config)
    positions = [record.layer_positions[layer][0] if layer in record.layer_positions else torch.arange(N)
                 for layer in range(dims.num_layers)]
    est = estimate(model.config, N, record.tokens_per_layer, 1, attention="causal",
                   positions_per_layer=[p.tolist() for p in positions])
    windows = layer_windows(model.config)
    expected = sum(4 * dims.q_dim * _mask_pairs(p, w) for p, w in zip(positions, windows))
    assert est["pruned"]["prefill"]["attention"] == expected
    assert est["cached_per_layer"]["pruned"] == cache_lengths(cache)
    assert est["kv_reduction"] == pytest.approx(1 - sum(cache_lengths(cache)) / sum(est["cached_per_layer"]["dense"]))
    # From counts alone a pruned sliding layer is taken as contiguous: an upper bound on its pairs.
    counts_only = estimate(model.config, N, record.tokens_per_layer, 1, attention="causal")
    assert counts_only["pruned"]["prefill"]["attention"] > expected


def test_decode_pairs_follow_the_window():
    """Gemma3-shaped config: one step after a 2K prefill reads `window` keys at a sliding layer, not 2K."""
    config = {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
              "intermediate_size": 2048, "vocab_size": 262144, "num_hidden_layers": 2, "sliding_window": 512,
              "layer_types": ["sliding_attention", "full_attention"]}
    dims, n = ModelDims.from_config(config), 2048
    assert dims.windows == (512, None)
    step = estimate(config, n, None, new_tokens=2)["dense"]["decode"]["attention"]
    assert step == 4 * dims.q_dim * (512 + n + 1)
    prefill_attn = estimate(config, n, None)["dense"]["prefill"]["attention"]
    assert prefill_attn == 4 * dims.q_dim * (512 * 513 // 2 + (n - 512) * 512 + n * (n + 1) // 2)
