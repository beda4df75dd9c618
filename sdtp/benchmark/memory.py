"""Peak memory of one generation: a fresh process on CPU, CUDA's peak counter on GPU.

On CPU the only honest peak is the resident set of a process that ran nothing else: in a process
that already ran the dense baseline, glibc (with the benchmark's no-trim setting) keeps those
pages, so a pruned run would report the dense peak. :func:`peak_rss_subprocess` therefore runs
``python -m sdtp.benchmark.memory spec.json`` once per (variant, length): it loads the model,
runs a tiny generation (so the weights are resident), returns the heap's free pages to the kernel
(``malloc_trim``: with the benchmark's no-trim setting, buffers freed while loading stay resident and
later allocations reuse them, so activations would not show in the RSS), resets the kernel's
high-water mark (``/proc/self/clear_refs`` = 5), generates, and prints the peak RSS (``VmHWM``) and
the RSS before the generation as its last stdout line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Give glibc's free heap pages back to the kernel (``malloc_trim(0)``); False without glibc."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


def peak_rss_subprocess(
    cfg: DictConfig, variant: str, input_ids: torch.Tensor, new_tokens: int, timeout: float = 1800
) -> dict[str, Any]:
    """Peak and baseline RSS (bytes) of generating ``new_tokens`` after ``input_ids`` (1, N) in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="sdtp-mem-") as tmp:
        spec = {"config": str(Path(tmp) / "config.yaml"), "ids": str(Path(tmp) / "ids.pt"),
                "variant": variant, "new_tokens": new_tokens}
        OmegaConf.save(cfg, spec["config"], resolve=True)
        torch.save(input_ids.cpu(), spec["ids"])
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "sdtp.benchmark.memory", str(Path(tmp) / "spec.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(spec_path: str) -> dict[str, Any]:
    from sdtp.cli.bench import build_bench_pruner
    from sdtp.engine.generation import generate
    from sdtp.models import load_model
    from sdtp.utils import seed_everything, set_threads

    spec = json.loads(Path(spec_path).read_text())
    cfg = OmegaConf.load(spec["config"])
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    model, _ = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    pruner = build_bench_pruner(cfg, model)[0] if spec["variant"] != "dense" else None
    input_ids = torch.load(spec["ids"]).to(cfg.model.device)
    # Page the (possibly memory-mapped) weights in first, so the delta below is activations + KV cache.
    generate(model, input_ids[:, :8], 2, pruner, eos_token_id=None)
    trimmed = release_free_heap()
    supported = reset_peak_rss()
    before = _status_kib("VmRSS")
    generate(model, input_ids, int(spec["new_tokens"]), pruner, eos_token_id=None)
    peak = _status_kib("VmHWM") if supported else None
    return {
        "peak_rss_bytes": peak * 1024 if peak is not None else None,
        "rss_before_bytes": before * 1024 if before is not None else None,
        "peak_rss_delta_bytes": (peak - before) * 1024 if peak is not None and before is not None else None,
        "heap_trimmed": trimmed,
    }


def peak_cuda(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(_probe(sys.argv[1])))
