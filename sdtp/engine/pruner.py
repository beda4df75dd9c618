"""Physical token dropping during prefill, as a context manager over a Hugging Face causal LM.

``with TokenPruner(schedule, scorer)(model): model(input_ids, use_cache=True)`` runs the model's
own forward; forward pre-hooks on the decoder layers shrink the token axis at each stage:

* at a stage layer the scorer rates the alive tokens, the protected ones (first ``keep_first``,
  last ``keep_recent`` of the prompt) plus the top-scored others up to the stage budget are kept,
  and the hidden states are gathered, so this and every later layer run on fewer tokens;
* every later layer receives the matching slices of ``position_embeddings`` (RoPE cos/sin of the
  tokens' *original* positions), ``position_ids`` and, if present, the attention mask;
* each layer's KV cache therefore holds exactly the tokens that reached it. Layer 0 is never
  pruned, so the cache length the model reads (layer 0's) stays the prompt length N and decoding
  continues at position N.

After the prompt, forwards with a non-empty cache (decode steps, or lm-eval continuations) are
never pruned; if they carry an attention-mask tensor, its key axis is sliced per layer to the
positions that layer's cache holds. Nothing of HF's forward code is copied or patched, and all
hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import gather_tokens, protected_mask, select_kept
from sdtp.models import check_supported, decoder_layers
from sdtp.models.compat import cache_from_kwargs
from sdtp.scorers.base import Scorer, ScoreContext


@dataclass
class PrefillRecord:
    """What the last pruned prefill did (read it after the forward).

    Attributes:
        seq_len: prompt length N.
        kept_per_stage: tokens alive after each stage.
        tokens_per_layer: tokens each decoder layer processed.
        final_positions: (B, k) original positions of the tokens that reached the last layer;
            the model's output logits/hidden states are for these positions, in this order.
        layer_positions: layer -> (B, k_l) positions whose K/V that layer cached (pruned layers only).
    """

    seq_len: int
    kept_per_stage: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    final_positions: torch.Tensor | None = None
    layer_positions: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Alive:
    """Per-prefill state: the alive tokens and the layer inputs sliced to them."""

    positions: torch.Tensor  # (B, n) original positions
    position_ids: torch.Tensor | None = None  # what layers receive as position_ids
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (B, n, hd)
    attention_mask: torch.Tensor | None = None


class TokenPruner:
    """Prefill token pruning by ``schedule`` with ``scorer``. Use as ``with pruner(model): ...``."""

    def __init__(self, schedule: PruningSchedule, scorer: Scorer) -> None:
        self.schedule = schedule
        self.scorer = scorer
        self.last_prefill: PrefillRecord | None = None
        self._stage_of = schedule.stage_of_layer()
        self._model: nn.Module | None = None
        self._alive: _Alive | None = None
        self._extras: dict[str, Any] = {}
        self._prefill = False

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[TokenPruner]:
        check_supported(model)
        layers = decoder_layers(model)
        self.schedule.validate(len(layers))
        self.scorer.bind(model, self.schedule.layers)
        self._model = model
        handles = [model.base_model.register_forward_pre_hook(self._on_model_start, with_kwargs=True)]
        first = self.schedule.layers[0]
        for idx in range(first, len(layers)):
            hook = self._make_layer_hook(idx)
            handles.append(layers[idx].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.scorer.unbind()
            self._model, self._alive, self._extras = None, None, {}

    # ----------------------------------------------------------------------------------------
    # hooks

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        self._prefill = past == 0
        if not self._prefill:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise NotImplementedError("token pruning does not support padded batches; use batch size 1 or equal lengths")
        batch, seq_len = ref.shape[0], ref.shape[1]
        positions = torch.arange(seq_len, device=ref.device).unsqueeze(0).expand(batch, -1)
        self._alive = _Alive(positions=positions)
        # Layers before the first stage are not hooked: they always see the whole prompt.
        self.last_prefill = PrefillRecord(seq_len=seq_len, tokens_per_layer=[seq_len] * self.schedule.layers[0])
        self._extras = {"input_ids": input_ids}
        self.scorer.begin(input_ids, self._extras)

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._prefill:
                return self._prefill_layer(layer, args, kwargs)
            return self._extend_layer(layer, args, kwargs)

        return hook

    def _prefill_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        alive, record = self._alive, self.last_prefill
        if layer in self._stage_of:
            hidden = self._run_stage(layer, self._stage_of[layer], hidden, kwargs)
        if alive.positions.shape[1] < record.seq_len:
            kwargs = self._sliced_kwargs(kwargs)
            record.layer_positions[layer] = alive.positions
        record.tokens_per_layer.append(alive.positions.shape[1])
        record.final_positions = alive.positions
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _run_stage(self, layer: int, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Score, select and gather: (B, n, D) -> (B, k, D)."""
        alive, record = self._alive, self.last_prefill
        n, seq_len = alive.positions.shape[1], record.seq_len
        budget = self.schedule.budget(stage, seq_len)
        if budget < n:
            ctx = ScoreContext(
                layer=layer,
                stage=stage,
                hidden_states=hidden,
                positions=alive.positions,
                seq_len=seq_len,
                model=self._model,
                past_key_values=cache_from_kwargs(kwargs),
                extras=self._extras,
            )
            scores = self.scorer.score(ctx)
            protect = protected_mask(
                alive.positions, seq_len, self.schedule.keep_first, self.schedule.num_recent(seq_len)
            )
            keep = select_kept(scores, protect, budget)  # (B, k) indices into the alive tokens
            hidden = gather_tokens(hidden, keep)
            self._shrink(keep, kwargs)
        record.kept_per_stage.append(alive.positions.shape[1])
        return hidden

    def _shrink(self, keep: torch.Tensor, kwargs: dict) -> None:
        """Slice the alive-token state by ``keep`` (B, k) once per stage; layers reuse the slices."""
        alive = self._alive
        full_cos, full_sin = kwargs["position_embeddings"]
        if alive.position_embeddings is None:  # first stage: start from the model's full tensors
            alive.position_embeddings = (full_cos, full_sin)
            alive.position_ids = kwargs.get("position_ids")
        alive.positions = gather_tokens(alive.positions, keep)
        if self.schedule.position_ids == "renumber":
            # Ablation: the kept tokens are treated as a contiguous prompt 0..k-1.
            new_ids = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0).expand(keep.shape[0], -1)
            rotary = self._model.base_model.rotary_emb
            alive.position_embeddings = rotary(full_cos, position_ids=new_ids)
            alive.position_ids = new_ids
        else:
            cos, sin = alive.position_embeddings
            alive.position_embeddings = (gather_tokens(cos, keep), gather_tokens(sin, keep))
            alive.position_ids = alive.positions
        mask = kwargs.get("attention_mask")
        alive.attention_mask = None
        if mask is not None:
            alive.attention_mask = _slice_mask(mask, alive.positions, alive.positions)

    def _sliced_kwargs(self, kwargs: dict) -> dict:
        alive = self._alive
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = alive.position_embeddings
        if "position_ids" in kwargs:
            kwargs["position_ids"] = alive.position_ids
        if kwargs.get("attention_mask") is not None:
            if alive.attention_mask is None:
                alive.attention_mask = _slice_mask(kwargs["attention_mask"], alive.positions, alive.positions)
            kwargs["attention_mask"] = alive.attention_mask
        return kwargs

    def _extend_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decode/continuation step: only the mask's key axis must match this layer's cache."""
        mask = kwargs.get("attention_mask")
        record = self.last_prefill
        if mask is None or record is None or layer not in record.layer_positions:
            return None
        if not isinstance(mask, torch.Tensor):
            raise NotImplementedError(f"attention mask of type {type(mask).__name__} is not supported with pruning")
        cached = record.layer_positions[layer]  # (B, k_l) prompt positions held by this layer
        total = mask.shape[-1]
        new = torch.arange(record.seq_len, total, device=cached.device).unsqueeze(0).expand(cached.shape[0], -1)
        keys = torch.cat([cached, new], dim=1)  # (B, k_l + t) positions of this layer's cached keys
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _slice_mask(mask, None, keys)
        return args, kwargs


def _slice_mask(mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """Slice a 4D attention mask (B or 1, H or 1, Q, K) to query ``rows`` and key ``cols``.

    Args:
        rows: (B, q') query indices or None (keep all queries).
        cols: (B, k') key indices.
    """
    if mask.dim() != 4:
        raise NotImplementedError(f"expected a 4D attention mask, got shape {tuple(mask.shape)}")
    batch = cols.shape[0]
    mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] != batch else mask
    heads, q = mask.shape[1], mask.shape[2]
    col_idx = cols[:, None, None, :].expand(batch, heads, q, cols.shape[1])
    mask = mask.gather(3, col_idx)
    if rows is not None:
        row_idx = rows[:, None, :, None].expand(batch, heads, rows.shape[1], mask.shape[3])
        mask = mask.gather(2, row_idx)
    return mask
