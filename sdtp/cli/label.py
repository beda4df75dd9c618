"""``sdtp-label``: gradient x input saliency labels for predictor training.

    sdtp-label model=smollm2-135m data=dolly_c4 threads=1

Runs the full, frozen model on each sequence, backpropagates the configured scalar and stores the
per-stage saliency (see :mod:`sdtp.saliency`) as shards in ``out_dir``. Re-running resumes at the
first missing shard; a directory made with a different config is an error. The last stdout line is
a JSON summary.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sdtp.config import build_schedule, sdtp_main
from sdtp.data import source_fingerprint, source_texts, tokenize_texts, validate_source
from sdtp.errors import ConfigError
from sdtp.labels import check_or_write_meta, completed_shards, write_shard
from sdtp.models import load_model
from sdtp.saliency import TARGETS, saliency_scores
from sdtp.utils import set_threads

log = logging.getLogger(__name__)


def validate_label_config(cfg: DictConfig) -> None:
    for i, source in enumerate(cfg.data.sources):
        validate_source(source, f"data.sources.{i}")
    if int(cfg.data.max_length) < 8:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} is too short (>= 8)")
    if cfg.saliency.target not in TARGETS:
        raise ConfigError(f"saliency.target: {cfg.saliency.target!r} not in {TARGETS}")
    if int(cfg.shard_size) < 1:
        raise ConfigError("shard_size: must be >= 1")


def build_sequences(cfg: DictConfig, tokenizer: Any) -> list[torch.Tensor]:
    """All sources' token sequences, interleaved by a seeded permutation (so any tail is a mix)."""
    sequences: list[torch.Tensor] = []
    for source in cfg.data.sources:
        texts = source_texts(source)
        sequences += tokenize_texts(tokenizer, texts, int(cfg.data.max_length), bool(cfg.data.packing),
                                    int(cfg.data.min_length))
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(int(cfg.seed)))
    return [sequences[i] for i in order.tolist()]


def label_meta(cfg: DictConfig, layers: list[int], tokenizer: Any, num_sequences: int) -> dict[str, Any]:
    """Everything that must match for two labelling runs to share a directory."""
    # Identity is the content hash, not the path: the same file in another clone/location matches.
    sources = [
        {**{k: v for k, v in OmegaConf.to_container(s, resolve=True).items() if k != "path"},
         "fingerprint": source_fingerprint(s)} for s in cfg.data.sources
    ]
    return {
        "base_model": cfg.model.name,
        "hf_id": cfg.model.get("hf_id"),
        "layers": layers,
        "num_layers": int(cfg.model.num_layers),
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer)},
        "data": {"name": cfg.data.name, "sources": sources, "max_length": int(cfg.data.max_length),
                 "packing": bool(cfg.data.packing), "min_length": int(cfg.data.min_length)},
        "saliency": OmegaConf.to_container(cfg.saliency, resolve=True),
        "seed": int(cfg.seed),
        "shard_size": int(cfg.shard_size),
        "num_sequences": num_sequences,
        "source_paths": [s.get("path") for s in cfg.data.sources],
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_label_config(cfg)
    set_threads(cfg.threads)
    layers = list(build_schedule(cfg).layers)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval()
    sequences = build_sequences(cfg, tokenizer)
    meta = label_meta(cfg, layers, tokenizer, len(sequences))
    check_or_write_meta(cfg.out_dir, meta)
    size = int(cfg.shard_size)
    num_shards = (len(sequences) + size - 1) // size
    start = completed_shards(cfg.out_dir)
    log.info("Labelling %d sequences into %s (%d/%d shards done)", len(sequences), cfg.out_dir, start, num_shards)
    device = next(model.parameters()).device
    tokens, begin = 0, time.perf_counter()
    bar = tqdm(total=len(sequences), initial=min(start * size, len(sequences)), desc="label", unit="seq")
    for shard in range(start, num_shards):
        batch = sequences[shard * size : (shard + 1) * size]
        labels = []
        for seq in batch:  # one sequence at a time: peak memory is one forward + backward
            sal = saliency_scores(model, seq[None].to(device), layers, cfg.saliency.target,
                                  cfg.saliency.absolute, cfg.saliency.normalize)
            labels.append(sal[0].cpu())
            tokens += seq.shape[0]
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - begin):.0f}")
        write_shard(cfg.out_dir, shard, batch, labels)
    bar.close()
    summary = {"out_dir": str(cfg.out_dir), "num_sequences": len(sequences), "num_shards": num_shards,
               "layers": layers, "labelled_tokens_this_run": tokens,
               "seconds": round(time.perf_counter() - begin, 1), "model": cfg.model.name}
    print(json.dumps(summary))
    return summary


@sdtp_main("label")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
