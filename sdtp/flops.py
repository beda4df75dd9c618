"""Analytic FLOPs of dense and token-pruned inference (prefill, decode, end to end).

A pure function of the Hugging Face model config, the per-layer token counts of the prefill
(``PruningSchedule.tokens_per_layer``, protected tokens included), the predictor's cost per
token and the number of generated tokens. One multiply-add = 2 FLOPs. With

    d = hidden_size, q = heads * head_dim, kv = kv_heads * head_dim, F = intermediate_size,
    V = vocab_size, n_l = tokens decoder layer l processes during prefill (n_l = N when dense),

the terms are

* linear, per token and layer:  ``2 (d q + 2 d kv + q d + 3 d F)``  (q, k, v, o projections and
  the SwiGLU MLP's gate, up and down); prefill layer l costs that times ``n_l``;
* attention, per layer:  ``4 q P_l``  (Q K^T and P V, 2 FLOPs per multiply-add each), where
  ``P_l`` is the number of (query, key) pairs: with ``attention="causal"`` the pairs the layer's mask
  admits, ``n_l (n_l + 1) / 2`` at a full-attention layer (what the CPU flash kernel behind SDPA
  computes for a causal mask: it skips the upper triangle), fewer at a sliding-window layer (below);
  ``n_l^2`` with ``attention="full"`` (what ``torch.utils.flop_counter.FlopCounterMode`` counts:
  its SDPA formula ignores ``is_causal`` and any mask);
* LM head: ``2 d V`` per position whose logits are computed; prefill computes only the last
  one (``logits_to_keep=1``), each decode step one;
* predictor (pruned only): ``f_pred`` FLOPs per scored token at each stage that actually drops
  tokens, applied to the tokens alive when the stage starts;
* decode step t (t = 0, 1, ...) after a prefill: one token per layer, linear as above, attention
  ``4 q (c_l + t + 1)`` with ``c_l`` the tokens layer l cached during prefill (``n_l``), LM head.

Sliding-window layers (Gemma3, Mistral; :mod:`sdtp.models.layer_types`) admit a (query, key) pair
only when ``0 <= p_q - p_k < window`` in *original* positions, pruned or not. With the positions
each layer processed (``positions_per_layer``, from the prefill record) the pairs are counted
exactly; without them a layer's ``n_l`` tokens are taken as the prompt's last ``n_l`` positions,
exact for dense layers and an upper bound for pruned ones (kept tokens spread over more positions
share fewer windows). Such a layer caches only what a later query's window reaches (``p > N -
window``; HF trims the dense cache so, :mod:`sdtp.engine.window` the pruned one), and a decode
step attends to those of them still in its window plus the generated tokens. On CPU, SDPA runs a
sliding layer with an explicit mask and computes every block, so at prefill ``attention="causal"``
counts the work a window-aware kernel would do, ``"full"`` the work the CPU kernel does. Decode
counts the keys a step's mask admits in both modes.

End to end for ``G`` generated tokens = prefill + ``G - 1`` decode steps (the first token comes
from the prefill logits, as in :func:`sdtp.engine.generation.generate`). Norms, RoPE, SwiGLU's
elementwise product, softmax and the residual adds are not counted (as in the paper and in
FlopCounterMode, which counts matmuls only). The compression ratio ``1/tau`` of the paper (§4.1)
is ``N / mean_l(n_l)``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from sdtp.models.layer_types import layer_windows

ATTENTION_MODES = ("causal", "full")


@dataclass(frozen=True)
class ModelDims:
    """The config fields the FLOPs depend on."""

    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    num_layers: int
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full); () = all full

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """From a ``PretrainedConfig`` (or any object / mapping with the same attribute names)."""
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        head_dim = get("head_dim") or hidden // heads
        kv_heads = int(get("num_key_value_heads") or heads)
        as_object = SimpleNamespace(**config) if isinstance(config, Mapping) else config
        return cls(hidden=hidden, q_dim=heads * int(head_dim), kv_dim=kv_heads * int(head_dim),
                   intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")),
                   num_layers=int(get("num_hidden_layers")), windows=layer_windows(as_object))

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    @property
    def linear_per_token(self) -> int:
        """FLOPs of one token through one layer's projections and MLP."""
        d, q, kv, f = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)

    @property
    def lm_head_per_token(self) -> int:
        return 2 * self.hidden * self.vocab


@dataclass
class Flops:
    """A FLOPs breakdown; ``total`` is the sum of the four terms."""

    linear: int = 0
    attention: int = 0
    lm_head: int = 0
    predictor: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head + self.predictor

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention,
                     self.lm_head + other.lm_head, self.predictor + other.predictor)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


Positions = Sequence[int]  # sorted original positions of the tokens a layer processed


