"""Keep committed results free of machine-specific absolute paths (one-off rewrite + a guard).

    python scripts/portable_paths.py            # rewrite the files under results/ (idempotent)
    python scripts/portable_paths.py --check    # list offending file:line: path, exit 1 if any

Writers record portable paths themselves (:mod:`sdtp.paths`); this rewrites what was committed
before they did, and is safe to re-run after new results land. Only files git would commit are
read (tracked, or untracked and not ignored), so the gitignored run directories
(``results/runs/``, ``results/multiruns/``, ...) are never touched.

Besides this checkout's own locations (:func:`sdtp.paths.default_roots`), the locations of the
sessions that produced the committed results are mapped (:data:`HISTORIC_ROOTS`, :data:`WORKTREE`):

- ``/work/shared/data/...`` (also reached as ``<clone>/../shared/data``) -> ``${paths.data_dir}/...``
- ``/work/main/...`` and any git worktree ``/work/wt*/...`` -> repo-relative (``results/...``)
- ``/work/runs/...`` -> ``<runs>/...``: an out-of-repo run directory of the original session, kept
  only so a page's command still says which run it was; it does not exist in a clone.

The rewrite is textual and touches path tokens only (:data:`sdtp.paths.ABS_PATH`): numbers, key
order and formatting stay byte-identical, and every rewritten JSON file is checked to parse to the
same structure with the same non-string values (two path keys collapsing into one would fail it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdtp.paths import ABS_PATH, DATA_DIR_TOKEN, REPO_ROOT, default_roots, portable_text
from sdtp.utils import write_text_atomic

RUNS_TOKEN = "<runs>"
HISTORIC_ROOTS = {"/work/shared/data": DATA_DIR_TOKEN, "/work/runs": RUNS_TOKEN}
WORKTREE = re.compile(r"/work/(?:main|wt[\w\-]*)(?=/|\b)")
SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".yaml", ".yml", ".txt")


def migrate_text(text: str) -> str:
    """``text`` with every absolute path made portable (this checkout's and the historic locations)."""
    roots = {**default_roots(), **HISTORIC_ROOTS, **{root: "" for root in WORKTREE.findall(text)}}
    return portable_text(text, roots)


def same_shape(old: Any, new: Any) -> bool:
    """Same JSON structure (dict sizes, list lengths) and equal non-string values; strings may differ."""
    if isinstance(old, dict):
        return (isinstance(new, dict) and len(old) == len(new)
                and all(same_shape(a, b) for a, b in zip(old.values(), new.values())))
    if isinstance(old, list):
        return isinstance(new, list) and len(old) == len(new) and all(map(same_shape, old, new))
    return isinstance(new, str) if isinstance(old, str) else type(old) is type(new) and old == new


def check_json(path: Path, old: str, new: str) -> None:
    """Refuse a rewrite that changes anything in ``path`` but strings (ValueError naming the file)."""
    if path.suffix == ".jsonl":
        pairs = zip(old.splitlines(), new.splitlines())
        ok = len(old.splitlines()) == len(new.splitlines()) and all(
            same_shape(json.loads(a), json.loads(b)) for a, b in pairs if a.strip())
    else:
        ok = same_shape(json.loads(old), json.loads(new))
    if not ok:
        raise ValueError(f"{path}: rewriting its paths would change more than strings; left as is")


def committed_files(paths: Iterable[str | Path], root: Path = REPO_ROOT) -> list[Path]:
    """Files under ``paths`` that git would commit (tracked, or untracked and not ignored), text formats only."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *map(str, paths)],
                         cwd=root, check=True, capture_output=True, text=True).stdout
    files = sorted({root / name for name in out.split("\0") if name})
    return [f for f in files if f.suffix in SUFFIXES and f.is_file()]


def offenders(path: Path) -> list[str]:
    """``file:line: path`` for every absolute path left in ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    return [f"{shown}:{n}: {match.group(0)}" for n, line in enumerate(lines, 1) for match in ABS_PATH.finditer(line)]


def migrate(files: Iterable[Path]) -> list[Path]:
    """Rewrite ``files`` in place (atomically); returns those that changed."""
    changed = []
    for path in files:
        old = path.read_text(encoding="utf-8")
        new = migrate_text(old)
        if new == old:
            continue
        if path.suffix in (".json", ".jsonl"):
            check_json(path, old, new)
        write_text_atomic(path, new)
        changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", default=["results"], help="files or folders, relative to the repo root")
    parser.add_argument("--check", action="store_true", help="only list absolute paths; exit 1 if there are any")
    args = parser.parse_args(argv)
    files = committed_files(args.paths)
    if args.check:
        found = [line for path in files for line in offenders(path)]
        print("\n".join(found) if found else f"{len(files)} files, no absolute paths")
        return 1 if found else 0
    changed = migrate(files)
    for path in changed:
        print(path.relative_to(REPO_ROOT))
    print(f"{len(changed)} of {len(files)} files rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
