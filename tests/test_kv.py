"""KV-cache compression: exact per-layer budgets, H2O/SnapKV scores vs eager attention, decoding, composition,
scores of your own."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

import sdtp.kv.compressor as compressor_module
from sdtp.config import compose
from sdtp.engine.cache import cache_lengths, select_rows
from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.eval.scoring import prefill_context
from sdtp.kv import CompressedCache, KVCompressor, KVPolicy, build_kv_policy
from sdtp.kv.scores import KVScore, LayerPrefill
from sdtp.models import load_model
from sdtp.models.compat import cache_from_kwargs, cache_kwargs, output_cache
from sdtp.models.layer_types import FULL, layer_kinds
from sdtp.scorers.random import RandomScorer

METHODS = ("h2o", "streaming", "snapkv")


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_compression_keeps_budget_per_layer_and_decodes_at_original_positions(tiny, prompt_ids, method):
    model, _, _ = tiny
    policy = KVPolicy(method, ratio=0.4, window=8)
    n = prompt_ids.shape[1]
    with KVCompressor(policy)(model) as press:
        cache = output_cache(model(prompt_ids, use_cache=True))
        assert cache_lengths(cache) == [policy.budget(n)] * model.config.num_hidden_layers
        assert press.last_sizes == [(n, policy.budget(n))] * model.config.num_hidden_layers
        assert cache.get_seq_length() == n  # logical length: decoding continues at position n
        reference = DynamicCache(config=model.config)
        for idx, layer in enumerate(cache.layers):
            reference.update(layer.keys.clone(), layer.values.clone(), idx)
        for step, token in enumerate((5, 6, 7)):
            ids = torch.tensor([[token]])
            ours = model(ids, **cache_kwargs(cache), use_cache=True).logits
            ref = model(ids, **cache_kwargs(reference), use_cache=True, position_ids=torch.tensor([[n + step]])).logits
            torch.testing.assert_close(ours, ref)
        assert cache_lengths(cache) == [policy.budget(n) + 3] * model.config.num_hidden_layers
    with pytest.raises(NotImplementedError, match="token by token only"):  # no hooks: no mask for a block
        model(torch.tensor([[1, 2]]), **cache_kwargs(cache), use_cache=True)


def _decode_one_by_one(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """(1, W, V) logits of ``ids`` (1, W) fed one token per forward from position ``start`` (the decode path)."""
    steps = [model(ids[:, i : i + 1], **cache_kwargs(cache), use_cache=True,
                   position_ids=torch.tensor([[start + i]])).logits for i in range(ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pruned", [False, True])
@torch.no_grad()
def test_block_of_tokens_on_compressed_cache_equals_decoding_them_one_by_one(tiny_engine, prompt_ids, method, pruned):
    """A continuation fed in one forward (lm-eval's scoring) attends exactly what token-by-token decoding does:
    each head its kept prompt entries, the new tokens causally; also after row selection, and under a pruner
    (Gemma3: its sliding layers, left uncompressed, as HF's masks have them)."""
    model, _, _ = tiny_engine
    policy = KVPolicy(method, ratio=0.4, window=8)
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45))
    pruner = TokenPruner(schedule, RandomScorer(seed=0)) if pruned else None
    n, block = prompt_ids.shape[1], torch.tensor([[11, 12, 13, 14, 15]])
    with KVCompressor(policy)(model) as press:
        ctx = prefill_context(model, prompt_ids, pruner)
        full = [idx for idx, kind in enumerate(layer_kinds(model.config)) if kind == FULL]
        assert isinstance(ctx.cache, CompressedCache) and full
        assert all(press.last_sizes[idx][1] < 0.5 * press.last_sizes[idx][0] for idx in full)
        rows = torch.tensor([0, 0])  # two choices of one context, as lm-eval scores them
        with pruner(model) if pruner is not None else nullcontext():
            if pruner is not None:
                pruner.last_prefill = ctx.record.select(rows)
            together = model(input_ids=block.expand(2, -1), **cache_kwargs(select_rows(ctx.cache, rows)),
                             attention_mask=torch.ones(2, n + block.shape[1], dtype=torch.long),
                             position_ids=n + torch.arange(block.shape[1]).expand(2, -1), use_cache=True).logits
            if pruner is not None:
                pruner.last_prefill = ctx.record
            one_by_one = _decode_one_by_one(model, select_rows(ctx.cache, torch.tensor([0])), block, n)
    torch.testing.assert_close(together[:1], one_by_one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1:], one_by_one, atol=1e-4, rtol=1e-4)
    # the copies left it intact: the policy's cut in full-attention layers, the window's in sliding ones (pruned)
    widths = ctx.record.cache_widths(len(press.last_sizes)) if pruner is not None else None
    assert cache_lengths(ctx.cache) == [after if idx in full or widths is None else widths[idx]
                                        for idx, (_, after) in enumerate(press.last_sizes)]


