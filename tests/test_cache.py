"""The in-place appending cache layout: same numbers as HF's DynamicCache, no copy per decode step."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sdtp.engine.cache import AppendLayer, appendable_cache, cache_bytes, cache_lengths
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.models.compat import cache_kwargs
from sdtp.scorers.random import RandomScorer

SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45))


@torch.no_grad()
def test_pruned_prefill_and_decode_match_dynamic_cache(tiny, prompt_ids):
    model, _, _ = tiny
    outputs = {}
    for name, cache in (("hf", DynamicCache(config=model.config)), ("append", appendable_cache(model, headroom=3))):
        pruner = TokenPruner(SCHEDULE, RandomScorer(seed=0))  # a fresh scorer per cache: the same random mask
        with pruner(model):
            out = model(prompt_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            logits = [out.logits]
            buffers = [layer._key_buffer.data_ptr() for layer in cache.layers] if name == "append" else []
            for token in (5, 6, 7, 8, 9):  # 5 steps > headroom 3: one reallocation on the way
                out = model(torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True)
                logits.append(out.logits)
                if name == "append" and token == 7:  # the first 3 steps wrote in place
                    assert [layer._key_buffer.data_ptr() for layer in cache.layers] == buffers
        if name == "append":  # ... and the 4th outgrew the headroom: every layer moved to a bigger buffer
            assert all(layer._key_buffer.data_ptr() != old for layer, old in zip(cache.layers, buffers, strict=True))
        outputs[name] = (logits, cache_lengths(cache), cache_bytes(cache))
    (hf_logits, hf_lengths, hf_bytes), (ap_logits, ap_lengths, ap_bytes) = outputs["hf"], outputs["append"]
    assert ap_lengths == hf_lengths and ap_bytes == hf_bytes
    assert hf_lengths == [n + 5 for n in SCHEDULE.tokens_per_layer(prompt_ids.shape[1], 4)]
    for a, b in zip(hf_logits, ap_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_crop_and_replaced_tensors_are_picked_up():
    layer = AppendLayer(headroom=4)
    keys = torch.randn(1, 2, 6, 8)
    layer.update(keys, keys + 1)
    layer.crop(-2)
    new = torch.randn(1, 2, 1, 8)
    out_k, out_v = layer.update(new, new + 1)
    assert torch.equal(out_k, torch.cat([keys[:, :, :4], new], dim=2))
    assert torch.equal(out_v, torch.cat([keys[:, :, :4] + 1, new + 1], dim=2))
    layer.batch_select_indices(torch.tensor([0]))  # replaces keys with a copy: next update re-buffers
    out_k, _ = layer.update(new, new)
    assert out_k.shape[-2] == 6 and torch.equal(out_k[:, :, -1:], new)
