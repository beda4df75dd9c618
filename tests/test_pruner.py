"""Invariants of the pruned-inference engine on tiny Llama, Qwen2 and Mistral models."""

from __future__ import annotations

import torch
from conftest import PositionScorer
from transformers import DynamicCache

from sdtp.engine.cache import cache_lengths
from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.models import decoder_layers
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.scorers.random import RandomScorer

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)


def _scores(n: int = 512, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _reference_forward(model, input_ids, layer_positions, decode_ids=()):
    """Slow reference: run each decoder layer on explicitly sliced inputs, then decode steps.

    Args:
        layer_positions: layer -> (1, k) original positions that reach it (absent = all N).
    Returns:
        (last-layer logits at the kept positions (1, k, V), list of decode logits (1, V)).
    """
    base = model.base_model
    n = input_ids.shape[1]
    all_pos = torch.arange(n).unsqueeze(0)
    hidden_full = base.embed_tokens(input_ids)
    cache = DynamicCache(config=model.config)
    hidden, positions = hidden_full, all_pos
    for idx, layer in enumerate(decoder_layers(model)):
        target = layer_positions.get(idx, all_pos)
        if target.shape[1] != positions.shape[1]:
            local = torch.searchsorted(positions[0], target[0])  # positions are sorted
            assert torch.equal(positions[0, local], target[0])
            hidden, positions = hidden[:, local], target
        cos_sin = base.rotary_emb(hidden, position_ids=positions)
        hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=positions,
                       **cache_kwargs(cache), use_cache=True)
    logits = model.lm_head(base.norm(hidden))
    decode_logits = []
    for step, token in enumerate(decode_ids):
        out = model(input_ids=torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True,
                    position_ids=torch.tensor([[n + step]]))
        decode_logits.append(out.logits[:, -1])
    return logits, decode_logits


@torch.no_grad()
def test_keep_ratio_one_reproduces_unpruned_model(tiny, prompt_ids):
    model, _, _ = tiny
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
        assert torch.equal(a, b)


@torch.no_grad()
def test_greedy_generation_with_ratio_one_matches_hf_generate(tiny, prompt_ids):
    model, tokenizer, _ = tiny
    schedule = PruningSchedule(layers=(1, 3), keep_fractions=(1.0, 1.0))
    ours = generate(model, prompt_ids, 12, TokenPruner(schedule, RandomScorer()), eos_token_id=None)
    hf = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.tokens == hf[0, prompt_ids.shape[1]:].tolist()


@torch.no_grad()
def test_kept_tokens_are_protected_plus_top_scored(tiny, prompt_ids):
    model, _, _ = tiny
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
def test_cache_lengths_match_tokens_per_layer(tiny, prompt_ids):
    model, _, _ = tiny
    pruner = TokenPruner(SCHEDULE, RandomScorer(seed=1))
    with pruner(model):
        out = model(prompt_ids, use_cache=True)
    record = pruner.last_prefill
    assert cache_lengths(output_cache(out)) == record.tokens_per_layer
    assert record.tokens_per_layer == SCHEDULE.tokens_per_layer(prompt_ids.shape[1], 4)
    # logits come back for the tokens that reached the last layer only
    assert out.logits.shape[1] == record.final_positions.shape[1] == record.kept_per_stage[-1]


@torch.no_grad()
def test_pruned_forward_equals_explicit_slicing_reference(tiny, prompt_ids):
    model, _, _ = tiny
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
def test_multi_token_continuation_with_mask_matches_reference(tiny, prompt_ids):
    """lm-eval style: prune the context, then score several continuation tokens in one forward."""
    model, _, _ = tiny
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
def test_hooks_removed_and_model_unchanged_after_use(tiny, prompt_ids):
    model, _, _ = tiny
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
def test_hooks_removed_when_forward_raises(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, RandomScorer())
    try:
        with pruner(model):
            right_padded = torch.ones_like(prompt_ids)
            right_padded[:, -3:] = 0
            model(prompt_ids, attention_mask=right_padded)  # right padding: rejected
    except NotImplementedError:
        pass
    assert all(len(layer._forward_pre_hooks) == 0 for layer in decoder_layers(model))


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
def test_renumbered_positions_ablation_runs_and_differs(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    original = TokenPruner(SCHEDULE, RandomScorer(seed=4))
    renumber = TokenPruner(PruningSchedule(**{**SCHEDULE.__dict__, "position_ids": "renumber"}), RandomScorer(seed=4))
    with original(model):
        a = model(prompt_ids).logits
    with renumber(model):
        b = model(prompt_ids).logits
    assert a.shape == b.shape and not torch.allclose(a, b)
