"""Config composition, validation and object construction shared by every entry point.

Validation runs right after Hydra composes the config and before any model is loaded, so bad
input (layer out of range, ratio outside (0, 1], unsupported family, missing files) fails in
seconds with a message naming the key.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sdtp.checks import integer
from sdtp.distributed import adopt_submitit_tasks, refuse_sweep_under_launcher, worker_overrides
from sdtp.engine.merging import MergingPruner
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.revival import RevivingPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.kv.policy import build_kv_policy
from sdtp.models.loading import check_family, resolve_dtype
from sdtp.paths import REPO_ROOT  # also registers the ${repo_root:} resolver
from sdtp.scorers.base import Scorer
from sdtp.targets import check_arguments, import_target

log = logging.getLogger(__name__)
CONF_DIR = REPO_ROOT / "conf"

if not OmegaConf.has_resolver("layer_at"):
    # ${layer_at:${model.num_layers},0.4} -> the decoder layer at 40% of depth (clamped to 1..L-1),
    # so single-stage schedules (pruning=gemfilter|fastkv) fit any model depth.
    OmegaConf.register_new_resolver(
        "layer_at", lambda num_layers, frac: min(max(1, round(int(num_layers) * float(frac))), int(num_layers) - 1)
    )
if not OmegaConf.has_resolver("mul"):
    # ${mul:${model.schedule.layer_step},2} -> twice the model's stage step (pruning=sdtp_low: half the stages
    # over the same depth).
    OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))


def build_schedule(cfg: DictConfig) -> PruningSchedule | None:
    """The validated schedule of ``cfg.pruning``, or None for the dense model (``pruning=none``)."""
    if cfg.pruning.get("scorer") is None:
        return None
    return PruningSchedule.from_config(cfg.pruning, num_layers=int(cfg.model.num_layers))


def build_pruner(cfg: DictConfig) -> TokenPruner | None:
    """Schedule + scorer instantiated from ``cfg.pruning.scorer._target_`` (None when dense)."""
    schedule = build_schedule(cfg)
    if schedule is None:
        return None
    variant, options = pruner_variant(cfg.pruning)
    log.info("Instantiating scorer <%s>", cfg.pruning.scorer._target_)
    scorer = hydra.utils.instantiate(cfg.pruning.scorer)
    return variant(schedule, scorer, **options)


def pruner_variant_settings(pruning: DictConfig) -> dict[str, Any]:
    """The nesting-ablation keys a ``pruning`` node sets (``revive``, ``merge_weight``), e.g. for a fingerprint;
    empty for the plain pruner, so results computed before these keys existed stay valid."""
    return {key: pruning[key] for key in ("revive", "merge_weight") if pruning.get(key)}


def pruner_variant(pruning: DictConfig) -> tuple[type[TokenPruner], dict[str, Any]]:
    """The pruner class and its options for the nesting ablations, absent from the shipped configs:
    ``+pruning.revive=true`` (:mod:`sdtp.engine.revival`) or ``+pruning.merge_weight=w`` in (0, 1]
    (:mod:`sdtp.engine.merging`); plain :class:`TokenPruner` otherwise."""
    revive, weight = pruning.get("revive", False), pruning.get("merge_weight", 0)
    if not isinstance(revive, bool):
        raise ConfigError(f"pruning.revive: expected true or false, got {revive!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise ConfigError(f"pruning.merge_weight: expected a number in [0, 1], got {weight!r}")
    if revive and weight:
        raise ConfigError("pruning.revive and pruning.merge_weight: choose one (they are separate ablations)")
    if revive:
        return RevivingPruner, {}
    if weight:
        return MergingPruner, {"merge_weight": float(weight)}
    return TokenPruner, {}


# What `+pruning.<key>=...` may add: the options build_pruner reads beyond the pruning group's own keys (a `+` key
# is new by definition: Hydra refuses `+` on a key the group defines). Scorer arguments go under +pruning.scorer.
PRUNING_EXTRAS = ("merge_weight", "refill", "revive")


@functools.cache
def pruning_group_keys() -> frozenset[str]:
    """The top-level keys the pruning methods of ``conf/pruning/`` define (the shared ``_schedule`` keys, ``name``,
    ``scorer``, a method's own): what ``++pruning.<key>`` may set besides :data:`PRUNING_EXTRAS`."""
    keys: set[str] = set()
    for path in (CONF_DIR / "pruning").glob("*.yaml"):
        node = OmegaConf.load(path)
        if isinstance(node, DictConfig):
            keys.update(str(key) for key in node if key != "defaults")
    return frozenset(keys)


def check_added_keys(overrides: list[str]) -> None:
    """Refuse a ``+pruning.<key>`` or ``++pruning.<key>`` no code reads: a misspelt ``+pruning.reviv=true`` would
    otherwise run as if it had not been given, silently.

    ``++`` (force-add) also sets a key the group defines, so ``++pruning.keep_ratio=0.5`` passes; a ``++`` key that
    is neither an extra nor a key of a pruning method in ``conf/pruning/`` is as much a typo as a ``+`` one (after
    composition the typo is in the config too, so the check goes by the names, not by the composed config).
    """
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith("+"):
            continue
        force, name = key.startswith("++"), key.lstrip("+").removeprefix("pruning.")
        if not key.lstrip("+").startswith("pruning.") or "." in name or name in PRUNING_EXTRAS:
            continue
        if force and name in pruning_group_keys():
            continue
        prefix = "++" if force else "+"
        raise ConfigError(f"pruning.{name}: not a pruning option; {prefix} adds one of {list(PRUNING_EXTRAS)} "
                          f"(scorer arguments: {prefix}pruning.scorer.<argument>)")


# The keys a derived schedule reads (layers first_layer + i * layer_step, i < num_stages); an explicit
# pruning.layers (pruning=gemfilter|fastkv, or the command line) takes their place.
DERIVED_SCHEDULE_KEYS = tuple(f"pruning.{key}" for key in ("first_layer", "layer_step", "num_stages"))


def _override_key(item: str) -> str:
    """The config key of a command-line override (``++pruning.keep_ratio=0.5`` -> ``pruning.keep_ratio``)."""
    return item.lstrip("+~").split("=", 1)[0]


def shadowed_schedule_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The command line's ``pruning.first_layer`` / ``layer_step`` / ``num_stages`` when ``pruning.layers`` is set.

    The schedule then takes the explicit layers and these keys are never read. Refused, not warned about like
    :func:`ignored_overrides`: the run prunes, at other layers than the ones its overrides (and a page labelling it
    by them, such as the schedule search's) name.
    """
    pruning = cfg.get("pruning")
    if pruning is None or pruning.get("scorer") is None or pruning.get("layers") is None:
        return []
    return [item for item in overrides if not item.startswith("~") and _override_key(item) in DERIVED_SCHEDULE_KEYS]


def ignored_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Command-line overrides the composed config never reads: ``pruning.*`` when nothing is pruned
    (``pruning=none``) and ``kv.*`` when the cache is not compressed (``kv=none``).

    They are warned about, not refused: a sweep such as ``-m pruning=none,random pruning.keep_ratio=0.5``
    legitimately applies one override to every method, the dense one included. (Schedule keys an explicit
    ``pruning.layers`` replaces are refused instead: :func:`shadowed_schedule_overrides`.)
    """
    ignored = []
    for item in overrides:
        key = _override_key(item)
        if key.startswith("pruning.") and "pruning" in cfg and cfg.pruning.get("scorer") is None:
            ignored.append(f"{item} (pruning={cfg.pruning.get('name')} prunes nothing)")
        elif key.startswith("kv.") and "kv" in cfg and cfg.kv.get("method") in (None, "none"):
            ignored.append(f"{item} (kv=none compresses nothing)")
    return ignored


def offline_by_default() -> list[str]:
    """Set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless the user set them (or ``TRANSFORMERS_OFFLINE``).

    The project runs from an offline data mirror and embedded weights; without these a hub lookup on
    a machine with no network waits for timeouts before failing. Online users set
    ``HF_HUB_OFFLINE=0``. Returns the variables set here.
    """
    user_chose = "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ
    names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if n not in os.environ and not user_chose]
    for name in names:
        os.environ[name] = "1"
    if "HF_HUB_OFFLINE" in names and "huggingface_hub.constants" in sys.modules:
        # huggingface_hub reads the variable once, at import, and sdtp's imports have loaded it already;
        # its is_offline_mode() (used by transformers) returns this module attribute.
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    return names


# Entry points that run the pruned model past the prompt: generate and bench decode from the pruned cache, and every
# eval runner generates or scores tokens on it (lm-eval's continuations and perplexity's scored tokens included).
CONTINUING_TASKS = ("bench", "eval", "generate")


def refuse_renumbered_continuation(cfg: DictConfig) -> None:
    """Refuse ``pruning.position_ids=renumber`` for an entry point that runs tokens on the pruned cache.

    Renumbering gives each pruned layer's kept prompt tokens the positions 0..k_l-1, with k_l differing by layer,
    while every later token continues at the prompt length N (layer 0 is never pruned): a pruned layer sees a gap of
    N - k_l positions between the prompt and what follows, and no single decode position closes it for all layers.
    The ablation therefore covers the prefill only (a ``TokenPruner`` forward over a prompt, its own logits).
    """
    if cfg.pruning.get("position_ids") != "renumber" or cfg.get("task_name") not in CONTINUING_TASKS:
        return
    raise ConfigError(
        f"pruning.position_ids=renumber: sdtp-{cfg.task_name} runs tokens on the pruned cache after the prompt, but "
        "renumbered layers hold their kept tokens at positions 0..k-1 (k differs by layer) while later tokens continue "
        "at the prompt length, leaving a position gap; renumber is a prefill-only ablation (use position_ids=original)"
    )


def validate_config(cfg: DictConfig, overrides: list[str] | None = None, present: Collection[str] = ()) -> None:
    """Check the composed config; raises :class:`ConfigError` naming the offending key.

    ``overrides`` (the command line's) are checked for keys the config ignores (a warning). ``present``: predictor
    folders taken as existing (an earlier step of the same script creates them: ``sdtp.cli.check --will-exist``).
    """
    check_added_keys(list(overrides or []))
    for item in ignored_overrides(cfg, list(overrides or [])):
        log.warning("override ignored: %s", item)
    shadowed = shadowed_schedule_overrides(cfg, list(overrides or []))
    if shadowed:
        keys = ", ".join(dict.fromkeys(_override_key(item) for item in shadowed))
        raise ConfigError(
            f"{keys}: set on the command line ({' '.join(shadowed)}), but pruning={cfg.pruning.get('name')} gives "
            f"explicit stage layers pruning.layers={list(cfg.pruning.layers)}, which the schedule uses instead; add "
            "pruning.layers=null to derive the layers from first_layer, layer_step and num_stages, or set "
            "pruning.layers itself"
        )
    check_family(cfg.model.family)
    resolve_dtype(cfg.model.dtype, cfg.model.device)
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: {threads!r} must be a positive integer or null (torch's default)")
    if "seed" in cfg and not 0 <= integer(cfg.seed, "seed") < 2**32:  # numpy's seed range
        raise ConfigError(f"seed: must be in [0, 2**32), got {cfg.seed}")
    build_kv_policy(cfg)  # the optional `kv` group (KV-cache compression); raises on bad kv.* keys
    if "pruning" not in cfg:  # e.g. the pipeline, which validates each pruning variant it composes
        return
    if "name" not in cfg.pruning:  # pruning=_schedule: the shared defaults every method includes, not a method
        raise ConfigError("pruning: the group option is not a pruning method (no pruning.name); see conf/pruning/")
    build_schedule(cfg)
    scorer = cfg.pruning.get("scorer")
    if scorer is None:  # pruning=none
        return
    refuse_renumbered_continuation(cfg)
    pruner_variant(cfg.pruning)  # bad revive / merge_weight values
    variant = pruner_variant_settings(cfg.pruning)
    if variant and int(cfg.get("eval", {}).get("batch_size", 1)) != 1:
        # both ablations refuse padded batches: refuse before the model loads, not at the first ragged batch
        raise ConfigError(f"pruning.{next(iter(variant))}: prompts are pruned one at a time; set eval.batch_size=1")
    if "_target_" not in scorer:
        raise ConfigError("pruning.scorer._target_: missing (which scorer class to build)")
    scorer_class = import_target("pruning.scorer._target_", str(scorer._target_), Scorer)
    if not scorer.get("_partial_", False):  # a partial may be completed by code; a full build must be whole
        check_arguments("pruning.scorer", scorer_class, OmegaConf.to_container(scorer, resolve=True))
    path = scorer.get("path")
    if path is not None and not Path(path).exists() and Path(path) not in {Path(p) for p in present}:
        raise ConfigError(
            f"pruning.scorer.path: {scorer.path} does not exist; train a predictor with `sdtp-train` "
            f"for model={cfg.model.name} or point pruning.scorer.path at one"
        )


def compose(config_name: str, overrides: list[str] | None = None,
            prepare: Callable[[DictConfig], None] | None = None, present: Collection[str] = ()) -> DictConfig:
    """Compose and validate a primary config (tests, notebooks, or a stage called from another entry point).

    ``prepare``: the entry point's (sdtp_main), applied before validation as the entry point does; ``present``: as
    :func:`validate_config`'s.

    Inside a running Hydra app (e.g. ``sdtp-pipeline`` calling the eval stage) the app's already
    initialised config search path (this repo's ``conf/``) is used instead of initialising a new one.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name=config_name, overrides=overrides or [])
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides or [])
    prepare_and_validate(cfg, overrides or [], prepare, present)
    return cfg


# The running entry point (sdtp_main): its config name and ``prepare``, which the sweeper's checks of a sweep's jobs
# apply too (hydra_plugins/sdtp_sweeper). A one-element list, so the entry point can set it.
_RUNNING_ENTRY: list[tuple[str | None, Callable[[DictConfig], None] | None]] = [(None, None)]


def running_entry() -> tuple[str | None, Callable[[DictConfig], None] | None]:
    """(config name, ``prepare``) of the entry point running in this process ((None, None) outside one)."""
    return _RUNNING_ENTRY[0]


def prepare_and_validate(cfg: DictConfig, overrides: list[str], prepare: Callable[[DictConfig], None] | None = None,
                         present: Collection[str] = ()) -> None:
    """What an entry point does to its composed config before running it: its ``prepare``, then
    :func:`validate_config` (``present`` as there)."""
    if prepare is not None:
        prepare(cfg)
    validate_config(cfg, overrides, present)


def quoted_override(key: str, value: str | os.PathLike[str]) -> str:
    """``key=value`` as an override Hydra reads back as exactly ``str(value)``, whatever the text (a path, say).

    Unquoted, Hydra's override grammar refuses ``=`` (a sweep job's directory is named like ``seed=0``), spaces,
    brackets, commas and quotes, and resolves ``${...}``. Single-quoted, it only takes ``\\'`` for a quote and a
    doubled backslash before a quote or at the end; OmegaConf then takes ``\\${`` as a literal ``${`` and a doubled
    backslash before it as one.
    """
    text = str(value)
    # backslashes right before a quote, an interpolation or the end: doubled, so they stay backslashes
    text = re.sub(r"(\\+)(?='|\$\{|$)", lambda match: match.group(1) * 2, text)
    return f"{key}='" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` (a Hydra command line) with ``extra`` overrides added next to its own.

    Hydra's parser takes the overrides as one run of positional arguments, so they are inserted right
    after the user's (``model=x --cfg job`` stays valid), or appended when there are none.
    """
    if not extra:
        return list(argv)
    from hydra._internal.utils import get_args_parser

    given = get_args_parser().parse_known_args(argv)[0].overrides
    ends = [i + len(given) for i in range(len(argv) - len(given) + 1) if argv[i : i + len(given)] == given]
    at = ends[0] if given and ends else len(argv)
    return [*argv[:at], *extra, *argv[at:]]


def sdtp_main(
    config_name: str, prepare: Callable[[DictConfig], None] | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@hydra.main`` for an entry point, with validation before the task runs.

    The entry point runs offline unless the user chose otherwise (:func:`offline_by_default`).

    ``prepare(cfg)``, if given, may adjust the composed config before it is validated.
    """

    def decorator(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def validated(cfg: DictConfig) -> Any:
            from hydra.core.hydra_config import HydraConfig

            offline_by_default()
            adopt_submitit_tasks()  # a multi-task submitit job: this process's rank, before anything reads it
            prepare_and_validate(cfg, list(HydraConfig.get().overrides.task), prepare)
            return task(cfg)

        hydra_entry = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(validated)

        @functools.wraps(task)
        def entry(*args: Any, **kwargs: Any) -> Any:
            refuse_sweep_under_launcher(sys.argv[1:])
            _RUNNING_ENTRY[0] = (config_name, prepare)
            # hydra.main reads its overrides from sys.argv: a non-zero torchrun rank adds the ones
            # that keep it from writing the run directory's config copy and log (rank 0 writes them).
            sys.argv[1:] = with_overrides(sys.argv[1:], worker_overrides())
            return hydra_entry(*args, **kwargs)

        return entry

    return decorator
