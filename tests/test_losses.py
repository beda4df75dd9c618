"""Losses against hand computations; sampled ranking pairs; every stage's terms reach only its predictor."""

from __future__ import annotations

import math

import pytest
import torch

from sdtp.labels import transform_labels
from sdtp.losses import centered_mse, ranking_loss, ratio_loss, sdtp_loss, selection_loss
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.saliency import capture_layer_inputs


def sp(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_ranking_loss_hand_computed_4_tokens():
    pred = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    target = torch.tensor([[0.3, 0.1, 0.9, 0.1]])  # tokens 1 and 3 tie
    mask = torch.ones(1, 4, dtype=torch.bool)
    # pairs i<j: log(1 + exp(-(p_i - p_j) * sign(t_i - t_j)))
    pairs = [sp(-1.5), sp(-1.5), sp(-0.5), sp(-3.0), sp(-2.0)]  # (0,1) (0,2) (0,3) (1,2) (2,3)
    assert ranking_loss(pred, target, mask, "ignore").item() == pytest.approx(sum(pairs) / 5, rel=1e-6)
    assert ranking_loss(pred, target, mask, "include").item() == pytest.approx((sum(pairs) + math.log(2)) / 6, rel=1e-6)
    # a masked-out fifth token (dropped earlier, protected or padding) changes nothing
    pred5 = torch.cat([pred, torch.tensor([[9.0]])], 1)
    target5 = torch.cat([target, torch.tensor([[-5.0]])], 1)
    mask5 = torch.tensor([[True, True, True, True, False]])
    assert ranking_loss(pred5, target5, mask5).item() == pytest.approx(sum(pairs) / 5, rel=1e-6)


def test_sampled_pairs_estimate_the_all_pairs_mean():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 300, generator=gen), torch.randn(2, 300, generator=gen)
    mask = torch.rand(2, 300, generator=gen) > 0.3
    exact = ranking_loss(pred, target, mask, max_pairs=10**9).item()
    sampled = ranking_loss(pred, target, mask, max_pairs=20000, generator=torch.Generator().manual_seed(1)).item()
    assert sampled == pytest.approx(exact, rel=0.03)
    assert sampled != exact  # it really sampled (a full pair set has ~22K pairs per row)


