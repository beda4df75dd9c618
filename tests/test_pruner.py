"""Invariants of the pruned-inference engine on tiny Llama, Qwen2, Mistral, Qwen3 and Gemma3 models.

Gemma3's sliding-window layers see, after pruning, the kept keys within the window of *original*
positions (``sdtp.models.layer_types``); the reference below builds that mask from positions alone.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import PositionScorer
from transformers import DynamicCache

from sdtp.engine.cache import cache_lengths
from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.models import decoder_layers
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.models.layer_types import SLIDING, has_sliding_layers, layer_kinds, layer_windows
from sdtp.scorers.random import RandomScorer

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)


def _scores(n: int = 512, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _rope(model, hidden, positions, kind):
    """The model's own RoPE tables of ``kind`` for ``positions`` (1, k) (Gemma3: local vs global base)."""
    rotary = model.base_model.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, positions, kind)
    return rotary(hidden, position_ids=positions)


def _reference_mask(queries, keys, kind, window):
    """(1, 1, q, k) bool mask from original positions alone: causal, and within the window for sliding
    layers; None where that is plain causal attention over a prefix (SDPA's own is_causal path)."""
    allowed = keys[0][None, :] <= queries[0][:, None]
    if kind == SLIDING:
        allowed &= queries[0][:, None] - keys[0][None, :] < window
    elif queries.shape[1] == keys.shape[1]:
        return None
    return allowed[None, None]


def _reference_forward(model, input_ids, layer_positions, decode_ids=()):
    """Slow reference: run each decoder layer on explicitly sliced inputs, then decode steps, layer by layer.

    Every layer's cache holds exactly the tokens that reached it (a plain ``DynamicCache``), and its mask
    is built from original positions (``_reference_mask``), never by HF's mask code. A layer runs on each of
    its positions' latest state, so a position absent from the layer before enters with the state it had when it
    was last computed (non-nested prefills, ``sdtp.engine.revival``).

    Args:
        layer_positions: layer -> (1, k) original positions that reach it (absent = all N).
    Returns:
        (last-layer logits at the kept positions (1, k, V), list of decode logits (1, V)).
    """
    base, kinds, window = model.base_model, layer_kinds(model.config), getattr(model.config, "sliding_window", None)
    n = input_ids.shape[1]
    all_pos = torch.arange(n).unsqueeze(0)
    cache = DynamicCache()
    latest, held = base.embed_tokens(input_ids), {}  # (1, N, D) each position's last computed state
    for idx, layer in enumerate(decoder_layers(model)):
        positions = layer_positions.get(idx, all_pos)
        held[idx] = positions
        mask = _reference_mask(positions, positions, kinds[idx], window)
        hidden = layer(latest[:, positions[0]], attention_mask=mask,
                       position_embeddings=_rope(model, latest, positions, kinds[idx]), position_ids=positions,
                       **cache_kwargs(cache), use_cache=True)
        latest = latest.index_copy(1, positions[0], hidden)
    logits = model.lm_head(base.norm(hidden))
    decode_logits = []
    for step, token in enumerate(decode_ids):
        hidden, position = base.embed_tokens(torch.tensor([[token]])), torch.tensor([[n + step]])
        for idx, layer in enumerate(decoder_layers(model)):
            held[idx] = torch.cat([held[idx], position], dim=1)
            hidden = layer(hidden, attention_mask=_reference_mask(position, held[idx], kinds[idx], window),
                           position_embeddings=_rope(model, hidden, position, kinds[idx]), position_ids=position,
                           **cache_kwargs(cache), use_cache=True)
        decode_logits.append(model.lm_head(base.norm(hidden))[:, -1])
    return logits, decode_logits


