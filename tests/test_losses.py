"""Ranking loss against a hand computation; every stage's terms reach exactly its predictor."""

from __future__ import annotations

import math

import pytest
import torch

from sdtp.losses import masked_mse, ranking_loss, sdtp_loss
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.saliency import capture_layer_inputs


def sp(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_ranking_loss_hand_computed_4_tokens():
    pred = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    target = torch.tensor([[0.3, 0.1, 0.9, 0.1]])  # tokens 1 and 3 tie
    valid = torch.ones(1, 4, dtype=torch.bool)
    # pairs i<j: log(1 + exp(-(p_i - p_j) * sign(t_i - t_j)))
    pairs = [sp(-1.5), sp(-1.5), sp(-0.5), sp(-3.0), sp(-2.0)]  # (0,1) (0,2) (0,3) (1,2) (2,3)
    assert ranking_loss(pred, target, valid, "ignore").item() == pytest.approx(sum(pairs) / 5, rel=1e-6)
    assert ranking_loss(pred, target, valid, "include").item() == pytest.approx((sum(pairs) + math.log(2)) / 6, rel=1e-6)
    # a padded fifth token with arbitrary values changes nothing
    pred5 = torch.cat([pred, torch.tensor([[9.0]])], 1)
    target5 = torch.cat([target, torch.tensor([[-5.0]])], 1)
    valid5 = torch.tensor([[True, True, True, True, False]])
    assert ranking_loss(pred5, target5, valid5).item() == pytest.approx(sum(pairs) / 5, rel=1e-6)
    assert masked_mse(pred5, target5, valid5).item() == pytest.approx(
        ((0.2**2) + (1.1**2) + (1.1**2) + (0.1**2)) / 4, rel=1e-6
    )


def _stage_grads(model, predictor, ids, labels, stage_weights):
    layers = predictor.meta.layers
    with torch.no_grad(), capture_layer_inputs(model, layers) as captured:
        model.base_model(input_ids=ids)
    predictor.zero_grad()
    scores = [predictor(s, captured[l]) for s, l in enumerate(layers)]
    valid = torch.ones_like(ids, dtype=torch.bool)
    loss, terms = sdtp_loss(scores, labels, valid, {"mse": 1.0, "ranking": 1.0}, stage_weights=stage_weights)
    loss.backward()
    assert all(f"rank/{s}" in terms and f"mse/{s}" in terms for s in range(len(layers)))
    return [torch.cat([p.grad.flatten() for p in stage.parameters()]) for stage in predictor.stages]


def test_every_stage_contributes(tiny_llama):
    model, _, _ = tiny_llama
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2, 3]))
    ids = torch.randint(4, 260, (1, 17), generator=torch.Generator().manual_seed(3))
    labels = torch.rand(1, 17, 3, generator=torch.Generator().manual_seed(4))
    full = _stage_grads(model, predictor, ids, labels, [1.0, 1.0, 1.0])
    assert all(g.abs().sum() > 0 for g in full)
    for s in range(3):
        weights = [1.0, 1.0, 1.0]
        weights[s] = 0.0
        grads = _stage_grads(model, predictor, ids, labels, weights)
        for t in range(3):
            if t == s:
                assert grads[t].abs().sum() == 0
            else:
                torch.testing.assert_close(grads[t], full[t])
