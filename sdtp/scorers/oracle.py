"""Oracle scorer: the true saliency (default: gradient x input), computed on the fly with the full model.

At the start of each prefill (:meth:`Scorer.begin`) it runs one extra dense forward + backward of
the unpruned model on the prompt (:func:`sdtp.saliency.saliency_scores`) and then scores the alive
tokens at each stage by that stage layer's saliency. With a ``continuation``/``fidelity`` target the
prompt's last ``recent`` fraction (the tokens the pruner protects) stands in for the continuation.
With ``gold=True`` the continuation protocol (:mod:`sdtp.eval.continuation`) hands the scorer the
segment's real continuation before each prefill (:func:`reveal_continuation`), and the labels are
computed on prompt + continuation with the split at the prompt's end: the same label a predictor is
trained on (a Dolly response, a text window's last tokens), so this oracle is the ceiling of a perfect
student; the prompt-tail oracle instead asks what the prompt's own last tokens read.
With ``samples=k`` the continuation is instead sampled from the dense model itself (``k`` continuations of
up to ``sample_len`` tokens at temperature 1, each ending at its first EOS; seeded by the prompt's ids, so a
prompt always gets the same samples) and the label is averaged over them: the expected label under the
model's own predictive distribution, computed from nothing but the prompt. Its gap to the gold oracle
measures how much of the label the model itself cannot foresee from the prompt (a student of real
continuations' labels can still beat it: it learns the data's distribution, not the model's).
This is the upper bound a learned predictor
approximates (and costs a full backward per prompt, so it is for analysis, not speed).

``begin`` runs inside the pruner's forward pre-hook, typically under ``torch.inference_mode``;
the saliency pass leaves inference mode, enables grad, and temporarily sets aside the hooks the
pruner installed on the model so the dense pass is not itself pruned (they are restored after).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sdtp.engine.generation import SamplingConfig, generate
from sdtp.saliency import saliency_scores
from sdtp.scorers.base import Scorer, ScoreContext


@contextmanager
def hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """Temporarily detach every module's forward (pre-)hooks; restore them on exit."""
    saved = []
    for module in model.modules():
        saved.append((module, module._forward_pre_hooks, module._forward_hooks))
        module._forward_pre_hooks = type(module._forward_pre_hooks)()
        module._forward_hooks = type(module._forward_hooks)()
    try:
        yield
    finally:
        for module, pre, post in saved:
            module._forward_pre_hooks, module._forward_hooks = pre, post


