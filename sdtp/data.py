"""Training examples: a prompt (what inference prunes) followed by a continuation (what is decoded).

An example is ``(input_ids (S,), split)``: tokens ``[0, split)`` are the prompt, ``[split, S)`` the
continuation. Labels with a ``continuation`` target and the training losses are taken on the
continuation, and training never prunes it, exactly as at inference (prune the prompt, then decode).

A source is a config node ``{name, path, hub, split, format, num_samples, first_doc, last_doc}``.
``path`` is a local jsonl file (the offline mirror in ``${paths.data_dir}``) or a raw text file
(WikiText: blank-line-separated paragraphs are documents); when it is null, ``hub`` names a Hugging
Face dataset for online users. Formats:

* ``instruction``: ``instruction``/``context``/``response`` (Dolly) or ``prompt``/``response``
  records. Prompt = the instruction and context (in the model's chat template when it has one,
  middle-truncated to fit), continuation = the response (truncated to ``continuation_length``).
  Rows are shuffled with the seed first (the Dolly mirror is grouped by category).
* ``passage_qa``: long-document QA built from the Dolly file (:mod:`sdtp.eval.passage_qa`): records
  ``[first_doc, first_doc + num_samples)`` with prompts of about ``max_length - continuation_length``
  tokens, formatted exactly as the evaluation formats them; continuation = the gold answer. Records below
  ``EVAL_RECORDS`` are the evaluation cells and are refused. Teaches the predictor the case where the
  question after a long document decides which passage survives.
* ``longbench``: records ``[first_doc, first_doc + num_samples)`` of a LongBench JSONL (``task`` names the
  prompt template, default the source's ``name``), built exactly as the continuation evaluation builds a
  LongBench cell (:func:`sdtp.eval.continuation.longbench_segments`): the task prompt middle-truncated to
  the prompt budget, in the chat template; continuation = the first gold answer. Records below
  ``EVAL_RECORDS`` are the evaluation cells and are refused. Teaches a task whose relevant tokens do not
  depend on a question (e.g. multi_news summaries), which a per-token predictor can learn.
* ``text``: ``text`` records. Documents are joined with EOS and cut into windows of
  ``max_length`` tokens; the last ``continuation_length`` tokens of each window are its
  continuation. Documents are read in order until the windows are filled, each capped at about
  ``(num_samples / documents + 1)`` windows' worth of characters, so no single book fills them alone (with
  many samples per book the last documents may contribute nothing: e.g. 9 of the 13 books for ``data=mix``).

``passage_qa`` and ``longbench`` prompts get about ``max_length - continuation_length - CHAT_MARGIN``
tokens, or ``context_len`` tokens (plus the chat wrapper) when the source sets it, so long-document
examples can be as long as the evaluation's while text windows stay short.

``first_doc``/``last_doc`` select a document range, so evaluation can hold out the rest. An
``instruction`` source with ``exclude_passage_qa_eval: true`` skips the Dolly rows behind the passage-QA
evaluation records (their question and answer would otherwise be trained on).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtp.errors import ConfigError
from sdtp.utils import read_jsonl_records, read_text_file

log = logging.getLogger(__name__)

FORMATS = ("instruction", "text", "passage_qa", "longbench")
CHAT_MARGIN = 32  # tokens left for the chat wrapper around a passage-QA prompt
CHARS_PER_TOKEN = 6  # generous upper bound, used only to cap how much of a long document is tokenised
Example = tuple[torch.Tensor, int]  # (input_ids (S,), split)


def _local_records(path: Path, key: str, limit: int | None) -> Iterable[Mapping[str, Any]]:
    """Records of a jsonl file (strict: errors name ``key``, the file and the line), or the
    blank-line-separated documents of a raw text file (WikiText)."""
    if path.suffix == ".jsonl":
        return [record for _, record in read_jsonl_records(path, f"{key}.path", limit)]
    # WikiText's blank lines hold a space (" \n"): split on lines that are empty once stripped.
    blocks = re.split(r"\n[ \t]*\n", read_text_file(path, f"{key}.path"))
    return [{"text": block.strip()} for block in blocks if block.strip()]


def _hub_records(name: str, split: str) -> Iterable[Mapping[str, Any]]:
    from datasets import load_dataset

    return load_dataset(name, split=split, streaming=True)


def validate_data(data: Mapping[str, Any], sources: bool = True) -> None:
    """The ``data`` group: window lengths (always) and, with ``sources``, every source (files read when labelling)."""
    if int(data["max_length"]) < 8:
        raise ConfigError(f"data.max_length: {data['max_length']} is too short (>= 8)")
    if not 0 < int(data["continuation_length"]) < int(data["max_length"]):
        raise ConfigError("data.continuation_length: must be in (0, data.max_length), "
                          f"got {data['continuation_length']}")
    for i, source in enumerate(data["sources"] if sources else []):
        validate_source(source, f"data.sources.{i}")


def validate_source(source: Mapping[str, Any], key: str) -> None:
    """ConfigError naming ``key`` when a source is unusable (before any model work)."""
    if source.get("format") not in FORMATS:
        raise ConfigError(f"{key}.format: {source.get('format')!r} not in {FORMATS}")
    path = source.get("path")
    if path is None and not source.get("hub"):
        raise ConfigError(f"{key}: give a local `path` or a hub dataset name `hub`")
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{key}.path: {path} does not exist (set paths.data_dir or SDTP_DATA_DIR)")
    if path is not None and Path(path).stat().st_size == 0:
        raise ConfigError(f"{key}.path: {path} is empty")
    if int(source.get("num_samples", 0)) < 1:
        raise ConfigError(f"{key}.num_samples: must be >= 1")
    if source["format"] in HELD_OUT_BUILDERS:
        _validate_held_out(source, key)
    if source["format"] == "longbench":
        _validate_longbench_task(source, key)
    if source.get("exclude_passage_qa_eval") and path is None:
        raise ConfigError(f"{key}.exclude_passage_qa_eval: needs the local Dolly-15k file the records are built from")


def _validate_held_out(source: Mapping[str, Any], key: str) -> None:
    """A source built like the evaluation cells: local file, no evaluation record, a usable prompt budget."""
    from sdtp.eval.passage_qa import EVAL_RECORDS

    if source.get("path") is None:
        raise ConfigError(f"{key}.path: format {source['format']} is built from a local jsonl file")
    if int(source.get("first_doc") or 0) < EVAL_RECORDS:
        raise ConfigError(f"{key}.first_doc: records [0, {EVAL_RECORDS}) are the evaluation cells "
                          f"(test 0..63, validation 64..127); start training at {EVAL_RECORDS} or later")
    if source.get("context_len") is not None and int(source["context_len"]) < 16:
        raise ConfigError(f"{key}.context_len: must be >= 16, got {source['context_len']}")


def _validate_longbench_task(source: Mapping[str, Any], key: str) -> None:
    from sdtp.eval.longbench_tasks import DATASETS as TASKS

    task = longbench_task(source)
    if task not in TASKS:
        raise ConfigError(f"{key}.task: {task!r} is not a LongBench task ({', '.join(sorted(TASKS))})")


def longbench_task(source: Mapping[str, Any]) -> str | None:
    """The LongBench task whose template a ``longbench`` source uses: ``task``, by default its ``name``."""
    return source.get("task") or source.get("name")


def source_records(source: Mapping[str, Any], key: str = "data.sources") -> list[Mapping[str, Any]]:
    """The records ``[first_doc, last_doc)`` of a source; ConfigError naming the file on a bad schema."""
    first, last = int(source.get("first_doc") or 0), source.get("last_doc")
    if source.get("path") is not None:
        records = _local_records(Path(source["path"]), key, int(last) if last is not None else None)
    else:
        records = _hub_records(source["hub"], source.get("split", "train"))
    out = []
    for index, record in enumerate(records):
        if last is not None and index >= int(last):
            break
        if index >= first:
            out.append(record)
    where = source.get("path") or source.get("hub")
    needed = ("text",) if source["format"] == "text" else ("response",)
    missing = [k for k in needed if out and k not in out[0]]
    if not out or missing:
        raise ConfigError(f"{key}: {where} has no usable records (format={source['format']} needs fields {needed})")
    return out


def source_fingerprint(source: Mapping[str, Any]) -> str:
    """Content hash of a local source file (sha256), or the hub name/split for remote data."""
    if source.get("path") is None:
        return f"hub:{source['hub']}:{source.get('split', 'train')}"
    digest = hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
    return f"sha256:{digest}"


def data_identity(data: DictConfig) -> dict[str, Any]:
    """What decides the examples of ``data``: every setting, each source's content hash instead of its path
    (the same file in another clone matches). Recorded with stored labels and checked by training."""
    sources = [{**{k: v for k, v in OmegaConf.to_container(s, resolve=True).items() if k != "path"},
                "fingerprint": source_fingerprint(s)} for s in data.sources]
    settings = {k: v for k, v in OmegaConf.to_container(data, resolve=True).items() if k != "sources"}
    return {**settings, "sources": sources}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _prompt_ids(tokenizer: Any, record: Mapping[str, Any], chat_template: bool) -> list[int]:
    """An instruction record's prompt ids: in the chat template (which writes its own special tokens), or as
    plain text with the tokenizer's own (e.g. BOS: a base model reads every prompt after it, as
    :func:`sdtp.eval.predict.encode` gives it at evaluation)."""
    if "prompt" in record:  # already formatted (e.g. Dolly/HH-RLHF mix)
        return _encode(tokenizer, str(record["prompt"]))
    user = "\n\n".join(str(record[k]) for k in ("instruction", "context") if record.get(k))
    if chat_template and getattr(tokenizer, "chat_template", None):
        return _encode(tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                                add_generation_prompt=True))
    return tokenizer(user + "\n\n").input_ids


def middle_truncate_ids(ids: list[int], length: int) -> list[int]:
    """The first ``length // 2`` and last ``length - length // 2`` token ids (LongBench's rule, on ids:
    :func:`sdtp.eval.longbench.truncate_middle` applies it to a prompt's text)."""
    if len(ids) <= length:
        return ids
    head = length // 2
    return ids[:head] + ids[len(ids) - (length - head):]


