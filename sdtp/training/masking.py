"""Training-time pruning by attention masking (DynamicViT style): shapes never change.

``with PolicyMasker(schedule, predictor)(model) as masker: model.base_model(ids)`` runs the frozen
model's own forward. Forward pre-hooks on the decoder layers do, at each stage layer ``l_s``:

1. score the tokens from the hidden states entering ``l_s`` with predictor ``s``;
2. draw a hard keep mask ``M_s`` (straight-through, so gradients reach the predictor), force the
   protected tokens (first ``keep_first``, last ``keep_recent``) to 1, and update the cumulative
   policy ``D_s = D_{s-1} * M_s``;
3. give layer ``l_s`` and every later layer an additive attention mask
   ``causal + log(D_j + eps)`` on the keys j != i (the diagonal is kept, as in DynamicViT).

With a hard policy the mask is ``log(eps)`` (about -14) on dropped keys, i.e. the
``exp(a) * D / sum`` renormalisation of DynamicViT's ``softmax_with_policy``; its gradient with
respect to ``D`` is finite because the ``1 / (D + eps)`` of the log cancels the ``D + eps`` factor
of the attention weight. Keep ratios are enforced one of two ways (``mode``):

* ``gumbel``: hard Gumbel-softmax over the (keep, drop) logits (paper Eq. 2); the kept fraction is
  steered by the DynamicViT ratio loss (``train.loss.ratio``);
* ``topk``: keep exactly the schedule's budget, the top-k of the Gumbel-perturbed scores among the
  alive tokens (as inference does); the straight-through gradient is a sigmoid around the threshold.

All hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdtp.engine.schedule import PruningSchedule
from sdtp.engine.selection import protected_mask
from sdtp.models import decoder_layers
from sdtp.predictor import TokenPredictor

MODES = ("gumbel", "topk")
EPS = 1e-6


@dataclass
class PolicyState:
    """What the last masked forward did, per stage (read it after the forward).

    Attributes:
        scores: per stage (B, S) predictor scores (keep - drop logit), with grad.
        policies: per stage (B, S) cumulative keep policy D_s in {0, 1} (straight-through grad).
        valid: (B, S) bool, non-padding tokens.
    """

    scores: list[torch.Tensor] = field(default_factory=list)
    policies: list[torch.Tensor] = field(default_factory=list)
    valid: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (B, 1, S, S) current additive mask
    causal: torch.Tensor | None = None  # (B, 1, S, S) additive causal + padding mask


def _gumbel(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float32).clamp_(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).to(like.device)


def causal_additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) valid tokens -> (B, 1, S, S) float mask: 0 where key j <= query i and j valid, else -inf-like.

    The diagonal is always open so padded rows never have an empty softmax.
    """
    seq = valid.shape[1]
    idx = torch.arange(seq, device=valid.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=valid.device)[None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def policy_attention_mask(causal: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Combine the causal mask (B, 1, S, S) with key policy (B, S): ``log(D_j + eps)`` off the diagonal."""
    seq = policy.shape[1]
    eye = torch.eye(seq, device=policy.device, dtype=policy.dtype)
    keys = policy[:, None, None, :]
    keys = keys + (1.0 - keys) * eye  # DynamicViT: a token always attends to itself
    return causal + torch.log(keys + EPS)


class PolicyMasker:
    """Simulated multi-stage pruning for training. Use as ``with masker(model): ...``."""

    def __init__(self, schedule: PruningSchedule, predictor: TokenPredictor, mode: str = "gumbel",
                 tau: float = 1.0, noise: bool = True, generator: torch.Generator | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"train.keep_mode: {mode!r} not in {MODES}")
        self.schedule, self.predictor, self.mode, self.tau, self.noise = schedule, predictor, mode, tau, noise
        self.generator = generator
        self.state = PolicyState()
        self._stage_of = schedule.stage_of_layer()

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[PolicyMasker]:
        layers = decoder_layers(model)
        self.schedule.validate(len(layers))
        handles = [model.base_model.register_forward_pre_hook(self._on_model_start, with_kwargs=True)]
        for idx in range(self.schedule.layers[0], len(layers)):
            handles.append(layers[idx].register_forward_pre_hook(self._make_hook(idx), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.state = PolicyState()

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
        self.state = PolicyState(valid=valid, causal=causal_additive_mask(valid))

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if layer in self._stage_of:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._run_stage(self._stage_of[layer], hidden)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self.state.mask.to(_dtype_of(args, kwargs))
            return args, kwargs

        return hook

    def _run_stage(self, stage: int, hidden: torch.Tensor) -> None:
        """Score, draw M_s, update D_s and the attention mask. hidden: (B, S, D)."""
        state = self.state
        logits = self.predictor.logits(stage, hidden).float()  # (B, S, 2)
        scores = logits[..., 0] - logits[..., 1]
        prev = state.policies[-1] if state.policies else state.valid.float()
        batch, seq = scores.shape
        lengths = state.valid.sum(1)
        positions = torch.arange(seq, device=scores.device).expand(batch, -1)
        protect = torch.stack([
            protected_mask(positions[b], int(n), self.schedule.keep_first, self.schedule.num_recent(int(n)))
            for b, n in enumerate(lengths.tolist())
        ]) & state.valid
        if self.mode == "gumbel":
            noisy = logits + _gumbel(logits.shape, logits, self.generator) if self.noise else logits
            soft = (noisy / self.tau).softmax(-1)[..., 0]
            hard = (soft > 0.5).float()
        else:
            noisy = scores + (_gumbel(scores.shape, scores, self.generator) - _gumbel(scores.shape, scores, self.generator)
                              if self.noise else 0.0)
            hard, soft = self._topk(stage, noisy, prev, protect, lengths)
        keep = hard + (soft - soft.detach())  # straight-through: forward exactly hard, backward soft
        keep = torch.where(protect, torch.ones_like(keep), keep)
        policy = prev * keep * state.valid.float()
        state.scores.append(scores)
        state.policies.append(policy)
        state.mask = policy_attention_mask(state.causal, policy)

    def _topk(self, stage: int, noisy: torch.Tensor, prev: torch.Tensor, protect: torch.Tensor,
              lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard top-``budget`` mask among alive tokens (protected first) and a soft surrogate."""
        hard = torch.zeros_like(noisy)
        soft = torch.zeros_like(noisy)
        for b, n in enumerate(lengths.tolist()):
            alive = prev[b].detach() > 0.5
            ranked = noisy[b].detach().masked_fill(~alive, float("-inf")).masked_fill(protect[b], float("inf"))
            budget = min(self.schedule.budget(stage, int(n)), int(alive.sum()))
            order = ranked.topk(budget).indices
            hard[b, order] = 1.0
            # Threshold halfway between the last kept and the first dropped score.
            finite = noisy[b].detach().masked_fill(~alive | protect[b], float("nan"))
            kept_vals = finite[hard[b] > 0]
            drop_vals = finite[(hard[b] == 0) & alive]
            kept_min = kept_vals[~kept_vals.isnan()].min() if (~kept_vals.isnan()).any() else noisy[b].max().detach()
            drop_max = drop_vals.max() if drop_vals.numel() else kept_min - 1.0
            threshold = (kept_min + drop_max) / 2
            soft[b] = torch.sigmoid((noisy[b] - threshold) / self.tau)
        return hard, soft


def _dtype_of(args: tuple, kwargs: dict) -> torch.dtype:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.dtype
