"""Runner for the synthetic long-context tasks (needle, passage retrieval, passage count).

Samples come from :mod:`sdtp.eval.synthetic_data` (WikiText filler, seeded); each is greedily
decoded from the (pruned) prefill cache and scored automatically. The summary reports the score
(x100, like LongBench) overall, per length and, for the needle, per depth and per (length, depth).
Needles are placed outside the spans pruners keep unconditionally (``eval.protected_*``) and this is
checked on every encoded prompt before generation starts.

    sdtp-eval eval=needle eval.lengths=[4096] pruning=random
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from sdtp.config import build_schedule
from sdtp.checks import integer
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.longbench_metrics import dataset_score
from sdtp.eval.predict import (PredictionLog, check_chat_template, cost_summary, encode, greedy_predict,
                               stop_token_ids, wants_chat_template)
from sdtp.eval.prompt_compression import build_compression, compressed_ids, compression_summary
from sdtp.eval.prompt_compression import validate as validate_compression
from sdtp.eval.synthetic_data import SCORERS, Protected, Sample, make_samples, score, wiki_paragraphs
from sdtp.kv import build_kv_policy
from sdtp.utils import read_text_file

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Check ``cfg.eval`` before the model loads (ConfigError naming the key)."""
    ev = cfg.eval
    if ev.task not in SCORERS:
        raise ConfigError(f"eval.task: {ev.task!r} is not one of {sorted(SCORERS)}")
    if not Path(ev.source).is_file():
        raise ConfigError(f"eval.source: {ev.source} not found (WikiText-2 raw text, e.g. <data_dir>/lm/wiki.test.raw)")
    read_text_file(ev.source, "eval.source")  # UTF-8, or an error naming the line
    if not wiki_paragraphs(str(ev.source)):
        raise ConfigError(f"eval.source: {ev.source} has no body paragraph of >= 40 words (empty, or not WikiText "
                          "raw text?): nothing to build the filler from")
    lengths = list(ev.lengths or [])
    if not lengths or any(int(n) < 256 for n in lengths):
        raise ConfigError(f"eval.lengths: need a non-empty list of prompt lengths >= 256 tokens, got {lengths}")
    limit = int(cfg.model.max_length)
    if max(int(n) for n in lengths) + int(ev.max_new_tokens) > limit:
        raise ConfigError(f"eval.lengths: {max(lengths)} + eval.max_new_tokens exceeds model.max_length={limit}")
    if ev.task == "needle" and (not ev.depths or any(not 0.0 <= float(d) <= 1.0 for d in ev.depths)):
        raise ConfigError(f"eval.depths: need a non-empty list of needle depths in [0, 1], got {ev.depths}")
    for key in ("num_samples", "max_new_tokens"):
        integer(ev[key], f"eval.{key}", low=1)
    if ev.get("limit") is not None:
        integer(ev.limit, "eval.limit", low=1)
    check_chat_template(ev.get("chat_template", "auto"))
    if ev.task == "needle":
        check_protection(cfg)
    validate_compression(cfg)


def protection(cfg: DictConfig) -> Protected:
    return Protected(int(cfg.eval.get("protected_first", 4)), float(cfg.eval.get("protected_recent", 0.1)))


def check_protection(cfg: DictConfig) -> None:
    """The needle's keep-out spans must cover what the pruning schedule and KV policy always keep."""
    spec = protection(cfg)
    schedule = build_schedule(cfg) if "pruning" in cfg else None
    policy = build_kv_policy(cfg)
    for name, keeper in (("pruning", schedule), ("kv", policy)):
        if keeper is None:
            continue
        if keeper.keep_first > spec.first:
            raise ConfigError(f"eval.protected_first: {spec.first} < {name}.keep_first={keeper.keep_first}: the needle "
                              f"could sit in tokens {name} always keeps; set eval.protected_first>={keeper.keep_first} "
                              "(for every method you compare)")
        if keeper.keep_recent > spec.recent:
            raise ConfigError(f"eval.protected_recent: {spec.recent} < {name}.keep_recent={keeper.keep_recent}: the "
                              f"needle could sit in tokens {name} always keeps; set eval.protected_recent>="
                              f"{keeper.keep_recent} (for every method you compare)")


