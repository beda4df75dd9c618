"""WikiText-2 perplexity with a strided sliding window, dense or with prefill token pruning.

Windows (as in the Hugging Face perplexity guide): window ``w`` starts every ``stride`` tokens and
spans up to ``window`` tokens; it SCORES only the tokens the previous window did not reach (the
last ``stride`` tokens; the first window scores all but the first token), and the rest of the
window is CONTEXT. Every token except the first is scored exactly once, so
``ppl = exp(sum NLL / (num_tokens - 1))``.

Pruned protocol: each window's context is prefilled with the pruner installed (dropped layer by
layer, budgets relative to the context length), then the scored tokens are fed on top of the
pruned cache and are never pruned (:mod:`sdtp.eval.scoring`). With pruning off the window is one
dense forward, which is what the pruned path reduces to when the schedule keeps everything.
Partial sums are checkpointed to the run directory, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.eval.scoring import prefill_context, score_continuation
from sdtp.utils import read_text_file, write_json_atomic

log = logging.getLogger(__name__)
STATE_FILE = "perplexity_state.json"


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
    """(begin, first_scored, end) per window; scored spans tile [1, num_tokens) exactly once.

    Needs ``stride < window`` so that every scored token has context inside its window.
    """
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window), got stride={stride}, window={window}")
    spans, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first = max(prev_end, 1)  # token 0 has no context; later windows overlap the previous one
        if first < end:
            spans.append((begin, first, end))
        prev_end = end
        if end == num_tokens:
            break
    return spans


@torch.inference_mode()
def window_nll(model: nn.Module, ids: torch.Tensor, n_ctx: int, pruner: TokenPruner | None) -> tuple[float, Any]:
    """Summed NLL of ``ids[:, n_ctx:]`` given ``ids[:, :n_ctx]`` (ids: (1, W)); returns (nll, record)."""
    if pruner is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, n_ctx - 1 : -1]  # (1, W - n_ctx, V)
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(2, ids[:, n_ctx:].unsqueeze(-1))
        return -float(logprobs.sum()), None
    ctx = prefill_context(model, ids[:, :n_ctx], pruner)
    logprobs, _ = score_continuation(model, ctx, ids[:, n_ctx:], pruner)
    return -float(logprobs.float().sum()), ctx.record


def validate(cfg: DictConfig) -> None:
    ev = cfg.eval
    if int(ev.window) < 2:
        raise ConfigError(f"eval.window: must be >= 2, got {ev.window}")
    if not 1 <= int(ev.stride) < int(ev.window):
        raise ConfigError(f"eval.stride: must be in [1, eval.window={ev.window}) so every scored token has "
                          f"context in its window, got {ev.stride}")
    if int(ev.window) > int(cfg.model.max_length):
        raise ConfigError(f"eval.window: {ev.window} exceeds model.max_length={cfg.model.max_length}")
    if ev.max_tokens is not None and int(ev.max_tokens) < 2:
        raise ConfigError(f"eval.max_tokens: must be >= 2 or null, got {ev.max_tokens}")
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


def _load_state(path: Path, signature: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """The checkpoint of an interrupted run with the same signature, unless ``fresh`` (``force=true``)."""
    if path.is_file() and not fresh:
        state = json.loads(path.read_text())
        if state.get("signature") == signature:
            log.info("resuming perplexity at window %d", state["next_window"])
            return state
    return {"signature": signature, "next_window": 0, "nll": 0.0, "tokens": 0, "kept": []}


def run(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None, run_dir: Path) -> dict:
    ev = cfg.eval
    ids = tokenizer(load_text(cfg), return_tensors="pt").input_ids
    if ev.max_tokens is not None:
        ids = ids[:, : int(ev.max_tokens)]
    ids = ids.to(cfg.model.device)
    if ids.shape[1] < 2:  # e.g. a hub split of blank rows: no token has a context to be scored in
        raise ConfigError(f"eval.data_file: {ev.data_file or ev.hf_dataset} tokenizes to {ids.shape[1]} token(s); "
                          "perplexity needs at least 2")
    spans = window_spans(ids.shape[1], int(ev.window), int(ev.stride))
    signature = {"tokens": int(ids.shape[1]), "window": int(ev.window), "stride": int(ev.stride),
                 "pruning": OmegaConf.to_container(cfg.pruning, resolve=True), "model": cfg.model.name}
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path, signature, fresh=bool(cfg.get("force", False)))
    stats = KeptStats()
    stats.final, stats.per_layer, stats.prompt_tokens = (list(x) for x in zip(*state["kept"])) if state["kept"] else ([], [], [])
    for index in tqdm(range(state["next_window"], len(spans)), desc="perplexity windows", initial=state["next_window"],
                      total=len(spans)):
        begin, first, end = spans[index]
        nll, record = window_nll(model, ids[:, begin:end], first - begin, pruner)
        state["nll"] += nll
        state["tokens"] += end - first
        stats.add(record)
        state["next_window"] = index + 1
        if state["next_window"] % int(ev.checkpoint_every) == 0 or state["next_window"] == len(spans):
            state["kept"] = list(zip(stats.final, stats.per_layer, stats.prompt_tokens))
            write_json_atomic(state_path, state)
    nll_mean = state["nll"] / state["tokens"]
    return {
        "perplexity": math.exp(nll_mean),
        "nll_per_token": nll_mean,
        "scored_tokens": state["tokens"],
        "num_tokens": int(ids.shape[1]),
        "windows": len(spans),
        "window": int(ev.window),
        "stride": int(ev.stride),
        **stats.summary(),
    }
