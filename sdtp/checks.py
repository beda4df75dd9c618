"""Typed reads of config values: a number or an integer, or a ConfigError naming the key.

OmegaConf passes overrides through as written (``seed=abc`` is the string "abc", ``max_steps=2.7`` a float), so a
bare ``int(...)`` would fail late with a traceback that names no key, or silently truncate.
"""

from __future__ import annotations

import math
from typing import Any

from sdtp.errors import ConfigError


def number(value: Any, key: str) -> float:
    """``value`` as a float; ConfigError naming ``key`` for text, booleans (``true`` is not 1.0) or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        result = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return result


def integer(value: Any, key: str, low: int | None = None) -> int:
    """``value`` as an int (at least ``low`` when given); ConfigError naming ``key`` for text, booleans,
    fractional numbers or a value below ``low``."""
    result = number(value, key)
    if result != int(result):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if low is not None and result < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
    return int(result)