def test_sampled_pairs_are_unbiased_per_row_but_pooled_rows_are_reweighted():
    """As losses.py states: one row's sampled mean estimates its all-pairs mean, but pooled over rows, a long row
    capped at ``max_pairs`` counts ``max_pairs`` pairs, not all of its own, so a short row weighs more."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 200, generator=gen)
    pred = torch.stack([target[0], -target[1]])  # row 0 ranked as its labels (low loss), row 1 reversed (high)
    mask = torch.zeros(2, 200, dtype=torch.bool)
    mask[0], mask[1, :20] = True, True  # 19,900 pairs (sampled: 1,000) and 190 (all of them)
    row = [ranking_loss(pred[r:r + 1], target[r:r + 1], mask[r:r + 1], max_pairs=10**9).item() for r in (0, 1)]
    draws = [ranking_loss(pred[:1], target[:1], mask[:1], max_pairs=1000, generator=torch.Generator().manual_seed(s))
             for s in range(40)]
    assert torch.stack(draws).mean().item() == pytest.approx(row[0], rel=0.01)  # one row: unbiased
    exact = ranking_loss(pred, target, mask, max_pairs=10**9).item()
    assert exact == pytest.approx((19900 * row[0] + 190 * row[1]) / 20090, rel=1e-5)
    pooled = [ranking_loss(pred, target, mask, max_pairs=1000, generator=torch.Generator().manual_seed(s))
              for s in range(40)]
    expected = (1000 * row[0] + 190 * row[1]) / 1190  # the weights the pooled sample gives the two rows
    assert torch.stack(pooled).mean().item() == pytest.approx(expected, rel=0.01)
    assert expected > 1.3 * exact  # not the all-pairs mean


def test_selection_loss_hand_computed_and_sampled():
    pred = torch.tensor([[0.5, -1.0, 2.0, 0.0, 9.0]])
    target = torch.tensor([[0.3, 0.1, 0.9, 0.2, -5.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # token 4 is not decided by this stage
    # the stage keeps 2 of the 4: the label's top 2 are tokens 2 and 0; pairs (kept, dropped) only
    pairs = [sp(-(2.0 + 1.0)), sp(-(2.0 - 0.0)), sp(-(0.5 + 1.0)), sp(-(0.5 - 0.0))]  # (2,1) (2,3) (0,1) (0,3)
    assert selection_loss(pred, target, mask, torch.tensor([2])).item() == pytest.approx(sum(pairs) / 4, rel=1e-6)
    assert selection_loss(pred, target, mask, torch.tensor([4])).item() == 0.0  # keeps everything: no cut
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 400, generator=gen), torch.randn(2, 400, generator=gen)
    mask, kept = torch.ones(2, 400, dtype=torch.bool), torch.tensor([360, 300])
    exact = selection_loss(pred, target, mask, kept, max_pairs=10**9).item()
    sampled = selection_loss(pred, target, mask, kept, max_pairs=20000, generator=torch.Generator().manual_seed(1)).item()
    assert sampled == pytest.approx(exact, rel=0.03) and sampled != exact


def test_sdtp_loss_adds_the_weighted_selection_term():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(1, 6, generator=gen) for _ in range(2)]
    labels, decided = torch.randn(1, 6, 2, generator=gen), [torch.ones(1, 6, dtype=torch.bool)] * 2
    kept = [torch.tensor([5]), torch.tensor([4])]
    base, _ = sdtp_loss(scores, labels, decided, {"mse": 1.0})
    total, terms = sdtp_loss(scores, labels, decided, {"mse": 1.0, "selection": 0.5}, kept=kept)
    by_hand = sum(selection_loss(s, labels[..., i], decided[i], kept[i]) for i, s in enumerate(scores))
    assert total.item() == pytest.approx(base.item() + 0.5 * by_hand.item(), rel=1e-6)
    assert terms["sel"] == pytest.approx(by_hand.item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="kept count"):
        sdtp_loss(scores, labels, decided, {"selection": 1.0})


def test_centered_mse_hand_computed_and_shift_invariant():
    pred = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    target = torch.tensor([[0.0, 2.0, 1.0, -7.0]])
    mask = torch.tensor([[True, True, True, False]])
    # centred over the 3 masked tokens: pred - 3 = (-2, -1, 3); target - 1 = (-1, 1, 0)
    assert centered_mse(pred, target, mask).item() == pytest.approx(((-1) ** 2 + (-2) ** 2 + 3**2) / 3)
    assert centered_mse(pred + 5.0, target, mask).item() == pytest.approx(centered_mse(pred, target, mask).item())


def test_ratio_loss_hand_computed():
    prompt = torch.tensor([[True, True, True, True, False]])
    policies = [torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])]
    # kept prompt fractions 0.75 and 0.5 against 0.9 and 0.81
    expected = ((0.75 - 0.9) ** 2 + (0.5 - 0.81) ** 2) / 2
    assert ratio_loss(policies, [0.9, 0.81], prompt).item() == pytest.approx(expected, rel=1e-6)


def test_label_transforms():
    raw = torch.tensor([[[-1.0], [math.e], [math.e**2], [50.0]]])
    region = torch.tensor([[True, True, True, False]])
    out = transform_labels(raw, region, "log_z")[0, :3, 0]
    logs = torch.log(torch.tensor([1.0, math.e, math.e**2]) + 1e-6 * math.e**2)
    expected = (logs - logs.mean()) / logs.std(unbiased=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert transform_labels(raw, region, "log_z")[0, 3, 0] == 0  # outside the region
    torch.testing.assert_close(transform_labels(raw, region, "max")[0, :3, 0], torch.tensor([1, math.e, math.e**2]) / math.e**2)
    # signed: asinh(s / median|s|) keeps the sign (median |s| over the region is e)
    signed = torch.asinh(torch.tensor([-1.0, math.e, math.e**2]) / math.e)
    expected = (signed - signed.mean()) / signed.std(unbiased=False)
    torch.testing.assert_close(transform_labels(raw, region, "signed")[0, :3, 0], expected, rtol=1e-4, atol=1e-4)


def _stage_grads(model, predictor, ids, labels, stage_weights):
    layers = predictor.meta.layers
    with torch.no_grad(), capture_layer_inputs(model, layers) as captured:
        model.base_model(input_ids=ids)
    predictor.zero_grad()
    scores = [predictor(s, captured[l]) for s, l in enumerate(layers)]
    decided = [torch.ones_like(ids, dtype=torch.bool)] * len(layers)
    loss, terms = sdtp_loss(scores, labels, decided, {"mse": 1.0, "ranking": 1.0}, stage_weights=stage_weights)
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
