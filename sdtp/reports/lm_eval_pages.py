"""What the result pages share: the paper's task names, the setup read off the runs, number
formatting, the ``--run name=<dir>`` argument, writing a page's four files and refusing to replace a
page built from more data with a smaller one (:func:`smaller_page`).

A page (``paper_table3``, ``paper_table6``) is a dict saved as ``<out>/<model>.json`` beside its
rendering ``<model>.md``, the table as ``<model>.csv`` and a figure ``<model>.png``, each written
atomically (:func:`write_page_files`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdtp.paths import portable_path, portable_tree, roots_for
from sdtp.reports.seed_runs import SEP, row_of
from sdtp.utils import write_json_atomic, write_text_atomic

# Our offline task -> the paper's row name, in the paper's order (Tables 3 and 6 use these rows).
TASKS = {"sdtp_copa": "COPA", "sdtp_piqa": "PIQA", "sdtp_winogrande": "WinoGrande", "sdtp_mathqa": "MathQA",
         "sdtp_boolq": "BoolQ", "sdtp_cb": "CB", "sdtp_wic": "WiC", "sdtp_wsc": "WSC"}


def ordered_tasks(found: Collection[str]) -> list[str]:
    """``found`` in the paper's row order, tasks the paper does not have after them (sorted)."""
    return [t for t in TASKS if t in found] + sorted(set(found) - set(TASKS))


def num(x: float | None, spec: str = ".2f") -> str:
    """``x`` formatted by ``spec``, "–" for None."""
    return "–" if x is None else f"{x:{spec}}"


