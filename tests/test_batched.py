"""Batched pruned inference (issue 14): a batch must behave exactly like its rows run one at a time."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.scorers.attention import AttentionScorer
from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.oracle import OracleScorer

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)
NEW_TOKENS = 6


class RowSeededScorer(Scorer):
    """Random scores seeded per row: row b's token at real position p scores ``rand(seed_b)[p]``.

    The same row run alone (with its own seed) therefore gets the same scores, so a batch and its
    rows one at a time must keep the same tokens.
    """

    def __init__(self, seeds: list[int], max_len: int = 256) -> None:
        self.tables = torch.stack([torch.rand(max_len, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.tables.gather(1, ctx.positions)


def _prompts(lengths: tuple[int, ...], seed: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (1, n), generator=generator) for n in lengths]


def _left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) ids and (B, N) mask, each prompt right-aligned."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
    return ids, mask


def _scorer(kind: str, seeds: list[int]) -> Scorer:
    if kind == "lazyllm":
        return AttentionScorer(num_queries=3)
    if kind == "lazyllm_wide":  # more queries than the short row keeps: its masked slots must not be queries
        return AttentionScorer(num_queries=32)
    if kind == "oracle":
        return OracleScorer(target="continuation")
    return HiddenNormScorer() if kind == "norm" else RowSeededScorer(seeds)


@pytest.fixture(scope="module", autouse=True)
def _fp32_one_thread(single_thread):
    yield


@torch.no_grad()
@pytest.mark.parametrize("kind", ["norm", "random"])
def test_equal_length_batch_equals_rows_one_at_a_time(tiny_engine, kind):
    model, _, _ = tiny_engine
    prompts = _prompts((53, 53))
    batch = torch.cat(prompts)
    pruner = TokenPruner(SCHEDULE, _scorer(kind, [11, 12]))
    with pruner(model):
        logits = model(batch, use_cache=True).logits
        record = pruner.last_prefill
    assert record.final_valid is None
    result = generate(model, batch, NEW_TOKENS, TokenPruner(SCHEDULE, _scorer(kind, [11, 12])))
    assert len(result.sequences) == 2
    for row, prompt in enumerate(prompts):
        single = TokenPruner(SCHEDULE, _scorer(kind, [11 + row]))
        with single(model):
            ref = model(prompt, use_cache=True).logits
        assert torch.equal(record.final_positions[row], single.last_prefill.final_positions[0])
        torch.testing.assert_close(logits[row], ref[0], atol=1e-5, rtol=1e-5)
        alone = generate(model, prompt, NEW_TOKENS, TokenPruner(SCHEDULE, _scorer(kind, [11 + row])))
        assert result.sequences[row] == alone.tokens


def _continuation_logprob(model, ids, mask, cont, pruner):
    """Sum of log p(cont) after prefilling ``ids`` (B, N); ``cont`` (B, T) scored token by token.

    Returns (B,) log-likelihoods and the prefill record.
    """
    batch = ids.shape[0]
    with pruner(model) if pruner is not None else torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        cache, logits = output_cache(out), out.logits[:, -1]
        total = torch.zeros(batch)
        for step in range(cont.shape[1]):
            total += logits.log_softmax(-1).gather(1, cont[:, step:step + 1])[:, 0]
            kwargs = {}
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                kwargs = {"attention_mask": mask, "position_ids": mask.sum(-1, keepdim=True) - 1}
            out = model(input_ids=cont[:, step:step + 1], **cache_kwargs(cache), use_cache=True, **kwargs)
            cache, logits = output_cache(out), out.logits[:, -1]
        record = pruner.last_prefill if pruner is not None else None
    return total, record


@torch.no_grad()
@pytest.mark.parametrize("kind", ["norm", "random", "lazyllm", "lazyllm_wide", "oracle"])
def test_ragged_batch_equals_rows_one_at_a_time(tiny_engine, kind):
    """Also on Gemma3, whose sliding layers each row trims to its own window (a ragged trim, masked slots)."""
    model, _, _ = tiny_engine
    prompts = _prompts((61, 40))
    ids, mask = _left_pad(prompts)
    cont = torch.randint(4, 260, (2, 5), generator=torch.Generator().manual_seed(9))
    seeds = [21, 22]
    batch_ll, record = _continuation_logprob(model, ids, mask, cont, TokenPruner(SCHEDULE, _scorer(kind, seeds)))
    assert record.seq_lens == [61, 40]
    # Each row keeps its own budget of real tokens; the shorter row is padded with masked slots.
    assert [rows for rows in record.kept_rows_per_stage] == [
        [SCHEDULE.budget(stage, 61), SCHEDULE.budget(stage, 40)] for stage in range(3)
    ]
    assert record.final_valid is not None and not bool(record.final_valid[1].all())
    result = generate(model, ids, NEW_TOKENS, TokenPruner(SCHEDULE, _scorer(kind, seeds)), attention_mask=mask)
    for row, prompt in enumerate(prompts):
        single = TokenPruner(SCHEDULE, _scorer(kind, [seeds[row]]))
        alone_ll, alone_record = _continuation_logprob(model, prompt, None, cont[row:row + 1], single)
        kept = record.final_positions[row][record.final_valid[row]]
        assert torch.equal(kept, alone_record.final_positions[0])
        torch.testing.assert_close(batch_ll[row], alone_ll[0], atol=1e-4, rtol=1e-5)
        alone = generate(model, prompt, NEW_TOKENS, TokenPruner(SCHEDULE, _scorer(kind, [seeds[row]])))
        assert result.sequences[row] == alone.tokens


@torch.no_grad()
def test_ragged_keep_ratio_one_equals_dense_batch(tiny):
    model, _, _ = tiny
    ids, mask = _left_pad(_prompts((50, 33)))
    schedule = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
    dense = generate(model, ids, NEW_TOKENS, None, attention_mask=mask, keep_logits=True)
    pruned = generate(model, ids, NEW_TOKENS, TokenPruner(schedule, HiddenNormScorer()), attention_mask=mask,
                      keep_logits=True)
    assert pruned.sequences == dense.sequences
    for a, b in zip(pruned.step_logits, dense.step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_select_kept_rows_keeps_per_row_budgets_and_never_padding():
    from sdtp.engine.selection import select_kept_rows

    scores = torch.tensor([[9.0, 8.0, 1.0, 2.0, 3.0, 0.5], [9.0, 9.0, 5.0, 1.0, 4.0, 0.1]])
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])  # row 1: 2 left pads
    protected = torch.tensor([[False] * 5 + [True], [False] * 5 + [True]])
    keep, keep_valid = select_kept_rows(scores, protected, valid, torch.tensor([3, 2]))
    # Row 1 keeps its 2 real tokens (2, 5; never the padding 0, 1) after one masked filler slot.
    assert keep_valid.tolist() == [[True, True, True], [False, True, True]]
    assert keep[0].tolist() == [0, 1, 5] and keep[1, 1:].tolist() == [2, 5]


def test_a_ragged_row_breaks_ties_as_it_would_alone():
    """Scores with many exact ties (lexical matches, attention outside a sliding window): each row of a ragged batch
    keeps exactly what select_kept keeps for that row by itself."""
    from sdtp.engine.selection import select_kept, select_kept_rows

    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (2, 300), generator=generator).float()  # 3 distinct values: ties everywhere
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :77] = False  # row 1 left-padded by 77
    protected = torch.zeros(2, 300, dtype=torch.bool)
    protected[:, -10:] = True
    keep, keep_valid = select_kept_rows(scores, protected, valid, torch.tensor([120, 90]))
    for row in range(2):
        slots = valid[row].nonzero().squeeze(1)
        alone = slots[select_kept(scores[row, slots][None], protected[row, slots][None], [120, 90][row])[0]]
        assert keep[row][keep_valid[row]].tolist() == alone.tolist()


@torch.no_grad()
def test_padding_rules(tiny_llama):
    model, _, _ = tiny_llama
    ids, mask = _left_pad(_prompts((30, 20)))
    mask[1] = 0
    with TokenPruner(SCHEDULE, HiddenNormScorer())(model), pytest.raises(ValueError, match="no real token"):
        model(ids, attention_mask=mask)
    single = generate(model, _prompts((30,))[0], 3)
    with pytest.raises(ValueError, match="sequences"):
        _ = generate(model, torch.cat(_prompts((30, 30))), 3).tokens
    assert len(single.tokens) == 3 and single.sequences == [single.tokens]


@torch.no_grad()
def test_generation_refuses_a_mask_that_is_not_left_padded(tiny_llama):
    """The dense path used to accept a right-padded mask and read each short row's next token from a padding
    column: generate() and prefill() now refuse it as the pruner does, and an all-0 row too."""
    from sdtp.engine.generation import prefill

    model, _, _ = tiny_llama
    prompts = _prompts((30, 20))
    ids, mask = _left_pad(prompts)
    right_ids, right_mask = ids.clone(), mask.flip(-1)  # row 1: its 20 tokens first, then 10 padding
    right_ids[1] = ids[1].roll(-10)
    for pruner in (None, TokenPruner(SCHEDULE, HiddenNormScorer())):
        with pytest.raises(NotImplementedError, match="left-padded batches only.*row 1"):
            generate(model, right_ids, 3, pruner, attention_mask=right_mask)
        empty = mask.clone()
        empty[1] = 0
        with pytest.raises(ValueError, match=r"no real token .*row 1"):
            generate(model, ids, 3, pruner, attention_mask=empty)
    gap = mask.clone()
    gap[0, 5] = 0  # a hole inside row 0's prompt is no padding either
    with pytest.raises(NotImplementedError, match="left-padded batches only.*row 0"):
        prefill(model, ids, attention_mask=gap)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(model, ids, 3, attention_mask=torch.ones(2, 29, dtype=torch.long))  # all 1 but the wrong width
    # Left padding still runs, and each row decodes as it would alone.
    batch = generate(model, ids, 3, attention_mask=mask)
    assert batch.sequences == [generate(model, prompt, 3).tokens for prompt in prompts]
