"""Metric logging: always a local ``metrics.jsonl``; W&B optionally (offline by default).

W&B is imported only when ``logger.backend == wandb``; a failed job still finishes its run
(use as a context manager) so a multirun sweep is never left with a dangling W&B process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class RunLogger:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and mirror them to W&B when configured."""

    def __init__(self, run_dir: str | Path, logger_cfg: Mapping[str, Any] | None = None,
                 config: DictConfig | None = None, name: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        backend = (logger_cfg or {}).get("backend", "none")
        if backend == "wandb":
            import wandb

            self._wandb = wandb.init(
                project=logger_cfg.get("project", "sdtp"),
                entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group"),
                tags=list(logger_cfg.get("tags") or []),
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
