"""KV-cache compression after prefill (H2O, StreamingLLM, SnapKV, or a score of your own), composable with token
pruning.

    policy = build_kv_policy(cfg)            # or KVPolicy("h2o", ratio=0.4)
    with KVCompressor(policy)(model):        # inside or outside ``with pruner(model)``
        result = generate(model, ids, 32, pruner)

The compressor evicts cache entries per layer and per KV head at the end of the prefill forward,
so whatever the (pruned) prefill left in each layer is cut to ``ratio`` of it; decoding proceeds
token by token from the compressed cache at the original positions. What ranks the entries is a
:class:`~sdtp.kv.scores.KVScore` (``kv.score._target_`` for your own; docs/extending.md).
"""

from sdtp.kv.cache import CompressedCache, compress_cache
from sdtp.kv.compressor import KVCompressor, kv_compression
from sdtp.kv.policy import KV_METHODS, KVPolicy, build_kv_policy, kv_enabled
from sdtp.kv.scores import KVScore, LayerPrefill

__all__ = ["KV_METHODS", "CompressedCache", "KVCompressor", "KVPolicy", "KVScore", "LayerPrefill", "build_kv_policy",
           "compress_cache", "kv_compression", "kv_enabled"]
