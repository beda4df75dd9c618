"""Run provenance: what produced a result, and a lock so one run directory has one writer.

A run's *fingerprint* records everything its numbers depend on that the run directory's name does
not: the fully resolved config (defaults included), the resolved dtype and device (``dtype: auto``
is bf16 on one CPU and fp32 on another), the sha256 of the predictor checkpoint and of every data
file the eval reads, the versions of the packages that compute the numbers, and the git commit with
its dirty flag.

Reuse rule (:func:`differences`): a finished run is reused only if everything but ``git`` matches.
The commit is recorded, not compared: a commit that touches docs or another stage would otherwise
invalidate hours of finished sweep runs, while the inputs that change numbers (config defaults,
predictor weights, data, library versions, dtype) are compared exactly. A reused run whose commit
differs is logged; ``force=true`` recomputes.

Locations (:func:`locations_portable`): a fingerprint is stored with its paths in the portable form of
:mod:`sdtp.paths` (``${paths.data_dir}/...``, repo-relative, ``<home>/...``, ``<abs>/<name>``), each made
against the fingerprint's *own* ``config.paths``, and both sides of every comparison are normalised
the same way (:func:`portable`). So a fingerprint written before paths were portable, or in another
clone, equals the one made here for the same setup, while the files' contents are still compared
exactly through their sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtp.distributed import World
from sdtp.paths import portable_tree, roots_for
from sdtp.predictor import META_FILE, WEIGHTS_FILE
from sdtp.utils import git_commit

log = logging.getLogger(__name__)

# Keys that change how a run is executed, not what it computes (they are also left out of the run
# directory name, conf/eval.yaml). ``distributed``: a data-parallel lm-eval run scores every document as
# one process does (docs/scaling.md), so it reuses, and is reused as, the single-process run. Dotted keys
# are nested: ``eval.checkpoint`` (eval=lm_eval's in-run checkpoint) decides whether a killed run resumes,
# and runs finished before the key existed must stay reusable.
VOLATILE_KEYS = ("force", "threads", "run_dir", "logger", "distributed", "eval.checkpoint")
# Scorers whose draws differ with the number of ranks (one random stream per rank).
RANK_DEPENDENT_SCORERS = ("sdtp.scorers.random.RandomScorer",)
PACKAGES = ("torch", "transformers", "lm_eval")
# Fingerprint entries that must match for a finished run to be reused (everything but ``git``).
COMPARED = ("config", "dtype", "device", "predictor", "data", "packages")
LOCK_FILE = ".sdtp.lock"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Iterable[str | Path]) -> dict[str, str]:
    """path -> sha256 for each existing file (a directory contributes every file inside it)."""
    hashes: dict[str, str] = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                hashes[str(file)] = sha256_file(file)
    return hashes


def predictor_files(cfg: DictConfig) -> list[Path]:
    """The checkpoint files the scorer reads (``pruning.scorer.path``: a file, or a folder of weights + meta).

    Only what :meth:`sdtp.predictor.TokenPredictor.load` reads is hashed: reports kept beside the
    weights (README, eval pages, ``multi_news.json``) do not change predictions, and rewriting the
    paths inside them (``scripts/portable_paths.py``) must not make finished runs stale.
    """
    scorer = cfg.get("pruning", {}).get("scorer") if "pruning" in cfg else None
    path = scorer.get("path") if scorer is not None else None
    if not path:
        return []
    path = Path(path)
    if path.is_dir():
        return [path / name for name in (WEIGHTS_FILE, META_FILE) if (path / name).is_file()]
    return [path] if path.is_file() else []


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in (*PACKAGES, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (defaults included) without the keys that do not change results.

    The number of ranks is kept (as ``ranks``) for a scorer whose draws depend on it
    (:data:`RANK_DEPENDENT_SCORERS`): its data-parallel run is not the single-process run.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE_KEYS:
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    scorer = ((config.get("pruning") or {}).get("scorer") or {}).get("_target_")
    ranks = World.from_env().size
    if scorer in RANK_DEPENDENT_SCORERS and ranks > 1:
        config["ranks"] = ranks
    return config


def fingerprint(cfg: DictConfig, data_files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Everything a run's numbers depend on, locations portable; see the module docstring."""
    # Imported here: transformers (~5 s) is not needed by the report modules that import provenance.
    from sdtp.models.loading import resolve_dtype

    model = cfg.model
    extra = [str(model.package)] if model.get("source") == "gguf_package" and model.get("package") else []
    if (cfg.get("compression") or {}).get("method", "none") == "llmlingua2":
        extra.append("llmlingua")  # its selection rule decides which words the model reads
    commit = git_commit()
    return locations_portable({
        "config": comparable_config(cfg),
        "dtype": str(resolve_dtype(model.dtype, model.device)),
        "device": str(model.device),
        "predictor": hash_files(predictor_files(cfg)),
        "data": hash_files(data_files),
        "packages": package_versions(extra),
        "git": {"commit": commit.removesuffix("-dirty") if commit else None,
                "dirty": bool(commit and commit.endswith("-dirty"))},
    })


