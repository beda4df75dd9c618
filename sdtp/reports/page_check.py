"""Check that every committed predictor page still re-renders from its own command, and say why where it does not.

    PYTHONPATH=. python scripts/check_pages.py                 # every page; writes results/page_check.{md,json}
    PYTHONPATH=. python scripts/check_pages.py --pages 'results/compare/*'   # a subset (glob on the page folder)

A page of the continuation protocol (:mod:`sdtp.reports.predictor_eval`) records the command that made it
(``eval.json["command"]``). Each page's ``eval.json`` and ``continuation/`` cache are copied to a scratch folder and
its command is run there with ``--render-only --replace --out <scratch>``: no forward pass, only tokenizing and
fingerprints.
Outcomes:

- ``same``: every cell the page shows was found, every value of its tables (``cells``, ``pooled``) equals the
  committed one (fields a later renderer adds, absent from the committed page, are not compared), and so does every
  line of its ``eval.md`` but those that depend on how and where the check renders (:func:`comparable_markdown`);
- ``changed``: every cell found, but a value or a line of the page differs (the renderer's statistics or text
  changed since the page was made);
- ``stale``: cells the page shows are no longer found, because their cache no longer matches what the command
  asks for today; the reason lists the fingerprint keys that differ (typically ``predictor_sha256`` or a prior
  weight: the checkpoint or its ``predictor.json`` changed after the page was computed). The committed page is a
  record of that earlier state (its own command refuses to drop them: recompute them, or pass ``--replace``);
- ``failed``: any other error (its last line is shown).

Each page runs in its own process, as a user would run it (about 20-80 s per page on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sdtp.config import REPO_ROOT
from sdtp.reports.continuation_cells import existing_page
from sdtp.utils import write_json_atomic, write_text_atomic

SCRIPT = "scripts/predictor_report.py"
MISMATCH = re.compile(r"fingerprint mismatch \(([^)]*)\)")
TABLES = ("cells", "pooled")  # what render-only recomputes from the cached cells
MARKDOWN = "eval.md"
# Header lines of eval.md that name the rendering host (CPU, packages, git commit) or depend on the check's own
# command (--replace and a scratch --out decide which cell commands are listed apart from the page's).
INVOCATION_LINES = ("- **Machine.**", "- **Cells computed by.**")


def committed_pages(root: Path) -> list[Path]:
    """Page folders under ``root/results`` whose git-tracked ``eval.json`` was written by :data:`SCRIPT`."""
    listed = subprocess.run(["git", "ls-files", "results/**/eval.json"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.split()
    folders = [(root / name).parent for name in sorted(listed)]
    return [folder for folder in folders if SCRIPT in existing_page(folder).get("command", "")]


def render_argv(command: str, out: Path) -> list[str]:
    """The page's own options (after :data:`SCRIPT`) plus ``--render-only --replace --out out`` (later options win;
    ``--replace``: a stale page is rendered without its stale cells, which :func:`outcome` then counts)."""
    argv = shlex.split(command.split(SCRIPT, 1)[1])
    return [*argv, *(flag for flag in ("--render-only", "--replace") if flag not in argv), "--out", str(out)]


def check_page(page: Path, env: dict[str, str]) -> dict[str, Any]:
    """Re-render ``page`` (a folder) in a scratch copy, from the repository root as its command expects; returns its
    outcome, reason and wall time."""
    root = Path(REPO_ROOT)
    committed = existing_page(page)
    with tempfile.TemporaryDirectory(prefix="page_check.") as scratch:
        out = Path(scratch) / "page"
        out.mkdir()
        shutil.copy2(page / "eval.json", out / "eval.json")
        if (page / "continuation").is_dir():
            shutil.copytree(page / "continuation", out / "continuation")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, SCRIPT, *render_argv(committed["command"], out)], cwd=root, env=env,
                              capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
        rendered = existing_page(out) if proc.returncode == 0 else {}
        texts = [(folder / MARKDOWN).read_text() if (folder / MARKDOWN).is_file() else None for folder in (page, out)]
    name = page.relative_to(root) if page.is_relative_to(root) else page
    return {"page": str(name), "seconds": seconds, **outcome(proc, committed, rendered, *texts)}


def comparable_markdown(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a page's ``eval.md`` that a re-render must reproduce: all but the command block
    (the check's command adds ``--replace`` and a scratch ``--out``) and the :data:`INVOCATION_LINES`."""
    lines = text.splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith("```")][:2]  # the first block is the command
    command = range(fences[0], fences[1] + 1) if len(fences) == 2 else range(0)
    return [(i + 1, line) for i, line in enumerate(lines) if i not in command and not line.startswith(INVOCATION_LINES)]


