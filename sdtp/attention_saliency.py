"""The ``attention`` label target: how much the continuation reads each token from a layer on.

For token j and decoder layer l the label is

    a[j, l] = sum_{k >= l} mean_{heads, q in continuation} A_k[q, j],

the attention probability the continuation queries put on j, summed over the layers j would be
missing from if it were dropped before layer l (dropping at l removes it from every later layer).
The queries are the continuation tokens' own, the ones that read the pruned cache while decoding; the last
prompt token's query (which predicts the first continuation token) runs in the pruned prefill itself.
It is computed on the full, unpruned model in one forward (no backward): after each layer's
attention has run, the continuation rows' queries are re-projected (:func:`project_queries`) and
scored against that layer's cached keys, so the full S x S attention matrix is never stored and
the model's attention kernel (SDPA) is untouched. A sliding-window layer (Gemma3) is read through
its window: its queries' probabilities cover only the keys the layer itself lets them see.

``attention_value`` weights each probability by the norm of what the key contributes to that head's
output, ``||W_o^h v_j||`` (Kobayashi et al., 2020, "Attention is not only a weight"): a token that
draws attention but writes almost nothing (a sink, a newline, punctuation) scores low, so the budget
goes to tokens whose content the continuation reads. Per-head output norms are taken through the
Gram matrix ``W_o^h^T W_o^h`` (hd x hd), so no (S, D) tensor per head is built. A post-attention
norm (Gemma3) is left out: it rescales the summed output, not one key's share of it.

Why a second kind of label: gradient x input rates what *zeroing* a token's state would change to
first order, far from removing 65% of the prompt; the oracle ablation (``results/predictors/...``)
found it below the positional rule, while the attention the continuation actually pays is what a
pruned KV cache can no longer serve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from sdtp.engine.cache import unslide
from sdtp.models import decoder_layers
from sdtp.models.attention import attention_probs, project_queries
from sdtp.models.compat import cache_kwargs
from sdtp.models.layer_types import layer_windows


def value_output_norms(attn: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, g, T) norm of each cached value through each query head's slice of ``o_proj``.

    Args:
        attn: the layer's self-attention module (``o_proj`` maps (H * hd) -> D).
        values: (B, H_kv, T, hd) the layer's cached values.
    """
    kv_heads, head_dim = values.shape[1], values.shape[-1]
    weight = attn.o_proj.weight.float()  # (D, H * hd)
    per_head = weight.view(weight.shape[0], -1, head_dim).transpose(0, 1)  # (H, D, hd)
    gram = (per_head.transpose(1, 2) @ per_head).view(kv_heads, -1, head_dim, head_dim)  # (H_kv, g, hd, hd)
    v = values.float()
    squared = torch.einsum("bkti,kgij,btkj->bkgt", v, gram, v.transpose(1, 2))
    return squared.clamp(min=0).sqrt()


def continuation_weights(valid: torch.Tensor, split: torch.Tensor, start: int) -> torch.Tensor:
    """(B, S - start) weight of each query row from ``start`` on: 1 / #continuation tokens of its row.

    Args:
        valid: (B, S) bool, non-padding tokens (right padding).
        split: (B,) first continuation position of each row.
    """
    pos = torch.arange(start, valid.shape[1], device=valid.device)[None]
    rows = (pos >= split[:, None]) & valid[:, start:]
    return rows.float() / rows.sum(dim=1, keepdim=True).clamp(min=1)


@torch.no_grad()
def attention_saliency(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                       valid: torch.Tensor | None, split: torch.Tensor | None,
                       value_weighted: bool = False) -> torch.Tensor:
    """(B, S, len(layers)) attention received from the continuation at layers >= each of ``layers``.

    Args:
        input_ids: (B, S), right-padded when ``valid`` is given.
        split: (B,) first continuation position per row (required).
        value_weighted: weight each head's probability by :func:`value_output_norms` (``attention_value``).
    """
    if split is None:
        raise ValueError("saliency targets 'attention' and 'attention_value' need a prompt/continuation split")
    blocks = decoder_layers(model)
    windows = layer_windows(model.config)
    valid = valid.bool() if valid is not None else torch.ones_like(input_ids, dtype=torch.bool)
    split = split.to(input_ids.device)
    start = int(split.min())
    weights = continuation_weights(valid, split, start)  # (B, m)
    cache = DynamicCache(config=model.config)
    unslide(cache)  # sliding layers keep every key, so each query's window can be read from the cache
    received: list[torch.Tensor] = [torch.zeros(input_ids.shape, device=input_ids.device) for _ in blocks]

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            query = project_queries(module, hidden[:, start:], cos[:, start:], sin[:, start:])  # (B, H, m, hd)
            index = torch.arange(start, hidden.shape[1], device=hidden.device)
            probs = attention_probs(query, cache.layers[k].keys, index, module.scaling, windows[k],
                                    key_valid=valid)  # (B, Hkv, g, m, S); padding keys never count
            if value_weighted:
                probs = probs * value_output_norms(module, cache.layers[k].values)[..., None, :]
            per_query = probs.mean(dim=(1, 2))  # (B, m, S)
            received[k] = torch.einsum("bm,bms->bs", weights, per_query)

        return hook

    handles = [block.self_attn.register_forward_hook(make_hook(k), with_kwargs=True)
               for k, block in enumerate(blocks)]
    try:
        model.base_model(input_ids=input_ids, attention_mask=valid.long(), **cache_kwargs(cache),
                         use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    from_layer = torch.stack(received, dim=-1).flip(-1).cumsum(-1).flip(-1)  # (B, S, L): sum over k >= l
    return from_layer[..., list(layers)] * valid[..., None]
