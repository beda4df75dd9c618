"""Refill (``+pruning.refill=true``): the pruned prefill's per-layer choice, filled from a dense prefill."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.eval.continuation import segment_nll, segments
from sdtp.eval.refill import refill_dense
from sdtp.eval.scoring import prefill_context
from sdtp.models.layer_types import layer_windows
from sdtp.scorers.norm import HiddenNormScorer

pytestmark = pytest.mark.usefixtures("single_thread")

KEEP_ALL = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
PRUNE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35))


def _ids(n: int = 60) -> torch.Tensor:
    return torch.randint(4, 260, (1, n), generator=torch.Generator().manual_seed(1))


def test_refilled_cache_is_the_dense_cache_at_each_layers_kept_positions(tiny_llama):
    model, _, _ = tiny_llama
    ids = _ids()
    pruner = TokenPruner(PRUNE, HiddenNormScorer())
    pruned = prefill_context(model, ids, pruner)
    pruned_keys = [layer.keys.clone() for layer in pruned.cache.layers]
    dense = prefill_context(model, ids, None)
    refilled = refill_dense(model, ids, pruned)
    record = refilled.record
    assert torch.equal(refilled.last_logits, dense.last_logits)
    for index, (got, want) in enumerate(zip(refilled.cache.layers, dense.cache.layers, strict=True)):
        positions = record.layer_positions.get(index)
        if positions is None:  # before the first stage: the whole prompt
            assert index < PRUNE.layers[0] and torch.equal(got.keys, want.keys)
            continue
        assert got.keys.shape[2] == positions.shape[1] < ids.shape[1]
        assert torch.equal(got.keys, want.keys[:, :, positions[0]])
        assert torch.equal(got.values, want.values[:, :, positions[0]])
        # the pruned prefill computed these tokens without the dropped ones: its keys differ from 2 stages on
        if index >= PRUNE.layers[1]:
            assert not torch.allclose(pruned_keys[index], got.keys)


def test_refill_of_a_keep_all_schedule_is_dense_and_records_the_cache_share(tiny_llama):
    model, _, _ = tiny_llama
    stream = torch.randint(4, 260, (300,), generator=torch.Generator().manual_seed(0))
    segs = segments(stream, context_len=80, cont_len=16, num_segments=3)
    dense = segment_nll(model, segs, None)
    whole = segment_nll(model, segs, TokenPruner(KEEP_ALL, HiddenNormScorer()), refill=True)
    assert [s.nll for s in whole] == pytest.approx([s.nll for s in dense], rel=1e-5)
    pruned = segment_nll(model, segs, TokenPruner(PRUNE, HiddenNormScorer()))
    refilled = segment_nll(model, segs, TokenPruner(PRUNE, HiddenNormScorer()), refill=True)
    assert [s.nll for s in refilled] != pytest.approx([s.nll for s in pruned], rel=1e-4)
    for got, base in zip(refilled, pruned, strict=True):  # the dense prefill did the work; the layout is pruned
        assert got.layer_fraction == 1.0 and got.cache_fraction == base.layer_fraction < 1.0
        assert got.kept_fraction == base.kept_fraction and base.cache_fraction is None
    with pytest.raises(ConfigError, match="pruning.refill"):
        segment_nll(model, segs, None, refill=True)
    with pytest.raises(ConfigError, match="pruning.refill"):
        segment_nll(model, segs, TokenPruner(PRUNE, HiddenNormScorer()), batch_size=2, refill=True)


def test_refill_on_a_sliding_window_model_reads_the_dense_windows(tiny_gemma3):
    """Gemma3: a dense sliding layer holds its last window - 1 entries, the pruned one the kept entries among them
    (sdtp.engine.window); refilling maps one onto the other, and keeping every token reproduces the dense NLL."""
    model, _, _ = tiny_gemma3
    ids, window = _ids(), model.config.sliding_window
    pruned = prefill_context(model, ids, TokenPruner(PRUNE, HiddenNormScorer()))
    dense = prefill_context(model, ids, None)
    refilled = refill_dense(model, ids, pruned)
    for index, size in enumerate(layer_windows(model.config)):
        got, want = refilled.cache.layers[index].keys, dense.cache.layers[index].keys
        if size is not None:
            positions = refilled.record.cache_layout(index)[0][0]
            assert want.shape[2] == window - 1 and 0 < got.shape[2] < window
            assert torch.equal(got, want[:, :, positions - (ids.shape[1] - window + 1)])
    stream = torch.randint(4, 260, (300,), generator=torch.Generator().manual_seed(0))
    segs = segments(stream, context_len=80, cont_len=16, num_segments=3)
    whole = segment_nll(model, segs, TokenPruner(KEEP_ALL, HiddenNormScorer()), refill=True)
    assert [s.nll for s in whole] == pytest.approx([s.nll for s in segment_nll(model, segs, None)], rel=1e-5)