def needle_span(tokenizer: Any, sample: Sample, chat: bool) -> tuple[int, int, int]:
    """(first, end, N): the needle's token span in the encoded prompt (as :func:`encode` builds it)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                             add_generation_prompt=True, tokenize=False) + sample.answer_prefix
    else:
        text = sample.prompt + sample.answer_prefix
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    begin = text.index(sample.needle)
    end = begin + len(sample.needle)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > begin and a < end and b > a]
    return inside[0], inside[-1] + 1, len(enc["input_ids"])


def assert_needle_unprotected(cfg: DictConfig, tokenizer: Any, samples: list[Sample], chat: bool,
                              pruner: TokenPruner | None) -> None:
    """Every needle lies outside the spans kept unconditionally (eval spec, pruning schedule, KV policy)."""
    spec, policy = protection(cfg), build_kv_policy(cfg)
    for sample in samples:
        first, end, n = needle_span(tokenizer, sample, chat)
        head = max([spec.first] + ([pruner.schedule.keep_first] if pruner else []) + ([policy.keep_first] if policy else []))
        tail = max([spec.num_recent(n)] + ([pruner.schedule.num_recent(n)] if pruner else [])
                   + ([policy.num_recent(n)] if policy else []))
        if first < head or end > n - tail:
            raise AssertionError(f"{sample.id}: needle tokens [{first}, {end}) of {n} touch the protected spans "
                                 f"(first {head}, last {tail}); the comparison would be unfair")
        sample.meta["needle_tokens"] = [first, end]


def input_files(cfg: DictConfig) -> list[Path]:
    return [Path(cfg.eval.source)]


def _group(rows: list[dict[str, Any]], *keys: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        groups["/".join(f"{k}{row[k]}" for k in keys)].append(row["score"])
    return {name: dataset_score(values) for name, values in sorted(groups.items())}


def run(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None, run_dir: str | Path) -> dict:
    """Generate, predict and score ``cfg.eval.task``; writes ``predictions.jsonl`` into ``run_dir``."""
    validate(cfg)
    ev, start = cfg.eval, time.perf_counter()
    chat = wants_chat_template(tokenizer, ev.chat_template)
    extra = encode(tokenizer, "", chat).shape[1]  # tokens the chat wrapper / BOS add around the prompt
    samples = make_samples(ev.task, tokenizer, ev.source, [int(n) for n in ev.lengths],
                           [float(d) for d in ev.get("depths") or []], int(ev.num_samples), int(ev.seed), extra,
                           protected=protection(cfg))
    if ev.get("limit") is not None:
        samples = samples[: int(ev.limit)]
    if ev.task == "needle":  # before any generation: a needle in a protected span makes the score meaningless
        assert_needle_unprotected(cfg, tokenizer, samples, chat, pruner)
    stops = stop_token_ids(model, tokenizer)
    predictions = PredictionLog(Path(run_dir) / "predictions.jsonl")
    compression = build_compression(cfg, tokenizer)
    for sample in tqdm(samples, desc=ev.task, leave=False):
        if sample.id in predictions:
            continue
        input_ids, compressed = compressed_ids(compression, sample.prompt, sample.context,
                                               lambda text: encode(tokenizer, text, chat, sample.answer_prefix))
        pred = greedy_predict(model, tokenizer, input_ids, int(ev.max_new_tokens), pruner, stops)
        predictions.add({"id": sample.id, "task": sample.task, "length": sample.length, **sample.meta,
                         "pred": pred.text, "answer": sample.answer,
                         "score": score(sample.task, pred.text, sample.answer),
                         **pred.fields(), **compressed})
    rows = [predictions.records[s.id] for s in samples]
    metrics: dict[str, Any] = {
        "task": ev.task,
        "score": dataset_score([r["score"] for r in rows]),
        "by_length": _group(rows, "length"),
        "num_samples": len(rows),
        **cost_summary(rows),
        **compression_summary(rows),
        "wall_s": round(time.perf_counter() - start, 3),
    }
    if ev.task == "needle":
        metrics["by_depth"] = _group(rows, "depth")
        metrics["by_length_depth"] = _group(rows, "length", "depth")
    log.info("%s: %.2f over %d samples", ev.task, metrics["score"], len(rows))
    return metrics
