"""The one place that knows how the installed ``transformers`` names the KV cache (5.20 - 5.25).

transformers 5.24 renamed the cache keyword argument from ``past_key_values`` to ``cache`` on every
forward (causal LM, base model, decoder layer, attention module, ``create_causal_mask``) and the
``ModelOutput`` field from ``.past_key_values`` to ``.cache``. The old names still work there as
deprecated aliases (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`` on each
forward, a ``ModelOutput.past_key_values`` property), but each use logs a deprecation warning, and
the aliases only resolve *inside* ``forward``: the forward hooks the engine installs see the kwargs
as the caller passed them, so under 5.24 the decoder layers' hooks get ``cache=``, and a hook that
reads ``kwargs["past_key_values"]`` silently finds nothing. Everything in ``sdtp`` therefore goes
through the helpers below instead of spelling either name. 5.25 keeps this naming (it only lists the
deprecated alias in the signatures of the mask functions, which ``sdtp`` does not inspect).

The name is read once, from the signature of the Llama decoder layer's forward (every supported
family, ``sdtp.models.loading.SUPPORTED_FAMILIES``, shares that call signature), so it follows the
code actually installed rather than a version table.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

LEGACY_CACHE_KWARG = "past_key_values"
"""The name transformers < 5.24 uses (and >= 5.24 still accepts, deprecated until 5.40)."""


def _detect_cache_kwarg() -> str:
    # inspect.signature follows __wrapped__ through deprecate_kwarg, i.e. it shows the real parameters.
    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    for name in ("cache", LEGACY_CACHE_KWARG):
        if name in params:
            return name
    raise ImportError(
        f"unsupported transformers: LlamaDecoderLayer.forward takes neither `cache` nor `past_key_values` "
        f"({list(params)}); sdtp supports transformers 5.20 - 5.25"
    )


CACHE_KWARG: str = _detect_cache_kwarg()
"""The cache keyword argument of model/layer forwards and the cache field of their outputs."""

# Names a hook may find the cache under: the current one first; the legacy alias too under >= 5.24,
# where a caller may still pass it (e.g. calling ``model.base_model`` directly with the old name).
_HOOK_NAMES: tuple[str, ...] = tuple(dict.fromkeys((CACHE_KWARG, LEGACY_CACHE_KWARG)))


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a model call, e.g. ``model(input_ids=ids, **cache_kwargs(cache), use_cache=True)``."""
    return {CACHE_KWARG: cache}


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward (pre-)hook registered ``with_kwargs=True`` received, or None."""
    for name in _HOOK_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (``output.cache`` or ``output.past_key_values``), or None."""
    return getattr(output, CACHE_KWARG, None)