def attention_pairs(n: int, attention: str = "causal", window: int | None = None) -> int:
    """(query, key) pairs of an ``n``-token self-attention over consecutive positions."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention: {attention!r} not in {ATTENTION_MODES}")
    if attention == "full":
        return n * n
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window  # later queries see exactly `window` keys


def window_pairs(positions: Positions, window: int | None) -> int:
    """Causal pairs among sorted original ``positions`` whose offset is below ``window`` (None: all)."""
    if window is None or isinstance(positions, range):
        return attention_pairs(len(positions), "causal", window)
    # query i sees the keys j <= i with positions[j] > positions[i] - window
    return sum(i + 1 - bisect_right(positions, p - window, 0, i + 1) for i, p in enumerate(positions))


def layer_positions(seq_len: int, tokens_per_layer: Sequence[int],
                    positions_per_layer: Sequence[Positions | None] | None = None) -> list[Positions]:
    """Each layer's processed positions: the given ones, else the prompt's last ``n_l`` positions."""
    given = positions_per_layer or [None] * len(tokens_per_layer)
    if len(given) != len(tokens_per_layer):
        raise ValueError(f"positions_per_layer has {len(given)} entries for {len(tokens_per_layer)} layers")
    out: list[Positions] = []
    for n, positions in zip(tokens_per_layer, given):
        if positions is not None and len(positions) != n:
            raise ValueError(f"a layer processed {n} tokens but {len(positions)} positions were given")
        out.append(range(seq_len - n, seq_len) if positions is None else positions)
    return out


def cached_positions(positions: Positions, seq_len: int, window: int | None) -> Positions:
    """What a layer caches after the prefill: everything, or at a sliding layer what a later window reaches."""
    if window is None:
        return positions
    return positions[bisect_right(positions, seq_len - window):]


def prefill_flops(
    dims: ModelDims,
    tokens_per_layer: Sequence[int],
    predictor_per_token: int = 0,
    stage_layers: Sequence[int] = (),
    attention: str = "causal",
    positions_per_layer: Sequence[Positions | None] | None = None,
    scored_per_stage: Sequence[int] | None = None,
) -> Flops:
    """FLOPs of one prefill with logits for the last position only.

    Args:
        tokens_per_layer: tokens each of the ``num_layers`` layers processes (all N when dense).
        predictor_per_token: the scorer's FLOPs per scored token (0 for random / training-free).
        stage_layers: layers before which a stage scores the alive tokens.
        positions_per_layer: the original positions each layer processed (None, or a None entry: the
            last ``n_l``); only sliding-window layers with ``attention="causal"`` read them.
        scored_per_stage: tokens each stage's scorer rates, when that is not the alive ones of a stage that
            drops some (None): a reviving pruner (:mod:`sdtp.engine.revival`) rates every prompt token.
    """
    if len(tokens_per_layer) != dims.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {dims.num_layers} layers")
    linear = sum(dims.linear_per_token * n for n in tokens_per_layer)
    positions = layer_positions(max(tokens_per_layer), tokens_per_layer, positions_per_layer)
    attn = sum(4 * dims.q_dim * (attention_pairs(n, attention) if attention == "full" or dims.window(layer) is None
                                 else window_pairs(positions[layer], dims.window(layer)))
               for layer, n in enumerate(tokens_per_layer))
    if scored_per_stage is None:
        scored_per_stage = nested_scored(tokens_per_layer, stage_layers)
    elif len(scored_per_stage) != len(stage_layers):
        raise ValueError(f"scored_per_stage has {len(scored_per_stage)} entries for {len(stage_layers)} stages")
    predictor = predictor_per_token * sum(scored_per_stage)
    return Flops(linear=linear, attention=attn, lm_head=dims.lm_head_per_token, predictor=predictor)


def nested_scored(tokens_per_layer: Sequence[int], stage_layers: Sequence[int]) -> list[int]:
    """Tokens each stage of a nesting pruner scores: its alive ones, or none when it has nothing to drop (the
    pruner does not call the scorer then)."""
    return [alive if kept < alive else 0
            for alive, kept in ((tokens_per_layer[layer - 1], tokens_per_layer[layer]) for layer in stage_layers)]


def revived_scored(seq_len: int, tokens_per_layer: Sequence[int], stage_layers: Sequence[int]) -> list[int]:
    """Tokens each stage of a reviving pruner (:mod:`sdtp.engine.revival`) scores: every prompt token, at each
    stage that keeps fewer than all of them (it re-ranks dropped tokens too)."""
    return [seq_len if tokens_per_layer[layer] < seq_len else 0 for layer in stage_layers]


def decode_pairs(cached: Positions, seq_len: int, steps: int, window: int | None) -> int:
    """(query, key) pairs of ``steps`` decode steps at one layer whose cache holds ``cached`` positions."""
    if window is None:  # step t attends over c + t + 1 keys: sum_t = steps * c + steps (steps + 1) / 2
        return steps * len(cached) + steps * (steps + 1) // 2
    # step t (query at seq_len + t) sees the cached keys still in its window and up to `window` new ones
    return sum(len(cached) - bisect_right(cached, seq_len + t - window) + min(t + 1, window) for t in range(steps))


def decode_flops(dims: ModelDims, cached_per_layer: Sequence[Positions], seq_len: int, steps: int) -> Flops:
    """FLOPs of ``steps`` single-token decode steps after a ``seq_len``-token prefill whose layer l
    cached the positions ``cached_per_layer[l]`` (:func:`cached_positions`)."""
    linear = steps * dims.num_layers * dims.linear_per_token
    pairs = sum(decode_pairs(cached, seq_len, steps, dims.window(layer))
                for layer, cached in enumerate(cached_per_layer))
    return Flops(linear=linear, attention=4 * dims.q_dim * pairs, lm_head=steps * dims.lm_head_per_token)


def compression_ratio(seq_len: int, tokens_per_layer: Sequence[int]) -> float:
    """The paper's 1/tau: original tokens / average tokens per layer."""
    return seq_len * len(tokens_per_layer) / sum(tokens_per_layer)


