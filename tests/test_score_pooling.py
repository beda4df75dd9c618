"""Box pooling of the predictor's scores (sdtp/scorers/pooling.py, ``pruning.scorer.pool_window``)."""

from __future__ import annotations

import pytest
import torch

from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.base import ScoreContext
from sdtp.scorers.pooling import box_sum, pool_scores
from sdtp.scorers.predictor import PredictorScorer

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pooling_by_hand():
    """Window 1: the mean of each slot and its neighbours, over the valid ones only (the row's ends have one
    neighbour; a padding slot neither counts nor changes)."""
    scores = torch.tensor([[1.0, 4.0, 7.0, 10.0, 2.0]])
    torch.testing.assert_close(box_sum(scores, 1), torch.tensor([[5.0, 12.0, 21.0, 19.0, 12.0]]))
    torch.testing.assert_close(pool_scores(scores, None, 1), torch.tensor([[2.5, 4.0, 7.0, 19 / 3, 6.0]]))
    valid = torch.tensor([[False, True, True, True, True]])
    torch.testing.assert_close(pool_scores(scores, valid, 1), torch.tensor([[1.0, 5.5, 7.0, 19 / 3, 6.0]]))
    assert pool_scores(scores, valid, 0) is scores



def test_box_sum_keeps_float32_precision_at_32k_tokens():
    """A window's sum is the difference of two prefix sums ~1e5 at 32K tokens of scores with mean 3: it must
    still match a float64 box sum to the result's own float32 rounding (a float32 cumulative sum is ~1e-2 off),
    and come back in the input's dtype."""
    scores = 3.0 + 2.0 * torch.randn(1, 32768, generator=torch.Generator().manual_seed(0))
    got = box_sum(scores, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), box_sum(scores.double(), 2), rtol=1e-6, atol=1e-6)

@torch.no_grad()
def test_pool_window_averages_the_predictors_scores_over_alive_neighbours(tiny_llama):
    """The scorer returns the predictor's raw scores box-averaged over the alive tokens in slot order (their
    positions need not be contiguous: a later stage sees the survivors), skipping a padding slot; a negative
    window fails at construction."""
    model, _, _ = tiny_llama
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], base_model="tiny-llama", num_layers=4))
    scorer = PredictorScorer(predictor=predictor, recency_weight=0.0, pool_window=2)
    scorer.bind(model, (1, 2))
    scorer.begin(torch.randint(4, 200, (1, 40)), {})
    positions = torch.tensor([[0, 1, 2, 3, 7, 8, 15, 16, 20, 31, 38, 39]])
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[0, 5] = False
    hidden = torch.randn(1, 12, 64)
    ctx = ScoreContext(layer=2, stage=1, hidden_states=hidden, positions=positions, seq_len=40, model=model,
                       valid=valid)
    raw = predictor(1, hidden, positions, torch.tensor([40]), valid)[0]
    real = valid[0].nonzero().squeeze(1).tolist()
    expected = raw.clone()
    for i in real:
        expected[i] = raw[[j for j in real if abs(j - i) <= 2]].mean()
    torch.testing.assert_close(scorer.score(ctx)[0], expected)
    with pytest.raises(ValueError, match="pool_window: must be >= 0"):
        PredictorScorer(predictor=predictor, pool_window=-1)
