"""Package attributes imported on first use (PEP 562), so importing a light submodule stays light.

``sdtp`` and ``sdtp.models`` re-export the engine and the model loader, which pull in transformers (~5 s); the
report and table modules the experiment scripts call many times over need neither.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path) when ``name`` is read."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
