"""Metric logging: always a local ``metrics.jsonl``; W&B optionally (offline by default).

W&B is imported only when ``logger.backend == wandb``; a failed job still finishes its run
(use as a context manager) so a multirun sweep is never left with a dangling W&B process.
The W&B run id is saved in the run directory (``wandb_run_id``, next to a training checkpoint), so a
resumed job (``resume=True``) continues the same W&B run instead of opening a second, unlinked one.
Runs are grouped by ``logger.group`` (the experiment name) and tagged with the job's command-line
overrides, so the points of an ablation sweep can be told apart. Offline runs upload later with
``wandb sync <run_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtp.utils import write_text_atomic

log = logging.getLogger(__name__)


RUN_ID_FILE = "wandb_run_id"
MAX_TAGS, MAX_TAG_LENGTH = 64, 64  # W&B refuses more tags, or longer ones, when the run starts


def command_line_overrides() -> list[str]:
    """The Hydra overrides of the running job (``[]`` outside a Hydra app), used as W&B tags."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def wandb_tags(tags: list[str]) -> list[str]:
    """``tags`` as W&B accepts them: at most 64, each 1-64 characters. A longer one (a path override)
    keeps its start and ends with a hash of the whole, so two long tags stay apart."""
    short = []
    for tag in (str(t) for t in tags if str(t)):
        if len(tag) > MAX_TAG_LENGTH:
            tag = f"{tag[:MAX_TAG_LENGTH - 9]}~{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
        short.append(tag)
    return short[:MAX_TAGS]


def wandb_run_id(run_dir: Path, resume: bool) -> tuple[str, str | None]:
    """(run id, W&B ``resume`` mode): the saved id when resuming, else a fresh one (saved)."""
    path = run_dir / RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip(), "allow"
    run_id = uuid.uuid4().hex[:12]  # W&B accepts any id of [a-z0-9]
    write_text_atomic(path, run_id + "\n")
    return run_id, None


class RunLogger:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and mirror them to W&B when configured."""

    def __init__(self, run_dir: str | Path, logger_cfg: Mapping[str, Any] | None = None,
                 config: DictConfig | None = None, name: str | None = None, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        backend = (logger_cfg or {}).get("backend", "none")
        if backend == "wandb":
            import wandb

            run_id, resume_mode = wandb_run_id(self.run_dir, resume)
            self._wandb = wandb.init(
                id=run_id,
                resume=resume_mode,
                project=logger_cfg.get("project", "sdtp"),
                entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group"),
                tags=wandb_tags([*(logger_cfg.get("tags") or []), *command_line_overrides()]),
                mode=logger_cfg.get("mode", "offline"),
                name=name,
                dir=str(self.run_dir),
                config=OmegaConf.to_container(config, resolve=True) if config is not None else None,
            )
        elif backend != "none":
            raise ValueError(f"logger.backend: {backend!r} not in ('none', 'wandb')")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        record = {"time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(dict(metrics))

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class NullLogger:
    """The :class:`RunLogger` of a process that must not write (a non-zero rank of a ``torchrun`` job)."""

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
