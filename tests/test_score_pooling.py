"""Box pooling of the predictor's scores (sdtp/scorers/pooling.py, ``pruning.scorer.pool_window``)."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.base import ScoreContext
from sdtp.scorers.pooling import box_sum, pool_scores
from sdtp.scorers.predictor import PredictorScorer

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEDULE = PruningSchedule(layers=(1, 2), keep_fractions=(0.6, 0.4), keep_first=4, keep_recent=0.1)


def test_pooling_by_hand():
    """Window 1: the mean of each slot and its neighbours, over the valid ones only (the row's ends have one
    neighbour; a padding slot neither counts nor changes)."""
    scores = torch.tensor([[1.0, 4.0, 7.0, 10.0, 2.0]])
    torch.testing.assert_close(box_sum(scores, 1), torch.tensor([[5.0, 12.0, 21.0, 19.0, 12.0]]))
    torch.testing.assert_close(pool_scores(scores, None, 1), torch.tensor([[2.5, 4.0, 7.0, 19 / 3, 6.0]]))
    valid = torch.tensor([[False, True, True, True, True]])
    torch.testing.assert_close(pool_scores(scores, valid, 1), torch.tensor([[1.0, 5.5, 7.0, 19 / 3, 6.0]]))
    assert pool_scores(scores, valid, 0) is scores


class _Recording(PredictorScorer):
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        out = super().score(ctx)
        self.calls.append((ctx, out))
        return out


@torch.no_grad()
def test_pool_window_averages_the_predictors_scores_over_alive_neighbours(tiny_llama):
    """At every stage (the second sees only the first's survivors) the scorer returns the predictor's raw scores
    box-averaged over the alive tokens in position order; a negative window fails at construction."""
    model, _, _ = tiny_llama
    prompt_ids = torch.randint(4, 200, (1, 300), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], base_model="tiny-llama", num_layers=4))
    scorer = _Recording(predictor=predictor, recency_weight=0.0, pool_window=2)
    scorer.calls = []
    with TokenPruner(SCHEDULE, scorer)(model):
        model(prompt_ids, use_cache=True)
    assert [ctx.hidden_states.shape[1] for ctx, _ in scorer.calls] == [300, 180]
    for ctx, out in scorer.calls:
        raw = predictor(ctx.stage, ctx.hidden_states, ctx.positions, torch.tensor([ctx.seq_len]))[0]
        expected = torch.stack([raw[max(0, i - 2):i + 3].mean() for i in range(raw.shape[0])])
        torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pool_window: must be >= 0"):
        PredictorScorer(predictor=predictor, pool_window=-1)
