"""Gradient x input labels: equal to an independent autograd reference; hooks are removed."""

from __future__ import annotations

import torch

from sdtp.saliency import normalize_saliency, saliency_scores


def _reference(model, ids, layers, target):
    """HF's own loss and output_hidden_states (hidden_states[l] = input of layer l), plain autograd."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids if target == "lm_loss" else None, output_hidden_states=True)
    hidden = [out.hidden_states[l] for l in layers]
    for h in hidden:
        h.retain_grad()
    objective = out.loss if target == "lm_loss" else out.logits[0, -2, ids[0, -1]]
    objective.backward()
    return torch.stack([(h.grad * h).sum(-1) for h in hidden], dim=-1)


def test_grad_x_input_matches_autograd_reference(tiny):
    model, _, _ = tiny
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(0))
    layers = [1, 2, 3]
    for target in ("lm_loss", "logit"):
        ours = saliency_scores(model, ids, layers, target=target, absolute=False, normalize=False)
        ref = _reference(model, ids, layers, target)
        assert ours.shape == (1, 23, 3)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def test_one_token_prompt_has_zero_saliency(tiny):
    """A 1-token prompt has no next-token target: zero saliency instead of a backward error."""
    model, _, _ = tiny
    scores = saliency_scores(model, torch.tensor([[7]]), [1, 2], target="lm_loss")
    assert scores.shape == (1, 1, 2) and not scores.any()
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def test_grad_x_input_on_toy_linear_model():
    """For T = sum_i w . x_i (a linear 'model'), grad x input is exactly w . x_i per token."""
    x = torch.randn(1, 5, 4)
    w = torch.randn(4)
    x_req = x.clone().requires_grad_(True)
    (x_req @ w).sum().backward()
    torch.testing.assert_close((x_req.grad * x_req).sum(-1), x @ w)


def test_normalisation_abs_and_max():
    raw = torch.tensor([[[-2.0, 1.0], [1.0, 4.0], [0.5, -8.0]]])
    out = normalize_saliency(raw, absolute=True, normalize=True)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.125], [0.5, 0.5], [0.25, 1.0]]]))
    valid = torch.tensor([[True, True, False]])
    out = normalize_saliency(raw, absolute=True, normalize=True, valid=valid)
    torch.testing.assert_close(out[0, :, 1], torch.tensor([0.25, 1.0, 0.0]))