def _attend_only(kept: torch.Tensor, length: int, heads: int):
    """A pre-hook on a full-attention module: each query head attends only its KV head's ``kept`` (1, H_kv, k)
    entries among the first ``length`` keys, and every key after them (one query at a time, no padding)."""
    def hook(module, args, kwargs):
        keys = cache_from_kwargs(kwargs).layers[module.layer_idx].keys
        visible = torch.ones(1, kept.shape[1], 1, keys.shape[-2] + 1, dtype=torch.bool)
        visible[..., :length] = False
        visible[..., :length].scatter_(-1, kept[:, :, None, :], True)
        return args, {**kwargs, "attention_mask": visible.repeat_interleave(heads // kept.shape[1], dim=1)}

    return hook


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_sliding_window_models_compress_their_full_attention_layers_only(tiny_gemma3, prompt_ids, method):
    """Gemma3: the global layer keeps its budget per KV head, the sliding layers what HF keeps of their window,
    and decoding equals the dense cache with each global head's evicted entries masked out."""
    model, n = tiny_gemma3[0], prompt_ids.shape[1]
    kinds, window = layer_kinds(model.config), model.config.sliding_window
    policy = KVPolicy(method, ratio=0.4, window=8)
    with KVCompressor(policy)(model) as press:
        cache = output_cache(model(prompt_ids, use_cache=True))
        assert cache_lengths(cache) == [policy.budget(n) if kind == FULL else window - 1 for kind in kinds]
        assert press.last_sizes == [(n, policy.budget(n)) if kind == FULL else (window - 1,) * 2 for kind in kinds]
        ours = _decode_one_by_one(model, cache, torch.tensor([[5, 6, 7]]), n)
    reference = output_cache(model(prompt_ids, use_cache=True))
    global_layers = [idx for idx, kind in enumerate(kinds) if kind == FULL]
    assert global_layers and all(kept is None for idx, kept in enumerate(cache.kept) if idx not in global_layers)
    heads = model.config.num_attention_heads
    handles = [model.model.layers[idx].self_attn.register_forward_pre_hook(
        _attend_only(cache.kept[idx], n, heads), with_kwargs=True) for idx in global_layers]
    try:
        dense = _decode_one_by_one(model, reference, torch.tensor([[5, 6, 7]]), n)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-4)
    unmasked = _decode_one_by_one(model, output_cache(model(prompt_ids, use_cache=True)), torch.tensor([[5, 6, 7]]), n)
    assert (ours - unmasked).abs().max() > 1e-3  # the global layer's evictions do change the logits


def test_a_model_whose_every_layer_slides_has_nothing_to_compress():
    model, _ = load_model(compose("generate", ["model=tiny-mistral", "+model.arch.sliding_window=16"]).model)
    with pytest.raises(NotImplementedError, match="every layer of 'mistral' is a sliding-window one"):
        with KVCompressor(KVPolicy("h2o"))(model):
            pass


@torch.no_grad()
def test_block_on_compressed_cache_differs_from_the_uncompressed_one(tiny_llama, prompt_ids):
    """The mask gathering does not undo the compression: the same block on the full cache scores differently."""
    model, _, _ = tiny_llama
    block, n = torch.tensor([[11, 12, 13]]), prompt_ids.shape[1]
    kwargs = {"attention_mask": torch.ones(1, n + 3, dtype=torch.long), "use_cache": True}
    full = model(input_ids=block, **cache_kwargs(output_cache(model(prompt_ids, use_cache=True))), **kwargs).logits
    with KVCompressor(KVPolicy("streaming", ratio=0.3))(model):
        cache = output_cache(model(prompt_ids, use_cache=True))
        ours = model(input_ids=block, **cache_kwargs(cache), **kwargs).logits
    assert (ours - full).abs().max() > 1e-3


def test_left_padded_prefill_is_refused(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    mask = torch.ones_like(prompt_ids)
    mask[:, :3] = 0
    with KVCompressor(KVPolicy("h2o"))(model), pytest.raises(NotImplementedError, match="left-padded"):
        model(prompt_ids, attention_mask=mask, use_cache=True)


@torch.no_grad()
def test_full_ratio_is_lossless(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    dense = generate(model, prompt_ids, 6, keep_logits=True)
    with KVCompressor(KVPolicy("h2o", ratio=1.0))(model):
        ours = generate(model, prompt_ids, 6, keep_logits=True)
    assert ours.tokens == dense.tokens
    for a, b in zip(ours.step_logits, dense.step_logits):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["h2o", "snapkv"])
@torch.no_grad()
def test_attention_statistics_match_eager_reference(prompt_ids, method, family, monkeypatch):
    """H2O = attention summed over all queries; SnapKV = last-window attention, pooled over the keys before the
    window as SnapKV does (the window's own votes never spill into its neighbours; per KV head); on Gemma3
    (q/k norms, its own query scaling) at its full-attention layer, the only one scored."""
    cfg = compose("generate", [f"model=tiny-{family}", "model.attn_implementation=eager"])
    model, _ = load_model(cfg.model)
    policy = KVPolicy(method, ratio=0.5, window=6, kernel=3)
    seen = {}
    real = compressor_module.compress_cache

    def spy(cache, pol, scores, layers):
        seen.update({k: v.clone() for k, v in scores.items()})
        return real(cache, pol, scores, layers)

    monkeypatch.setattr(compressor_module, "compress_cache", spy)
    with KVCompressor(policy)(model):
        out = model(prompt_ids, use_cache=True, output_attentions=True)
    kv_heads = model.config.num_key_value_heads
    assert set(seen) == {idx for idx, kind in enumerate(layer_kinds(model.config)) if kind == FULL}
    for idx in seen:
        attn = out.attentions[idx]  # (B, H, N, N)
        grouped = attn.float().view(1, kv_heads, -1, *attn.shape[-2:])
        if method == "h2o":
            reference = grouped.sum(dim=(2, 3))
        else:
            votes = grouped[:, :, :, -6:].sum(dim=(2, 3))
            pooled = torch.nn.functional.avg_pool1d(votes[..., :-6], 3, stride=1, padding=1)
            reference = torch.cat([pooled, votes[..., -6:]], dim=-1)
        torch.testing.assert_close(seen[idx], reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_token_pruning_composes_with_kv_policy(tiny_engine, prompt_ids, method):
    """The policy cuts what the pruned prefill left in each full-attention layer; Gemma3's sliding layers keep
    what their window still shows (sdtp.engine.window)."""
    model, _, _ = tiny_engine
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45))
    policy = KVPolicy(method, ratio=0.4, window=8)
    n, layers = prompt_ids.shape[1], model.config.num_hidden_layers
    full = [idx for idx, kind in enumerate(layer_kinds(model.config)) if kind == FULL]
    reached = schedule.tokens_per_layer(n, layers)
    pruner = TokenPruner(schedule, RandomScorer(seed=0))
    with KVCompressor(policy)(model) as press:
        result = generate(model, prompt_ids, 5, pruner)
    assert [press.last_sizes[idx] for idx in full] == [(reached[idx], policy.budget(reached[idx])) for idx in full]
    assert len(result.tokens) == 5
    lengths = cache_lengths(result.cache)
    assert [lengths[idx] for idx in full] == [policy.budget(reached[idx]) + 4 for idx in full]  # 4 decode steps
    # a sliding layer also drops, after each step, what the next query's window no longer reaches
    window = getattr(model.config, "sliding_window", None)
    assert all(length < window for idx, length in enumerate(lengths) if idx not in full)


@torch.no_grad()
def test_kept_fraction_counts_the_compressed_layers_in_either_nesting_order(tiny_gemma3, prompt_ids):
    """Gemma3 + pruner + policy: kept_fraction is over the global layers only, so it does not depend on whether
    the pruner has trimmed the sliding layers to their window when the compressor counts."""
    model = tiny_gemma3[0]
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45))
    policy = KVPolicy("h2o", ratio=0.4)
    full = [idx for idx, kind in enumerate(layer_kinds(model.config)) if kind == FULL]
    reached = schedule.tokens_per_layer(prompt_ids.shape[1], model.config.num_hidden_layers)
    expected = sum(policy.budget(reached[idx]) for idx in full) / sum(reached[idx] for idx in full)
    for kv_outer in (True, False):
        pruner, press = TokenPruner(schedule, RandomScorer(seed=0)), KVCompressor(policy)
        first, second = (press, pruner) if kv_outer else (pruner, press)
        with first(model), second(model):
            model(prompt_ids, use_cache=True)
        assert press.kept_fraction == pytest.approx(expected), kv_outer


