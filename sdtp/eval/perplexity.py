"""WikiText-2 perplexity with a strided sliding window, dense or with prefill token pruning.

Windows (protocol 2): with ``context = window - stride``, window ``k`` covers tokens
``[k * stride, k * stride + window)``; its first ``context`` tokens are CONTEXT and the rest (up
to ``stride`` tokens, fewer only in the last window) are SCORED. The scored spans tile
``[context, num_tokens)`` exactly once, so every scored token's window holds exactly ``context``
tokens before its first scored token, and ``ppl = exp(sum NLL / (num_tokens - context))``. The
first ``context`` tokens of the text are never scored: in the Hugging Face guide's windowing
(protocol 1, before issue 13) the first window scored them with contexts of 1..context tokens, so
a pruned run scored many tokens whose prompt was too short to be pruned much; the metrics report
``min_context_tokens`` (= ``context``) to show no scored token had a short context.

Pruned protocol: each window's context is prefilled with the pruner installed (dropped layer by
layer, budgets relative to the ``context`` tokens), then the scored tokens are fed on top of the
pruned cache and are never pruned (:mod:`sdtp.eval.scoring`). Dense: one forward over the window
whose LM head runs only at the scored positions (``logits_to_keep``), which is what the pruned
path reduces to when the schedule keeps everything. Both paths take log-probs with
:func:`sdtp.eval.scoring.token_logprobs` in float32 (``LOGPROB_DTYPE``), so a bf16 model is
compared like for like.

The metrics keep each window's NLL sum and scored-token count (``window_nll``,
``window_tokens``): windows are the paired units for an interval on a dense vs pruned difference
(window ``k + 1``'s context holds window ``k``'s scored tokens, so they are not independent
samples; :mod:`sdtp.eval.continuation` has non-overlapping segments).
Partial sums are checkpointed to the run directory (``STATE_FILE``), so an interrupted run
resumes; the state records ``PROTOCOL_VERSION``, so a state file of another protocol (or of a
run with other settings) is ignored, never resumed from. ``eval.protocol`` (conf/eval/perplexity.yaml)
states the same version: :func:`validate` checks it against the code, and as config it is part of
the run's fingerprint, so ``sdtp-eval`` recomputes a finished protocol-1 run instead of reusing it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.eval.scoring import prefill_context, score_continuation, token_logprobs
from sdtp.utils import read_text_file, write_json_atomic

log = logging.getLogger(__name__)
STATE_FILE = "perplexity_state.json"
# 1: HF-guide windows (the first window scored tokens with short contexts), log-softmax in the
# logits' dtype when pruned. 2: full-context windows only, float32 log-softmax on both paths.
PROTOCOL_VERSION = 2
LOGPROB_DTYPE = torch.float32


def wikitext_rows(path: str | Path) -> list[str]:
    """Rows of a raw WikiText file as HF ``wikitext-*-raw-v1`` has them (blank lines become "")."""
    lines = read_text_file(path, "eval.data_file").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def load_text(cfg: DictConfig) -> str:
    """The evaluation text, ``"\\n\\n".join(rows)`` (HF convention), from the file or the hub."""
    ev = cfg.eval
    if ev.data_file and Path(ev.data_file).is_file():
        rows = wikitext_rows(ev.data_file)
    else:
        from datasets import load_dataset

        rows = load_dataset(ev.hf_dataset, ev.hf_config, split=ev.hf_split)["text"]
    return "\n\n".join(rows)


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_scored, end) per window; scored spans tile [window - stride, num_tokens) exactly once.

    Every window has ``first_scored - begin == window - stride`` context tokens; ``end - first_scored``
    is ``stride`` except in the last window (fewer when the text ends). Empty if the text has no
    token after one full context (``num_tokens <= window - stride``).
    """
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window), got stride={stride}, window={window}")
    context = window - stride
    # begin + context < num_tokens: a window is only opened when it has a token to score.
    return [(begin, begin + context, min(begin + window, num_tokens))
            for begin in range(0, max(num_tokens - context, 0), stride)]


@torch.inference_mode()
def window_nll(model: nn.Module, ids: torch.Tensor, n_ctx: int,
               pruner: TokenPruner | None) -> tuple[float, PrefillRecord | None]:
    """Summed NLL (nats) of ``ids[:, n_ctx:]`` given ``ids[:, :n_ctx]`` (ids: (1, W)); returns (nll, record).

    The record is the pruned prefill's (None dense). Neither path computes vocabulary logits for a
    position whose next token is not scored.
    """
    targets = ids[:, n_ctx:]  # (1, T)
    if pruner is None:
        # Positions n_ctx-1 .. W-2 predict the targets; HF's LM head runs on these only.
        scored = torch.arange(n_ctx - 1, ids.shape[1] - 1, device=ids.device)  # (T,)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=scored).logits  # (1, T, V)
        logprobs, _ = token_logprobs(logits, targets, LOGPROB_DTYPE)
        return -float(logprobs.double().sum()), None
    ctx = prefill_context(model, ids[:, :n_ctx], pruner)
    logprobs, _ = score_continuation(model, ctx, targets, pruner, dtype=LOGPROB_DTYPE)
    return -float(logprobs.double().sum()), ctx.record