def locations_portable(fp: dict[str, Any]) -> dict[str, Any]:
    """``fp`` with the paths in its config and file-hash keys made portable (:mod:`sdtp.paths`) against
    its own ``config.paths``: where *that* run's repo and data dir were, not this checkout's.
    Idempotent (a stored portable fingerprint has no absolute paths left)."""
    config = fp.get("config") if isinstance(fp.get("config"), dict) else {}
    roots = roots_for(config.get("paths") or {})
    return {key: portable_tree(value, roots) if key in ("config", "data", "predictor") else value
            for key, value in fp.items()}


def portable(fp: dict[str, Any]) -> dict[str, Any]:
    """The compared parts of a fingerprint (:data:`COMPARED`), locations made portable and the
    ``config.paths`` entries (where things lie, not what they hold) left out: equal for the same run
    made in another clone or before paths were portable, so committed results can stand in for a local run.

    Predictor files are narrowed to the checkpoint itself (:func:`predictor_files`): fingerprints
    written before that rule also hashed reports beside the weights.
    """
    fp = locations_portable(fp)
    out: dict[str, Any] = {part: fp.get(part) for part in COMPARED}
    config = out["config"] if isinstance(out["config"], dict) else {}
    out["config"] = {k: v for k, v in config.items() if k != "paths"}
    scorer = ((config.get("pruning") or {}).get("scorer") or {}) if isinstance(config.get("pruning"), dict) else {}
    target = str(scorer.get("path")) if isinstance(scorer, dict) and scorer.get("path") else None
    hashes = out["predictor"] if isinstance(out["predictor"], dict) else {}
    out["predictor"] = {path: digest for path, digest in hashes.items()
                        if path == target or Path(path).name in (WEIGHTS_FILE, META_FILE)}
    out["data"] = out["data"] if isinstance(out["data"], dict) else {}
    return out


def flat_leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted key: leaf value} (an empty dict is a leaf)."""
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flat_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def differences(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints (``git`` and locations ignored, :func:`portable`); [] = same run.

    A missing stored fingerprint (a run written before provenance was recorded) is a difference.
    """
    if not isinstance(stored, dict):
        return ["fingerprint (none stored)"]
    return changed_keys(portable(stored), portable(current))


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose leaf values differ between two nested dicts (a key absent on one side differs)."""
    # Through JSON, so tuples vs lists and int vs float keys compare as they are stored.
    a, b = _stored_leaves(old), _stored_leaves(new)
    return sorted(key for key in a.keys() | b.keys() if a.get(key, "<absent>") != b.get(key, "<absent>"))


def _stored_leaves(data: dict[str, Any]) -> dict[str, Any]:
    return flat_leaves(json.loads(json.dumps(data, default=str)))


def leaf_changes(old: dict[str, Any], new: dict[str, Any], shown: int) -> tuple[list[tuple[str, Any, Any]], int]:
    """The first ``shown`` of :func:`changed_keys` as (dotted key, old leaf, new leaf) ("<absent>" on a side that
    lacks it), and how many more differ: what an error message names."""
    keys = changed_keys(old, new)
    a, b = _stored_leaves(old), _stored_leaves(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys[:shown]], max(len(keys) - shown, 0)


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock file."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``<run_dir>/.sdtp.lock`` (created with O_EXCL) while the body runs; removed on exit.

    Two processes on one run directory would interleave ``predictions.jsonl`` lines and overwrite
    each other's metrics, so the second one refuses. A lock left by a killed process on this host
    (its pid is gone) is taken over; any other leftover lock names the file to delete.
    """
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            stale = holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
            if stale and attempt == 0:
                log.warning("%s: taking over the stale lock of pid %s (no longer running)", path, holder["pid"])
                path.unlink(missing_ok=True)
                continue
            raise RunLockedError(
                f"{path}: run directory is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('since', '?')}; wait for it to finish, or, if that process is gone "
                f"(e.g. the machine rebooted), delete {path} and re-run"
            ) from None
    with os.fdopen(fd, "w") as handle:
        json.dump(owner, handle)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