def estimate(
    config: Any,
    seq_len: int,
    tokens_per_layer: Sequence[int] | None = None,
    new_tokens: int = 1,
    predictor_per_token: int = 0,
    stage_layers: Sequence[int] = (),
    attention: str = "causal",
    positions_per_layer: Sequence[Positions | None] | None = None,
    scored_per_stage: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Dense vs pruned FLOPs of generating ``new_tokens`` tokens from a ``seq_len``-token prompt.

    ``tokens_per_layer=None`` means no pruning (the pruned numbers then equal the dense ones);
    ``positions_per_layer`` are the pruned layers' original positions and ``scored_per_stage`` the tokens
    each stage's scorer rates (None: a nesting pruner's, :func:`prefill_flops`).
    Returns a JSON-ready dict: ``{dense, pruned}: {prefill, decode, end_to_end}: Flops.as_dict()``,
    the ratios dense/pruned (``prefill_ratio``, ``decode_ratio``, ``end_to_end_ratio``), the
    prefill FLOPs reduction ``1 - pruned/dense``, the predictor's share of pruned prefill FLOPs,
    ``compression_ratio`` (1/tau), the tokens each layer caches (``cached_per_layer``: dense and
    pruned) and ``kv_reduction``, the share of KV entries pruning saves (``1 - tau`` without
    sliding windows).
    """
    dims = ModelDims.from_config(config)
    dense_counts = [seq_len] * dims.num_layers
    counts = list(tokens_per_layer) if tokens_per_layer is not None else dense_counts
    steps = max(new_tokens - 1, 0)
    out: dict[str, Any] = {"attention": attention, "seq_len": seq_len, "new_tokens": new_tokens,
                           "cached_per_layer": {}}
    for name, per_layer, pred, given in (("dense", dense_counts, 0, None),
                                         ("pruned", counts, predictor_per_token, positions_per_layer)):
        processed = layer_positions(seq_len, per_layer, given)
        pre = prefill_flops(dims, per_layer, pred, stage_layers if name == "pruned" else (), attention, processed,
                            scored_per_stage if name == "pruned" else None)
        cached = [cached_positions(positions, seq_len, dims.window(layer)) for layer, positions in enumerate(processed)]
        dec = decode_flops(dims, cached, seq_len, steps)
        out[name] = {"prefill": pre.as_dict(), "decode": dec.as_dict(), "end_to_end": (pre + dec).as_dict()}
        out["cached_per_layer"][name] = [len(c) for c in cached]
    for phase in ("prefill", "decode", "end_to_end"):
        dense, pruned = out["dense"][phase]["total"], out["pruned"][phase]["total"]
        out[f"{phase}_ratio"] = dense / pruned if pruned else 1.0
    out["prefill_reduction"] = 1.0 - out["pruned"]["prefill"]["total"] / out["dense"]["prefill"]["total"]
    out["predictor_share"] = out["pruned"]["prefill"]["predictor"] / out["pruned"]["prefill"]["total"]
    out["compression_ratio"] = compression_ratio(seq_len, counts)
    out["kv_reduction"] = 1.0 - sum(out["cached_per_layer"]["pruned"]) / sum(out["cached_per_layer"]["dense"])
    out["tokens_per_layer"] = counts
    return out


def prefill_fraction(config: Any, seq_len: int, tokens_per_layer: Sequence[int] | None = None,
                     attention: str = "causal") -> dict[str, float]:
    """Analytic prefill FLOPs of one ``seq_len``-token prompt, dense vs pruned (``tokens_per_layer``, None = dense).

    Returns ``{dense_gflops, pruned_gflops, fraction}`` with ``fraction`` = pruned / dense (1.0 dense). The
    scorer's own cost is not counted (the schedule's cost only: every scorer pays the same).
    """
    dims = ModelDims.from_config(config)
    dense = prefill_flops(dims, [seq_len] * dims.num_layers, attention=attention).total
    pruned = dense if tokens_per_layer is None else prefill_flops(dims, tokens_per_layer, attention=attention).total
    return {"dense_gflops": dense / 1e9, "pruned_gflops": pruned / 1e9, "fraction": pruned / dense}


def flop_counter_mapping() -> dict:
    """Extra formulas for ``FlopCounterMode(custom_mapping=...)``: the CPU flash SDPA kernel.

    torch's counter registers SDPA only for the CUDA kernels; on CPU ``aten._scaled_dot_product_
    flash_attention_for_cpu`` would count 0. We register torch's own SDPA formula for it, which,
    like the CUDA ones, counts the full ``n_q x n_k`` score matrix (``attention="full"`` here).
    """
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
