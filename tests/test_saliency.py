"""Gradient x input labels: each target equals a hand-written autograd reference; every-layer labels
equal per-schedule labels; padded batches equal per-row labels; hooks are removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdtp.config import compose
from sdtp.models import load_model
from sdtp.models.layer_types import layer_kinds
from sdtp.saliency import TARGETS, normalize_saliency, saliency_scores

SPLIT = 15  # tokens 15.. of the 23-token sequence are the continuation


def _reference(model, ids, layers, target, split):
    """HF's own forward with output_hidden_states (hidden_states[l] = input of layer l), plain autograd."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = [out.hidden_states[l] for l in layers]
    for h in hidden:
        h.retain_grad()
    logits = out.logits[0].float()  # (S, V); row t predicts token t + 1
    if target == "sequence":
        objective = F.cross_entropy(logits[:-1], ids[0, 1:])
    elif target == "continuation":
        objective = F.cross_entropy(logits[split - 1 : -1], ids[0, split:])
    elif target == "fidelity":
        rows = logits[split - 1 : -1]
        objective = F.cross_entropy(rows, rows.detach().argmax(-1))
    else:
        objective = logits[-2, ids[0, -1]]
    objective.backward()
    return torch.stack([(h.grad * h).sum(-1) for h in hidden], dim=-1)


@pytest.mark.parametrize("target", [t for t in TARGETS if t not in ("mask", "attention", "attention_value")])
def test_every_target_matches_autograd_reference(tiny_engine, target):
    model, _, _ = tiny_engine
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(0))
    layers = [1, 2, 3]
    ours = saliency_scores(model, ids, layers, target=target, absolute=False, normalize=False,
                           split=torch.tensor([SPLIT]))
    ref = _reference(model, ids, layers, target, SPLIT)
    assert ours.shape == (1, 23, 3)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_mask_target_is_the_finite_difference_of_dropping_a_key(family):
    """``mask`` = -d CE(continuation) / d m_j, m_j scaling token j as a key in every layer >= l (Gemma3: with
    each layer's own kind of causal mask, tests/test_masking.py checks those against the model's)."""
    from sdtp.training.masking import causal_masks, policy_attention_mask

    model, _ = load_model(compose("generate", [f"model=tiny-{family}"]).model)
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(0))
    layers = [1, 2, 3]
    ours = saliency_scores(model, ids, layers, "mask", absolute=False, normalize=False, split=torch.tensor([SPLIT]))
    masks, kinds = causal_masks(model.config, torch.ones(1, 23, dtype=torch.bool)), layer_kinds(model.config)

    def loss(token: int, first_layer: int, eps: float) -> float:
        def hook_for(k):
            def hook(module, args, kwargs):
                keep = torch.ones(1, 23, dtype=torch.float64)
                if k >= first_layer:
                    keep[0, token] -= eps
                return args, {**kwargs, "attention_mask": policy_attention_mask(masks[kinds[k]].double(), keep).float()}
            return hook

        handles = [b.register_forward_pre_hook(hook_for(k), with_kwargs=True) for k, b in enumerate(model.model.layers)]
        try:
            with torch.no_grad():
                logits = model(ids).logits[0].double()
        finally:
            for h in handles:
                h.remove()
        return float(F.cross_entropy(logits[SPLIT - 1 : -1], ids[0, SPLIT:]))

    for token, stage in ((5, 1), (9, 0), (12, 2)):
        eps = 1e-2
        fd = (loss(token, layers[stage], eps) - loss(token, layers[stage], -eps)) / (2 * eps)
        assert float(ours[0, token, stage]) == pytest.approx(fd, rel=0.05, abs=2e-4)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def _eager_attentions(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer (1, H, S, S) attention weights from HF's eager attention (the model's own setting restored)."""
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        return model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = impl


def test_attention_target_matches_eager_attention_weights(tiny_engine):
    """``attention`` = sum over layers k >= l of the mean (heads, continuation rows) attention on j,
    against the weights HF's eager attention returns with ``output_attentions`` (Gemma3: within each
    sliding layer's window of 16 over 23 tokens)."""
    model, _, _ = tiny_engine
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(0))
    layers = [0, 2, 3]
    hooks = [len(layer.self_attn._forward_hooks) for layer in model.model.layers]
    ours = saliency_scores(model, ids, layers, "attention", absolute=False, normalize=False, split=torch.tensor([SPLIT]))
    probs = _eager_attentions(model, ids)
    per_layer = torch.stack([a[0, :, SPLIT:].float().mean(dim=(0, 1)) for a in probs], dim=-1)  # (S, L)
    ref = per_layer.flip(-1).cumsum(-1).flip(-1)[:, layers]
    torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ours[0].sum(0), torch.tensor([4.0, 2.0, 1.0]))  # each layer's rows sum to 1
    assert [len(layer.self_attn._forward_hooks) for layer in model.model.layers] == hooks


