"""The schedule search's depth-aware stage count (``hydra.sweeper.custom_search_space``).

The sweeper draws ``pruning.first_layer``, ``pruning.layer_step`` and ``pruning.keep_ratio`` from its
``params``; a fixed range for ``pruning.num_stages`` would put the last stage beyond the model's depth for
many of those draws (``first_layer + (num_stages - 1) * layer_step`` must be at most ``num_layers - 1``). This
draws it from 1 to the most stages that fit after the trial's first layer and step instead, so random draws are
always valid. NSGA-II's crossover can still hand a child a parent's stage count that no longer fits: that trial
fails at composition (ConfigError naming ``pruning.layers``) and is recorded as a FAIL trial, which NSGA-II
never selects as a parent (``max_failure_rate: 1.0`` keeps the sweep going).

``pruning.num_stages`` fixed on the command line (``pruning.num_stages=3``) or swept there by the user
(``pruning.num_stages=choice(2,3)`` or ``int(interval(1,6))``) is left as given: the sweeper draws a swept one before
calling this, and suggesting the name again with another distribution would stop the sweep (Optuna refuses a second
distribution kind for one name, outside any trial). Such a draw that does not fit fails at composition like above.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from sdtp.errors import ConfigError

STAGES = "pruning.num_stages"


def max_stages(first_layer: int, layer_step: int, num_layers: int) -> int:
    """Most stages ``first_layer + i * layer_step`` (i = 0, 1, ...) that stay in the valid layers 1..num_layers-1
    (0 if even the first does not)."""
    if not 1 <= first_layer <= num_layers - 1:
        return 0
    return (num_layers - 1 - first_layer) // layer_step + 1


def _trial_value(cfg: DictConfig, trial: Any, key: str) -> int:
    """``key`` as this trial sets it: drawn (``trial.params``), fixed on the command line (``user_attrs``,
    strings) or the composed config's value."""
    if key in trial.params:
        return int(trial.params[key])
    if key in trial.user_attrs:
        return int(trial.user_attrs[key])
    return int(cfg.pruning[key.split(".", 1)[1]])


def check_searchable(cfg: DictConfig) -> None:
    """Refuse a pruning method with explicit ``pruning.layers`` (pruning=gemfilter|fastkv): the search varies
    ``first_layer``, ``layer_step`` and ``num_stages``, which explicit layers replace, so every trial would prune at
    the same layers while the page labels it with its drawn values."""
    layers = cfg.pruning.get("layers")
    if layers is not None:
        raise ConfigError(
            f"pruning.layers: pruning={cfg.pruning.get('name')} sets explicit stage layers {list(layers)}, which the "
            "schedule search cannot vary (it draws pruning.first_layer, layer_step and num_stages); search a method "
            "without explicit layers (e.g. pruning=lazyllm or oracle) or add pruning.layers=null"
        )


def suggest_num_stages(cfg: DictConfig, trial: Any) -> None:
    """Draw ``pruning.num_stages`` in 1..min(``search.max_stages``, what fits); nothing if fixed or swept on the
    command line (the module docstring says why). First refuses a search it cannot vary (:func:`check_searchable`),
    as the schedule search's sweeper already did before asking for any trial (hydra_plugins/sdtp_sweeper)."""
    check_searchable(cfg)
    if STAGES in trial.user_attrs or STAGES in trial.params:
        return
    fit = max_stages(_trial_value(cfg, trial, "pruning.first_layer"), _trial_value(cfg, trial, "pruning.layer_step"),
                     int(cfg.model.num_layers))
    trial.suggest_int(STAGES, 1, max(1, min(int(cfg.search.max_stages), fit)))
