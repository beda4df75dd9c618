"""Small helpers: atomic result files, seeding, threads, provenance, hook owners."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from sdtp.paths import REPO_ROOT
from sdtp.errors import ConfigError

T = TypeVar("T")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON via a temporary file + rename, so a crash never leaves a half-written result.

    Non-finite floats are written as ``null``: Python would emit a bare ``NaN`` token, which is not
    JSON and breaks every strict reader of the results (an undefined mean is "no value").
    """
    return write_text_atomic(path, json.dumps(finite_json(data), indent=2, default=str, allow_nan=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` via a temporary file + rename (readable by others), so readers never see half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; it replaces ``path`` only if the block succeeds.

    For writers that take a file name (``torch.save``, safetensors, matplotlib): the temporary name is hidden,
    unique per writer, and keeps ``path``'s suffix, from which matplotlib picks the image format. On success the
    file is made readable by others (results are shared; ``mkstemp`` creates it 0600), flushed to disk and
    renamed over ``path`` (atomic on POSIX); on any exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finite_json(data: Any) -> Any:
    """``data`` with every NaN / infinity (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def read_text_file(path: str | Path, key: str) -> str:
    """The UTF-8 text of a data file; ConfigError naming the config ``key``, the file and the line otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{key}: {path} line {line} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                          "re-encode the file as UTF-8") from None


def read_jsonl_records(path: str | Path, key: str, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for the first ``limit`` records of a JSONL data file (blank lines skipped).

    Strict, unlike :func:`parse_jsonl` (which reads our own logs and tolerates a torn last line):
    input data with a truncated or non-JSON line, a non-object line, or no record at all is an error
    naming ``key``, the file and the line, raised before any model work.
    """
    records = []
    for number, line in enumerate(read_text_file(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: {path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}; "
                              "a truncated download?)") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{key}: {path} line {number} is a JSON {type(record).__name__}, expected an object")
        records.append((number, record))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ConfigError(f"{key}: {path} holds no records (empty file)")
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


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The repo's HEAD commit (with ``-dirty`` if uncommitted changes), or None outside git.

    Changes under ``results/`` do not count: they are outputs, and an experiment script's own summaries
    (written there between its runs, committed afterwards) would otherwise mark its later runs dirty.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)results"], cwd=root,
                               capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def hook_owner(hooks: Iterable[Any], cls: type[T]) -> T | None:
    """The ``cls`` instance whose bound method is among ``hooks`` (a module's ``_forward_hooks.values()`` or
    ``_forward_pre_hooks.values()``), or None.

    Pruners and KV compressors register bound methods as hooks and remove them on exit, so the hooks themselves
    say which one is active on a model: no separate marker exists that could outlive them.
    """
    for hook in hooks:
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, cls):
            return owner
    return None