@torch.no_grad()
def test_keep_ratio_one_reproduces_unpruned_model(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
    dense = model(prompt_ids, use_cache=True)
    pruner = TokenPruner(schedule, RandomScorer(seed=0))
    with pruner(model):
        pruned = model(prompt_ids, use_cache=True)
        assert pruner.last_prefill.kept_per_stage == [97, 97, 97]
        steps = [model(torch.tensor([[t]]), **cache_kwargs(output_cache(pruned))).logits for t in (5, 6, 7)]
    dense_steps = [model(torch.tensor([[t]]), **cache_kwargs(output_cache(dense))).logits for t in (5, 6, 7)]
    assert torch.equal(pruned.logits, dense.logits)
    for a, b in zip(steps, dense_steps):
        if has_sliding_layers(model.config):
            # Under the pruner a sliding layer caches every token and HF's window mask hides the old ones;
            # the dense cache drops them (sdtp.engine.cache.unslide): the same attention, summed over
            # differently sized key axes, so equal to rounding only.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


@torch.no_grad()
def test_greedy_generation_with_ratio_one_matches_hf_generate(tiny_engine, prompt_ids):
    model, tokenizer, _ = tiny_engine
    schedule = PruningSchedule(layers=(1, 3), keep_fractions=(1.0, 1.0))
    # EOS blocked on both sides: the random Gemma3's top token after this prompt happens to be EOS.
    eos = model.generation_config.eos_token_id
    ours = generate(model, prompt_ids, 12, TokenPruner(schedule, RandomScorer()), eos_token_id=eos, min_new_tokens=12)
    hf = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.tokens == hf[0, prompt_ids.shape[1]:].tolist()


@torch.no_grad()
def test_kept_tokens_are_protected_plus_top_scored(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    table = _scores()
    pruner = TokenPruner(SCHEDULE, PositionScorer(table))
    with pruner(model):
        model(prompt_ids, use_cache=True)
    record = pruner.last_prefill
    n = prompt_ids.shape[1]
    alive = torch.arange(n)
    protected = (alive < 4) | (alive >= n - SCHEDULE.num_recent(n))
    for stage, layer in enumerate(SCHEDULE.layers):
        budget = SCHEDULE.budget(stage, n)
        free = alive[~protected[alive]]
        best = free[table[free].argsort(descending=True)[: budget - int(protected[alive].sum())]]
        alive = torch.cat([alive[protected[alive]], best]).sort().values
        assert record.layer_positions[layer][0].tolist() == alive.tolist()
        assert record.kept_per_stage[stage] == budget == round(n * SCHEDULE.keep_fractions[stage])


@torch.no_grad()
def test_the_last_prompt_token_survives_without_a_recent_window(tiny_llama, prompt_ids):
    """keep_recent=0, keep_first=0 and scores falling with position: the last token still survives (it yields the
    next-token logits), a 1-token prompt keeps its token, and max_new_tokens=0 generates nothing (as HF)."""
    model, n = tiny_llama[0], prompt_ids.shape[1]
    schedule = PruningSchedule(layers=(1, 2), keep_fractions=(0.5, 0.2), keep_first=0, keep_recent=0.0)
    pruner = TokenPruner(schedule, PositionScorer(-torch.arange(512, dtype=torch.float)))
    with pruner(model):
        model(prompt_ids, use_cache=True)
    assert pruner.last_prefill.final_positions[0].tolist() == [*range(schedule.budget(1, n) - 1), n - 1]
    assert len(generate(model, prompt_ids[:, :1], 2, pruner=pruner).sequences[0]) == 2
    assert generate(model, prompt_ids, 0, pruner=pruner).sequences == [[]]


@torch.no_grad()
def test_cache_lengths_match_tokens_per_layer(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=1))
    with pruner(model):
        out = model(prompt_ids, use_cache=True)
    record, n = pruner.last_prefill, prompt_ids.shape[1]
    # A sliding-window layer (Gemma3) keeps only the entries a later query's window reaches (sdtp.engine.window).
    reached = [record.layer_positions.get(layer, torch.arange(n)[None]) for layer in range(4)]
    live = [int((p > n - w).sum()) if w else p.shape[1] for p, w in zip(reached, layer_windows(model.config))]
    assert cache_lengths(output_cache(out)) == live
    assert record.tokens_per_layer == SCHEDULE.tokens_per_layer(n, 4) == [p.shape[1] for p in reached]
    for layer, length in enumerate(live):
        layout = record.cache_layout(layer)
        assert (layout is None and length == n) or layout[0].shape[1] == length
    # logits come back for the tokens that reached the last layer only
    assert out.logits.shape[1] == record.final_positions.shape[1] == record.kept_per_stage[-1]


@torch.no_grad()
def test_pruned_forward_equals_explicit_slicing_reference(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    pruner = TokenPruner(SCHEDULE, PositionScorer(_scores(seed=7)))
    decode_ids = [11, 12, 13]
    with pruner(model):
        out = model(prompt_ids, use_cache=True)
        cache = output_cache(out)
        steps = []
        for token in decode_ids:
            step = model(torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True)
            steps.append(step.logits[:, -1])
    ref_logits, ref_steps = _reference_forward(model, prompt_ids, pruner.last_prefill.layer_positions, decode_ids)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(steps, ref_steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_one_stage_then_layers_of_both_kinds_match_reference(tiny_engine, prompt_ids):
    """One stage at layer 1; layers 2 and 3 (Gemma3: global, then sliding) reuse the stage's slices of their kind."""
    model, _, _ = tiny_engine
    pruner = TokenPruner(PruningSchedule(layers=(1,), keep_fractions=(0.5,)), PositionScorer(_scores(seed=5)))
    with pruner(model):
        out = model(prompt_ids, use_cache=True)
        step = model(torch.tensor([[11]]), **cache_kwargs(output_cache(out)), use_cache=True).logits[:, -1]
    ref_logits, (ref_step,) = _reference_forward(model, prompt_ids, pruner.last_prefill.layer_positions, [11])
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, ref_step, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_multi_token_continuation_with_mask_matches_reference(tiny_engine, prompt_ids):
    """lm-eval style: prune the context, then score several continuation tokens in one forward."""
    model, _, _ = tiny_engine
    pruner = TokenPruner(SCHEDULE, PositionScorer(_scores(seed=9)))
    cont = torch.tensor([[21, 22, 23, 24]])
    n = prompt_ids.shape[1]
    with pruner(model):
        out = model(prompt_ids, use_cache=True)
        mask = torch.ones(1, n + cont.shape[1], dtype=torch.long)
        cont_logits = model(cont, **cache_kwargs(output_cache(out)), attention_mask=mask, use_cache=True).logits
    _, ref = _reference_forward(model, prompt_ids, pruner.last_prefill.layer_positions, cont[0].tolist())
    torch.testing.assert_close(cont_logits[0], torch.cat(ref), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_hooks_removed_and_model_unchanged_after_use(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    before = model(prompt_ids).logits
    layers = decoder_layers(model)
    pruner = TokenPruner(SCHEDULE, RandomScorer())
    with pruner(model):
        assert any(len(layer._forward_pre_hooks) for layer in layers)
        model(prompt_ids)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    assert len(model.base_model._forward_pre_hooks) == 0
    assert torch.equal(model(prompt_ids).logits, before)


@torch.no_grad()
def test_reentering_the_pruner_on_its_model_adds_no_hooks(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    layers = decoder_layers(model)
    alone = generate(model, prompt_ids, 3, TokenPruner(SCHEDULE, RandomScorer(seed=1)))
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=1))
    with pruner(model):
        hooks = [len(layer._forward_pre_hooks) for layer in layers]
        inner = generate(model, prompt_ids, 3, pruner)  # enters the pruner again
        assert [len(layer._forward_pre_hooks) for layer in layers] == hooks
        model(prompt_ids, use_cache=True)  # the outer block's hooks still work after the inner exit
        after = pruner.last_prefill.kept_per_stage
    assert inner.tokens == alone.tokens and after == alone.record.kept_per_stage
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    with pruner(model), pytest.raises(RuntimeError, match="another model"), pruner(torch.nn.Linear(1, 1)):
        pass


@torch.no_grad()
def test_hooks_removed_when_forward_raises(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, RandomScorer())
    right_padded = torch.ones_like(prompt_ids)
    right_padded[:, -3:] = 0
    with pytest.raises(NotImplementedError, match="left"), pruner(model):
        assert any(len(layer._forward_pre_hooks) for layer in decoder_layers(model))
        model(prompt_ids, attention_mask=right_padded)  # right padding: rejected inside the forward
    assert all(len(layer._forward_pre_hooks) == 0 for layer in decoder_layers(model))


def _hook_count(model) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


@torch.no_grad()
def test_a_second_pruner_on_the_same_model_is_refused(tiny_llama, prompt_ids):
    """Two different pruners on one model would both install hooks and prune every stage twice: the second is
    refused, installs nothing, and may enter once the first has exited."""
    from sdtp.engine.revival import RevivingPruner

    model, _, _ = tiny_llama
    alone = generate(model, prompt_ids, 3, TokenPruner(SCHEDULE, RandomScorer(seed=1)))
    before = _hook_count(model)
    first, second = TokenPruner(SCHEDULE, RandomScorer(seed=1)), RevivingPruner(SCHEDULE, RandomScorer(seed=2))
    with first(model):
        hooks = _hook_count(model)
        assert TokenPruner.active_on(model) is first
        with pytest.raises(RuntimeError, match="another TokenPruner is already active on this model"), second(model):
            pass
        with pytest.raises(RuntimeError, match="another TokenPruner is already active"):
            generate(model, prompt_ids, 3, TokenPruner(SCHEDULE, RandomScorer(seed=1)))  # a new pruner per call
        assert _hook_count(model) == hooks and TokenPruner.active_on(model) is first
        inner = generate(model, prompt_ids, 3, first)  # still pruned once, by `first` alone
    assert inner.tokens == alone.tokens and inner.kept_per_stage == alone.kept_per_stage
    assert _hook_count(model) == before and TokenPruner.active_on(model) is None
    with second(model):  # the first has exited: the model is free again
        assert TokenPruner.active_on(model) is second
        with pytest.raises(RuntimeError, match="another RevivingPruner is already active"), first(model):
            pass
        model(prompt_ids, use_cache=True)
        assert second.last_prefill.kept_per_stage == alone.kept_per_stage
    assert _hook_count(model) == before and TokenPruner.active_on(model) is None


@torch.no_grad()
def test_an_error_in_the_block_frees_the_model_for_the_next_pruner(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    before = _hook_count(model)
    first, second = TokenPruner(SCHEDULE, RandomScorer(seed=1)), TokenPruner(SCHEDULE, RandomScorer(seed=1))
    with pytest.raises(KeyError, match="raised in the block"), first(model):
        model(prompt_ids, use_cache=True)
        raise KeyError("raised in the block")
    assert _hook_count(model) == before and TokenPruner.active_on(model) is None
    with second(model):
        model(prompt_ids, use_cache=True)
    assert second.last_prefill.kept_per_stage == first.last_prefill.kept_per_stage
    assert _hook_count(model) == before


@torch.no_grad()
def test_random_scorer_is_deterministic_and_sampling_generation_works(tiny_llama, prompt_ids):
    from sdtp.engine.generation import SamplingConfig

    model, _, _ = tiny_llama
    runs = []
    for _ in range(2):
        pruner = TokenPruner(SCHEDULE, RandomScorer(seed=4))
        result = generate(model, prompt_ids, 6, pruner, SamplingConfig(do_sample=True, top_k=20, top_p=0.9, seed=2))
        runs.append((result.tokens, result.record.final_positions.tolist()))
    assert runs[0] == runs[1] and len(runs[0][0]) == 6


@torch.no_grad()
def test_a_static_cache_is_refused_with_a_clear_error(tiny_llama, prompt_ids):
    """A fixed-size cache cannot hold a pruned layer's fewer entries at the prompt's cache positions."""
    from transformers import StaticCache

    from sdtp.models.compat import CACHE_KWARG

    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=4))
    cache = StaticCache(config=model.config, max_cache_len=prompt_ids.shape[1] + 8)
    with pruner(model), pytest.raises(ValueError, match="needs a dynamic KV cache, got StaticCache"):
        model(prompt_ids, use_cache=True, **{CACHE_KWARG: cache})
    with pruner(model), pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(prompt_ids, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_sampling_filters_as_transformers_warpers():
    """Temperature, top-k and top-p keep the tokens transformers' warpers keep, ties at top_p included."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from sdtp.engine.generation import SamplingConfig, sampling_logits

    cases = [(torch.tensor([[2.0, 1.0, 1.0]]).log(), SamplingConfig(do_sample=True, top_p=0.75))]  # mass 0.75 exactly
    generator = torch.Generator().manual_seed(0)
    for top_k, top_p, temperature in ((0, 0.9, 1.0), (20, 0.9, 0.7), (5, 1.0, 1.3), (0, 0.3, 1.0)):
        cases.append((3 * torch.randn(4, 50, generator=generator), SamplingConfig(True, temperature, top_k, top_p)))
    for logits, sampling in cases:
        reference = TemperatureLogitsWarper(sampling.temperature)(None, logits.clone())
        if sampling.top_k:
            reference = TopKLogitsWarper(sampling.top_k)(None, reference)
        if sampling.top_p < 1:
            reference = TopPLogitsWarper(sampling.top_p)(None, reference)
        ours = sampling_logits(logits, sampling)
        # the same number of tokens kept, and the same logits (which of two equal ones is kept is arbitrary)
        assert torch.equal(ours.isinf().sum(-1), reference.isinf().sum(-1))
        assert torch.equal(ours.sort(-1).values, reference.float().sort(-1).values)


@torch.no_grad()
def test_renumbered_positions_ablation_runs_and_differs(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    original = TokenPruner(SCHEDULE, RandomScorer(seed=4))
    renumber = TokenPruner(PruningSchedule(**{**SCHEDULE.__dict__, "position_ids": "renumber"}), RandomScorer(seed=4))
    with original(model):
        a = model(prompt_ids).logits
    with renumber(model):
        b = model(prompt_ids).logits
    assert a.shape == b.shape and not torch.allclose(a, b)


@torch.no_grad()
def test_renumbered_positions_refuse_decoding_on_the_pruned_cache(tiny_llama, prompt_ids):
    """Each renumbered layer holds its k_l kept tokens at 0..k_l-1, but a decode step continues at N: refused at the
    first step after the prefill, rather than attending across a per-layer position gap."""
    model, _, _ = tiny_llama
    renumber = TokenPruner(PruningSchedule(**{**SCHEDULE.__dict__, "position_ids": "renumber"}), RandomScorer(seed=4))
    assert len(generate(model, prompt_ids, 1, renumber).tokens) == 1  # the prefill's own logits: allowed
    with pytest.raises(NotImplementedError, match="position_ids=renumber covers the prefill only"):
        generate(model, prompt_ids, 3, renumber)


class _ShortScorer(PositionScorer):
    """Returns one score too few (a scorer bug the pruner must name, not a broadcasting error)."""

    def score(self, ctx):
        return super().score(ctx)[:, 1:]


@torch.no_grad()
def test_scores_of_the_wrong_shape_are_refused(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    with pytest.raises(ValueError, match="_ShortScorer scored .* expected one score per alive token"):
        with TokenPruner(SCHEDULE, _ShortScorer(_scores()))(model):
            model(prompt_ids)
