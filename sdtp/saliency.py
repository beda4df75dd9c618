"""Gradient x input saliency of the tokens entering each pruning layer (SDTP's "marking stage").

For a frozen causal LM and a scalar output T, the saliency of token i at stage layer l is

    pi_hat[i, l] = sum_d (dT / dx_{i,d}) * x_{i,d},   x = hidden state *entering* decoder layer l,

computed on the full, unpruned model (paper Eq. 3). T is the mean next-token cross-entropy over
the sequence (default) or the logit of the last token given its prefix. Optionally the absolute
value is taken and each sequence's scores are divided by their per-layer maximum (method
reference section 8), which makes labels comparable across sequences for the MSE loss.

The hidden states are captured by forward pre-hooks (removed on exit); nothing of the model's
forward is copied. Memory stays bounded: the loss runs the LM head in checkpointed chunks, so no
full-vocabulary logits tensor is kept for the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtp.models import decoder_layers

TARGETS = ("lm_loss", "logit")
CE_CHUNK = 512  # positions per LM-head chunk: bounds the (chunk, vocab) logits held at once


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE of (n, D) hidden states against (n,) labels (-100 = ignored)."""
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def lm_loss(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token CE from final hidden states, LM head applied in checkpointed chunks.

    Args:
        hidden: (B, S, D) final (normed) hidden states.
        input_ids: (B, S); position t predicts token t+1.
        loss_mask: (B, S) bool/0-1, which tokens count as targets (e.g. not padding); None = all.
    """
    labels = input_ids[:, 1:].clone()
    if loss_mask is not None:
        labels[~loss_mask[:, 1:].bool()] = -100
    flat_h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_y.shape[0], CE_CHUNK):
        end = start + CE_CHUNK
        total = total + checkpoint(_chunk_ce, head, flat_h[start:end], flat_y[start:end], use_reentrant=False)
    return total / (flat_y != -100).sum().clamp(min=1)


def target_logit(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of the logit of each sequence's last (valid) token given its prefix."""
    if loss_mask is None:
        last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    else:
        last = loss_mask.long().sum(1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    logits = head(hidden[rows, last - 1]).float()  # (B, V): prediction made at the position before
    return logits[rows, input_ids[rows, last]].sum()


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
    layers: Sequence[int],
    target: str = "lm_loss",
    absolute: bool = True,
    normalize: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient x input saliency at the input of each stage layer.

    Args:
        model: a Hugging Face causal LM (its parameters are not modified and get no gradient).
        input_ids: (B, S).
        layers: 0-based decoder layers (the pruning stages).
        target: ``lm_loss`` (mean next-token CE) or ``logit`` (last token's logit).
        loss_mask: (B, S) valid tokens (padding = 0); padded tokens score 0.
    Returns:
        (B, S, len(layers)) float32 saliency.
    """
    if target not in TARGETS:
        raise ValueError(f"saliency target {target!r} not in {TARGETS}")
    base, head = model.base_model, model.get_output_embeddings()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only activations need gradients; no parameter .grad is touched
    try:
        with torch.inference_mode(False), torch.enable_grad(), capture_layer_inputs(model, layers) as captured:
            ids = input_ids.clone()
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            attn = loss_mask.long() if loss_mask is not None else None
            hidden = base(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
            objective = (lm_loss if target == "lm_loss" else target_logit)(head, hidden, ids, loss_mask)
            if not objective.requires_grad:
                # No target token (a 1-token prompt, or a fully masked one): the loss is a constant,
                # so every token's saliency is 0 (the pruner's protected tokens decide alone).
                raw = embeds.new_zeros((*ids.shape, len(layers)), dtype=torch.float32)
            else:
                objective.backward()
                raw = torch.stack([(captured[i].grad * captured[i]).float().sum(-1) for i in layers], dim=-1)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return normalize_saliency(raw.detach(), absolute, normalize, loss_mask)