def test_kv_config_group():
    assert build_kv_policy(compose("generate", [])) is None
    policy = build_kv_policy(compose("generate", ["kv=h2o"]))
    assert policy == KVPolicy("h2o", ratio=0.4, keep_first=4, keep_recent=0.1)
    assert build_kv_policy(compose("generate", ["kv=snapkv", "kv.ratio=0.2"])).ratio == 0.2
    with pytest.raises(ConfigError, match="kv.ratio"):
        compose("generate", ["kv=streaming", "kv.ratio=0"])
    with pytest.raises(ConfigError, match="kv.kernel"):
        compose("generate", ["kv=snapkv", "kv.kernel=4"])
    # A policy of your own names its score's class; here the built-in H2O statistic under another name.
    mine = build_kv_policy(compose("generate", ["kv=h2o", "kv.method=mine",
                                                "+kv.score._target_=sdtp.kv.scores.AccumulatedAttention"]))
    assert mine.method == "mine" and type(mine.statistic).__name__ == "AccumulatedAttention"


def test_generate_cli_applies_kv_policy_after_pruned_prefill(capsys):
    from sdtp.cli.generate import run

    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    overrides = ["model=tiny-llama", "pruning=lazyllm", "kv=h2o", f"prompt={prompt!r}", "max_new_tokens=3"]
    summary = run(compose("generate", overrides))
    dense = run(compose("generate", ["model=tiny-llama", "pruning=lazyllm", f"prompt={prompt!r}", "max_new_tokens=3"]))
    assert summary["kv"] == "h2o" and summary["kv_ratio"] == 0.4 and dense["kv"] == "none"
    assert summary["kept_per_stage"] == dense["kept_per_stage"]
    assert summary["kv_cache_bytes"] < 0.5 * dense["kv_cache_bytes"]


