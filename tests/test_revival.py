"""Non-nested pruning (``+pruning.revive=true``, :mod:`sdtp.engine.revival`)."""

from __future__ import annotations

import pytest
import torch
from conftest import PositionScorer
from test_pruner import _reference_forward

from sdtp.config import build_pruner, compose
from sdtp.engine.cache import cache_lengths
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.revival import RevivingPruner, revived_fraction
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.models.layer_types import layer_windows
from sdtp.scorers.base import Scorer, ScoreContext

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.6, 0.5, 0.4), keep_first=4, keep_recent=0.1)


class StageScorer(Scorer):
    """Scores by original position from a different table at each stage, so the stages disagree."""

    def __init__(self, tables: list[torch.Tensor]) -> None:
        self.tables = tables  # per stage: (N_max,) score per position

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.tables[ctx.stage][ctx.positions]


def _tables(seeds=(1, 2, 3), n: int = 512) -> list[torch.Tensor]:
    return [torch.rand(n, generator=torch.Generator().manual_seed(seed)) for seed in seeds]


def _run(pruner: TokenPruner, model, ids: torch.Tensor, decode_ids=(11, 12)):
    with pruner(model):
        out = model(ids, use_cache=True)
        cache = output_cache(out)
        steps = [model(torch.tensor([[t]]), **cache_kwargs(cache), use_cache=True).logits[:, -1] for t in decode_ids]
    return out, steps


@torch.no_grad()
def test_revived_prefill_and_decode_equal_the_per_layer_reference(tiny_engine, prompt_ids):
    model, _, _ = tiny_engine
    pruner = RevivingPruner(SCHEDULE, StageScorer(_tables()))
    out, steps = _run(pruner, model, prompt_ids)
    record = pruner.last_prefill
    n = prompt_ids.shape[1]
    first, second = (set(record.layer_positions[layer][0].tolist()) for layer in SCHEDULE.layers[:2])
    assert second - first, "the stages disagree, so the second must re-admit tokens the first dropped"
    assert revived_fraction(record) > 0
    # the nested pruner's tokens per layer; each stage keeps the protected tokens plus its own table's best of all
    per_layer = SCHEDULE.tokens_per_layer(n, len(record.tokens_per_layer))
    assert record.tokens_per_layer == per_layer
    widths = record.cache_widths(len(per_layer))  # per_layer, but sliding layers (Gemma3) trimmed to their window
    lengths, windows = cache_lengths(output_cache(out)), layer_windows(model.config)
    # full-attention layers: what the prefill left + the two decode steps; sliding ones stay within their window
    assert [n for n, w in zip(lengths, windows) if w is None] == [c + 2 for c, w in zip(widths, windows) if w is None]
    assert all(n <= w - 1 for n, w in zip(lengths, windows) if w is not None)
    everything = torch.arange(n)
    protected = (everything < 4) | (everything >= n - SCHEDULE.num_recent(n))
    for stage, (layer, table) in enumerate(zip(SCHEDULE.layers, _tables(), strict=True)):
        free = everything[~protected]
        best = free[table[free].argsort(descending=True)[: SCHEDULE.budget(stage, n) - int(protected.sum())]]
        assert record.layer_positions[layer][0].tolist() == sorted(everything[protected].tolist() + best.tolist())
    ref_logits, ref_steps = _reference_forward(model, prompt_ids, record.layer_positions, (11, 12))
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(steps, ref_steps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_one_ranking_for_every_stage_is_the_nested_pruner(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    table = _tables()[0]
    nested_out, nested_steps = _run(TokenPruner(SCHEDULE, PositionScorer(table)), model, prompt_ids)
    pruner = RevivingPruner(SCHEDULE, PositionScorer(table))
    out, steps = _run(pruner, model, prompt_ids)
    assert revived_fraction(pruner.last_prefill) == 0.0
    assert torch.equal(out.logits, nested_out.logits)
    for got, want in zip(steps, nested_steps, strict=True):
        assert torch.equal(got, want)


@torch.no_grad()
def test_keep_ratio_one_is_the_dense_model(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    whole = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
    out, _ = _run(RevivingPruner(whole, StageScorer(_tables())), model, prompt_ids, ())
    assert torch.equal(out.logits, model(prompt_ids).logits)


@torch.no_grad()
def test_rows_of_a_batch_equal_their_own_prefills(tiny_llama):
    model, _, _ = tiny_llama
    ids = torch.randint(4, 260, (2, 61), generator=torch.Generator().manual_seed(4))
    batch, _ = _run(RevivingPruner(SCHEDULE, StageScorer(_tables())), model, ids, ())
    for row in range(2):
        alone, _ = _run(RevivingPruner(SCHEDULE, StageScorer(_tables())), model, ids[row : row + 1], ())
        torch.testing.assert_close(batch.logits[row : row + 1], alone.logits, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_padded_batches_are_refused(tiny_llama, left_padded_batch):
    model, _, _ = tiny_llama
    ids, mask = left_padded_batch
    with pytest.raises(NotImplementedError, match="pruning.revive"):
        with RevivingPruner(SCHEDULE, StageScorer(_tables()))(model):
            model(ids, attention_mask=mask, use_cache=True)


def test_config_selects_the_reviving_pruner_and_refuses_bad_values():
    cfg = compose("generate", ["model=tiny-llama", "pruning=random", "+pruning.revive=true"])
    assert type(build_pruner(cfg)) is RevivingPruner
    assert type(build_pruner(compose("generate", ["model=tiny-llama", "pruning=random"]))) is TokenPruner
    with pytest.raises(ConfigError, match="pruning.revive"):
        compose("generate", ["model=tiny-llama", "pruning=random", "+pruning.revive=maybe"])
    with pytest.raises(ConfigError, match="choose one"):
        compose("generate", ["model=tiny-llama", "pruning=random", "+pruning.revive=true", "+pruning.merge_weight=0.5"])


@torch.no_grad()
def test_a_scorer_that_cannot_rate_parked_tokens_is_refused(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = build_pruner(compose("generate", ["model=tiny-llama", "pruning=lazyllm", "+pruning.revive=true"]))
    with pytest.raises(RuntimeError, match="cache holds .* tokens, expected the .* alive ones"):
        with pruner(model):
            model(prompt_ids, use_cache=True)
