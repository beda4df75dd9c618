"""LongBench v1 native runner: THUDM ``pred.py`` + ``eval.py`` behaviour on the (pruned) engine.

Per sample, as in pred.py: format the dataset's prompt template with the jsonl record; if the
tokenised prompt exceeds ``max_length`` keep its first and last ``max_length // 2`` tokens
(middle truncation, decoded back to text); wrap it in the chat template unless the dataset is a
few-shot / code one; greedy-decode up to the dataset's ``max_new_tokens`` from the pruned prefill
cache. Scores follow eval.py (see :mod:`sdtp.eval.longbench_metrics`); the summary adds per-category
means and ``avg``, the mean over datasets (the SDTP paper's AVG column).

    sdtp-eval eval=longbench model=smollm2-135m pruning=random eval.limit=10
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from string import Formatter
from typing import Any

from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from sdtp.checks import integer
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.longbench_metrics import check_dependencies, dataset_score, sample_score
from sdtp.eval.longbench_tasks import (
    CATEGORIES,
    DATASETS,
    FIRST_LINE_DATASETS,
    NEWLINE_STOP_DATASETS,
    NO_CHAT_DATASETS,
    LongBenchDataset,
)
from sdtp.eval.predict import (PredictionLog, check_chat_template, cost_summary, encode, greedy_predict,
                               stop_token_ids, wants_chat_template)
from sdtp.eval.prompt_compression import PromptCompression, build_compression, compressed_ids, compression_summary
from sdtp.eval.prompt_compression import validate as validate_compression
from sdtp.utils import read_jsonl_records

log = logging.getLogger(__name__)
# THUDM's model2maxlen.json counts a "K" of context as 1000 tokens and leaves 500 of them for the answer
# (4K -> 3500, 8K -> 7500, 32K -> 31500), so even multi_news' 512 new tokens fit under the window.
HEADROOM = 500


def data_file(cfg: DictConfig, name: str) -> Path:
    """``eval.data_files[name]`` or ``<eval.data_dir>/<name>.jsonl``; missing -> ConfigError."""
    files = cfg.eval.get("data_files") or {}
    path = Path(files[name]) if files.get(name) else Path(cfg.eval.data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"eval.data_files.{name}: {path} not found. LongBench v1 jsonl files come from the data.zip of the "
            f"THUDM/LongBench dataset repo; unzip it into eval.data_dir or set eval.data_files.{name}=<path>"
        )
    return path


def validate(cfg: DictConfig) -> dict[str, Path]:
    """Check ``cfg.eval`` (before the model loads); returns dataset -> jsonl path."""
    names = list(cfg.eval.datasets or [])
    if not names:
        raise ConfigError("eval.datasets: empty; name at least one LongBench dataset, e.g. [multi_news]")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ConfigError(f"eval.datasets: unknown LongBench v1 dataset(s) {unknown}; known: {sorted(DATASETS)}")
    for key in ("limit", "max_length", "max_new_tokens"):
        if cfg.eval.get(key) is not None:
            integer(cfg.eval[key], f"eval.{key}", low=1)
    check_chat_template(cfg.eval.get("chat_template", "auto"))
    if max_prompt_length(cfg) < 1:
        raise ConfigError(f"model.max_length={cfg.model.max_length} leaves no prompt tokens under LongBench's rule "
                          "(max_length * 1000 / 1024 - 500); set eval.max_length")
    unknown_files = sorted(set(cfg.eval.get("data_files") or {}) - set(DATASETS))
    if unknown_files:
        raise ConfigError(f"eval.data_files: {unknown_files} are not LongBench v1 datasets; known: {sorted(DATASETS)}")
    validate_compression(cfg)
    check_dependencies(DATASETS[n].metric for n in names)
    paths = {n: data_file(cfg, n) for n in names}
    for name, path in paths.items():
        load_records(path, cfg.eval.get("limit"), DATASETS[name])  # schema errors before the model loads
    return paths


def input_files(cfg: DictConfig) -> list[Path]:
    return list(validate(cfg).values())


def max_prompt_length(cfg: DictConfig) -> int:
    """Prompt tokens kept by middle truncation: ``eval.max_length``, else LongBench's rule for the model's window."""
    if cfg.eval.get("max_length") is not None:
        return int(cfg.eval.max_length)
    return int(cfg.model.max_length) * 1000 // 1024 - HEADROOM


def max_new_tokens(cfg: DictConfig, name: str) -> int:
    """Dataset ``name``'s official generation length, capped (never raised) by ``eval.max_new_tokens``."""
    official = DATASETS[name].max_new_tokens
    cap = cfg.eval.get("max_new_tokens")
    return official if cap is None else min(int(cap), official)