def validate(cfg: DictConfig) -> None:
    ev = cfg.eval
    if int(ev.window) < 2:
        raise ConfigError(f"eval.window: must be >= 2, got {ev.window}")
    if not 1 <= int(ev.stride) < int(ev.window):
        raise ConfigError(f"eval.stride: must be in [1, eval.window={ev.window}) so every scored token has "
                          f"context in its window, got {ev.stride}")
    if int(ev.window) > int(cfg.model.max_length):
        raise ConfigError(f"eval.window: {ev.window} exceeds model.max_length={cfg.model.max_length}")
    if int(ev.get("protocol", PROTOCOL_VERSION)) != PROTOCOL_VERSION:
        raise ConfigError(f"eval.protocol: this code implements perplexity protocol {PROTOCOL_VERSION} "
                          f"(see sdtp/eval/perplexity.py), got {ev.get('protocol')}")
    context = int(ev.window) - int(ev.stride)
    if ev.max_tokens is not None and int(ev.max_tokens) <= context:
        raise ConfigError(f"eval.max_tokens: must exceed the context eval.window - eval.stride = {context} "
                          f"(only tokens after a full context are scored) or be null, got {ev.max_tokens}")
    if not (ev.data_file and Path(ev.data_file).is_file()) and not ev.hf_dataset:
        raise ConfigError(f"eval.data_file: {ev.data_file} not found and eval.hf_dataset is not set "
                          "(set SDTP_DATA_DIR to the offline data mirror)")
    if ev.data_file and Path(ev.data_file).is_file() and not read_text_file(ev.data_file, "eval.data_file").strip():
        # Nothing to score: the mean NLL would divide by zero after the model loaded.
        raise ConfigError(f"eval.data_file: {ev.data_file} is empty")
    if cfg.pruning.get("scorer") is not None and float(cfg.pruning.keep_recent) <= 0:
        raise ConfigError("pruning.keep_recent: must be > 0 for perplexity (the last context token must survive)")


def input_files(cfg: DictConfig) -> list[Path]:
    """The local text file, if the run reads one (the hub fallback is identified by its config keys)."""
    path = cfg.eval.data_file
    return [Path(path)] if path and Path(path).is_file() else []


def _fresh_state(signature: dict[str, Any]) -> dict[str, Any]:
    """Nothing scored yet; per window: NLL sum (nats), scored tokens, (kept, layer fraction, prompt tokens)."""
    return {"signature": signature, "next_window": 0, "window_nll": [], "window_tokens": [], "kept": []}


def _load_state(path: Path, signature: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """The checkpoint of an interrupted run with the same signature, unless ``fresh`` (``force=true``).

    The signature holds ``protocol``, so a protocol-1 file (no per-window lists, other windows) is
    never resumed from; it is overwritten at the first checkpoint.
    """
    if not path.is_file() or fresh:
        return _fresh_state(signature)
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is unreadable: starting perplexity from the first window", path)
        return _fresh_state(signature)
    if not isinstance(state, dict) or state.get("signature") != signature:
        log.warning("%s was written by another perplexity protocol or configuration: starting from the first window",
                    path)
        return _fresh_state(signature)
    log.info("resuming perplexity at window %d", state["next_window"])
    return state


def token_ids(cfg: DictConfig, tokenizer: Any) -> torch.Tensor:
    """(1, N) the evaluation text's ids (``eval.max_tokens`` first ones); ConfigError if nothing can be scored."""
    ev = cfg.eval
    ids = tokenizer(load_text(cfg), return_tensors="pt").input_ids
    if ev.max_tokens is not None:
        ids = ids[:, : int(ev.max_tokens)]
    context = int(ev.window) - int(ev.stride)
    if ids.shape[1] <= context:  # e.g. a short file or a hub split of blank rows
        raise ConfigError(f"eval.data_file: {ev.data_file or ev.hf_dataset} tokenizes to {ids.shape[1]} token(s); "
                          f"perplexity scores only tokens after a full context of eval.window - eval.stride = "
                          f"{context} tokens, so it needs more")
    return ids.to(cfg.model.device)


def run(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None, run_dir: Path) -> dict:
    ev = cfg.eval
    ids = token_ids(cfg, tokenizer)
    spans = window_spans(ids.shape[1], int(ev.window), int(ev.stride))
    signature = {"protocol": PROTOCOL_VERSION, "tokens": int(ids.shape[1]), "window": int(ev.window),
                 "stride": int(ev.stride), "pruning": OmegaConf.to_container(cfg.pruning, resolve=True),
                 "model": cfg.model.name}
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path, signature, fresh=bool(cfg.get("force", False)))
    stats = KeptStats()
    stats.final, stats.per_layer, stats.prompt_tokens = (list(x) for x in zip(*state["kept"])) if state["kept"] else ([], [], [])
    for index in tqdm(range(state["next_window"], len(spans)), desc="perplexity windows", initial=state["next_window"],
                      total=len(spans)):
        begin, first, end = spans[index]
        nll, record = window_nll(model, ids[:, begin:end], first - begin, pruner)
        state["window_nll"].append(nll)
        state["window_tokens"].append(end - first)
        stats.add(record)
        state["next_window"] = index + 1
        if state["next_window"] % int(ev.checkpoint_every) == 0 or state["next_window"] == len(spans):
            state["kept"] = list(zip(stats.final, stats.per_layer, stats.prompt_tokens))
            write_json_atomic(state_path, state)
    scored = sum(state["window_tokens"])
    nll_mean = math.fsum(state["window_nll"]) / scored
    return {
        "perplexity": math.exp(nll_mean),
        "nll_per_token": nll_mean,
        "protocol": PROTOCOL_VERSION,
        "scored_tokens": scored,
        "num_tokens": int(ids.shape[1]),
        # Context tokens before the first scored token of each window; all equal window - stride.
        "min_context_tokens": min(first - begin for begin, first, _ in spans),
        "windows": len(spans),
        "window": int(ev.window),
        "stride": int(ev.stride),
        # Per window (the paired unit for dense vs pruned): NLL sum in nats and scored tokens.
        "window_nll": list(state["window_nll"]),
        "window_tokens": list(state["window_tokens"]),
        **stats.summary(),
    }
