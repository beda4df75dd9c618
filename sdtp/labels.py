"""On-disk saliency labels: safetensors shards + ``meta.json`` describing what produced them.

Layout of a label directory::

    meta.json                 model, dtype, target, data sources + content hashes, examples hash, ...
    shard_00000.safetensors   input_ids (n, S) int64 right-padded with 0, lengths (n,), splits (n,),
                              saliency (n, S, num_layers) fp32 raw label at EVERY layer
    shard_00001.safetensors   ...

Labels (any ``saliency.target`` of :mod:`sdtp.saliency`) are stored at every decoder layer's input, raw
(signed, not normalised), so any schedule and any label transform
(:func:`transform_labels`) reuse them. Shards are written atomically (by whichever rank of a
``torchrun`` job labelled them), so a killed labelling run resumes with the missing shards; each
shard carries the hash of ``meta.json``.
Loading refuses a folder whose shard count does not match ``meta.num_sequences`` (a partial run) or
whose shards carry another meta hash (copied from another run); re-labelling into a directory whose
``meta.json`` differs in any identity field raises :class:`ConfigError` instead of mixing labels.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtp.errors import ConfigError
from sdtp.utils import atomic_path, write_json_atomic

META_FILE = "meta.json"
VOLATILE_KEYS = ("source_paths",)  # allowed to differ between a run and its resume
TRANSFORMS = ("log_z", "max", "signed")


def meta_hash(meta: dict[str, Any]) -> str:
    """Hash of the identity fields of a label set's meta (what every shard must agree with)."""
    identity = {k: v for k, v in meta.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                f"out_dir: {directory} holds labels made with a different config ({details}); "
                "use another out_dir or delete it"  # sdtp-label's top-level key (conf/label.yaml), not label.*
            )
        return
    write_json_atomic(path, meta)


def completed_shards(directory: str | Path) -> int:
    """Number of leading shards present (the resume point)."""
    index = 0
    while shard_path(Path(directory), index).is_file():
        index += 1
    return index


def write_shard(directory: str | Path, index: int, sequences: list[torch.Tensor], splits: list[int],
                saliency: list[torch.Tensor], digest: str) -> Path:
    """Save one shard. ``sequences[i]``: (L_i,) ids; ``splits[i]``: prompt length; ``saliency[i]``:
    (L_i, num_layers) labels; ``digest``: :func:`meta_hash` of the label set."""
    max_len = max(seq.shape[0] for seq in sequences)
    stages = saliency[0].shape[-1]
    ids = torch.zeros(len(sequences), max_len, dtype=torch.long)
    sal = torch.zeros(len(sequences), max_len, stages, dtype=torch.float32)
    for row, (seq, lab) in enumerate(zip(sequences, saliency)):
        ids[row, : seq.shape[0]] = seq
        sal[row, : seq.shape[0]] = lab.float()
    lengths = torch.tensor([seq.shape[0] for seq in sequences], dtype=torch.long)
    path = shard_path(Path(directory), index)
    tensors = {"input_ids": ids, "lengths": lengths, "splits": torch.tensor(splits, dtype=torch.long), "saliency": sal}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta_hash": digest})
    return path


def load_labels(directory: str | Path) -> tuple[dict[str, Any], list[tuple[torch.Tensor, int, torch.Tensor]]]:
    """(meta, [(ids (L,), split, saliency (L, num_layers)), ...]) in labelling order.

    Raises:
        ConfigError: no labels, a partial folder, or shards from another label set.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"train.labels_dir: no labels at {directory} (run `sdtp-label` first)")
    meta = json.loads(meta_path.read_text())
    expected = math.ceil(int(meta["num_sequences"]) / int(meta["shard_size"]))
    found = completed_shards(directory)
    if found != expected:
        raise ConfigError(f"train.labels_dir: {directory} holds {found} of {expected} shards "
                          "(an unfinished labelling run: re-run the same `sdtp-label` command to complete it)")
    digest = meta_hash(meta)
    items: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for index in range(found):
        path = shard_path(directory, index)
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("meta_hash") != digest:
                raise ConfigError(f"train.labels_dir: {path} was made for another label set (meta hash mismatch)")
        shard = load_file(str(path))
        for row, (length, split) in enumerate(zip(shard["lengths"].tolist(), shard["splits"].tolist())):
            items.append((shard["input_ids"][row, :length], int(split), shard["saliency"][row, :length]))
    if len(items) != int(meta["num_sequences"]):
        raise ConfigError(f"train.labels_dir: {directory} holds {len(items)} sequences, meta.json says {meta['num_sequences']}")
    return meta, items


def transform_labels(raw: torch.Tensor, region: torch.Tensor, mode: str) -> torch.Tensor:
    """Raw signed labels (B, S, K) -> training targets, per (row, layer) over the ``region`` tokens.

    ``log_z``: z-scored ``log(|s| + 1e-6 * max|s|)``. Saliency is heavy-tailed (a few tokens hold
    most of it), so on a linear scale almost every token sits near 0 and the score spread a predictor
    learns is tiny next to the selection noise; in log space the spread is about one unit per
    e-fold. ``max``: ``|s| / max|s|`` in [0, 1] (the method reference's suggestion). ``signed``:
    z-scored ``asinh(s / median|s|)``, a sign-keeping log scale for targets whose sign matters
    (``mask``: a token whose removal lowers the loss should rank below one that is merely unused).

    Args:
        region: (B, S) bool, the tokens a stage may choose among (prompt, not protected).
    """
    if mode not in TRANSFORMS:
        raise ValueError(f"train.label_transform: {mode!r} not in {TRANSFORMS}")
    weight = region[..., None].float()
    mag = raw.abs().float() * weight
    peak = mag.amax(dim=1, keepdim=True).clamp(min=1e-30)
    if mode == "max":
        return mag / peak
    count = weight.sum(1, keepdim=True).clamp(min=1)
    if mode == "signed":
        scale = torch.stack([_region_median(mag[b], region[b]) for b in range(raw.shape[0])])[:, None, :]
        values = torch.asinh(raw.float() / scale.clamp(min=1e-30)) * weight
        mean = values.sum(1, keepdim=True) / count
        std = ((((values - mean) ** 2) * weight).sum(1, keepdim=True) / count).sqrt().clamp(min=1e-6)
        return (values - mean) / std * weight
    logs = torch.log(mag + 1e-6 * peak)
    mean = (logs * weight).sum(1, keepdim=True) / count
    std = ((((logs - mean) ** 2) * weight).sum(1, keepdim=True) / count).sqrt().clamp(min=1e-6)
    return (logs - mean) / std * weight


def _region_median(mag: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(S, K) magnitudes, (S,) bool -> (K,) median over the region (1 if the region is empty)."""
    if not bool(region.any()):
        return torch.ones(mag.shape[-1], device=mag.device)
    return mag[region].median(dim=0).values
