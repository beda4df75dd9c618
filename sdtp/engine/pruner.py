"""Physical token dropping during prefill, as a context manager over a Hugging Face causal LM.

``with TokenPruner(schedule, scorer)(model): model(input_ids, use_cache=True)`` runs the model's
own forward; forward pre-hooks on the decoder layers shrink the token axis at each stage:

* at a stage layer the scorer rates the alive tokens, the protected ones (first ``keep_first``,
  last ``keep_recent`` of the prompt) plus the top-scored others up to the stage budget are kept,
  and the hidden states are gathered, so this and every later layer run on fewer tokens;
* every later layer receives the matching slices of ``position_embeddings`` (RoPE cos/sin of the
  tokens' *original* positions), ``position_ids`` and, if present, the attention mask, each sliced
  from the tensors HF hands *that* layer: models with sliding-window layers (Gemma3) get the mask
  and RoPE of each layer's own kind, so a window stays a window over original positions
  (:mod:`sdtp.models.layer_types`), and their sliding cache layers keep every kept token
  (:func:`sdtp.engine.cache.unslide`) until the prefill returns, when the entries no later query's
  window reaches are dropped (:mod:`sdtp.engine.window`);
* each layer's KV cache therefore holds exactly the tokens that reached it. Layer 0 is never
  pruned, so the cache length the model reads (layer 0's) stays the prompt length N and decoding
  continues at position N.

After the prompt, forwards with a non-empty cache (decode steps, or lm-eval continuations) are
never pruned; if they carry an attention-mask tensor, its key axis is sliced per layer to the
positions that layer's cache holds. Nothing of HF's forward code is copied or patched, and all
hooks are removed on exit. One pruner at a time per model: entering another while one is active raises.

Batches. Rows are pruned independently: every row gets its own scores, kept set, positions and
RoPE cos/sin. Prompts of different lengths must be **left-padded** with a 2D ``attention_mask``
(1 = real token). Left padding is the choice because (a) every row's last real token then sits in
the last column, which is where ``logits_to_keep=1`` and decoding read the next-token logits, and
(b) decode steps append one column for every row at the same cache slot, so the caches stay
rectangular without per-row bookkeeping; with right padding the new tokens would land after each
row's padding. The pruner derives each row's budget, protected first ``keep_first`` and recent
``keep_recent`` fraction from that row's real length ``L_b`` and its real positions
(``column - padding``; the caller's ``position_ids``, if absent they are set from the mask as
``cumsum - 1``). Padding is never kept as a real token. After a stage the rows keep different
numbers of tokens, so the shorter rows are left-padded with *masked slots* up to the longest
row's count: the per-layer tensors and each layer's KV cache stay rectangular, and a per-slot
validity mask is folded into the 4D attention mask at every pruned layer (prefill) and into the
key axis of every later decode step, so masked slots are never attended. Decoding must pass the
2D mask (grown by one column per step) and ``position_ids`` continuing each row from its own
length (``sdtp.engine.generation.generate`` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from sdtp.engine.cache import refuse_static, unslide
from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import gather_tokens, protected_mask, select_kept, select_kept_rows
from sdtp.models import check_supported, decoder_layers
from sdtp.engine.window import WindowedLayer, trim_to_window, with_decoded
from sdtp.models.compat import CACHE_KWARG, cache_from_kwargs, output_cache
from sdtp.models.layer_types import has_sliding_layers, layer_kinds, layer_windows
from sdtp.scorers.base import Scorer, ScoreContext
from sdtp.utils import hook_owner


def left_padded_lengths(mask: torch.Tensor, user: str = "token pruning") -> torch.Tensor:
    """(B, N) 2D ``attention_mask`` (1 = real token) -> (B,) real length of each row, refusing any other layout.

    Shared by the pruner and the dense :func:`sdtp.engine.generation.prefill`: both read the next-token logits
    from the last column and append decode steps after it, which is only each row's last real token when the
    padding comes first (see the module doc), so a right-padded mask would silently give wrong tokens.

    Args:
        mask: (B, N) attention mask of 0/1 (any dtype).
        user: what needs the layout, named in the error ("token pruning", "generation").
    Raises:
        NotImplementedError: a row has a 0 after a 1 (right padding, or a gap inside the prompt).
        ValueError: a row has no real token.
    """
    real = mask.bool()
    after_real = real[:, :-1] & ~real[:, 1:]  # a real token followed by padding
    if bool(after_real.any()):
        row = int(after_real.any(-1).nonzero()[0, 0])
        raise NotImplementedError(f"{user} supports left-padded batches only (pad before the prompt): "
                                  f"attention_mask row {row} has padding after a real token")
    lengths = real.sum(-1)
    if not bool(lengths.all()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"a batch row has no real token (its attention_mask is all 0): row {row}")
    return lengths


@dataclass
class PrefillRecord:
    """What the last pruned prefill did (read it after the forward).

    Attributes:
        seq_len: prompt width N (the padded width in a ragged batch).
        kept_per_stage: token slots alive after each stage (the widest row's count in a ragged batch).
        tokens_per_layer: token slots each decoder layer processed.
        final_positions: (B, k) original positions (in each row's unpadded prompt) of the tokens
            that reached the last layer; the model's output logits/hidden states are for these
            slots, in this order. Masked slots hold -1.
        layer_positions: layer -> (B, k_l) positions whose K/V that layer cached (pruned layers
            only; masked slots hold -1).
        seq_lens: real prompt length of each row.
        pad: (B,) left padding of each row, or None for an unpadded batch.
        final_valid: (B, k) bool real-token slots of ``final_positions`` (None: all real).
        layer_valid: layer -> (B, k_l) bool real-token slots of that layer's cache (None: all real).
        kept_rows_per_stage: real tokens each row kept after each stage, ``[stage][row]``.
        tokens_per_layer_rows: real tokens each decoder layer processed per row, ``[layer][row]``.
        cached_positions: layer -> (B, k'_l) positions a sliding-window layer still caches after the
            prefill dropped the entries outside every later query's window (:mod:`sdtp.engine.window`);
            only layers that dropped some. Masked slots hold -1.
        cached_valid: layer -> (B, k'_l) bool real-token slots of those (None: all real).
        decode_layouts: layer -> ((B, k''_l) positions, validity or None, end): what a sliding-window layer
            holds after later forwards (decode steps, continuations) appended to it and dropped the entries
            the next query's window no longer reaches; it describes every entry up to the logical cache
            length ``end`` (appended tokens at positions L_b + t), later appends follow in order. Only
            layers that dropped some; the prefill's own fields above are left as the prefill made them.
    """

    seq_len: int
    kept_per_stage: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    final_positions: torch.Tensor | None = None
    layer_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    seq_lens: list[int] = field(default_factory=list)
    pad: torch.Tensor | None = None
    final_valid: torch.Tensor | None = None
    layer_valid: dict[int, torch.Tensor | None] = field(default_factory=dict)
    kept_rows_per_stage: list[list[int]] = field(default_factory=list)
    tokens_per_layer_rows: list[list[int]] = field(default_factory=list)
    cached_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    cached_valid: dict[int, torch.Tensor | None] = field(default_factory=dict)
    decode_layouts: dict[int, tuple[torch.Tensor, torch.Tensor | None, int]] = field(default_factory=dict)

    def cache_layout(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(B, k) positions and validity of the entries ``layer``'s cache holds, in slot order; None if it
        holds the whole prompt (a layer before the first stage, untrimmed)."""
        if layer in self.cached_positions:
            return self.cached_positions[layer], self.cached_valid.get(layer)
        if layer in self.layer_positions:
            return self.layer_positions[layer], self.layer_valid.get(layer)
        return None

    def live_layout(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        """What ``layer``'s cache holds now: (B, k) positions and validity of its first k entries, which cover the
        logical cache length ``end``; the entries past them are the tokens appended after ``end``, in order.
        None if it holds the whole prompt and every appended token."""
        if layer in self.decode_layouts:
            return self.decode_layouts[layer]
        layout = self.cache_layout(layer)
        return None if layout is None else (*layout, self.seq_len)

    def cache_widths(self, num_layers: int) -> list[int]:
        """Slots each of ``num_layers`` layers' caches holds after the prefill (a ragged batch's padded width)."""
        layouts = (self.cache_layout(layer) for layer in range(num_layers))
        return [self.seq_len if layout is None else layout[0].shape[1] for layout in layouts]

    def row(self, index: int) -> PrefillRecord:
        """Row ``index`` of a batched prefill as the one-row record its prompt alone would give.

        Counts are the row's real tokens (masked slots left out), ``seq_len`` its real length.
        """
        final = self.final_positions[index : index + 1] if self.final_positions is not None else None
        if final is not None and self.final_valid is not None:
            final = final[:, self.final_valid[index]]

        def real(positions: dict[int, torch.Tensor], validity: dict[int, torch.Tensor | None]) -> dict:
            rows = {layer: slots[index : index + 1] for layer, slots in positions.items()}
            return {layer: row if validity.get(layer) is None else row[:, validity[layer][index]]
                    for layer, row in rows.items()}

        return PrefillRecord(
            seq_len=self.seq_lens[index] if self.seq_lens else self.seq_len,
            kept_per_stage=[counts[index] for counts in self.kept_rows_per_stage],
            tokens_per_layer=[counts[index] for counts in self.tokens_per_layer_rows],
            final_positions=final,
            layer_positions=real(self.layer_positions, self.layer_valid),
            seq_lens=[self.seq_lens[index]] if self.seq_lens else [],
            kept_rows_per_stage=[[counts[index]] for counts in self.kept_rows_per_stage],
            tokens_per_layer_rows=[[counts[index]] for counts in self.tokens_per_layer_rows],
            cached_positions=real(self.cached_positions, self.cached_valid),
        )

    def select(self, rows: torch.Tensor) -> PrefillRecord:
        """The record of the batch whose row ``j`` is row ``rows[j]`` of this one (rows may repeat).

        Pairs with a KV cache whose batch axis was selected by the same ``rows`` (e.g. one row per
        answer choice of a shared context): the extend-layer hooks then slice every row's mask to
        the slots its own cache holds. Slot layout and padded width stay as they are, so a column
        that is a masked slot in every selected row simply stays masked.

        Args:
            rows: (B',) long indices into this record's batch.
        """
        picked = rows.tolist()

        def take(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.index_select(0, rows.to(value.device))

        return PrefillRecord(
            seq_len=self.seq_len,
            kept_per_stage=list(self.kept_per_stage),
            tokens_per_layer=list(self.tokens_per_layer),
            final_positions=take(self.final_positions),
            layer_positions={layer: take(positions) for layer, positions in self.layer_positions.items()},
            seq_lens=[self.seq_lens[i] for i in picked] if self.seq_lens else [],
            pad=take(self.pad),
            final_valid=take(self.final_valid),
            layer_valid={layer: take(valid) for layer, valid in self.layer_valid.items()},
            kept_rows_per_stage=[[counts[i] for i in picked] for counts in self.kept_rows_per_stage],
            tokens_per_layer_rows=[[counts[i] for i in picked] for counts in self.tokens_per_layer_rows],
            cached_positions={layer: take(positions) for layer, positions in self.cached_positions.items()},
            cached_valid={layer: take(valid) for layer, valid in self.cached_valid.items()},
            decode_layouts={layer: (take(positions), take(valid), end)
                             for layer, (positions, valid, end) in self.decode_layouts.items()},
        )


@dataclass
class _Alive:
    """Per-prefill state: the alive token slots and the layer inputs sliced to them."""

    columns: torch.Tensor  # (B, n) indices into the model's (possibly left-padded) prompt axis
    positions: torch.Tensor  # (B, n) original positions in each row's unpadded prompt (padding < 0)
    valid: torch.Tensor | None = None  # (B, n) bool real-token slots; None = all real
    lengths: torch.Tensor | None = None  # (B,) real prompt length per row
    pruned: bool = False  # a stage has gathered: later layers need the sliced kwargs
    position_ids: torch.Tensor | None = None  # (B, n) what layers receive as position_ids
    rope_columns: torch.Tensor | None = None  # (B, n) columns of the model's cos/sin each slot takes
    # Per layer kind (full / sliding attention), sliced once per stage from the first layer of that kind.
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (B, n, hd)
    attention_mask: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, H or 1, n, n)


class TokenPruner:
    """Prefill token pruning by ``schedule`` with ``scorer``. Use as ``with pruner(model): ...``."""

    def __init__(self, schedule: PruningSchedule, scorer: Scorer) -> None:
        self.schedule = schedule
        self.scorer = scorer
        self.last_prefill: PrefillRecord | None = None
        self._stage_of = schedule.stage_of_layer()
        self._model: nn.Module | None = None
        self._kinds: tuple[str, ...] = ()
        self._alive: _Alive | None = None
        self._extras: dict[str, Any] = {}
        self._prefill = False

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[TokenPruner]:
        """Install the pruning hooks on ``model`` for the ``with`` block; they are removed on exit, also on error.

        Re-entering on the model it is already on is a no-op (the outer block keeps the hooks).

        Raises:
            RuntimeError: this pruner is active on another model, or another pruner is active on ``model``.
        """
        if self._model is not None:
            if self._model is not model:
                raise RuntimeError("this pruner is already attached to another model; use one pruner per model")
            # Re-entered on its own model (e.g. generate(model, ids, n, pruner) inside `with pruner(model)`): the
            # outer block owns the hooks; a second set would run every stage twice and the inner exit would
            # detach the outer block's scorer.
            yield self
            return
        check_supported(model)
        other = TokenPruner.active_on(model)
        if other is not None:
            # Both would install hooks: every stage would run twice, each pruner re-pruning the other's output.
            raise RuntimeError(f"another {type(other).__name__} is already active on this model; exit its "
                               "`with pruner(model)` block first (one pruner per model at a time)")
        layers = decoder_layers(model)
        self.schedule.validate(len(layers))
        self.scorer.bind(model, self.schedule.layers)
        handles = []
        # Everything from here is undone in `finally`, so a failure while installing (or in the body) leaves
        # no hook behind: the hooks are also what marks the model as taken (see `active_on`).
        try:
            self._model = model
            self._kinds = layer_kinds(model.config)
            handles.append(model.base_model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
            first = self.schedule.layers[0]
            if has_sliding_layers(model.config):
                handles.append(model.base_model.register_forward_hook(self._on_model_end, with_kwargs=True))
                first = 0  # a sliding layer before the first stage has its cache trimmed to the window too
            for idx in range(first, len(layers)):
                hook = self._make_layer_hook(idx)
                handles.append(layers[idx].register_forward_pre_hook(hook, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.scorer.unbind()
            self._model, self._alive, self._extras = None, None, {}

    @staticmethod
    def active_on(model: nn.Module) -> TokenPruner | None:
        """The pruner whose hooks are on ``model`` now (inside its ``with pruner(model)``), or None.

        Read from the base model's forward pre-hooks (the bound ``_on_model_start``), which ``__call__`` registers
        and removes on exit (:func:`sdtp.utils.hook_owner`).
        """
        return hook_owner(model.base_model._forward_pre_hooks.values(), TokenPruner)

    # ----------------------------------------------------------------------------------------
    # hooks

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        self._prefill = past == 0
        mask = kwargs.get("attention_mask")
        padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())
        if padded and kwargs.get("position_ids") is None:
            # Without explicit ids HF numbers columns 0..N-1, i.e. a left-padded row's tokens
            # would sit at shifted positions; the real ones are the count of real tokens before.
            kwargs = dict(kwargs)
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ref.shape[1]:]
        if not self._prefill:
            self._refuse_renumbered_continuation()
            return (args, kwargs) if padded else None
        refuse_static(cache)
        changed = padded
        if has_sliding_layers(self._model.config):
            kwargs, changed = self._full_layer_cache(kwargs), True
        batch, seq_len = ref.shape[0], ref.shape[1]
        columns = torch.arange(seq_len, device=ref.device).unsqueeze(0).expand(batch, -1)
        if padded:
            real = mask.bool()
            lengths = left_padded_lengths(mask)
            pad = seq_len - lengths
            positions = columns - pad.unsqueeze(1)
            self._alive = _Alive(columns=columns, positions=positions, valid=real, lengths=lengths)
        else:
            self._alive = _Alive(columns=columns, positions=columns)
            lengths, pad = torch.full((batch,), seq_len, device=ref.device), None
        # Layers before the first stage are not hooked: they always see the whole prompt.
        self.last_prefill = PrefillRecord(
            seq_len=seq_len,
            tokens_per_layer=[seq_len] * self.schedule.layers[0],
            seq_lens=[int(n) for n in lengths.tolist()],
            tokens_per_layer_rows=[[int(n) for n in lengths.tolist()]] * self.schedule.layers[0],
            pad=pad,
        )
        self._extras = {"input_ids": input_ids}
        if padded:
            self._extras["attention_mask"] = mask
        self.scorer.begin(input_ids, self._extras)
        return (args, kwargs) if changed else None

    def _refuse_renumbered_continuation(self) -> None:
        """Renumbered layers hold their kept tokens at 0..k_l-1 (k_l differs by layer), but a token run on the cache
        continues at the prompt length: no position is right for every layer, so refuse rather than mix them
        (``sdtp.config.refuse_renumbered_continuation`` refuses the entry points before any work)."""
        if self.schedule.position_ids == "renumber":
            raise NotImplementedError("pruning.position_ids=renumber covers the prefill only: decoding or scoring "
                                      "continuations on the renumbered pruned cache is not supported")

    def _full_layer_cache(self, kwargs: dict) -> dict:
        """Give a sliding-window model a cache whose every layer keeps all its tokens (see ``unslide``)."""
        cache = cache_from_kwargs(kwargs)
        if cache is not None:
            unslide(cache)
            return kwargs
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self._model.config.use_cache
        if not use_cache:
            return kwargs
        from transformers import DynamicCache

        # Without a config HF's DynamicCache makes every layer a plain DynamicLayer.
        return {**kwargs, CACHE_KWARG: DynamicCache()}

    def _on_model_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Drop the sliding-window layers' cache entries no later query can see (:mod:`sdtp.engine.window`),
        after the prefill and after every later forward, which appended to them."""
        cache = output_cache(output)
        record = self.last_prefill
        if cache is None or record is None:
            return
        lengths = torch.tensor(record.seq_lens)
        for layer, window in enumerate(layer_windows(self._model.config)):
            if window is None or type(cache.layers[layer]) not in (DynamicLayer, WindowedLayer):
                continue
            if self._prefill:
                layout = record.cache_layout(layer) or self._whole_prompt(record, cache.layers[layer].keys.device)
                trimmed = trim_to_window(cache, layer, *layout, lengths.to(layout[0].device), window)
                if trimmed is not None:
                    record.cached_positions[layer], record.cached_valid[layer] = trimmed
            else:
                self._trim_decoded(cache, layer, window, lengths)

    def _trim_decoded(self, cache: Any, layer: int, window: int, lengths: torch.Tensor) -> None:
        """After a decode step or continuation: drop ``layer``'s entries the next query's window cannot reach.

        Without this a sliding layer would keep every appended token (it is a plain ``DynamicLayer``, see
        ``unslide``): the mask hides them, but memory and attention work would grow with every token.
        """
        record = self.last_prefill
        entry = cache.layers[layer]
        total = cache.get_seq_length()  # layer 0's, never pruned: the next query's column
        seq_len = record.seq_len
        if total - window < 0:
            return  # no position is out of any window yet
        live = record.live_layout(layer)
        positions, valid, end = live if live is not None else (*self._whole_prompt(record, entry.keys.device), seq_len)
        positions, valid = with_decoded(positions, valid, lengths, end - seq_len, total - seq_len)
        # The next query of row b sits at position L_b + (total - N): trim as the prefill does for L_b.
        trimmed = trim_to_window(cache, layer, positions, valid, lengths.to(positions.device) + (total - seq_len),
                                 window)
        if trimmed is not None:
            record.decode_layouts[layer] = (*trimmed, total)

    @staticmethod
    def _whole_prompt(record: PrefillRecord, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N) positions (padding: -1) and validity of a layer that cached every prompt column, on ``device``
        (the cache's: the decode steps index the model's attention mask with them)."""
        columns = torch.arange(record.seq_len, device=device).unsqueeze(0)
        if record.pad is None:
            return columns.expand(len(record.seq_lens), -1), None
        positions = columns - record.pad.to(device).unsqueeze(1)
        valid = positions >= 0
        return positions.masked_fill(~valid, -1), valid

    def _make_layer_hook(self, layer: int):
        first = self.schedule.layers[0]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._prefill:
                return self._prefill_layer(layer, args, kwargs) if layer >= first else None
            return self._extend_layer(layer, args, kwargs)

        return hook

    def _prefill_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        alive, record = self._alive, self.last_prefill
        if layer in self._stage_of:
            hidden = self._run_stage(layer, self._stage_of[layer], hidden, kwargs)
        positions = alive.positions if alive.valid is None else alive.positions.masked_fill(~alive.valid, -1)
        if alive.pruned:
            kwargs = self._sliced_kwargs(self._kinds[layer], kwargs)
            record.layer_positions[layer] = positions
            record.layer_valid[layer] = alive.valid
        record.tokens_per_layer.append(alive.positions.shape[1])
        width = alive.positions.shape[1]
        record.tokens_per_layer_rows.append(
            [width] * alive.positions.shape[0] if alive.valid is None else alive.valid.sum(-1).tolist()
        )
        record.final_positions = positions
        record.final_valid = alive.valid
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _run_stage(self, layer: int, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Score, select and gather: (B, n, D) -> (B, k, D)."""
        hidden = self._candidates(hidden)
        alive, record = self._alive, self.last_prefill
        n, seq_len = alive.positions.shape[1], record.seq_len
        lens = record.seq_lens
        budgets = [self.schedule.budget(stage, length) for length in lens]
        protect = protected_mask(
            alive.positions,
            torch.tensor(lens, device=hidden.device),
            self.schedule.keep_first,
            torch.tensor([self.schedule.num_recent(length) for length in lens], device=hidden.device),
        )
        if alive.valid is not None:
            protect = protect & alive.valid
        real = alive.valid.sum(-1) if alive.valid is not None else torch.full((hidden.shape[0],), n)
        counts = torch.minimum(real.cpu(), torch.maximum(torch.tensor(budgets), protect.sum(-1).cpu()))
        # Score only when some row drops a real token or some masked slot can go: a stage that prunes
        # nothing must not advance the random scorer's generator (its masks would depend on the schedule).
        if bool((counts < real.cpu()).any()) or int(counts.max()) < n:
            ctx = ScoreContext(
                layer=layer,
                stage=stage,
                hidden_states=hidden,
                positions=alive.positions.clamp(min=0),
                seq_len=seq_len,
                model=self._model,
                past_key_values=cache_from_kwargs(kwargs),
                extras=self._extras,
                seq_lens=alive.lengths,
                valid=alive.valid,
            )
            scores = self.scorer.score(ctx)
            if scores.shape != protect.shape:
                raise ValueError(f"{type(self.scorer).__name__} scored {tuple(scores.shape)} tokens at layer {layer}, "
                                 f"expected one score per alive token {tuple(protect.shape)}")
            if alive.valid is None and len(set(budgets)) == 1:
                keep, keep_valid = select_kept(scores, protect, budgets[0]), None  # (B, k) indices into alive
            else:
                valid = alive.valid if alive.valid is not None else torch.ones_like(protect)
                keep, keep_valid = select_kept_rows(scores, protect, valid, torch.tensor(budgets))
                if bool(keep_valid.all()):
                    keep_valid = None
            hidden = self._gather_hidden(hidden, keep)
            self._shrink(keep, keep_valid, kwargs)
        record.kept_per_stage.append(alive.positions.shape[1])
        valid_now = alive.valid
        record.kept_rows_per_stage.append(
            [alive.positions.shape[1]] * alive.positions.shape[0] if valid_now is None else valid_now.sum(-1).tolist()
        )
        return hidden

    def _candidates(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states a stage ranks, (B, n, D): the alive tokens'. A subclass may widen the alive
        slots first (:mod:`sdtp.engine.revival` re-admits dropped tokens)."""
        return hidden

    def _gather_hidden(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The kept slots' hidden states (B, n, D) -> (B, k, D), called before the alive slots shrink. A
        subclass may fold the dropped tokens in (:mod:`sdtp.engine.merging`)."""
        return gather_tokens(hidden, keep)

    def _shrink(self, keep: torch.Tensor, keep_valid: torch.Tensor | None, kwargs: dict) -> None:
        """Slice the alive-slot state by ``keep`` (B, k) once per stage; layers reuse the slices.

        ``keep_valid`` (B, k) marks which kept slots are real tokens (None: all). The per-kind RoPE
        tables and masks are sliced lazily (``_sliced_kwargs``) from the full tensors HF passes each
        layer, by column: every layer of the forward receives the same full tensors of its kind.
        """
        alive = self._alive
        ids = kwargs.get("position_ids")  # (B or 1, N): the model's own, for every column
        alive.columns = gather_tokens(alive.columns, keep)
        alive.positions = gather_tokens(alive.positions, keep)
        alive.valid = keep_valid
        alive.pruned = True
        alive.position_embeddings, alive.attention_mask = {}, {}
        if self.schedule.position_ids == "renumber":
            # Ablation: the kept tokens of each row are treated as a contiguous prompt 0..k_b-1,
            # whose RoPE is the model's own at the column that holds position k in that row.
            if keep_valid is None:
                new_ids = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0).expand(keep.shape[0], -1)
            else:
                new_ids = (keep_valid.long().cumsum(-1) - 1).clamp(min=0)
            pad = self.last_prefill.pad
            alive.rope_columns = new_ids if pad is None else new_ids + pad.unsqueeze(1)
            alive.position_ids = new_ids
        else:
            alive.rope_columns = alive.columns
            alive.position_ids = gather_tokens(ids, alive.columns) if ids is not None else alive.positions.clamp(min=0)
        if kwargs.get("attention_mask") is None and keep_valid is not None:
            raise NotImplementedError("a ragged batch needs the model to build a 4D attention-mask tensor")

    def _sliced_kwargs(self, kind: str, kwargs: dict) -> dict:
        """The layer's kwargs with RoPE, position ids and mask sliced to the alive slots.

        Args:
            kind: the layer's attention kind (``sdtp.models.layer_types``); its cos/sin (B or 1, N, hd)
                and 4D mask (B or 1, H or 1, N, N), as HF passes them, are sliced once per stage.
        """
        alive = self._alive
        kwargs = dict(kwargs)
        if kind not in alive.position_embeddings:
            cos, sin = kwargs["position_embeddings"]
            alive.position_embeddings[kind] = (gather_tokens(cos, alive.rope_columns),
                                               gather_tokens(sin, alive.rope_columns))
        kwargs["position_embeddings"] = alive.position_embeddings[kind]
        if "position_ids" in kwargs:
            kwargs["position_ids"] = alive.position_ids
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if kind not in alive.attention_mask:
                alive.attention_mask[kind] = _mask_keys(_slice_mask(mask, alive.columns, alive.columns), alive.valid)
            kwargs["attention_mask"] = alive.attention_mask[kind]
        elif alive.valid is not None:
            raise NotImplementedError("a ragged batch needs the model to build a 4D attention-mask tensor")
        return kwargs

    def _extend_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decode/continuation step: only the mask's key axis must match this layer's cache."""
        mask = kwargs.get("attention_mask")
        record = self.last_prefill
        layout = record.live_layout(layer) if record is not None else None
        if layout is None:
            return None
        cached, valid, end = layout  # (B, k_l) positions held by this layer up to column `end` (-1: masked)
        if mask is None:
            if valid is not None:
                raise NotImplementedError("decoding from a ragged pruned cache needs the 2D attention mask")
            return None
        if not isinstance(mask, torch.Tensor):
            raise NotImplementedError(f"attention mask of type {type(mask).__name__} is not supported with pruning")
        if record.pad is not None:
            cached = cached + record.pad.unsqueeze(1)  # columns of the padded prompt
        cached = cached.clamp(min=0)  # masked slots (-1) read any column: key_valid blocks them
        total = mask.shape[-1]
        new = torch.arange(end, total, device=cached.device).unsqueeze(0).expand(cached.shape[0], -1)
        keys = torch.cat([cached, new], dim=1)  # (B, k_l + t) columns of this layer's cached keys
        kwargs = dict(kwargs)
        key_valid = None if valid is None else torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        kwargs["attention_mask"] = _mask_keys(_slice_mask(mask, None, keys), key_valid)
        return args, kwargs


def _mask_keys(mask: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Block the keys whose ``key_valid`` (B, K) is False in a 4D mask (B, H or 1, Q, K).

    Works for both formats HF builds: bool (True = attend, SDPA) and additive float (eager).
    """
    if key_valid is None:
        return mask
    block = ~key_valid[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)


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