def prompt_seed(ids: torch.Tensor, seed: int) -> int:
    """A 63-bit sampling seed from ``seed`` and the (1, N) prompt ids: the same prompt always gets the same
    samples, whatever order the prompts come in (so a resumed evaluation reproduces an uninterrupted one)."""
    digest = hashlib.sha256(str(seed).encode() + ids.cpu().to(torch.int64).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampled_continuations(model: nn.Module, ids: torch.Tensor, samples: int, length: int,
                          seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, N) prompt followed by ``samples`` continuations drawn from the dense model at temperature 1.

    Each continuation stops after its first EOS (kept) or ``length`` tokens. Returns (k, N + L) ids,
    right-padded with 0 to the longest continuation L (the validity masks the padding out of the label), and
    their (k, N + L) bool validity.
    """
    eos = getattr(model.generation_config, "eos_token_id", None)
    sampling = SamplingConfig(do_sample=True, temperature=1.0, seed=prompt_seed(ids, seed))
    prompts = ids.repeat(samples, 1)
    out = generate(model, prompts, length, sampling=sampling, eos_token_id=eos).sequences
    gen = ids.new_zeros(samples, max(len(seq) for seq in out))
    valid = torch.ones(samples, ids.shape[1] + gen.shape[1], dtype=torch.bool, device=ids.device)
    for row, seq in enumerate(out):
        gen[row, :len(seq)] = torch.tensor(seq, dtype=ids.dtype)
        valid[row, ids.shape[1] + len(seq):] = False
    return torch.cat([prompts, gen], dim=1), valid


class OracleScorer(Scorer):
    """Scores = the ``target``'s saliency of the full model at each stage layer's input (:mod:`sdtp.saliency`)."""

    def __init__(self, target: str = "continuation", absolute: bool = True, recent: float = 0.1,
                 gold: bool = False, samples: int = 0, sample_len: int = 128, sample_seed: int = 0) -> None:
        if samples < 0 or sample_len < 1:
            raise ValueError(f"OracleScorer: samples must be >= 0 and sample_len >= 1, got {samples}, {sample_len}")
        if gold and samples:
            raise ValueError("OracleScorer: gold=True labels with the real continuation, samples > 0 with sampled "
                             "ones; choose one")
        self.target = target
        self.absolute = absolute
        self.recent = recent  # continuation targets: the CE of the prompt's last ``recent`` fraction
        self.gold = gold
        self.samples, self.sample_len, self.sample_seed = samples, sample_len, sample_seed
        self.future: torch.Tensor | None = None  # (1, T) gold continuation of the next prefill (gold=True)
        self._model: nn.Module | None = None
        self._layers: tuple[int, ...] = ()
        self._saliency: torch.Tensor | None = None  # (B, S, num_stages)

    def bind(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self._model, self._layers = model, tuple(layers)

    def begin(self, input_ids: torch.Tensor | None, extras: dict[str, Any]) -> None:
        if input_ids is None:
            raise ValueError("OracleScorer needs input_ids (not inputs_embeds)")
        mask = extras.get("attention_mask")  # (B, N), set by the pruner for left-padded batches only
        with torch.inference_mode(False), hooks_set_aside(self._model):
            ids = input_ids.clone()  # a normal tensor even if the caller's is an inference tensor
            if mask is None:
                self._saliency = self._prompt_saliency(ids)
                return
            if self.gold or self.samples:
                raise ValueError("OracleScorer(gold=True or samples > 0) scores one prompt at a time, got a "
                                 "left-padded batch")
            # Each row is labelled alone on its real tokens, as it would be at batch 1, and stored from
            # column 0 because :meth:`score` reads it by position (counted from the row's first real token).
            lengths = mask.sum(-1).tolist()
            rows = [self._prompt_saliency(ids[b:b + 1, ids.shape[1] - n:]) for b, n in enumerate(lengths)]
            self._saliency = rows[0].new_zeros(len(rows), ids.shape[1], rows[0].shape[-1])
            for b, row in enumerate(rows):
                self._saliency[b, :row.shape[1]] = row[0]

    def _prompt_saliency(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) unpadded prompt ids -> (B, N, num_stages) saliency (B = 1 for the gold and sampled labels)."""
        seq, valid = ids.shape[1], None
        if self.gold:
            ids, split = self._with_future(ids)
        elif self.samples:
            ids, valid, split = self._with_samples(ids)
        else:
            split = torch.full((ids.shape[0],), seq - max(1, math.ceil(self.recent * seq - 1e-9)), device=ids.device)
        # The mask target is a signed loss change: its sign is meaningful, so no |.| there.
        absolute = self.absolute and self.target != "mask"
        saliency = saliency_scores(self._model, ids, self._layers, self.target, absolute,
                                   normalize=False, valid=valid, split=split)[:, :seq]
        # Sampled continuations: the expected label over the model's own continuations.
        return saliency.mean(0, keepdim=True) if self.samples else saliency

    def _with_future(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N + T) prompt + gold continuation and the split (1,) at N; the continuation is used once."""
        if self.future is None:
            raise ValueError("OracleScorer(gold=True) needs each prompt's continuation before its prefill; only "
                             "eval=continuation supplies it (sdtp.scorers.oracle.reveal_continuation)")
        if ids.shape[0] != 1:
            raise ValueError(f"OracleScorer(gold=True) scores one prompt at a time, got a batch of {ids.shape[0]}")
        future, self.future = self.future.to(ids.device), None
        return torch.cat([ids, future], dim=1), torch.tensor([ids.shape[1]], device=ids.device)

    def _with_samples(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, N + L) prompt + k sampled continuations, their validity and the split (k,) at N."""
        if ids.shape[0] != 1:
            raise ValueError(f"OracleScorer(samples > 0) scores one prompt at a time, got a batch of {ids.shape[0]}")
        full, valid = sampled_continuations(self._model, ids, self.samples, self.sample_len, self.sample_seed)
        return full, valid, torch.full((self.samples,), ids.shape[1], device=ids.device)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n) this stage's saliency of each alive token, read by its position (a padding slot reads column 0's;
        padding is masked out of the selection)."""
        stage_scores = self._saliency[..., ctx.stage].to(ctx.hidden_states.device)  # (B, N)
        return stage_scores.gather(1, ctx.positions.clamp(min=0))


def reveal_continuation(scorer: Scorer | None, cont_ids: torch.Tensor) -> None:
    """Hand a gold oracle the (1, T) continuation of the prompt about to be prefilled (no-op otherwise)."""
    if isinstance(scorer, OracleScorer) and scorer.gold:
        scorer.future = cont_ids
