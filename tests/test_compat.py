"""sdtp.models.compat: the KV-cache keyword name of the installed transformers (5.20 - 5.25)."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from sdtp.models import decoder_layers
from sdtp.models.compat import (
    CACHE_KWARG,
    LEGACY_CACHE_KWARG,
    cache_from_kwargs,
    cache_kwargs,
    output_cache,
)


def test_cache_kwarg_matches_installed_version():
    # Detected from the decoder layer's signature; the release that renamed it is 5.24.
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert CACHE_KWARG == ("cache" if renamed else LEGACY_CACHE_KWARG)


def test_cache_from_kwargs_prefers_current_name_and_accepts_legacy_alias():
    current, legacy = object(), object()
    assert cache_from_kwargs({}) is None
    assert cache_from_kwargs({CACHE_KWARG: None}) is None
    assert cache_from_kwargs({CACHE_KWARG: current}) is current
    assert cache_from_kwargs({LEGACY_CACHE_KWARG: legacy}) is legacy
    if CACHE_KWARG != LEGACY_CACHE_KWARG:  # >= 5.24: both may be present, the current name wins
        assert cache_from_kwargs({CACHE_KWARG: current, LEGACY_CACHE_KWARG: legacy}) is current


@torch.no_grad()
def test_hooks_see_the_cache_the_model_was_given(tiny, prompt_ids):
    """What the engine's pre-hooks rely on: base model and every decoder layer receive the cache."""
    model, _, _ = tiny
    cache = DynamicCache(config=model.config)
    seen: dict[str, object] = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = cache_from_kwargs(kwargs)

        return hook

    handles = [model.base_model.register_forward_pre_hook(record("model"), with_kwargs=True)]
    for idx, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(record(f"layer{idx}"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(record(f"attn{idx}"), with_kwargs=True))
    try:
        out = model(prompt_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and all(value is cache for value in seen.values()), seen
    assert output_cache(out) is cache
    assert cache.get_seq_length() == prompt_ids.shape[1]
