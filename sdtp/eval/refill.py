"""Separate *which* tokens a pruner keeps from *what it loses by pruning during prefill*.

A pruned prefill costs quality in two ways: the scorer may drop tokens the continuation needs
(selection), and from each stage on the kept tokens are computed without attending to the dropped
ones (the information those tokens would have passed on is lost before the cache is written).
``+pruning.refill=true`` removes the second cause. The context is prefilled twice: with the pruner,
which decides which prompt positions every layer keeps (:attr:`PrefillRecord.layer_positions`), and
densely; each layer's cache then holds the *dense* keys and values of exactly the positions the
pruned prefill kept at that layer, and the first continuation token is predicted by the dense
prefill's logits. The result is the pruner's choice used as a KV-cache policy: the same per-layer
cache layout (and memory) as the pruned prefill, at the cost of a dense prefill. The gap between a
scorer's pruned and refilled numbers is what pruning during prefill costs on top of its choice; the
gap between the refilled number and a KV policy's (``kv=h2o``) at equal memory compares the choices.
"""

from __future__ import annotations

import torch
from torch import nn

from sdtp.eval.scoring import PrefilledContext, prefill_context


@torch.inference_mode()
def refill_dense(model: nn.Module, ctx_ids: torch.Tensor, pruned: PrefilledContext) -> PrefilledContext:
    """``pruned`` with every layer's cache replaced by the dense prefill's K/V at the positions that layer kept.

    Args:
        ctx_ids: (1, N) the context ``pruned`` was prefilled from (one unpadded row).
        pruned: its pruned prefill (:func:`sdtp.eval.scoring.prefill_context` with a pruner).
    Returns:
        a context whose layer ``l`` caches (1, H_kv, k_l, hd) dense keys/values (``k_l`` = the tokens the
        pruned prefill left in layer ``l``'s cache), with the dense last logits and the pruned record, so
        continuations are scored through the pruner's per-layer masks as before.
    """
    record = pruned.record
    if record is None or pruned.attention_mask is not None or ctx_ids.shape[0] != 1:
        raise ValueError("refill_dense: needs one unpadded row prefilled with a pruner")
    dense = prefill_context(model, ctx_ids, None)
    for index, (source, target) in enumerate(zip(dense.cache.layers, pruned.cache.layers, strict=True)):
        layout = record.cache_layout(index)  # (1, k_l) positions the pruned layer caches; None: every token
        keys, values = source.keys, source.values  # (1, H_kv, N_l, hd): a dense sliding layer holds its last N_l
        if layout is not None:
            slots = layout[0][0] - (pruned.length - keys.shape[2])  # >= 0: trimmed to the same window
            keys, values = keys.index_select(2, slots), values.index_select(2, slots)
        target.keys, target.values = keys, values
    return PrefilledContext(dense.last_logits, pruned.cache, pruned.length, record)
