"""Check the commands a script will run, before it runs any: compose and validate each, load no model.

    python -m sdtp.cli.check [--will-exist PATH]... ENTRY OVERRIDE... [--- ENTRY OVERRIDE...]...

ENTRY is an entry point's config name (eval, train, bench, label, pipeline, generate). Each command is checked as its
entry point checks it before loading a model: :func:`sdtp.config.compose` with the entry point's ``prepare``
(:func:`sdtp.config.validate_config`), then the entry point's own validation. The first failure prints one line
naming the command and exits 1; exit 0, silently, when every command passes. ``--will-exist PATH``: a predictor folder
an earlier step of the same script creates; ``pruning.scorer.path=PATH`` is taken as present.
All commands are checked in one process: composing is cheap, starting the interpreter is not.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Collection
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sdtp.config import compose, offline_by_default
from sdtp.errors import ConfigError

SEPARATOR = "---"
WILL_EXIST = "--will-exist"
# What each entry point does to its config before loading a model: (prepare, its own validation).
Checks = tuple[Callable[[DictConfig], None] | None, Callable[[DictConfig], Any]]


def _entry_checks() -> dict[str, Checks]:
    """sdtp's entry points by config name -> (prepare, own validation); imported only when asked."""
    from sdtp.cli import bench, evaluate, generate, label, pipeline, train

    return {
        "eval": (None, evaluate.validate_eval),
        "train": (None, train.validate_train_config),
        "bench": (bench.prepare, bench.validate_bench),
        "label": (None, label.validate_label_config),
        "pipeline": (None, pipeline.validate_pipeline),
        "generate": (None, generate.check_settings),
    }


def entry_checks(entry: str) -> Checks:
    """The ``prepare`` and validation of the entry point whose config is ``entry``."""
    checks = _entry_checks()
    if entry not in checks:
        raise ConfigError(f"entry: {entry!r} not in {list(checks)}")
    return checks[entry]


def entry_validation(entry: str | None) -> Callable[[DictConfig], Any] | None:
    """The own validation of sdtp's entry point ``entry``; None for another (a user's ``sdtp_main``) or none."""
    return _entry_checks().get(entry, (None, None))[1] if entry is not None else None


def check_command(entry: str, overrides: list[str], will_exist: Collection[str] = ()) -> None:
    """Compose and validate one command; raises ConfigError, or Hydra's / OmegaConf's composition errors."""
    prepare, validate = entry_checks(entry)
    validate(compose(entry, overrides, prepare=prepare, present=will_exist))


def parse(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """(will-exist paths, commands) of a command line; each command is [entry, override...]."""
    will_exist: list[str] = []
    while argv and argv[0].startswith(WILL_EXIST):
        flag, _, value = argv[0].partition("=")
        if flag != WILL_EXIST or (not value and len(argv) < 2):
            raise ConfigError(f"{argv[0]}: expected {WILL_EXIST} PATH")
        will_exist.append(value or argv[1])
        argv = argv[1:] if value else argv[2:]
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            commands.append([])
        else:
            commands[-1].append(arg)
    if any(not command for command in commands):
        raise ConfigError(f"usage: {WILL_EXIST} PATH ... ENTRY OVERRIDE... [{SEPARATOR} ENTRY OVERRIDE...]...")
    return will_exist, commands


def main(argv: list[str] | None = None) -> int:
    """Check every command; 1 and one line on stderr at the first failure, else 0."""
    offline_by_default()
    # Errors only: warnings (e.g. an ignored override) are the real run's to give, once.
    logging.getLogger("sdtp").setLevel(logging.ERROR)
    try:
        will_exist, commands = parse(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"sdtp.cli.check: {err}", file=sys.stderr)
        return 1
    for entry, *overrides in commands:
        try:
            check_command(entry, overrides, will_exist)
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            # one line: Hydra's messages span several, and end with the config search path
            message = " ".join(str(err).split("\nConfig search path:")[0].split())
            print(f"check failed: sdtp-{entry} {' '.join(overrides)}: {message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
