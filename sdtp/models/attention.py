"""Attention probabilities for a few queries, recomputed from a layer's own modules.

Baselines that rank tokens (or KV entries) by attention need the softmax weights, which SDPA and
FlashAttention never materialise. Instead of running an eager copy of the model, we re-project
only the queries we need with the layer's ``q_proj`` (+ ``q_norm`` if the family has one), rotate
them with the model module's own ``apply_rotary_pos_emb`` and score them against the keys already
in the KV cache (which are stored post-RoPE). GQA is handled by grouping query heads per KV head.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from sdtp.models.layer_types import visible_keys


def project_queries(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotated queries of ``attn`` for ``hidden``.

    Args:
        attn: a decoder layer's self-attention module (Llama/Qwen2/Mistral layout).
        hidden: (B, m, D) post-``input_layernorm`` hidden states (what ``attn`` receives).
        cos, sin: (B or 1, m, hd) rotary tables for those tokens' positions.
    Returns:
        (B, H, m, hd) queries, as ``attn.forward`` computes them before attention.
    """
    batch, m, _ = hidden.shape
    query = attn.q_proj(hidden).view(batch, m, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3/Gemma-style per-head norm, applied before RoPE
        query = attn.q_norm(query)
    query = query.transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    query, _ = rope(query, query, cos, sin)
    return query


def attention_probs(query: torch.Tensor, keys: torch.Tensor, query_index: torch.Tensor, scale: float,
                    window: int | None = None, key_valid: torch.Tensor | None = None,
                    key_index: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of ``query`` over ``keys``, grouped per KV head.

    Args:
        query: (B, H, m, hd) rotated queries.
        keys: (B, H_kv, T, hd) cached (rotated) keys; ``H`` must be a multiple of ``H_kv``.
        query_index: (m,) or (B, m) long, the position of each query token (keys after it are masked).
        scale: softmax scaling (``attn.scaling``).
        window: a sliding-window layer's window: keys ``window`` or more positions before the query are
            masked too.
        key_valid: (B, T) bool real keys (False = a left-padding slot, masked); None = all real.
        key_index: (B, T) long, the position of each key, e.g. the original positions a pruned cache
            holds; None = its cache index (an unpruned cache that holds every token).
    Returns:
        (B, H_kv, H // H_kv, m, T) float32 probabilities; each row sums to 1.
    """
    batch, heads, m, head_dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = query.float().view(batch, kv_heads, heads // kv_heads, m, head_dim)
    logits = grouped @ keys.float()[:, :, None].transpose(-1, -2) * scale  # (B, H_kv, g, m, T)
    if key_index is None:
        key_index = torch.arange(length, device=keys.device)
    offset = query_index[..., :, None] - key_index[..., None, :]  # (m, T) or (B, m, T): query - key
    visible = visible_keys(offset, window)
    if visible.dim() == 3:
        visible = visible[:, None, None]  # (B, 1, 1, m, T)
    if key_valid is not None:
        visible = visible & key_valid.bool()[:, None, None, None, :]  # (B, 1, 1, m, T)
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
