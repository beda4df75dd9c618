"""Benchmark provenance (versions, CPU, threads, allocator) and the glibc allocator setting.

glibc's default ``malloc`` hands every large activation buffer back to the kernel and maps it
again in the next layer: a dense 8K prefill then takes ~650k page faults and its time varies by
50% between runs, which inflates the dense baseline. Raising the mmap/trim thresholds (and the
top pad) keeps the heap mapped for both sides. glibc reads these variables at start-up only, so
:func:`ensure_malloc_env` re-executes the process once with them set.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from sdtp.utils import git_commit

log = logging.getLogger(__name__)

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",  # never mmap an allocation below 4 GiB
    "MALLOC_TRIM_THRESHOLD_": "68719476736",  # never give the heap top back to the kernel
    "MALLOC_TOP_PAD_": "1073741824",  # grow the heap in 1 GiB steps
}
REEXEC_MARK = "SDTP_BENCH_REEXEC"


def malloc_env_missing() -> list[str]:
    return [key for key in MALLOC_ENV if key not in os.environ]


def ensure_malloc_env(module: str) -> None:
    """Re-exec ``python -m module <same args>`` with :data:`MALLOC_ENV` set unless it already is.

    Variables the user set are kept (so a deliberate default-allocator run is possible by setting
    them to glibc's defaults). Only re-executes once, and never on non-glibc platforms.
    """
    missing = malloc_env_missing()
    if not missing or os.environ.get(REEXEC_MARK) or platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, **{key: MALLOC_ENV[key] for key in missing}, REEXEC_MARK: "1"}
    log.info("Re-executing with %s set (allocator tuning for stable timings)", ", ".join(missing))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in wanted if flag in flags]


def environment(model: torch.nn.Module, device: str) -> dict[str, Any]:
    """Everything a reader needs to reproduce or discount a timing."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator": {key: os.environ.get(key) for key in MALLOC_ENV},
        "allocator_reexec": bool(os.environ.get(REEXEC_MARK)),
        "git_commit": git_commit(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info
