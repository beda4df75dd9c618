"""``sdtp-label``: saliency labels (``saliency.target``) at every decoder layer, for predictor training.

    sdtp-label model=smollm2-135m data=mix threads=2
    sdtp-train train.labels=stored                     # then train from them (any schedule)

Runs the full, frozen model on padded batches of examples, computes the configured target once
(:mod:`sdtp.saliency`: one forward for the attention targets, forward + backward for the gradient x input
ones) and stores the raw saliency at every layer's input as shards in
``out_dir`` (:mod:`sdtp.labels`). Re-running labels the missing shards only; a directory made
with a different config is an error. The last stdout line is a JSON summary.

Data parallel: ``torchrun --nproc_per_node=N -m sdtp.cli.label ...`` gives rank r the shards
r, r + N, ... (each written atomically by the rank that labelled it, the same bytes one process
writes); rank 0 writes ``meta.json`` and the summary. ``out_dir`` must be on a filesystem every
node sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from sdtp.config import sdtp_main
from sdtp.data import build_examples, data_identity, examples_hash, validate_data
from sdtp.distributed import World, check_enough_items, check_world, on_main, process_group, reduce_floats, \
    require_shared, shard
from sdtp.errors import ConfigError
from sdtp.labels import META_FILE, check_or_write_meta, meta_hash, shard_path, write_shard
from sdtp.models import load_model
from sdtp.models.loading import model_identity
from sdtp.saliency import TARGETS, saliency_scores
from sdtp.training.loop import collate
from sdtp.utils import set_threads

log = logging.getLogger(__name__)


def validate_label_config(cfg: DictConfig) -> None:
    validate_data(cfg.data)
    if cfg.saliency.target not in TARGETS:
        raise ConfigError(f"saliency.target: {cfg.saliency.target!r} not in {TARGETS}")
    for key in ("shard_size", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    check_world(World.from_env(), cfg.distributed, str(cfg.model.device))


def vocab_sha256(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary (its identity; the folder it was loaded from is not)."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def label_meta(cfg: DictConfig, num_layers: int, tokenizer: Any, examples: list, dtype: torch.dtype) -> dict[str, Any]:
    """Everything that must match for two labelling runs to share a directory (and a training run to use it)."""
    return {
        "base_model": cfg.model.name,
        "model": model_identity(cfg.model),
        "hf_id": cfg.model.get("hf_id"),
        "dtype": str(dtype).removeprefix("torch."),
        "layers": list(range(num_layers)),
        "num_layers": num_layers,
        "tokenizer": {"vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256(tokenizer)},
        "data": data_identity(cfg.data),
        "examples_hash": examples_hash(examples),
        "saliency": {"target": cfg.saliency.target, "stored": "raw, signed, every layer's input"},
        "seed": int(cfg.seed),
        "shard_size": int(cfg.shard_size),
        "num_sequences": len(examples),
        "source_paths": [s.get("path") for s in cfg.data.sources],
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, then label: in one process, or this rank's shards of a ``torchrun`` job."""
    validate_label_config(cfg)
    with process_group(World.from_env(), cfg.distributed, str(cfg.model.device)) as world:
        return label(cfg, world)


def label(cfg: DictConfig, world: World = World()) -> dict[str, Any]:
    """Write every missing shard of this rank (all of them in one process); rank 0 prints the summary."""
    set_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval()
    examples = build_examples(tokenizer, cfg.data, int(cfg.seed))
    if not examples:
        raise ConfigError("data.sources: no usable example (check num_samples, min_prompt_length, max_length)")
    param = next(model.parameters())
    size, batch_size = int(cfg.shard_size), int(cfg.batch_size)
    num_shards = (len(examples) + size - 1) // size
    check_enough_items(world, num_shards, 1, "label shards", "shard_size")
    meta = label_meta(cfg, int(cfg.model.num_layers), tokenizer, examples, param.dtype)
    on_main(lambda: check_or_write_meta(cfg.out_dir, meta), world)
    require_shared(Path(cfg.out_dir, META_FILE), world, "out_dir")
    digest = meta_hash(meta)
    # Shards are written atomically, so one that exists is complete (a killed run leaves gaps, not halves).
    todo = [k for k in shard(range(num_shards), world) if not shard_path(Path(cfg.out_dir), k).is_file()]
    log.info("Labelling %d examples into %s (%d of %d shards to do on this rank)", len(examples), cfg.out_dir,
             len(todo), num_shards)
    tokens, begin = 0, time.perf_counter()
    bar = tqdm(total=sum(len(examples[k * size : (k + 1) * size]) for k in todo), desc="label", unit="seq",
               disable=not world.is_main)
    for index in todo:
        chunk = examples[index * size : (index + 1) * size]
        labels: list[torch.Tensor] = []
        for first in range(0, len(chunk), batch_size):
            batch = collate(chunk[first : first + batch_size])
            sal = saliency_scores(model, batch.ids.to(param.device), None, cfg.saliency.target, absolute=False,
                                  normalize=False, valid=batch.valid.to(param.device), split=batch.split)
            labels += [sal[row, : len(ids)].cpu() for row, (ids, _) in enumerate(chunk[first : first + batch_size])]
            tokens += int(batch.valid.sum())
            bar.update(len(batch.split))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - begin):.0f}")
        write_shard(cfg.out_dir, index, [ids for ids, _ in chunk], [s for _, s in chunk], labels, digest)
    bar.close()
    # A collective: rank 0 reports only once every rank has written its shards.
    tokens = int(reduce_floats({"tokens": tokens}, world, mean=False)["tokens"])
    summary = {"out_dir": str(cfg.out_dir), "num_sequences": len(examples), "num_shards": num_shards,
               "labelled_tokens_this_run": tokens, "seconds": round(time.perf_counter() - begin, 1),
               "model": cfg.model.name, "target": cfg.saliency.target, "world_size": world.size}
    if world.is_main:
        print(json.dumps(summary))
    return summary


@sdtp_main("label")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