def _behind_passage_qa_eval(records: list[Mapping[str, Any]], path: str | Path) -> list[bool]:
    """Per record: is it (by instruction and context) a Dolly row behind a passage-QA evaluation record?"""
    from sdtp.eval.passage_qa import evaluation_questions

    held_out = evaluation_questions(path)
    return [(str(r.get("instruction", "")).strip(), str(r.get("context", "")).strip()) in held_out for r in records]


def _without_passage_qa_eval(records: list[Mapping[str, Any]], path: str | Path) -> list[Mapping[str, Any]]:
    return [r for r, behind in zip(records, _behind_passage_qa_eval(records, path)) if not behind]


def _warn_passage_qa_overlap(records: list[Mapping[str, Any]], path: str | Path, key: str) -> None:
    """Warn when ``records`` hold the Dolly rows behind the passage-QA evaluation records: the shipped recipes
    (``data=mix``, ``mix_news``) predate ``exclude_passage_qa_eval`` and sample some of them, and a predictor
    trained on a record's question and answer no longer scores that record as held-out data."""
    shared = sum(_behind_passage_qa_eval(records, path))
    if shared:
        log.warning("%s: %d of its rows are behind passage-QA evaluation records, and training may sample them; "
                    "set %s.exclude_passage_qa_eval=true to hold them out", key, shared, key)


