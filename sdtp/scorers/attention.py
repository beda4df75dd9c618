"""LazyLLM-style attention scorer: how much the last prompt tokens attend to each alive token.

At the stage before decoder layer ``L`` the importance of an alive token is its attention probability from the
last ``num_queries`` prompt tokens at layer ``L - 1`` (the layer that just ran), averaged over heads and
queries; the ones an earlier stage dropped are not replaced by older tokens (the queries are the alive tokens
among the prompt's last ``num_queries`` positions). The full attention matrix is never materialised, so this
works with SDPA: a forward pre-hook on layer ``L - 1``'s attention keeps the inputs of the last
``num_queries`` alive tokens; at scoring time their queries are re-projected and scored against layer
``L - 1``'s cached keys. That cache holds exactly the currently alive tokens, in the same order (the stage at
``L`` has not pruned yet), so the scores line up with ``ctx.positions``.

Causality and, when layer ``L - 1`` slides (Gemma3), its window are applied by the alive tokens'
*original* positions, the mask the pruned layer itself ran with (:mod:`sdtp.models.layer_types`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdtp.models import decoder_layers
from sdtp.models.attention import attention_probs, project_queries
from sdtp.models.layer_types import layer_windows
from sdtp.scorers.base import Scorer, ScoreContext


class AttentionScorer(Scorer):
    """Mean attention from the last ``num_queries`` prompt tokens at the previous layer."""

    def __init__(self, num_queries: int = 1) -> None:
        if num_queries < 1:
            raise ValueError(f"pruning.scorer.num_queries: must be >= 1, got {num_queries}")
        self.num_queries = num_queries
        self._attn: dict[int, nn.Module] = {}
        self._window: dict[int, int | None] = {}  # per captured layer: its sliding window (None: full attention)
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self.unbind()
        all_layers, windows = decoder_layers(model), layer_windows(model.config)
        for layer in layers:
            attn = all_layers[layer - 1].self_attn
            self._attn[layer - 1], self._window[layer - 1] = attn, windows[layer - 1]
            self._handles.append(attn.register_forward_pre_hook(self._capture(layer - 1), with_kwargs=True))

    def unbind(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._attn, self._window, self._captured = [], {}, {}, {}

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        self._captured = {}

    def _capture(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            m = min(self.num_queries, hidden.shape[1])
            # Only the last m rows are needed; clone so the full activations can be freed.
            self._captured[layer] = (hidden[:, -m:].clone(), cos[:, -m:].clone(), sin[:, -m:].clone())

        return hook

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) mean attention probability each alive token receives from the last queries."""
        prev = ctx.layer - 1
        if ctx.past_key_values is None:
            raise RuntimeError("the attention scorer needs the prefill KV cache: run the model with use_cache=True")
        keys = ctx.past_key_values.layers[prev].keys  # (B, H_kv, n, hd)
        n = ctx.positions.shape[1]
        if prev not in self._captured or keys.shape[-2] != n:
            raise RuntimeError(f"layer {prev} cache holds {keys.shape[-2]} tokens, expected the {n} alive ones")
        hidden, cos, sin = self._captured[prev]
        attn = self._attn[prev]
        query = project_queries(attn, hidden, cos, sin)  # (B, H, m, hd)
        positions = ctx.positions.to(keys.device)  # (B, n) original positions of the cached (alive) tokens
        # Left-padded rows: padding slots are masked keys, so each row attends as it would alone.
        probs = attention_probs(query, keys, positions[:, -query.shape[2]:], attn.scaling, self._window[prev],
                                key_valid=ctx.valid, key_index=positions).mean(dim=(1, 2))  # (B, m, n)
        queries = self._query_rows(ctx, probs.shape[1]).to(probs.device)  # (B, m)
        if bool(queries.all()):
            return probs.mean(dim=1)
        summed = torch.where(queries[..., None], probs, 0.0).sum(dim=1)
        return summed / queries.sum(dim=1, keepdim=True).clamp(min=1)

    def _query_rows(self, ctx: ScoreContext, m: int) -> torch.Tensor:
        """(B, m) which of the batch's last ``m`` alive slots are a row's queries: its alive tokens among the
        prompt's last ``num_queries`` positions.

        After an earlier stage pruned, the last ``m`` alive slots can reach back past those positions (only the
        protected recent 10% is sure to survive), and older survivors must not become queries. Padding or masked
        slots are not queries either (alone, the row would have fewer). A row left with none (no protected
        recency) falls back to its last real slot.
        """
        positions = ctx.positions[:, -m:]
        queries = positions >= ctx.prompt_lengths()[:, None] - self.num_queries
        real = torch.ones_like(queries) if ctx.valid is None else ctx.valid[:, -m:].to(queries.device)
        queries &= real
        last = real.int().cumsum(dim=1) == real.int().sum(dim=1, keepdim=True)  # from each row's last real slot on
        return torch.where(queries.any(dim=1, keepdim=True), queries, last & real)