def markdown_differences(committed: str, rendered: str) -> list[str]:
    """``eval.md:<line>`` (the committed page's numbering) of each line the re-render shows otherwise."""
    old, new = comparable_markdown(committed), comparable_markdown(rendered)
    found = [f"{MARKDOWN}:{i}" for (i, a), (_, b) in zip(old, new) if a != b]
    if len(old) != len(new):
        found.append(f"{MARKDOWN}: {len(old)} vs {len(new)} compared lines")
    return found


def outcome(proc: subprocess.CompletedProcess, committed: dict[str, Any], rendered: dict[str, Any],
            committed_md: str | None = None, rendered_md: str | None = None) -> dict[str, Any]:
    """``status`` and ``reason`` of one re-render (see the module docstring); the pages' markdown is compared when
    both are given."""
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {"status": "failed", "reason": lines[-1][:300]}
    lost = set(committed.get("caches", {})) - set(rendered.get("caches", {}))
    if lost:  # the cache warnings name the fingerprint keys that no longer match
        keys = sorted({key.strip() for found in MISMATCH.findall(proc.stderr) for key in found.split(",")})
        return {"status": "stale", "reason": f"{len(lost)} cell(s) no longer match (differing keys: {', '.join(keys)})"
                if keys else f"{len(lost)} cell(s) missing"}
    changed = [path for key in TABLES for path in differences(committed.get(key), rendered.get(key), key)]
    lines = [] if committed_md is None or rendered_md is None else markdown_differences(committed_md, rendered_md)
    reasons = ([f"{len(changed)} value(s) differ: {', '.join(changed[:3])}"] if changed else []) + \
        ([f"{len(lines)} line(s) of the page differ: {', '.join(lines[:3])}"] if lines else [])
    return {"status": "changed" if reasons else "same", "reason": "; ".join(reasons)}


def differences(committed: Any, rendered: Any, path: str) -> list[str]:
    """Paths of the values in ``committed`` that ``rendered`` lacks or holds otherwise; fields only ``rendered`` has
    are a later renderer's additions (e.g. a KV-cache column), not a change of what the page showed."""
    if isinstance(committed, dict) and isinstance(rendered, dict):
        return [found for key, value in committed.items()
                for found in differences(value, rendered.get(key, _MISSING), f"{path}.{key}")]
    if isinstance(committed, list) and isinstance(rendered, list) and len(committed) == len(rendered):
        return [found for index, (a, b) in enumerate(zip(committed, rendered))
                for found in differences(a, b, f"{path}[{index}]")]
    return [] if committed == rendered else [path]


_MISSING = object()


def markdown(results: list[dict[str, Any]], command: str) -> str:
    counts = {status: sum(r["status"] == status for r in results) for status in ("same", "changed", "stale", "failed")}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines = ["# Committed predictor pages: do they re-render from their own command?", "",
             "Generated by `sdtp/reports/page_check.py` (do not edit by hand):", "", "```bash", command, "```", "",
             "Each page's own command with `--render-only --replace`, on a scratch copy of its cells (a stale page "
             f"is rendered without its stale cells, which are counted; statuses: the module docstring). {summary}.", "",
             "| page | status | reason | seconds |", "|---|---|---|---|"]
    lines += [f"| `{r['page']}` | {r['status']} | {r['reason']} | {r['seconds']:.0f} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", default="*", help="glob on the page folders (default: every page)")
    parser.add_argument("--out", type=Path, default=Path("results/page_check"),
                        help="writes <out>.md and <out>.json (default results/page_check)")
    args = parser.parse_args(argv)
    root = Path(REPO_ROOT)
    pages = [p for p in committed_pages(root) if fnmatch.fnmatch(str(p.relative_to(root)), args.pages)]
    if not pages:
        parser.error(f"--pages {args.pages!r}: no committed page written by {SCRIPT} matches")
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    for index, page in enumerate(pages, 1):
        results.append(check_page(page, env))
        print(f"[{index}/{len(pages)}] {results[-1]['status']:7s} {results[-1]['page']} {results[-1]['reason']}",
              flush=True)
    command = "PYTHONPATH=. python scripts/check_pages.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_json_atomic(args.out.with_suffix(".json"), {"command": command.strip(), "pages": results})
    write_text_atomic(args.out.with_suffix(".md"), markdown(results, command.strip()))
    return 0 if all(r["status"] in ("same", "stale") for r in results) else 1