@torch.no_grad()
def test_hf_generate_runs_on_compressed_cache(tiny_llama, prompt_ids):
    """Transformers' own generate() decodes from the compressed cache exactly like ours."""
    model, _, _ = tiny_llama
    with KVCompressor(KVPolicy("snapkv", ratio=0.5, window=8))(model):
        hf = model.generate(prompt_ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ours = generate(model, prompt_ids, 6)
    assert hf[0, prompt_ids.shape[1]:].tolist() == ours.tokens


class ValueNormScore(KVScore):
    """A user's score: the L2 norm of each cached value (not a built-in statistic), with a window of its own."""

    recent = 7

    def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
        return prefill.values.float().norm(dim=-1)  # (B, H_kv, T)


@torch.no_grad()
def test_a_score_of_your_own_keeps_protected_plus_its_top_entries_per_head(tiny_llama, prompt_ids):
    """Each layer and KV head keeps the first/recent entries (its ``recent`` window included) plus the entries
    with the largest score, computed here by hand from the uncompressed prefill's values."""
    model, _, _ = tiny_llama
    policy = KVPolicy("value_norm", ratio=0.4, score=ValueNormScore())
    n = prompt_ids.shape[1]
    dense = output_cache(model(prompt_ids, use_cache=True))
    with KVCompressor(policy)(model):
        cache = output_cache(model(prompt_ids, use_cache=True))
    protected = policy.protected(n)
    assert int(protected[n - 7 :].sum()) == 7 and policy.num_recent(n) == 10  # max(ceil(0.1 n), 7)
    for idx, layer in enumerate(dense.layers):
        score = layer.values.float().norm(dim=-1)[0]  # (H_kv, T)
        for head in range(score.shape[0]):
            kept = cache.kept[idx][0, head]
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[kept] = True
            assert len(kept) == policy.budget(n) and bool(chosen[protected].all())
            # repeated prompt tokens have equal values at layer 0: ties may go either way
            assert score[head, chosen & ~protected].min() >= score[head, ~chosen].max()


@torch.no_grad()
def test_a_score_of_the_wrong_shape_is_named(tiny_llama, prompt_ids):
    class PerToken(KVScore):
        def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
            return prefill.hidden.norm(dim=-1)  # (B, T): one score per token, not per KV head

    model, _, _ = tiny_llama
    with KVCompressor(KVPolicy("per_token", score=PerToken()))(model), \
            pytest.raises(ValueError, match=r"kv.score PerToken returned shape \(1, 97\) at layer 0; expected"):
        model(prompt_ids, use_cache=True)


def test_a_score_of_your_own_needs_a_name_of_its_own():
    with pytest.raises(ConfigError, match="kv.method: 'h2o' names a built-in policy"):
        KVPolicy("h2o", score=ValueNormScore())
    with pytest.raises(ConfigError, match="kv.method: 'mine' not in"):
        KVPolicy("mine")
    with pytest.raises(ConfigError, match="kv.score: Linear is not a sdtp.kv.scores.KVScore"):
        KVPolicy("mine", score=torch.nn.Linear(1, 1))


@torch.no_grad()
def test_layer_ratios_set_each_layers_budget(tiny, prompt_ids):
    """``kv.layer_ratios``: one kept fraction per layer (PyramidKV-style, or a pruning schedule's tokens per layer)."""
    model, _, _ = tiny
    layers, n = model.config.num_hidden_layers, prompt_ids.shape[1]
    ratios = tuple(1.0 - 0.6 * i / (layers - 1) for i in range(layers))  # 1.0 down to 0.4
    policy = KVPolicy("h2o", ratio=0.4, layer_ratios=ratios)
    with KVCompressor(policy)(model) as press:
        cache = output_cache(model(prompt_ids, use_cache=True))
    expected = [max(round(n * r), policy.budget(n)) for r in ratios]
    assert cache_lengths(cache) == expected == [after for _, after in press.last_sizes]
    assert expected[0] == n and expected[-1] == policy.budget(n)
    with pytest.raises(ConfigError, match="kv.layer_ratios: 2 ratios for a model with"):
        with KVCompressor(KVPolicy("h2o", layer_ratios=(1.0, 0.5)))(model):
            pass


def test_layer_ratios_are_checked_at_composition():
    policy = build_kv_policy(compose("generate", ["model=tiny-llama", "kv=h2o", "+kv.layer_ratios=[1,1,0.5,0.5]"]))
    assert policy.layer_ratios == (1.0, 1.0, 0.5, 0.5) and policy.budget(100, 2) == 50 and policy.budget(100) == 40
    with pytest.raises(ConfigError, match="kv.layer_ratios: 3 ratios for a model with 4 layers"):
        compose("generate", ["model=tiny-llama", "kv=h2o", "+kv.layer_ratios=[1,1,0.5]"])
    with pytest.raises(ConfigError, match=r"kv.layer_ratios: .* in \(0, 1\]"):
        compose("generate", ["model=tiny-llama", "kv=h2o", "+kv.layer_ratios=[1,1,0,0.5]"])


@torch.no_grad()
def test_per_head_false_keeps_one_token_set_per_layer(tiny_llama, prompt_ids):
    """``kv.per_head=false``: every KV head of a layer keeps the same entries: protected + top of the summed score."""
    model, _, _ = tiny_llama
    policy = KVPolicy("h2o", ratio=0.4, per_head=False)
    scores = {}
    real = compressor_module.compress_cache

    def spy(cache, pol, layer_scores, layers):
        scores.update({idx: score.clone() for idx, score in layer_scores.items()})
        return real(cache, pol, layer_scores, layers)

    n = prompt_ids.shape[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compressor_module, "compress_cache", spy)
        with KVCompressor(policy)(model):
            cache = output_cache(model(prompt_ids, use_cache=True))
    assert model.config.num_key_value_heads > 1
    protected = policy.protected(n)
    for idx, kept in enumerate(cache.kept):  # (B, H_kv, k)
        assert kept.shape[-1] == policy.budget(n) and bool((kept == kept[:, :1]).all())
        total = scores[idx].sum(dim=1)[0].masked_fill(protected, float("inf"))
        assert set(kept[0, 0].tolist()) == set(total.topk(policy.budget(n)).indices.tolist())
    assert build_kv_policy(compose("generate", ["kv=h2o", "+kv.per_head=false"])).per_head is False


class LayerNoise(KVScore):
    """Scores drawn per layer (seeded by the layer), so free per-layer choices are not nested by chance."""

    def __call__(self, prefill: LayerPrefill) -> torch.Tensor:
        generator = torch.Generator().manual_seed(prefill.layer)
        return torch.rand(prefill.keys.shape[:3], generator=generator)


@torch.no_grad()
def test_nested_layers_keep_subsets_of_the_layer_before(tiny_llama, prompt_ids):
    """``kv.nested``: an entry evicted at one layer stays evicted deeper (the token pruner's constraint), and each
    layer keeps its protected entries plus the top of its own score among what the layer before kept."""
    model, _, _ = tiny_llama
    n, layers = prompt_ids.shape[1], model.config.num_hidden_layers
    ratios = tuple(0.9 ** (i + 1) for i in range(layers))

    def kept(**options):
        policy = KVPolicy("noise", score=LayerNoise(), layer_ratios=ratios, **options)
        with KVCompressor(policy)(model):
            cache = output_cache(model(prompt_ids, use_cache=True))
        return [set(k[0, 0].tolist()) for k in cache.kept], policy

    (nested, policy), (free, _) = kept(nested=True), kept()
    assert [len(k) for k in nested] == [len(k) for k in free] == [policy.budget(n, i) for i in range(layers)]
    assert nested[0] == free[0] and any(not deeper <= shallower for shallower, deeper in zip(free, free[1:]))
    protected = set(policy.protected(n).nonzero()[:, 0].tolist())
    for idx in range(1, layers):
        score = torch.rand(n, generator=torch.Generator().manual_seed(idx))
        others = sorted(nested[idx - 1] - protected, key=lambda j: -float(score[j]))
        assert nested[idx] == protected | set(others[: policy.budget(n, idx) - len(protected)])
    pruned = TokenPruner(PruningSchedule(layers=(2,), keep_fractions=(0.5,)), RandomScorer())
    with pruned(model), KVCompressor(KVPolicy("h2o", nested=True))(model):
        with pytest.raises(ValueError, match="kv.nested: layers cache"):
            model(prompt_ids, use_cache=True)
