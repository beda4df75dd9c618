"""Shared pieces of the generation-based evals: prompt encoding, greedy prediction from the pruned
prefill cache, and a resumable ``predictions.jsonl``.

Decoding goes through :func:`sdtp.engine.generation.generate`: the prompt is prefilled once (pruned
when a pruner is given) and every new token attends to that pruned cache; no dense prefill runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtp.engine.generation import generate
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.utils import parse_jsonl, write_text_atomic


@dataclass
class Prediction:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    kept_fraction: float  # tokens alive after the last stage / N (1.0 dense)
    layer_token_fraction: float  # prompt tokens processed per decoder layer / N, mean over layers

    def fields(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "kept_fraction": round(self.kept_fraction, 5),
            "layer_token_fraction": round(self.layer_token_fraction, 5),
        }


def mean_rows(rows: list[dict[str, Any]], key: str, weight: str | None = None) -> float:
    """Mean of ``key`` over rows, weighted by ``weight`` (e.g. prompt tokens) when given."""
    weights = [r[weight] if weight else 1 for r in rows]
    return sum(r[key] * w for r, w in zip(rows, weights)) / sum(weights) if rows else float("nan")


def cost_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt size, kept fractions (token-weighted, same names as :class:`KeptStats`) and times over rows."""
    return {
        "avg_prompt_tokens": mean_rows(rows, "prompt_tokens"),
        "avg_new_tokens": mean_rows(rows, "new_tokens"),
        "avg_kept_fraction": mean_rows(rows, "kept_fraction", "prompt_tokens"),
        "avg_layer_token_fraction": mean_rows(rows, "layer_token_fraction", "prompt_tokens"),
        "prefill_s": round(sum(r["prefill_s"] for r in rows), 3),
        "decode_s": round(sum(r["decode_s"] for r in rows), 3),
    }


def check_chat_template(setting: Any) -> None:
    """Refuse an ``eval.chat_template`` other than auto / true / false (called before the model loads)."""
    if setting != "auto" and setting not in (True, False, "true", "false"):
        raise ConfigError(f"eval.chat_template: {setting!r} is not one of auto, true, false")


def wants_chat_template(tokenizer: Any, setting: str | bool) -> bool:
    """``auto`` = the tokenizer's chat template when it has one (instruct models), else none."""
    check_chat_template(setting)
    if setting == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if setting in (True, "true"):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("eval.chat_template: true, but the tokenizer has no chat template")
        return True
    return False


def encode(tokenizer: Any, prompt: str, chat: bool, answer_prefix: str = "") -> torch.Tensor:
    """(1, N) ids of ``prompt`` (as a user turn when ``chat``), followed by ``answer_prefix``.

    Without chat the tokenizer's own special tokens (e.g. BOS) are added, as LongBench's pred.py does.
    """
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text + answer_prefix, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt + answer_prefix).input_ids
    return torch.tensor([ids], dtype=torch.long)


def stop_token_ids(model: nn.Module, tokenizer: Any, extra_texts: Iterable[str] = ()) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config, plus the last id of each extra text."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    for text in extra_texts:
        ids.add(tokenizer.encode(text, add_special_tokens=False)[-1])
    return sorted(ids)


def greedy_predict(
    model: nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pruner: TokenPruner | None,
    stop_ids: list[int],
    min_new_tokens: int = 0,
) -> Prediction:
    """Greedy continuation of ``input_ids`` (1, N) decoded from the (pruned) prefill cache."""
    device = next(model.parameters()).device
    result = generate(model, input_ids.to(device), max_new_tokens, pruner, eos_token_id=stop_ids,
                      min_new_tokens=min_new_tokens)
    kept = KeptStats()
    kept.add(result.record)
    stats = kept.summary()
    return Prediction(
        text=tokenizer.decode(result.tokens, skip_special_tokens=True),
        prompt_tokens=result.prompt_tokens,
        new_tokens=len(result.tokens),
        prefill_s=result.prefill_s,
        decode_s=result.decode_s,
        kept_fraction=stats["avg_kept_fraction"],
        layer_token_fraction=stats["avg_layer_token_fraction"],
    )


class PredictionLog:
    """Append-only ``predictions.jsonl``: one line per finished sample, so a killed run resumes.

    Lines are flushed and fsynced as they are written; a torn last line (crash mid-write) is ignored.
    """

    def __init__(self, path: str | Path, key: str = "id") -> None:
        self.path, self.key = Path(path), key
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self.records = {str(record[key]): record for record in parse_jsonl(text)}
            if text and not text.endswith("\n"):  # drop the torn line before appending after it
                write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in self.records.values()))

    def __contains__(self, key: str) -> bool:
        return str(key) in self.records

    def add(self, record: dict[str, Any]) -> None:
        self.records[str(record[self.key])] = record
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