def instruction_examples(tokenizer: Any, records: list[Mapping[str, Any]], data: Mapping[str, Any],
                         num_samples: int, seed: int) -> list[Example]:
    """Prompt = instruction (+ context), continuation = response; prompts shorter than
    ``min_prompt_length`` tokens are skipped (too little to prune)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cont_len, max_len = int(data["continuation_length"]), int(data["max_length"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples: list[Example] = []
    for index in order:
        record = records[index]
        prompt = _prompt_ids(tokenizer, record, bool(data.get("chat_template", True)))
        response = (_encode(tokenizer, str(record.get("response", ""))) + eos)[:cont_len]
        if len(prompt) < int(data.get("min_prompt_length", 16)) or len(response) < 2:
            continue
        prompt = middle_truncate_ids(prompt, max_len - len(response))
        examples.append((torch.tensor(prompt + response), len(prompt)))
        if len(examples) >= num_samples:
            break
    return examples


def text_examples(tokenizer: Any, records: list[Mapping[str, Any]], data: Mapping[str, Any],
                  num_samples: int) -> list[Example]:
    """EOS-joined documents cut into ``max_length`` windows; the last ``continuation_length``
    tokens of each window are its continuation."""
    window, cont_len = int(data["max_length"]), int(data["continuation_length"])
    per_doc_chars = (math.ceil(num_samples / len(records)) + 1) * window * CHARS_PER_TOKEN
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for record in records:
        stream += _encode(tokenizer, str(record["text"])[:per_doc_chars]) + eos
        if len(stream) >= num_samples * window:
            break
    starts = range(0, len(stream) - window + 1, window)
    return [(torch.tensor(stream[s : s + window]), window - cont_len) for s in list(starts)[:num_samples]]


def _prompt_budget(source: Mapping[str, Any], data: Mapping[str, Any]) -> int:
    """Prompt tokens of a ``passage_qa`` / ``longbench`` example (before the chat wrapper)."""
    if source.get("context_len") is not None:
        return int(source["context_len"])
    return int(data["max_length"]) - int(data["continuation_length"]) - CHAT_MARGIN


def _chat(tokenizer: Any, data: Mapping[str, Any]) -> bool:
    from sdtp.eval.predict import wants_chat_template

    return wants_chat_template(tokenizer, "auto" if data.get("chat_template", True) else False)


def _segment_examples(segments: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Example]:
    """(1, P) prompt and (1, C) continuation segments -> (P + C,) ids with split P."""
    return [(torch.cat([prompt[0], answer[0]]), prompt.shape[1]) for prompt, answer in segments]


def passage_qa_examples(tokenizer: Any, source: Mapping[str, Any], data: Mapping[str, Any]) -> list[Example]:
    """Passage-QA records ``[first_doc, first_doc + num_samples)`` as the continuation evaluation builds them
    (``sdtp.eval.continuation.passage_qa_cell``): prompt = chat-formatted passages + question of
    :func:`_prompt_budget` tokens; continuation = the gold answer."""
    from sdtp.eval.continuation import passage_qa_cell

    _, segments = passage_qa_cell(source["path"], tokenizer, _prompt_budget(source, data),
                                  int(data["continuation_length"]), int(source.get("first_doc") or 0),
                                  int(source["num_samples"]), _chat(tokenizer, data))
    return _segment_examples(segments)


def longbench_examples(tokenizer: Any, source: Mapping[str, Any], data: Mapping[str, Any]) -> list[Example]:
    """LongBench records ``[first_doc, first_doc + num_samples)`` as the continuation evaluation builds a
    LongBench cell (``sdtp.eval.continuation.longbench_segments``); continuation = the first gold answer."""
    from sdtp.eval.continuation import longbench_segments

    segments = longbench_segments(source["path"], longbench_task(source), tokenizer,
                                  _prompt_budget(source, data), int(data["continuation_length"]),
                                  int(source["num_samples"]), _chat(tokenizer, data), int(source.get("first_doc") or 0))
    return _segment_examples(segments)


# Formats built exactly like an evaluation cell (whose records they refuse), from the whole source at once.
HELD_OUT_BUILDERS = {"passage_qa": passage_qa_examples, "longbench": longbench_examples}


def build_examples(tokenizer: Any, data: Mapping[str, Any], seed: int) -> list[Example]:
    """Every source's examples, interleaved by a seeded permutation (so any tail is a mix)."""
    examples: list[Example] = []
    for i, source in enumerate(data["sources"]):
        if source["format"] in HELD_OUT_BUILDERS:
            examples += HELD_OUT_BUILDERS[source["format"]](tokenizer, source, data)
            continue
        records = source_records(source, f"data.sources.{i}")
        count = int(source["num_samples"])
        if source["format"] == "instruction":
            if source.get("exclude_passage_qa_eval"):
                records = _without_passage_qa_eval(records, source["path"])
            elif source.get("path") is not None:
                _warn_passage_qa_overlap(records, source["path"], f"data.sources.{i}")
            examples += instruction_examples(tokenizer, records, data, count, seed)
        else:
            examples += text_examples(tokenizer, records, data, count)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order]


def examples_hash(examples: list[Example]) -> str:
    """sha256 over every example's tokens and split: what a label set or checkpoint was made from."""
    digest = hashlib.sha256()
    for ids, split in examples:
        digest.update(ids.numpy().astype("int64").tobytes())
        digest.update(int(split).to_bytes(8, "little"))
    return digest.hexdigest()
