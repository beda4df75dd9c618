"""Training text: instruction data (Dolly-style) and plain text (C4, WikiText), tokenized to fixed length.

A source is a config node ``{path, hub, split, format, num_samples}``. ``path`` is a local file
(jsonl or raw text, the offline mirror in ``${paths.data_dir}``); when it is null, ``hub`` names a
Hugging Face dataset for online users. Formats:

* ``instruction``: ``prompt``/``response`` or ``instruction``/``context``/``response`` records;
* ``text``: ``text`` records (jsonl) or a raw text file whose blank-line-separated paragraphs are
  documents (WikiText).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdtp.errors import ConfigError

FORMATS = ("instruction", "text")


def record_text(record: Mapping[str, Any], fmt: str) -> str:
    """One training string from a record of either supported schema."""
    if fmt == "text":
        return str(record["text"])
    if "prompt" in record:
        return f"{record['prompt']}{record.get('response', '')}"
    parts = [record.get("instruction", ""), record.get("context", ""), record.get("response", "")]
    return "\n\n".join(str(p) for p in parts if p)


def _local_records(path: Path, fmt: str) -> Iterable[Mapping[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        return
    # Raw text (WikiText): documents are separated by blank lines.
    for block in path.read_text().split("\n\n"):
        if block.strip():
            yield {"text": block.strip()}


def _hub_records(name: str, split: str) -> Iterable[Mapping[str, Any]]:
    from datasets import load_dataset

    return load_dataset(name, split=split, streaming=True)


def validate_source(source: Mapping[str, Any], key: str) -> None:
    """ConfigError naming ``key`` when a source is unusable (before any model work)."""
    if source.get("format") not in FORMATS:
        raise ConfigError(f"{key}.format: {source.get('format')!r} not in {FORMATS}")
    path = source.get("path")
    if path is None and not source.get("hub"):
        raise ConfigError(f"{key}: give a local `path` or a hub dataset name `hub`")
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{key}.path: {path} does not exist (set paths.data_dir or SDTP_DATA_DIR)")
    if int(source.get("num_samples", 0)) < 1:
        raise ConfigError(f"{key}.num_samples: must be >= 1")


def source_texts(source: Mapping[str, Any]) -> list[str]:
    """The first ``num_samples`` non-empty texts of a source."""
    fmt = source["format"]
    if source.get("path") is not None:
        records = _local_records(Path(source["path"]), fmt)
    else:
        records = _hub_records(source["hub"], source.get("split", "train"))
    texts: list[str] = []
    for record in records:
        text = record_text(record, fmt)
        if text.strip():
            texts.append(text)
        if len(texts) >= int(source["num_samples"]):
            break
    return texts


def source_fingerprint(source: Mapping[str, Any]) -> str:
    """Content hash of a local source file (sha256), or the hub name/split for remote data."""
    if source.get("path") is None:
        return f"hub:{source['hub']}:{source.get('split', 'train')}"
    digest = hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
    return f"sha256:{digest}"


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int, packing: bool, min_length: int = 16) -> list[torch.Tensor]:
    """Token sequences of at most ``max_length``.

    ``packing=False`` truncates each text (shorter than ``min_length`` tokens are skipped);
    ``packing=True`` joins all texts with EOS and cuts the stream into full ``max_length`` chunks.
    """
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    if not packing:
        return [torch.tensor(ids[:max_length]) for ids in encoded if len(ids) >= min_length]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids + ([eos] if eos is not None else []))
    return [torch.tensor(stream[i : i + max_length]) for i in range(0, len(stream) - max_length + 1, max_length)]