def error_bars(deltas: Iterable[Mapping[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Paired deltas ``{"mean", "low", "high"}`` -> (means, matplotlib ``yerr`` [below, above]).

    A delta without an interval (identical on every document) gets a zero-length bar.
    """
    deltas = list(deltas)
    means = [d["mean"] for d in deltas]
    below = [d["mean"] - (d["low"] if d.get("low") is not None else d["mean"]) for d in deltas]
    above = [(d["high"] if d.get("high") is not None else d["mean"]) - d["mean"] for d in deltas]
    return means, [below, above]


def minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def run_config(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config a run recorded in its fingerprint ({} if none)."""
    return (metrics.get("fingerprint") or {}).get("config") or {}


def shown_path(path: str | None, config: Mapping[str, Any]) -> str | None:
    """``path`` made portable against the run's own ``paths`` (relative inside its repository; the page is read in any clone)."""
    return portable_path(path, roots_for(config.get("paths") or {})) if path else path


def scorer_path(metrics: Mapping[str, Any]) -> str | None:
    """The predictor (or other scorer checkpoint) a run pruned with, portable (None without one)."""
    config = run_config(metrics)
    return shown_path(((config.get("pruning") or {}).get("scorer") or {}).get("path"), config)


def eval_limit(metrics: Mapping[str, Any]) -> Any:
    """The run's ``eval.limit`` (documents per task) as recorded in its fingerprint."""
    return (run_config(metrics).get("eval") or {}).get("limit")


def machine_name(metrics: Mapping[str, Any]) -> str:
    """Where a run ran: its GPU's name, else its CPU model ("?" when it recorded neither)."""
    machine = metrics.get("machine") or {}
    return machine.get("gpu") or machine.get("cpu_model", "?")


def machine_text(metrics: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """(every machine the runs ran on, GPU name or CPU model, sorted and joined; the runs' git commits joined)."""
    runs = list(metrics)
    return (", ".join(sorted({machine_name(m) for m in runs})),
            ", ".join(sorted({str(m.get("git_commit")) for m in runs})))


def dtype_name(metrics: Mapping[str, Any]) -> str:
    """A run's dtype without torch's prefix ("bfloat16")."""
    return str(metrics.get("dtype")).removeprefix("torch.")


def mixed_setups(runs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Which of ``runs`` (name -> metrics) ran on which machine, device and dtype, as a page lists them ("dense,
    sdtp on AMD EPYC (cpu), bfloat16; ..."); None when they all ran alike (the page then names that one setup)."""
    groups: dict[str, list[str]] = {}
    for name, metrics in runs.items():
        device = (metrics.get("machine") or {}).get("device")
        groups.setdefault(f"{machine_name(metrics)} ({device}), {dtype_name(metrics)}", []).append(name)
    return None if len(groups) < 2 else "; ".join(f"{', '.join(names)} on {where}" for where, names in groups.items())


def setup_difference_lines(differences: Mapping[str, Sequence[str]], reference: str) -> list[str]:
    """A page's bullet naming each run whose setup differs from the ``reference`` run it is paired with, and in what
    (:func:`sdtp.reports.run_summary.setup_differences` keys); [] when none does."""
    differing = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in differences.items() if keys)
    if not differing:
        return []
    return [f"- **Setups differ.** These runs are paired with {reference} over the same documents but were not made "
            "like it (their fingerprints, `sdtp/reports/run_summary.py` `setup_differences`): "
            f"{differing}. Their Δ includes the effect of that difference."]


def run_argument(names: Collection[str]) -> Callable[[str], tuple[str, Path]]:
    """argparse ``type`` for ``--run <name>=<run dir>`` with ``name`` among ``names``, or ``<name>@<seed>``: the
    same row's run with another training seed's predictor (:mod:`sdtp.reports.seed_runs`)."""

    def parse(text: str) -> tuple[str, Path]:
        name, _, path = text.partition("=")
        if row_of(name) not in names or name.endswith(SEP) or not path:
            raise argparse.ArgumentTypeError(f"--run {text!r}: expected <name>=<run dir> or <name>@<seed>=<run dir> "
                                             f"(another training seed's run), name one of {', '.join(names)}")
        return name, Path(path)

    return parse


def write_page_files(out_dir: Path, page: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                     csv_text: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], Path]) -> Path:
    """Write ``<out_dir>/<model>.{json,png,csv,md}`` of ``page`` (each atomically; ``plot`` saves with
    :func:`sdtp.figures.save_figure`); returns the .md path.

    Every path on the page is made portable first (:mod:`sdtp.paths`): pages are committed."""
    page = portable_tree(page)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / page["model"]
    page = with_computing_wall_time(stem.with_suffix(".json"), page)
    write_json_atomic(stem.with_suffix(".json"), page)
    plot(page, stem.with_suffix(".png"))
    write_text_atomic(stem.with_suffix(".csv"), csv_text(page))
    write_text_atomic(stem.with_suffix(".md"), markdown(page))
    return stem.with_suffix(".md")


def with_computing_wall_time(path: Path, page: dict[str, Any]) -> dict[str, Any]:
    """``page`` with the wall time of the command that computed its runs, when ``path`` holds a page of the same
    runs: a later render that only found or restored them (a resumed script, or Table 6's script rendering Table 3's
    page first) would otherwise record its own few seconds as the time the page took."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return page
    if page.get("runs") is None or earlier.get("runs") != page["runs"] or earlier.get("wall_s") is None:
        return page
    return {**page, "wall_s": earlier["wall_s"]}


def guarded_out_dir(out_dir: Path, model: str, sizes: Mapping[str, int], smaller_out: Path | None,
                    replace: bool) -> Path:
    """Where a page built from ``sizes`` goes: ``out_dir``, or ``smaller_out`` when the page there rests on more
    data (:func:`smaller_page`; refused without one), unless ``replace``."""
    refusal = None if replace else smaller_page(out_dir / f"{model}.json", sizes)
    if refusal is None:
        return out_dir
    if smaller_out is None:
        raise FileExistsError(f"{refusal}; not replacing it (render elsewhere, or replace on purpose)")
    print(f"{refusal}: rendering into {smaller_out} instead", file=sys.stderr)
    return smaller_out


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--smaller-out`` and ``--replace`` options of :func:`guarded_out_dir`."""
    parser.add_argument("--smaller-out", type=Path, default=None,
                        help="where a page resting on less data than --out's goes (e.g. a smoke run's)")
    parser.add_argument("--replace", action="store_true", help="overwrite --out even if its page rests on more data")


def document_sizes(table: list[dict[str, Any]], seeds: Mapping[str, Any]) -> dict[str, int]:
    """What an accuracy page rests on: documents per task (``lm_eval_task`` -> ``n``) and training seeds per row."""
    out = {f"{r['lm_eval_task']}_documents": int(r["n"]) for r in table if r.get("lm_eval_task")}
    out.update({f"{row}_seeds": len(spread.get("members") or []) for row, spread in seeds.items()})
    return out


def smaller_page(path: Path, sizes: Mapping[str, int]) -> str | None:
    """Why the page JSON at ``path`` must not be replaced by one built from ``sizes`` (None if it may be).

    A page records ``sizes`` (documents per eval, lengths, steps...); a smoke or limited run that has less
    of any of them must render elsewhere, so a committed page is never silently shrunk.
    """
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text()).get("sizes")
    except (OSError, json.JSONDecodeError, AttributeError):
        old = None
    if not isinstance(old, dict):
        return f"{path} does not record how many documents it was built from (rendered before sizes were kept)"
    shrunk = [f"{key}: {n} -> {sizes.get(key, 0)}" for key, n in sorted(old.items()) if sizes.get(key, 0) < n]
    return f"{path} was built from more data ({'; '.join(shrunk)})" if shrunk else None
