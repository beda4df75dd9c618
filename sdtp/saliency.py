"""Saliency of the tokens entering decoder layers (SDTP's "marking stage"): gradient x input and its alternatives.

For a frozen causal LM and a scalar output T, the saliency of token i at layer l is

    pi_hat[i, l] = sum_d (dT / dx_{i,d}) * x_{i,d},   x = hidden state *entering* decoder layer l,

computed on the full, unpruned model (paper Eq. 3). One backward gives it at every layer, so labels
are computed once at all layers and any schedule (first layer, step, stage count) reuses them.

Targets T (``saliency.target``); each sequence has a ``split``: tokens before it are the prompt
(what inference prunes), tokens from it on the continuation (what is decoded after the prompt):

* ``sequence``: mean next-token CE over the whole sequence. It
  rates a token by how much *any* later token, mostly its neighbours, needs it.
* ``continuation``: mean CE of the continuation tokens given everything before them: how much the
  tokens generated after the prompt need each prompt token (the inference use).
* ``fidelity``: mean negative log-prob, at the continuation positions, of the dense model's own
  top-1 prediction (argmax of the dense logits, teacher-forced on the reference continuation):
  how much each token supports what the unpruned model would say, without using the reference.
  (A KL to the dense output would be stationary at the dense model: its gradient there is zero.)
* ``logit``: the logit of each sequence's last token given its prefix.
* ``mask``: not grad x input but the derivative of the continuation CE with respect to a keep
  multiplier on each token *as a key* in every layer (``attention logits + log m_j``, m = 1), summed
  over the layers from l on: the first-order loss increase of dropping token j before layer l,
  which is exactly what pruning does (grad x input instead estimates zeroing the token's state).
  Signed (a token whose removal lowers the loss scores below 0); needs an attention implementation
  that accepts a float mask with gradients (SDPA falls back to its math kernel).
* ``attention``: not a gradient either: the attention the continuation queries pay each token in
  the layers from l on (:mod:`sdtp.attention_saliency`; one forward, no backward).
* ``attention_value``: the same, each head's probability weighted by the norm of what the token's
  value writes through that head's output projection (tokens that draw attention but carry little,
  such as sinks and punctuation, score low).

The hidden states are captured by forward pre-hooks (removed on exit); nothing of the model's
forward is copied. The LM head runs in checkpointed chunks, so no full-vocabulary logits tensor
over the sequence is kept for the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtp.attention_saliency import attention_saliency
from sdtp.models import decoder_layers
from sdtp.models.layer_types import layer_kinds

TARGETS = ("sequence", "continuation", "fidelity", "logit", "mask", "attention", "attention_value")
CE_CHUNK = 512  # positions per LM-head chunk: bounds the (chunk, vocab) logits held at once


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, self_target: bool) -> torch.Tensor:
    """Summed CE of (n, D) hidden states against (n,) labels (-100 = ignored).

    ``self_target``: replace each kept label by the argmax of the logits themselves (``fidelity``).
    """
    logits = head(hidden).float()
    if self_target:
        labels = torch.where(labels >= 0, logits.detach().argmax(-1), labels)
    return nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def target_labels(input_ids: torch.Tensor, valid: torch.Tensor | None, split: torch.Tensor | None) -> torch.Tensor:
    """(B, S-1) next-token labels of positions 0..S-2, -100 where not a target.

    Args:
        input_ids: (B, S); valid: (B, S) bool or None (all valid);
        split: (B,) first continuation position per row, or None (every token is a target).
    """
    labels = input_ids[:, 1:].clone()
    if valid is not None:
        labels[~valid[:, 1:].bool()] = -100
    if split is not None:
        target_pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None]
        labels[target_pos < split[:, None].to(input_ids.device)] = -100
    return labels


def lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, self_target: bool = False) -> torch.Tensor:
    """Mean next-token CE from final hidden states, LM head applied in checkpointed chunks.

    Args:
        hidden: (B, S, D) final (normed) hidden states.
        labels: (B, S-1) from :func:`target_labels`; position t predicts labels[:, t].
    """
    flat_h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_y.shape[0], CE_CHUNK):
        end = start + CE_CHUNK
        if bool((flat_y[start:end] >= 0).any()):  # skip chunks without targets (e.g. a long prompt)
            total = total + checkpoint(_chunk_ce, head, flat_h[start:end], flat_y[start:end], self_target,
                                       use_reentrant=False)
    return total / (flat_y != -100).sum().clamp(min=1)


def last_logit(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of the logit of each sequence's last (valid) token given its prefix."""
    last = valid.long().sum(1) - 1 if valid is not None else torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    last = last.to(input_ids.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    logits = head(hidden[rows, last - 1]).float()  # (B, V): prediction made at the position before
    return logits[rows, input_ids[rows, last]].sum()


def objective(target: str, head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
              valid: torch.Tensor | None, split: torch.Tensor | None) -> torch.Tensor:
    """The scalar T of ``target`` from final hidden states (B, S, D)."""
    if target == "logit":
        return last_logit(head, hidden, input_ids, valid)
    if target == "sequence":
        split = None
    elif split is None:
        raise ValueError(f"saliency target {target!r} needs a prompt/continuation split")
    return lm_loss(head, hidden, target_labels(input_ids, valid, split), self_target=target == "fidelity")


def row_scale(target: str, input_ids: torch.Tensor, valid: torch.Tensor | None,
              split: torch.Tensor | None) -> torch.Tensor:
    """(B,) factor that turns the saliency of a batch's pooled mean CE into each row's own: N / n_b.

    The CE targets average over every target token of the batch (N), so a row's gradient carries 1 / N and its
    label would depend on the rows batched with it; each row's own mean CE carries 1 / n_b. Rows do not interact
    in the forward pass, so rescaling is exact. ``logit`` sums per-row values already (factor 1).
    """
    if target == "logit":
        return torch.ones(input_ids.shape[0], device=input_ids.device)
    counts = (target_labels(input_ids, valid, None if target == "sequence" else split) != -100).sum(1).float()
    return counts.sum().clamp(min=1) / counts.clamp(min=1)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside: only activations get gradients, no ``.grad`` is touched."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)


@contextmanager
def capture_layer_inputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record (and retain the grad of) the hidden state entering each of ``layers``."""
    captured: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)

    def make_hook(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.requires_grad:
                hidden.retain_grad()
            captured[idx] = hidden

        return hook

    handles = [blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def normalize_saliency(scores: torch.Tensor, absolute: bool, normalize: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, N) raw scores -> optionally |.| and divided by each (sequence, layer) max |score|."""
    if absolute:
        scores = scores.abs()
    if valid is not None:
        scores = scores * valid[..., None].to(scores.dtype)
    if normalize:
        scale = scores.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scores = scores / scale
    return scores


def saliency_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    target: str = "sequence",
    absolute: bool = True,
    normalize: bool = True,
    valid: torch.Tensor | None = None,
    split: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``target``'s saliency at the input of each of ``layers`` (None = every decoder layer).

    Args:
        model: a Hugging Face causal LM (its parameters are not modified and get no gradient).
        input_ids: (B, S), right-padded when ``valid`` is given.
        target: one of :data:`TARGETS`.
        valid: (B, S) bool, non-padding tokens; padded tokens score 0.
        split: (B,) first continuation position per row (``continuation`` / ``fidelity``).
    Returns:
        (B, S, len(layers)) float32 saliency.
    """
    if target not in TARGETS:
        raise ValueError(f"saliency target {target!r} not in {TARGETS}")
    layers = list(range(len(decoder_layers(model)))) if layers is None else list(layers)
    if target == "mask":
        raw = mask_saliency(model, input_ids, layers, valid, split)
        return normalize_saliency(raw, absolute, normalize, valid)
    if target in ("attention", "attention_value"):
        raw = attention_saliency(model, input_ids, layers, valid, split, value_weighted=target == "attention_value")
        return normalize_saliency(raw, absolute, normalize, valid)
    base, head = model.base_model, model.get_output_embeddings()
    with frozen_parameters(model), torch.inference_mode(False), torch.enable_grad(), \
            capture_layer_inputs(model, layers) as captured:
        ids = input_ids.clone()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        attn = valid.long() if valid is not None else None
        hidden = base(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
        value = objective(target, head, hidden, ids, valid, split)
        if not value.requires_grad:
            # No target token (a 1-token prompt, or no continuation): T is a constant, so every
            # token's saliency is 0 (the pruner's protected tokens decide alone).
            raw = embeds.new_zeros((*ids.shape, len(layers)), dtype=torch.float32)
        else:
            value.backward()
            raw = torch.stack([(captured[i].grad * captured[i]).float().sum(-1) for i in layers], dim=-1)
            raw = raw * row_scale(target, ids, valid, split).to(raw.device)[:, None, None]
    return normalize_saliency(raw.detach(), absolute, normalize, valid)


def mask_saliency(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                  valid: torch.Tensor | None, split: torch.Tensor | None) -> torch.Tensor:
    """(B, S, len(layers)) importance ``-sum_{k >= l} dT/dm_{k,j}`` of the ``mask`` target.

    A forward pre-hook on every decoder layer k gives it the additive mask
    ``causal + log(m_k + eps)`` (diagonal kept, as in training) with ``m_k`` = 1 leaf tensors.
    """
    from sdtp.training.masking import causal_masks, policy_attention_mask

    if split is None:
        raise ValueError("saliency target 'mask' needs a prompt/continuation split")
    blocks = decoder_layers(model)
    ids = input_ids.clone()
    valid = valid.bool() if valid is not None else torch.ones_like(ids, dtype=torch.bool)
    causal = causal_masks(model.config, valid)  # attention kind -> (B, 1, S, S)
    kinds = layer_kinds(model.config)
    keep = [torch.ones(ids.shape, dtype=torch.float32, device=ids.device, requires_grad=True) for _ in blocks]

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = policy_attention_mask(causal[kinds[k]], keep[k]).to(hidden.dtype)
            return args, kwargs

        return hook

    handles = [block.register_forward_pre_hook(make_hook(k), with_kwargs=True) for k, block in enumerate(blocks)]
    try:
        with frozen_parameters(model), torch.inference_mode(False), torch.enable_grad():
            hidden = model.base_model(input_ids=ids, attention_mask=valid.long(), use_cache=False).last_hidden_state
            value = objective("continuation", model.get_output_embeddings(), hidden, ids, valid, split)
            if not value.requires_grad:
                return torch.zeros((*ids.shape, len(layers)), dtype=torch.float32, device=ids.device)
            grads = torch.autograd.grad(value, keep)
    finally:
        for handle in handles:
            handle.remove()
    from_layer = -torch.stack(grads, dim=-1).flip(-1).cumsum(-1).flip(-1)  # (B, S, L): sum over k >= l
    scale = row_scale("continuation", ids, valid, split).to(from_layer.device)[:, None, None]
    return from_layer[..., list(layers)].float() * valid[..., None] * scale
