"""Prefill (optionally pruned) and token-by-token decoding from the resulting cache, timed.

Decoding runs the model's own forward with the cache; since layer 0 is never pruned, the model
derives decode positions from it (N, N+1, ...). Batches of different-length prompts are
left-padded (see :mod:`sdtp.engine.pruner`): they pass the growing 2D mask and per-row positions.
:func:`generate` uses a cache whose layers append in place (:class:`sdtp.engine.cache.AppendLayer`)
for the dense and the pruned model alike. Timings use ``perf_counter`` (CPU ops are synchronous)
and ``torch.cuda.synchronize`` on GPU.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdtp.engine.cache import appendable_cache
from sdtp.engine.pruner import PrefillRecord, TokenPruner, left_padded_lengths
from sdtp.models.compat import cache_kwargs, output_cache


@dataclass
class SamplingConfig:
    """Greedy when ``do_sample`` is false; otherwise temperature / top-k / top-p sampling, seeded."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
        sequences: the generated tokens of every row (a row stops at its first EOS, kept).
        prompt_tokens: prompt width N (padded width for a ragged batch).
        step_logits: per step, (B, V) next-token logits (rows that already stopped included).
    """

    sequences: list[list[int]]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    record: PrefillRecord | None = None
    cache: Any = None
    step_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        """The generated tokens of a one-row batch (use :attr:`sequences` for more rows)."""
        if len(self.sequences) != 1:
            raise ValueError(f"{len(self.sequences)} rows were generated: read .sequences")
        return self.sequences[0]

    @property
    def kept_per_stage(self) -> list[int]:
        return list(self.record.kept_per_stage) if self.record else []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any, float]:
    """One prefill forward with logits for the last position only.

    Args:
        input_ids: (B, N) prompt, left-padded if the rows differ in length.
        cache: an empty cache to fill (default: the model's own ``DynamicCache``).
        attention_mask: (B, N) 1 = real token, 0 = left padding; None = no padding. Padded rows get
            ``position_ids`` counted over their real tokens (what batch 1 would use).
    Returns:
        logits (B, 1, V), the KV cache, and the wall time in seconds. Pruned when called inside
        ``with pruner(model)`` (hooks installed once for many calls, not per call).
    Raises:
        ValueError: ``attention_mask`` is not (B, N), or one of its rows is all 0.
        NotImplementedError: ``attention_mask`` is not left-padded (the logits read the last column).
    """
    check_prompt_mask(input_ids, attention_mask)
    _sync(input_ids.device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1,
                **padding_kwargs(attention_mask, input_ids.shape[1]))
    _sync(input_ids.device)
    return out.logits, output_cache(out), time.perf_counter() - start


def check_prompt_mask(input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Refuse a prompt ``mask`` that is not (B, N) like ``input_ids``, not left-padded, or has an all-0 row.

    The pruner checks the layout too, but only when it is installed: without it a right-padded row would
    silently read its next token from a padding column.
    """
    if mask is None:
        return
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                         "they must match")
    left_padded_lengths(mask, "generation")


def padding_kwargs(mask: torch.Tensor | None, new: int) -> dict[str, torch.Tensor]:
    """``attention_mask`` (B, T) and ``position_ids`` (B, new) for a left-padded batch; {} when unpadded.

    Unpadded calls pass nothing (HF then numbers positions from the cache), so batch 1 runs HF's own path.
    """
    if mask is None:
        return {}
    return {"attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]}


def sampling_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(B, V) logits -> (B, V) float logits after temperature, top-k and top-p (filtered tokens: -inf)."""
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set reaching top_p: a token goes once the mass above it reaches top_p (>=, as
        # transformers' TopPLogitsWarper; the top token always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) next token."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    logits = sampling_logits(logits, sampling)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


def _block_eos(logits: torch.Tensor, eos: set[int], block: bool) -> torch.Tensor:
    """(B, V) logits with the EOS ids set to -inf when ``block``."""
    if not block or not eos:
        return logits
    logits = logits.clone()
    logits[:, sorted(eos)] = float("-inf")
    return logits


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pruner: TokenPruner | None = None,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | list[int] | None = None,
    keep_logits: bool = False,
    min_new_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> GenerationResult:
    """Prefill ``input_ids`` (B, N) with optional pruning, then decode up to ``max_new_tokens`` per row.

    Prompts of different lengths are left-padded, with ``attention_mask`` (B, N) marking the real
    tokens; the mask grows by one column per step and each row's positions continue from its own
    length. A row that emits an EOS stops (its later steps feed the EOS again and are discarded);
    decoding ends when every row has stopped. ``min_new_tokens`` blocks the EOS ids until that
    many tokens exist (HF's ``min_length``). A mask that is not (B, N), not left-padded, or has an
    all-0 row is refused (:func:`check_prompt_mask`).
    """
    sampling = sampling or SamplingConfig()
    generator = torch.Generator().manual_seed(sampling.seed)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    check_prompt_mask(input_ids, attention_mask)  # before the shortcut below and before any pruner hook
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing padded: take the unpadded path, identical to batch 1
    mask = attention_mask
    context = pruner(model) if pruner is not None else nullcontext()
    # Room for every generated token up front: decode steps then append in place (no per-step copy).
    cache = appendable_cache(model, headroom=max_new_tokens)
    batch = input_ids.shape[0]
    with context:
        logits, cache, prefill_s = prefill(model, input_ids, cache, attention_mask=mask)
        step_logits = [logits[:, -1].float().cpu()] if keep_logits else []
        sequences: list[list[int]] = [[] for _ in range(batch)]
        done = [max_new_tokens <= 0] * batch  # max_new_tokens=0: prefill only, no token (as HF)
        token = _next_token(_block_eos(logits[:, -1], eos, 0 < min_new_tokens), sampling, generator)
        _sync(input_ids.device)
        start = time.perf_counter()
        while not all(done):
            for row in range(batch):
                if not done[row]:
                    sequences[row].append(int(token[row, 0]))
                    done[row] = sequences[row][-1] in eos or len(sequences[row]) >= max_new_tokens
            if all(done):
                break
            # Stopped rows feed their last token again; their outputs are discarded.
            token = torch.tensor([[seq[-1]] for seq in sequences], device=input_ids.device)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(input_ids=token, **cache_kwargs(cache), use_cache=True, **padding_kwargs(mask, 1))
            cache = output_cache(out)
            if keep_logits:
                step_logits.append(out.logits[:, -1].float().cpu())
            generated = max(len(seq) for seq in sequences)
            token = _next_token(_block_eos(out.logits[:, -1], eos, generated < min_new_tokens), sampling, generator)
        _sync(input_ids.device)
        decode_s = time.perf_counter() - start
    return GenerationResult(
        sequences=sequences,
        prompt_tokens=int(input_ids.shape[1]),
        prefill_s=prefill_s,
        decode_s=decode_s,
        record=pruner.last_prefill if pruner is not None else None,
        cache=cache,
        step_logits=step_logits,
    )
