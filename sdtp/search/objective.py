"""What an ``sdtp-eval`` run returns to a Hydra sweeper: the metrics named by the config's ``objective``.

``objective`` is a dotted path into the run's ``metrics.json`` (e.g. ``results.nll``) or a list of them
(``[results.nll, results.flops.fraction]``: a two-objective study). The Optuna sweeper needs a float for one
direction and a sequence of floats for several; runs without ``objective`` return None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sdtp.errors import ConfigError


def metric_at(metrics: Mapping[str, Any], path: str, key: str = "objective") -> float:
    """The finite number at dotted ``path`` of ``metrics``; ConfigError naming ``key`` if absent or not a number."""
    value: Any = metrics
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ConfigError(f"{key}: {path!r} is not in the run's metrics (missing {part!r})")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key}: {path!r} is {value!r}, not a finite number")
    return float(value)


def objective_values(metrics: Mapping[str, Any], objective: str | Sequence[str] | None) -> float | list[float] | None:
    """``objective`` (a path or a list of paths, see the module docstring) read off ``metrics``; None when unset."""
    if objective is None:
        return None
    if isinstance(objective, str):
        return metric_at(metrics, objective)
    return [metric_at(metrics, str(path), f"objective[{i}]") for i, path in enumerate(objective)]
