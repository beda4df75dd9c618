"""On-disk saliency labels: safetensors shards + ``meta.json`` describing what produced them.

Layout of a label directory::

    meta.json                 model, layer schedule, data sources + content hashes, tokenizer, ...
    shard_00000.safetensors   input_ids (n, L) int64 right-padded with 0, lengths (n,), saliency (n, L, S) fp32
    shard_00001.safetensors   ...

Shards are written atomically and in order, so a killed labelling run resumes at the first missing
shard. Re-running against a directory whose ``meta.json`` differs in any identity field (anything
but ``num_sequences``) raises :class:`ConfigError` instead of silently mixing labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtp.errors import ConfigError
from sdtp.utils import write_json_atomic

META_FILE = "meta.json"
VOLATILE_KEYS = ("num_sequences", "source_paths")  # allowed to differ between a run and its resume


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.safetensors"


def check_or_write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` for a new directory, or raise if an existing one disagrees."""
    directory = Path(directory)
    path = directory / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = sorted(
            key for key in set(old) | set(meta)
            if key not in VOLATILE_KEYS and old.get(key) != json.loads(json.dumps(meta.get(key)))
        )
        if diffs:
            details = "; ".join(f"{k}: existing={old.get(k)!r} vs config={meta.get(k)!r}" for k in diffs[:4])
            raise ConfigError(
                f"label.out_dir: {directory} holds labels made with a different config ({details}); "
                "use another label.out_dir or delete it"
            )
        return
    write_json_atomic(path, meta)


def completed_shards(directory: str | Path) -> int:
    """Number of leading shards present (the resume point)."""
    index = 0
    while shard_path(Path(directory), index).is_file():
        index += 1
    return index


def write_shard(directory: str | Path, index: int, sequences: list[torch.Tensor], saliency: list[torch.Tensor]) -> Path:
    """Save one shard. ``sequences[i]``: (L_i,) ids; ``saliency[i]``: (L_i, S) labels."""
    max_len = max(seq.shape[0] for seq in sequences)
    stages = saliency[0].shape[-1]
    ids = torch.zeros(len(sequences), max_len, dtype=torch.long)
    sal = torch.zeros(len(sequences), max_len, stages, dtype=torch.float32)
    for row, (seq, lab) in enumerate(zip(sequences, saliency)):
        ids[row, : seq.shape[0]] = seq
        sal[row, : seq.shape[0]] = lab.float()
    lengths = torch.tensor([seq.shape[0] for seq in sequences], dtype=torch.long)
    path = shard_path(Path(directory), index)
    tmp = path.with_suffix(".tmp")
    save_file({"input_ids": ids, "lengths": lengths, "saliency": sal}, str(tmp))
    tmp.replace(path)
    return path


def load_labels(directory: str | Path) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(meta, [(ids (L,), saliency (L, S)), ...]) in labelling order."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"train.labels_dir: no labels at {directory} (run `sdtp-label` first)")
    meta = json.loads(meta_path.read_text())
    items: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index in range(completed_shards(directory)):
        shard = load_file(str(shard_path(directory, index)))
        for row, length in enumerate(shard["lengths"].tolist()):
            items.append((shard["input_ids"][row, :length], shard["saliency"][row, :length]))
    return meta, items
