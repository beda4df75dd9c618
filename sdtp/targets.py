"""Import the class a config's ``_target_`` names, and check its type, before anything is built.

Hydra's ``instantiate`` only fails when the object is built, which for a scorer or a KV score is
after the model has loaded. :func:`import_target` runs at composition instead, so a typo or a user
class missing from ``PYTHONPATH`` fails in seconds with a message naming the config key, and
:func:`check_arguments` refuses a misspelt constructor argument before any run directory exists.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from sdtp.errors import ConfigError


def _longest_module(parts: list[str]) -> tuple[ModuleType, int]:
    """The longest importable module prefix of ``parts`` and how many parts it took.

    A shorter prefix is tried only when the longer one itself does not exist, so that a class nested
    in another (``pkg.mod.Outer.Inner``) resolves, while an import error *inside* an existing module
    (a missing dependency of the user's code) is reported as it is.
    """
    first_error: ModuleNotFoundError | None = None
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            return importlib.import_module(name), cut
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
            first_error = first_error or err
    if first_error is None:
        raise ValueError("expected module.Class")
    raise first_error


def import_target(key: str, target: str, base: type) -> type:
    """The class ``target`` ("module.Class" or "module.Outer.Inner") names; it must subclass ``base``.

    Raises:
        ConfigError: naming ``key`` when ``target`` cannot be imported or is not a ``base`` subclass.
    """
    parts = target.split(".")
    try:
        obj, cut = _longest_module(parts)
        for name in parts[cut:]:
            obj = getattr(obj, name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"{key}: cannot import {target!r} ({type(err).__name__}: {err}); is its package on PYTHONPATH?"
        ) from err
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{key}: {target!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return obj


def check_arguments(key: str, cls: type, given: Mapping[str, Any]) -> None:
    """Refuse argument names ``cls(...)`` does not take, required arguments ``given`` lacks, and values of
    the wrong type for arguments annotated with ``int``, ``float``, ``bool`` or ``str`` (alone or ``| None``).

    ``given``: the config node as a mapping; Hydra's own keys (``_target_``, ``_partial_``...) are skipped.
    A class whose constructor takes ``**kwargs`` accepts any name. The type check is why a bad value (e.g.
    ``pruning.scorer.seed=seven``) fails at composition rather than when the scorer is built, after the model
    has loaded; arguments with other annotations are left to the constructor.

    Raises:
        ConfigError: naming ``key.<argument>`` and, for a name, the arguments the class does take.
    """
    names = [name for name in given if not name.startswith("_")]
    params = inspect.signature(cls).parameters
    named = {name for name, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [name for name in names if name not in named and not takes_any]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: {cls.__qualname__} takes no such argument "
                          f"(it takes: {', '.join(sorted(named)) or 'none'})")
    required = [name for name, p in params.items() if p.default is p.empty and name in named
                and p.kind is not p.POSITIONAL_ONLY and name not in names]
    if required:
        raise ConfigError(f"{key}.{required[0]}: {cls.__qualname__} requires this argument")
    hints = _init_hints(cls)
    for name in names:
        allowed = _plain_types(hints.get(name))
        value = given[name]
        if allowed and not _fits(value, allowed) and not (value is None and params[name].default is None):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{key}.{name}: {cls.__qualname__} takes {wanted}, got {value!r}")


_PLAIN = (int, float, bool, str, type(None))


def _init_hints(cls: type) -> dict[str, Any]:
    """The constructor's resolved annotations ({} when they cannot be resolved, e.g. a forward reference)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an unresolvable user annotation must not block a config: it is just not checked
        return {}


def _plain_types(hint: Any) -> tuple[type, ...]:
    """``hint``'s members if every one is a plain scalar type (``int``, ``float | None``...), else ()."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return tuple(members) if members and all(m in _PLAIN for m in members) else ()


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    """Whether a config value can be passed as one of ``allowed`` (an int is a float; a bool is not a number)."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, tuple(t for t in allowed if t is not bool))