def check_record(record: dict[str, Any], spec: LongBenchDataset, where: str) -> None:
    """The keys the prompt template and the scorer read, with the official types (``where``: file:line)."""
    fields = [f for _, f, _, _ in Formatter().parse(spec.prompt) if f]
    missing = [f for f in (*fields, "answers") if f not in record]
    if missing:
        raise ConfigError(f"eval.data_files.{spec.name}: {where} lacks {missing} (LongBench v1 schema: "
                          "input, context, answers, length, all_classes, _id)")
    bad = [f for f in fields if not isinstance(record[f], str)]
    if bad:
        raise ConfigError(f"eval.data_files.{spec.name}: {where} fields {bad} must be strings")
    answers = record["answers"]
    # A bare string would be scored character by character (every gold answer one letter).
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"eval.data_files.{spec.name}: {where} 'answers' must be a non-empty list of strings, "
                          f"got {answers!r:.80}")


def load_records(path: Path, limit: int | None, spec: LongBenchDataset | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` records, checked against the dataset's schema (ConfigError naming file and line)."""
    key = f"eval.data_files.{spec.name}" if spec else "eval.data_files"
    records = read_jsonl_records(path, key, limit)
    if spec is not None:
        for number, record in records:
            check_record(record, spec, f"{path} line {number}")
    return [record for _, record in records]


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> tuple[str, bool]:
    """pred.py's truncation: keep the first and last ``max_length // 2`` tokens, joined as text.

    Both ends carry instructions (task description, question), so the middle of the context goes.
    """
    ids = tokenizer(prompt).input_ids
    if len(ids) <= max_length:
        return prompt, False
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def build_input(tokenizer: Any, spec: LongBenchDataset, record: dict[str, Any], max_length: int,
                chat: bool) -> tuple[Any, bool]:
    """(1, N) input ids for one record, and whether it was truncated."""
    input_ids, truncated, _ = compressed_input(tokenizer, spec, record, max_length, chat, None)
    return input_ids, truncated


def gold_answer_ids(tokenizer: Any, spec: LongBenchDataset, record: dict[str, Any], max_length: int,
                    chat: bool) -> list[int]:
    """Ids of ``record``'s first gold answer as they follow :func:`build_input`'s prompt.

    In a chat turn the answer starts the assistant's reply, on its own. After a bare prompt ("...Answer:")
    it continues the text: a space is put between them unless either side has one (lm-eval's target
    delimiter), and the answer's ids are the tail of the joint encoding, so a BPE tokenizer gives
    " Paris", not "Paris" glued to the colon.
    """
    answer = record["answers"][0]
    if chat and spec.name not in NO_CHAT_DATASETS:
        return tokenizer(answer, add_special_tokens=False).input_ids
    prompt, _ = truncate_middle(tokenizer, spec.prompt.format(**record), max_length)
    text = answer if prompt[-1:].isspace() or answer[:1].isspace() else " " + answer
    head, whole = tokenizer(prompt).input_ids, tokenizer(prompt + text).input_ids
    if whole[: len(head)] == head:
        return whole[len(head):]
    return tokenizer(text, add_special_tokens=False).input_ids  # the join merged across the boundary


def prompt_context(spec: LongBenchDataset, record: dict[str, Any], prompt: str) -> str:
    """The part of ``prompt`` (formatted, maybe middle-truncated) that stands for ``{context}``: what
    prompt compression may shorten. "" when the template has no context or a truncation cut into it."""
    before, found, after = spec.prompt.partition("{context}")
    head, tail = before.format(**record), after.format(**record)
    if not found or not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) < len(head) + len(tail):
        return ""
    return prompt[len(head):len(prompt) - len(tail)]


def compressed_input(tokenizer: Any, spec: LongBenchDataset, record: dict[str, Any], max_length: int, chat: bool,
                     compression: PromptCompression | None) -> tuple[Any, bool, dict[str, Any]]:
    """(1, N) input ids for one record, whether it was truncated, and its compression record ({} without):
    the prompt is middle-truncated as pred.py does, then its context part compressed."""
    prompt, truncated = truncate_middle(tokenizer, spec.prompt.format(**record), max_length)
    use_chat = chat and spec.name not in NO_CHAT_DATASETS
    input_ids, compressed = compressed_ids(compression, prompt, prompt_context(spec, record, prompt),
                                           lambda text: encode(tokenizer, text, use_chat))
    return input_ids, truncated, compressed


def summarize(scores: dict[str, float]) -> dict[str, Any]:
    """Per-category means over the datasets run, and AVG = mean over datasets (paper Table 1)."""
    categories = {}
    for category in CATEGORIES:
        values = [s for n, s in scores.items() if DATASETS[n].category == category]
        if values:
            categories[category] = round(sum(values) / len(values), 2)
    avg = round(sum(scores.values()) / len(scores), 2) if scores else math.nan
    return {"datasets": dict(scores), "categories": categories, "avg": avg}


def predict_dataset(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None,
                    name: str, path: Path, predictions: PredictionLog,
                    compression: PromptCompression | None = None) -> list[dict[str, Any]]:
    """Predict (or reuse from ``predictions``) every record of one dataset; returns their rows.

    With ``compression`` the context part of each (truncated) prompt is compressed first.
    """
    spec = DATASETS[name]
    max_length = max_prompt_length(cfg)
    max_new = max_new_tokens(cfg, name)
    chat = wants_chat_template(tokenizer, cfg.eval.chat_template)
    newline = name in NEWLINE_STOP_DATASETS
    stops = stop_token_ids(model, tokenizer, ["\n"] if newline else [])
    rows = []
    for index, record in enumerate(tqdm(load_records(path, cfg.eval.get("limit"), spec), desc=name, leave=False)):
        key = f"{name}/{record.get('_id', index)}"
        if key not in predictions:
            input_ids, truncated, compressed = compressed_input(tokenizer, spec, record, max_length, chat, compression)
            pred = greedy_predict(model, tokenizer, input_ids, max_new, pruner, stops, min_new_tokens=int(newline))
            score = sample_score(spec.metric, pred.text, record["answers"], record.get("all_classes"),
                                 first_line=name in FIRST_LINE_DATASETS)
            predictions.add({
                "id": key, "dataset": name, "pred": pred.text, "answers": record["answers"],
                "all_classes": record.get("all_classes"), "length": record.get("length"),
                "truncated": truncated, "score": score, **pred.fields(), **compressed,
            })
        rows.append(predictions.records[key])
    return rows


def run(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None, run_dir: str | Path) -> dict:
    """Predict and score ``cfg.eval.datasets``; writes ``predictions.jsonl`` into ``run_dir``."""
    paths = validate(cfg)
    start = time.perf_counter()
    predictions = PredictionLog(Path(run_dir) / "predictions.jsonl")
    compression = build_compression(cfg, tokenizer)
    scores, rows_all, counts = {}, [], {}
    for name, path in paths.items():
        rows = predict_dataset(cfg, model, tokenizer, pruner, name, path, predictions, compression)
        scores[name] = dataset_score([r["score"] for r in rows])
        counts[name] = len(rows)
        rows_all += rows
        log.info("LongBench %s: %.2f over %d samples", name, scores[name], len(rows))
    return {
        **summarize(scores),
        "num_samples": counts,
        "max_length": max_prompt_length(cfg),
        "max_new_tokens": {name: max_new_tokens(cfg, name) for name in paths},
        "truncated_samples": sum(bool(r["truncated"]) for r in rows_all),
        **cost_summary(rows_all),
        **compression_summary(rows_all),
        "wall_s": round(time.perf_counter() - start, 3),
    }
