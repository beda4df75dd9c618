"""Training-time pruning by attention masking (DynamicViT style): shapes never change.

``with PolicyMasker(schedule, predictor)(model, split) as masker: model.base_model(ids)`` runs the
frozen model's own forward on rows whose prompt is ``[0, split)`` and whose continuation follows.
Forward pre-hooks on the decoder layers do, at each stage layer ``l_s``:

1. score the tokens from the hidden states entering ``l_s`` with predictor ``s``;
2. draw a hard keep mask ``M_s`` (straight-through, so gradients reach the predictor), force the
   protected tokens (first ``keep_first`` and last ``keep_recent`` of the *prompt*, and the whole
   continuation, as at inference) to 1, and update the cumulative policy ``D_s = D_{s-1} * M_s``;
   the budget ``round(P * r_s)`` is relative to the prompt length P;
3. give layer ``l_s`` and every later layer an additive attention mask
   ``causal + log(D_j + eps)`` on the keys j != i (the diagonal is kept, as in DynamicViT), where
   ``causal`` is the layer's own kind: plain causal, or causal within the sliding window (Gemma3).

With a hard policy the mask is ``log(eps)`` (about -14) on dropped keys, i.e. the
``exp(a) * D / sum`` renormalisation of DynamicViT's ``softmax_with_policy``; its gradient with
respect to ``D`` is finite because the ``1 / (D + eps)`` of the log cancels the ``D + eps`` factor
of the attention weight. Keep ratios are enforced one of two ways (``mode``):

* ``gumbel``: keep a token when its score plus the noise below is > 0, the kept fraction steered by
  the DynamicViT ratio loss (``train.loss.ratio``). This is the hard Gumbel-softmax over the (keep,
  drop) logits of paper Eq. 2 only at ``noise_scale`` 1: the noise is scaled as in ``topk``, so with
  the default anneal to 0 it ends as the noise-free threshold ``score > 0``. ``tau`` only shapes the
  straight-through gradient; the forward mask does not depend on it;
* ``topk``: keep exactly the schedule's budget, the top-k of the Gumbel-perturbed scores among the
  alive tokens (as inference does); the straight-through gradient is a sigmoid around the threshold.

The noise is ``noise_scale * (Gumbel - Gumbel)`` (logistic) on the keep - drop score; each stage
records how much of the noise-free dropped set the noisy draw also dropped (``drop_agreement``), so
a run can show that the noise explores around the predictor's choice instead of replacing it.

All hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import protected_mask
from sdtp.models import decoder_layers
from sdtp.models.layer_types import layer_kinds, layer_windows, visible_keys
from sdtp.predictor import TokenPredictor
from sdtp.scorers.lexical import prompt_match

MODES = ("gumbel", "topk")
EPS = 1e-6


@dataclass
class PolicyState:
    """What the last masked forward did, per stage (read it after the forward).

    Attributes:
        scores: per stage (B, S) predictor scores (keep - drop logit), with grad.
        policies: per stage (B, S) cumulative keep policy D_s in {0, 1} (straight-through grad).
        decided: per stage (B, S) bool, the tokens the stage chose among (alive, prompt, unprotected).
        drop_agreement: per stage, |noisy dropped & noise-free dropped| / |noise-free dropped|.
        valid: (B, S) bool, non-padding tokens; prompt: (B, S) bool, prompt tokens.
    """

    scores: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)  # per stage (B, S, D) detached predictor input
    draws: list[tuple] = field(default_factory=list)  # per stage (hard mask, noise) as drawn in the forward
    policies: list[torch.Tensor] = field(default_factory=list)
    decided: list[torch.Tensor] = field(default_factory=list)
    drop_agreement: list[float] = field(default_factory=list)
    valid: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    prompt_len: torch.Tensor | None = None  # (B,)
    protect: torch.Tensor | None = None  # (B, S) bool, always kept
    lexical: torch.Tensor | None = None  # (B, S) query match of the prompt tokens (predictors with the lexical input)
    mask: dict[str, torch.Tensor] = field(default_factory=dict)  # attention kind -> (B, 1, S, S) current additive mask
    causal: dict[str, torch.Tensor] = field(default_factory=dict)  # attention kind -> (B, 1, S, S) causal + padding


def _gumbel(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float32).clamp_(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).to(like.device)


def causal_additive_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, S) valid tokens -> (B, 1, S, S) float mask: 0 where key j <= query i and j valid, else -inf-like.

    ``window``: a sliding-window layer's, which also closes keys with ``i - j >= window`` (HF's rule).
    The diagonal is always open so padded rows never have an empty softmax.
    """
    seq = valid.shape[1]
    idx = torch.arange(seq, device=valid.device)
    allowed = visible_keys(idx[:, None] - idx[None, :], window)[None] & valid[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=valid.device)[None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def causal_masks(config: Any, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention kind -> (B, 1, S, S) :func:`causal_additive_mask` for every kind ``config``'s layers use.

    Training and the ``mask`` labels replace each layer's own mask, so a sliding-window layer (Gemma3)
    must get its window back; without pruning, token positions are the original ones, as the engine's
    window is measured (:mod:`sdtp.models.layer_types`).
    """
    windows = dict(zip(layer_kinds(config), layer_windows(config)))
    return {kind: causal_additive_mask(valid, window) for kind, window in sorted(windows.items())}


def policy_attention_mask(causal: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Combine the causal mask (B, 1, S, S) with key policy (B, S): ``log(D_j + eps)`` off the diagonal."""
    seq = policy.shape[1]
    eye = torch.eye(seq, device=policy.device, dtype=policy.dtype)
    keys = policy[:, None, None, :]
    keys = keys + (1.0 - keys) * eye  # DynamicViT: a token always attends to itself
    return causal + torch.log(keys + EPS)


class PolicyMasker:
    """Simulated multi-stage pruning for training. Use as ``with masker(model, split): ...``.

    ``noise_scale`` multiplies the logistic (Gumbel - Gumbel) noise added to the scores and ``tau``
    is the straight-through temperature; the training loop anneals both between steps.
    """

    def __init__(self, schedule: PruningSchedule, predictor: TokenPredictor, mode: str = "topk",
                 tau: float = 1.0, noise_scale: float = 1.0, generator: torch.Generator | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"train.keep_mode: {mode!r} not in {MODES}")
        self.schedule, self.predictor, self.mode = schedule, predictor, mode
        self.tau, self.noise_scale, self.generator = tau, noise_scale, generator
        self.state = PolicyState()
        self._stage_of = schedule.stage_of_layer()
        self._split: torch.Tensor | None = None
        self._config: Any = None  # the hooked model's config (its layers' attention kinds and window)

    @contextmanager
    def __call__(self, model: nn.Module, split: torch.Tensor | None = None) -> Iterator[PolicyMasker]:
        """Install the hooks for forwards whose rows have prompts ``[0, split)`` (None = whole rows)."""
        layers = decoder_layers(model)
        self.schedule.validate(len(layers))
        self._split, self._config = split, model.config
        kinds = layer_kinds(model.config)
        handles = [model.base_model.register_forward_pre_hook(self._on_model_start, with_kwargs=True)]
        for idx in range(self.schedule.layers[0], len(layers)):
            handles.append(layers[idx].register_forward_pre_hook(self._make_hook(idx, kinds[idx]), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.state, self._split = PolicyState(), None

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
        prompt_len = self._split.to(valid.device) if self._split is not None else valid.sum(1)
        positions = torch.arange(valid.shape[1], device=valid.device)[None]
        prompt = valid & (positions < prompt_len[:, None])
        protect = torch.stack([
            protected_mask(positions[0], int(n), self.schedule.keep_first, self.schedule.num_recent(int(n)))
            for n in prompt_len.tolist()
        ]) | ~prompt  # the continuation (and padding) is never pruned
        lexical = None
        if self.predictor.meta.lexical_feature:
            if ids is None:
                raise ValueError("a predictor with the lexical feature needs input_ids (not inputs_embeds)")
            lexical = prompt_match(ids, prompt)
        self.state = PolicyState(valid=valid, prompt=prompt, prompt_len=prompt_len, protect=protect & valid,
                                 causal=causal_masks(self._config, valid), lexical=lexical)

    def _make_hook(self, layer: int, kind: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if layer in self._stage_of:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._run_stage(self._stage_of[layer], hidden)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self.state.mask[kind].to(_dtype_of(args, kwargs))
            return args, kwargs

        return hook

    def _run_stage(self, stage: int, hidden: torch.Tensor) -> None:
        """Score, draw M_s, update D_s and the attention mask. hidden: (B, S, D)."""
        state = self.state
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        # The predictor reads the frozen model's features: its gradient comes from its own stage's
        # losses and, through the masks, from the CE; not through earlier stages' inputs.
        prev = state.policies[-1] if state.policies else state.valid.float()
        alive = (prev.detach() > 0.5) & state.valid  # what physical pruning would still hold
        scores = self.predictor(stage, hidden.detach(), positions, state.prompt_len, alive, state.lexical).float()  # (B, S)
        decided = (prev.detach() > 0.5) & state.prompt & ~state.protect
        noise = 0.0
        if self.noise_scale > 0:
            noise = self.noise_scale * (_gumbel(scores.shape, scores, self.generator)
                                        - _gumbel(scores.shape, scores, self.generator))
        if self.mode == "gumbel":
            # Hard Gumbel-softmax over (keep, drop) = a hard logistic-noise threshold at 0 on keep - drop; the noise
            # is noise_scale times Eq. 2's (none once it has annealed to 0).
            soft = torch.sigmoid((scores + noise) / self.tau)
            hard, clean = (soft > 0.5).float(), (scores > 0).float()
        else:
            hard, soft = self._topk(stage, scores + noise, prev, state.protect, state.prompt_len)
            clean = self._topk(stage, scores, prev, state.protect, state.prompt_len)[0] if self.noise_scale > 0 else hard
        keep = hard + (soft - soft.detach())  # straight-through: forward exactly hard, backward soft
        keep = torch.where(state.protect, torch.ones_like(keep), keep)
        policy = prev * keep * state.valid.float()
        state.scores.append(scores)
        state.inputs.append(hidden.detach())
        state.draws.append((hard.detach(), noise))
        state.policies.append(policy)
        state.decided.append(decided)
        state.drop_agreement.append(_drop_agreement(hard.detach(), clean, decided))
        state.mask = {kind: policy_attention_mask(causal, policy) for kind, causal in state.causal.items()}

    def rescore(self) -> list[torch.Tensor]:
        """Per stage (B, S) scores recomputed from the recorded inputs, with grad.

        For a masked forward run without autograd (no CE/KL term needs gradients through the
        masked LLM): the predictors then learn from their own stage's losses on exactly the inputs
        the masked forward gave them, and no backward through the LLM is needed. In ``gumbel`` mode
        the policies are rebuilt too (same draws, straight-through), so the ratio loss reaches the
        predictors.
        """
        state = self.state
        positions = torch.arange(state.valid.shape[1], device=state.valid.device).expand(state.valid.shape[0], -1)
        alive = [state.valid] + [(p.detach() > 0.5) & state.valid for p in state.policies[:-1]]
        scores = [self.predictor(s, x, positions, state.prompt_len, alive[s], state.lexical).float()
                  for s, x in enumerate(state.inputs)]
        if self.mode == "gumbel":
            policy = state.valid.float()
            policies = []
            for score, (hard, noise) in zip(scores, state.draws):
                soft = torch.sigmoid((score + noise) / self.tau)
                keep = torch.where(state.protect, torch.ones_like(soft), hard + (soft - soft.detach()))
                policy = policy * keep * state.valid.float()
                policies.append(policy)
            state.policies = policies
        return scores

    def _topk(self, stage: int, noisy: torch.Tensor, prev: torch.Tensor, protect: torch.Tensor,
              prompt_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard top-``budget`` mask among alive tokens (protected first) and a soft surrogate."""
        hard = torch.zeros_like(noisy)
        soft = torch.zeros_like(noisy)
        for b, n in enumerate(prompt_len.tolist()):
            alive = prev[b].detach() > 0.5
            ranked = noisy[b].detach().masked_fill(~alive, float("-inf")).masked_fill(protect[b], float("inf"))
            # Continuation tokens are protected and alive but not part of the prompt's budget.
            extra = int((protect[b] & alive).sum()) - self.schedule.num_protected(int(n))
            budget = min(self.schedule.budget(stage, int(n)) + max(extra, 0), int(alive.sum()))
            hard[b, ranked.topk(budget).indices] = 1.0
            # Threshold halfway between the last kept and the first dropped score.
            choosable = alive & ~protect[b]
            kept_vals = noisy[b].detach()[choosable & (hard[b] > 0)]
            drop_vals = noisy[b].detach()[choosable & (hard[b] == 0)]
            kept_min = kept_vals.min() if kept_vals.numel() else noisy[b].detach().max()
            drop_max = drop_vals.max() if drop_vals.numel() else kept_min - 1.0
            soft[b] = torch.sigmoid((noisy[b] - (kept_min + drop_max) / 2) / self.tau)
        return hard, soft


def _drop_agreement(hard: torch.Tensor, clean: torch.Tensor, decided: torch.Tensor) -> float:
    """Share of the noise-free dropped set that the noisy draw also dropped (1.0 if none dropped)."""
    clean_drop = (clean < 0.5) & decided
    both = clean_drop & (hard < 0.5)
    total = int(clean_drop.sum())
    return float(both.sum()) / total if total else 1.0


def _dtype_of(args: tuple, kwargs: dict) -> torch.dtype:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.dtype
