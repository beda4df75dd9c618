"""Small helpers: atomic result files, seeding, threads, provenance."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdtp.config import REPO_ROOT


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON via a temporary file + rename, so a crash never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL text, skipping blank and undecodable lines (a torn last line of a killed run)."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding should never be the thing that fails
        pass


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def git_commit() -> str | None:
    """The repo's HEAD commit (with ``-dirty`` if uncommitted changes), or None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None
