"""Training checkpoints that know what produced them.

A checkpoint holds the predictor (fp32 master weights), optimizer, scheduler and RNG states, the
step, and a *signature*: model, schedule, data hash, label target and every training setting that
changes the result. ``resume=true`` refuses a checkpoint whose signature differs, naming the keys,
instead of silently continuing another run's weights under a new label. A data-parallel run
(:mod:`sdtp.distributed`) also stores the other ranks' RNG states, so each rank resumes its own streams.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdtp.errors import ConfigError
from sdtp.provenance import leaf_changes
from sdtp.utils import atomic_path, write_text_atomic

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, step: int, signature: dict[str, Any], predictor: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: dict[str, torch.Generator],
                    rank_rng: Sequence[dict[str, torch.Tensor]] = ()) -> None:
    """Write atomically (temporary file + rename).

    Args:
        rng: this process's (rank 0's) generators; rank_rng: the generator states of ranks 1, 2, ...
    """
    state = {"step": step, "signature": json.dumps(signature, sort_keys=True, default=str),
             "predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": {name: gen.get_state() for name, gen in rng.items()}}
    if rank_rng:
        state["rank_rng"] = list(rank_rng)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, signature: dict[str, Any], predictor: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: dict[str, torch.Generator],
                    rank: int = 0) -> int:
    """Restore everything in place (``rng`` from rank ``rank``'s states) and return the step;
    ConfigError if the signature differs."""
    try:
        # On the CPU: load_state_dict moves each tensor to its parameter's device (rank r's GPU).
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ConfigError(f"resume: cannot read the checkpoint {path} ({exc})") from exc
    old = json.loads(state.get("signature", "{}"))
    new = json.loads(json.dumps(signature, sort_keys=True, default=str))
    changes, more = leaf_changes(old, new, shown=4)  # dotted leaves, e.g. train.optimizer.lr, not two whole dicts
    if changes:
        detail = "; ".join(f"{k}: checkpoint={was!r} vs config={now!r}" for k, was, now in changes) \
            + (f" (+{more} more)" if more else "")
        raise ConfigError(f"resume=true: {path} was trained with a different setup ({detail}); "
                          "use another out_dir or resume=false")
    predictor.load_state_dict(state["predictor"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    states = state["rng"] if rank == 0 else state["rank_rng"][rank - 1]  # the signature fixed the rank count
    for name, gen in rng.items():
        gen.set_state(states[name])
    return int(state["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` so a resumed run does not repeat steps."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
