"""Portable paths: how results name files without the machine-specific absolute prefix.

Committed results (pages, run summaries, fingerprints, cache records, commands) are read on other
machines and clones, where ``/work/main/...`` or ``/home/me/...`` means nothing. Every writer of a
result passes the paths it records through :func:`portable_path` (one path), :func:`portable_text`
(a command or free text) or :func:`portable_tree` (a JSON-like object). The portable forms:

==========================  ===================================  =========================================
where the file is           recorded as                          why
==========================  ===================================  =========================================
the data dir (``paths.      ``${paths.data_dir}/lm/wiki.raw``    the Hydra interpolation: an override copied
data_dir``)                                                      from a page resolves on any machine
                                                                 (single-quote it in a shell)
the cache dir               ``${paths.cache_dir}/...``           same, for converted weights
the repo (``paths.root``)   ``results/runs/...`` (relative)      the scripts run from the repo root
the home directory          ``<home>/...``                       a user's own files
anywhere else               ``<abs>/<file name>``                the location is not reproducible anyway;
                                                                 files are identified by sha256 where it
                                                                 matters (fingerprints)
==========================  ===================================  =========================================

The longest matching directory wins (a data dir inside the repo is still ``${paths.data_dir}``).
Already portable strings are returned unchanged, so every function here is idempotent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
PATHS_CONFIG = REPO_ROOT / "conf" / "paths" / "default.yaml"
DATA_DIR_TOKEN = "${paths.data_dir}"
CACHE_DIR_TOKEN = "${paths.cache_dir}"
HOME_TOKEN = "<home>"
ABS_TOKEN = "<abs>"
# ``paths.<key>`` -> its portable prefix ("" = relative to the repo root).
PATH_TOKENS = {"root": "", "data_dir": DATA_DIR_TOKEN, "cache_dir": CACHE_DIR_TOKEN}
# An absolute POSIX path inside free text. Not after a word character or one of ``./~$}>-``, so "tokens/s", "1/2",
# relative paths and the portable forms (``${paths.data_dir}/x``, ``<home>/x``) are left alone. After ':' it is a
# path-list entry (``PYTHONPATH=.:/x``); a URL's ``scheme://host/path`` never matches, as its slashes follow '/'.
ABS_PATH = re.compile(r"(?<![\w./~$}>\-])/[\w.+\-]+(?:/[\w.+@=\-]*)*")

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))

Roots = Mapping[str, str]


def roots_for(paths: Mapping[str, Any]) -> dict[str, str]:
    """Absolute directory -> portable prefix for a ``paths`` config (its absolute entries of
    :data:`PATH_TOKENS`), plus this user's home directory."""
    roots: dict[str, str] = {}
    home = os.path.expanduser("~")
    if os.path.isabs(home) and os.path.normpath(home) != "/":
        roots[os.path.normpath(home)] = HOME_TOKEN
    for key, token in PATH_TOKENS.items():
        value = paths.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            roots[os.path.normpath(value)] = token
    return roots


def default_roots() -> dict[str, str]:
    """:func:`roots_for` this checkout as ``conf/paths/default.yaml`` configures it (``SDTP_DATA_DIR`` etc. honoured)."""
    paths = OmegaConf.load(PATHS_CONFIG)
    return roots_for({key: str(paths[key]) for key in PATH_TOKENS if key in paths})


def portable_path(path: str | os.PathLike[str], roots: Roots | None = None) -> str:
    """``path`` in its portable form (module docstring); ``roots`` defaults to :func:`default_roots`."""
    text = os.fspath(path)
    if not text.startswith("/"):
        return text
    roots = default_roots() if roots is None else roots
    norm = os.path.normpath(text)  # <root>/../shared/data -> the data dir itself
    for root in sorted(roots, key=len, reverse=True):
        if norm == root or norm.startswith(root.rstrip("/") + "/"):
            rest, token = norm[len(root):].lstrip("/"), roots[root]
            if not token:
                return rest or "."
            return f"{token}/{rest}" if rest else token
    return f"{ABS_TOKEN}/{os.path.basename(norm)}"


def portable_text(text: str, roots: Roots | None = None) -> str:
    """``text`` (a command line, a Markdown page) with every absolute path in it made portable."""
    if "/" not in text:
        return text
    roots = default_roots() if roots is None else roots
    return ABS_PATH.sub(lambda match: portable_path(match.group(0), roots), text)


def portable_tree(node: Any, roots: Roots | None = None) -> Any:
    """A JSON-like ``node`` with :func:`portable_text` applied to every string, dict keys included
    (fingerprints key file hashes by path). Numbers and structure are untouched."""
    roots = default_roots() if roots is None else roots
    if isinstance(node, dict):
        return {portable_text(k, roots) if isinstance(k, str) else k: portable_tree(v, roots) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [portable_tree(value, roots) for value in node]
    return portable_text(node, roots) if isinstance(node, str) else node