def test_attention_value_target_weights_heads_by_value_output_norm(tiny_engine):
    """``attention_value`` = the attention label with each query head's probability on j multiplied by
    ||W_o^h v_j||, against eager attention weights and the values ``v_proj`` emits."""
    model, _, _ = tiny_engine
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(1))
    layers = [0, 2, 3]
    ours = saliency_scores(model, ids, layers, "attention_value", absolute=False, normalize=False,
                           split=torch.tensor([SPLIT]))
    values: list[torch.Tensor] = []
    handles = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out))
               for layer in model.model.layers]
    try:
        probs = _eager_attentions(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = []
    for attn, a, v in zip((layer.self_attn for layer in model.model.layers), probs, values, strict=True):
        hd, heads = attn.head_dim, a.shape[1]
        v = v[0].view(v.shape[1], -1, hd)  # (S, H_kv, hd)
        group = heads // v.shape[1]
        norms = torch.stack([(v[:, h // group] @ attn.o_proj.weight[:, h * hd:(h + 1) * hd].T).norm(dim=-1)
                             for h in range(heads)])  # (H, S)
        per_layer.append((a[0, :, SPLIT:].float() * norms[:, None]).mean(dim=(0, 1)))
    ref = torch.stack(per_layer, dim=-1).flip(-1).cumsum(-1).flip(-1)[:, layers]
    torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-5)
    plain = saliency_scores(model, ids, layers, "attention", absolute=False, normalize=False, split=torch.tensor([SPLIT]))
    assert not torch.allclose(ours, plain)


def _padded_pair():
    """Rows of 20 and 14 random tokens, right-padded to (2, 20), with their valid mask and splits."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(4, 260, (20,), generator=gen), torch.randint(4, 260, (14,), generator=gen)
    ids = torch.zeros(2, 20, dtype=torch.long)
    ids[0], ids[1, :14] = a, b
    valid = torch.zeros(2, 20, dtype=torch.bool)
    valid[0], valid[1, :14] = True, True
    return (a, b), ids, valid, torch.tensor([16, 10])


def test_attention_target_padded_batch_equals_rows_alone(tiny_llama):
    model, _, _ = tiny_llama
    (a, b), ids, valid, split = _padded_pair()
    batch = saliency_scores(model, ids, [1, 3], "attention", absolute=False, normalize=False, valid=valid, split=split)
    for row, seq in enumerate((a, b)):
        alone = saliency_scores(model, seq[None], [1, 3], "attention", absolute=False, normalize=False,
                                split=split[row : row + 1])
        torch.testing.assert_close(batch[row, : len(seq)], alone[0], rtol=1e-4, atol=1e-6)
    assert not batch[1, 14:].any()


def test_continuation_target_differs_from_sequence(tiny_llama):
    model, _, _ = tiny_llama
    ids = torch.randint(4, 260, (1, 23), generator=torch.Generator().manual_seed(0))
    split = torch.tensor([SPLIT])
    seq = saliency_scores(model, ids, [2], "sequence", absolute=False, normalize=False, split=split)
    cont = saliency_scores(model, ids, [2], "continuation", absolute=False, normalize=False, split=split)
    assert not torch.allclose(seq, cont)
    with pytest.raises(ValueError, match="split"):
        saliency_scores(model, ids, [2], "continuation")


def test_labels_at_every_layer_equal_per_schedule_labels(tiny_llama):
    model, _, _ = tiny_llama
    ids = torch.randint(4, 260, (1, 31), generator=torch.Generator().manual_seed(2))
    split = torch.tensor([24])
    every = saliency_scores(model, ids, None, "continuation", absolute=False, normalize=False, split=split)
    assert every.shape == (1, 31, model.config.num_hidden_layers)
    for schedule in ([1, 3], [2], [1, 2, 3]):
        ours = saliency_scores(model, ids, schedule, "continuation", absolute=False, normalize=False, split=split)
        torch.testing.assert_close(every[..., schedule], ours)


@pytest.mark.parametrize("target", ["continuation", "sequence", "mask"])
def test_padded_batch_equals_rows_alone(tiny_llama, target):
    """A row's label is its own mean CE's, whatever it is batched with (sdtp-label's batch_size, a resumed run's)."""
    model, _, _ = tiny_llama
    (a, b), ids, valid, split = _padded_pair()
    batch = saliency_scores(model, ids, [1, 3], target, absolute=False, normalize=False, valid=valid, split=split)
    for row, seq in enumerate((a, b)):
        alone = saliency_scores(model, seq[None], [1, 3], target, absolute=False, normalize=False,
                                split=split[row : row + 1])
        torch.testing.assert_close(batch[row, : len(seq)], alone[0], rtol=1e-3, atol=1e-6)
    assert not batch[1, 14:].any()  # padding scores 0


def test_one_token_prompt_has_zero_saliency(tiny):
    """A 1-token prompt has no next-token target: zero saliency instead of a backward error."""
    model, _, _ = tiny
    scores = saliency_scores(model, torch.tensor([[7]]), [1, 2], target="sequence")
    assert scores.shape == (1, 1, 2) and not scores.any()
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def test_normalisation_abs_and_max():
    raw = torch.tensor([[[-2.0, 1.0], [1.0, 4.0], [0.5, -8.0]]])
    out = normalize_saliency(raw, absolute=True, normalize=True)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.125], [0.5, 0.5], [0.25, 1.0]]]))
    valid = torch.tensor([[True, True, False]])
    out = normalize_saliency(raw, absolute=True, normalize=True, valid=valid)
    torch.testing.assert_close(out[0, :, 1], torch.tensor([0.25, 1.0, 0.0]))
