"""Reading the runs of the method comparison page: one row per method from ``metrics.json`` / ``bench.json``.

A run's method name, seed and variant come from its own record of its config and its Hydra overrides; its
columns, per-document outcomes, settings and fingerprint are folded into its method's row (:func:`collect`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from omegaconf import OmegaConf

from sdtp.eval.stats import document_outcomes, prediction_outcomes, window_outcomes
from sdtp.reports.compare_seeds import PATH_OVERRIDE, Seed, add_seed_groups, run_seed, seed_suffix, training_seed

log = logging.getLogger("compare_methods")  # the page's logger, whichever module of it speaks (compare_seeds too)

DENSE = "none"
ACC_KEYS = ("acc", "acc_norm", "score", "accuracy", "exact_match", "rouge_l", "rougeL", "rouge")
LOWER_IS_BETTER = ("perplexity",)
# Evals whose runs report one column per task / dataset: a newer run of some of them leaves the others' alone.
PER_TASK_EVALS = ("lm_eval", "longbench")
SPEEDUP_KEYS = ("prefill_speedup", "speedup_prefill", "ttft_speedup", "speedup")
# Eval keys that decide what a number means (how many documents, tokens, shots...), listed under the table.
SETTING_KEYS = ("tasks", "num_fewshot", "limit", "datasets", "max_new_tokens", "max_tokens", "window", "stride",
                "lengths", "depths", "num_samples")
# Command-line overrides that change what a method is (so an ablation gets a row of its own).
VARIANT_PREFIXES = ("pruning.", "kv.", "model.")
# Overrides already part of the name: kv.ratio (<pruning>+<kv>@<ratio>), the scorer seed (<pruning>_s<seed>),
# another training seed's predictor (<pruning>_<folder>).
NAMED_OVERRIDES = ("kv.ratio=", "pruning.scorer.seed=", PATH_OVERRIDE)


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _first_metric(entry: dict[str, Any]) -> float | None:
    """The task's headline number: the first of ACC_KEYS present (lm-eval's ``acc,none`` too; for a task with
    several filters, ``sdtp-eval``'s ``<key>/<filter>`` of the first filter lm-eval lists)."""
    for key in ACC_KEYS:
        for variant_key in (key, f"{key},none", *(k for k in entry if k.startswith(f"{key}/"))):
            value = _number(entry.get(variant_key))
            if value is not None:
                return value
    return None


# --------------------------------------------------------------------------------------------
# What one run is: method name, seed, variant, settings


def run_overrides(run_dir: Path) -> list[str]:
    """A run's command-line overrides (Hydra's ``.hydra/overrides.yaml``, ``+``/``~`` stripped), or []."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        overrides = [str(o) for o in OmegaConf.load(path)]
    except Exception as exc:  # a hand-edited or truncated file: the run still counts, unnamed
        log.warning("ignoring %s: %s", path, exc)
        return []
    return [o.lstrip("+~") for o in overrides]


def variant(overrides: Sequence[str]) -> str:
    """``[key=value,...]`` of a run's pruning/kv/model overrides that are not part of its name, or ''."""
    extra = sorted(o for o in overrides if o.startswith(VARIANT_PREFIXES) and not o.startswith(NAMED_OVERRIDES))
    return f"[{','.join(extra)}]" if extra else ""


def method_name(data: dict[str, Any], seed: Seed | None = None) -> str:
    """``<pruning>[<seed suffix>]`` or ``<pruning>[<seed suffix>]+<kv>@<ratio>`` from a run's own record of its
    config (seed suffix: :func:`~sdtp.reports.compare_seeds.seed_suffix`)."""
    pruning = _get(data, "pruning", "name") or _get(data, "config", "pruning", "name") or data.get("pruning")
    pruning = pruning if isinstance(pruning, str) else "unknown"
    if seed is not None:
        pruning += seed_suffix(seed)
    kv = _get(data, "config", "kv", "method") or _get(data, "kv", "method") or data.get("kv")
    if isinstance(kv, str) and kv != "none":
        ratio = _get(data, "config", "kv", "ratio") or _get(data, "kv", "ratio") or data.get("kv_ratio")
        return f"{pruning}+{kv}" + (f"@{ratio:g}" if isinstance(ratio, int | float) else "")
    return pruning


def eval_metrics(data: dict[str, Any]) -> dict[str, float]:
    """Column -> value for one ``metrics.json`` (accuracy-like columns in %, or ``perplexity``)."""
    results = data.get("results") if isinstance(data.get("results"), dict) else data
    columns: dict[str, float] = {}
    # lm-eval reports fractions, LongBench and the synthetic tasks percentages: one scale for the page.
    scale = 100.0 if data.get("eval") == "lm_eval" else 1.0
    # lm-eval: results.tasks.<task>.<metric>; LongBench: results.datasets.<dataset> = score.
    tasks = results.get("tasks") if isinstance(results.get("tasks"), dict) else results.get("datasets")
    if isinstance(tasks, dict):
        for task, entry in tasks.items():
            value = _first_metric(entry) if isinstance(entry, dict) else _number(entry)
            if value is not None:
                columns[str(task).removeprefix("sdtp_")] = scale * value
    for key in LOWER_IS_BETTER:
        if _number(results.get(key)) is not None:
            columns[key] = float(results[key])
    if not columns:
        value = _first_metric(results)
        if value is not None:
            columns[str(data.get("eval", "score"))] = value
    return columns


def sample_counts(data: dict[str, Any]) -> dict[str, int]:
    """Column -> documents scored, for the lm-eval accuracy columns (per-document 0/1 outcomes)."""
    if data.get("eval") != "lm_eval":
        return {}
    counts = _get(data, "results", "n_samples")
    if not isinstance(counts, dict):
        return {}
    return {str(task).removeprefix("sdtp_"): int(n) for task, n in counts.items() if _number(n)}


def run_settings(data: dict[str, Any]) -> str:
    """The settings a run's numbers depend on, e.g. ``limit=20, num_fewshot=5, dtype=torch.float32``."""
    if isinstance(data.get("settings"), dict):  # sdtp-bench
        values = {**data["settings"], "dtype": _get(data, "environment", "dtype")}
        keys = ("lengths", "new_tokens", "repeats", "threads", "dtype")
    else:
        values = {**(_get(data, "config", "eval") or {}), "dtype": data.get("dtype")}
        keys = (*SETTING_KEYS, "dtype")
    return ", ".join(f"{key}={json.dumps(values[key])}" for key in keys if values.get(key) is not None)


def settings_key(data: dict[str, Any]) -> str:
    """The eval a run belongs to; lm-eval runs of different task lists are listed apart (their columns add up)."""
    name = str(data.get("eval"))
    tasks = _get(data, "config", "eval", "tasks")
    if name == "lm_eval" and isinstance(tasks, list):
        return f"{name}[{','.join(str(t).removeprefix('sdtp_') for t in tasks)}]"
    return name


def run_outcomes(data: dict[str, Any], run_dir: Path) -> dict[tuple, float]:
    """The paired units of one eval run: per document (lm-eval), per sample (generation), per window (perplexity)."""
    if data.get("eval") == "lm_eval":
        return document_outcomes(run_dir)
    if data.get("eval") == "perplexity":
        return window_outcomes(data.get("results") or {})
    return prediction_outcomes(run_dir)


def bench_speedup(data: dict[str, Any]) -> float | None:
    """Measured prefill speedup over dense at the longest prompt length of a bench JSON.

    Reads sdtp-bench's schema (``results: [{seq_len, speedup: {prefill}}]``) and, as a fallback, any
    ``prefill_speedup``-like number or ``{length: number}`` map (``targets`` are ignored).
    """
    rows = data.get("results")
    if isinstance(rows, list):
        pairs = [(_number(r.get("seq_len")) or -1.0, _number(_get(r, "speedup", "prefill")))
                 for r in rows if isinstance(r, dict)]
        pairs = [(length, value) for length, value in pairs if value is not None]
        if pairs:
            return max(pairs)[1]
    found: list[tuple[float, float]] = []  # (length or -1, speedup)

    def walk(node: Any, length: float) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, length)
        if not isinstance(node, dict):
            return
        here = _number(node.get("length", node.get("seq_len")))
        here = length if here is None else here
        for key, value in node.items():
            if key == "targets":  # goals, not measurements
                continue
            if key in SPEEDUP_KEYS and _number(value) is not None:
                found.append((here, float(value)))
            elif key in SPEEDUP_KEYS and isinstance(value, dict):
                for sub, val in value.items():  # {"2048": 1.6, ...}
                    if _to_float(sub) is not None and _number(val) is not None:
                        found.append((_to_float(sub), float(val)))
            else:
                walk(value, _to_float(key) or here)

    walk(data, -1.0)
    if not found:
        return None
    longest = max(length for length, _ in found)
    return fmean([speedup for length, speedup in found if length == longest])


# --------------------------------------------------------------------------------------------
# Collecting rows


def _new_row() -> dict[str, Any]:
    return {"metrics": {}, "column_eval": {}, "files": [], "settings": {}, "counts": {}, "docs": {},
            "fingerprints": {}, "seed_of": None, "seed": None, "seeds": None}


def _read_run(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def unit_column(ev: str, unit: tuple) -> str:
    """The table column the outcome of paired ``unit`` (of eval ``ev``) counts in: its lm-eval task as the columns
    name it (``sdtp_`` dropped) or its LongBench dataset (the first part of the unit's key); an eval of one column
    (perplexity, needle, passage_count...) names it after itself (:func:`eval_metrics`)."""
    return str(unit[0]).removeprefix("sdtp_") if ev in PER_TASK_EVALS else ev


def newest_outcomes(older: dict[tuple, float], ev: str, newer: dict[tuple, float],
                    columns: Iterable[str]) -> dict[tuple, float]:
    """One eval's paired units after a newer run (its ``newer`` outcomes and ``columns``) is folded over ``older``.

    The newer run replaces every column it reports or has units for, units included: a smaller smoke run beside a
    full one must not pair its columns' documents with the full run's (an lm-eval run of other tasks, or a LongBench
    run of other datasets, leaves theirs alone). A column it reports without units loses the older run's too, so a
    difference is never paired on documents other than the column's.
    """
    replaced = set(columns) | {unit_column(ev, unit) for unit in newer}
    return {**{unit: v for unit, v in older.items() if unit_column(ev, unit) not in replaced}, **newer}


def _add_eval(row: dict[str, Any], data: dict[str, Any], run_dir: Path) -> None:
    """Fold one sdtp-eval ``metrics.json`` (and the per-document files beside it) into ``row``: the newer run
    replaces the columns it reports, with their paired units, document counts and sizes."""
    ev, columns = str(data.get("eval")), eval_metrics(data)
    row["metrics"].update(columns)
    row["column_eval"].update({col: ev for col in columns})
    row["counts"] = {col: n for col, n in row["counts"].items() if col not in columns} | sample_counts(data)
    row["fingerprints"][settings_key(data)] = data.get("fingerprint")
    docs = newest_outcomes(row["docs"].get(ev, {}), ev, run_outcomes(data, run_dir), columns)
    if docs:
        row["docs"][ev] = docs
    else:  # an eval without units has no interval (a note says so), not the older run's
        row["docs"].pop(ev, None)
    fraction = _number(_get(data, "results", "avg_layer_token_fraction")) or _number(
        data.get("avg_layer_token_fraction"))
    if fraction:
        row["layer_fraction"] = fraction
    if ev == "perplexity":
        scored = _number(_get(data, "results", "scored_tokens"))
        sizes = row.setdefault("sizes", {})
        if scored is None:  # unknown for this run: the size guard must not see the older run's
            sizes.pop("perplexity_tokens", None)
        else:
            sizes["perplexity_tokens"] = int(scored)
    kv_kept = _number(_get(data, "kv", "kept_fraction"))
    if kv_kept is not None:
        row["kv_kept"] = kv_kept


def _read_runs(root: Path, model: str | None = None) -> list[tuple[Path, dict[str, Any], list[str]]]:
    """(file, its JSON, the run's overrides) of every readable ``metrics.json`` / ``bench.json`` (of ``model``
    only, when given: one page never pairs two models), oldest first."""
    files = sorted(root.rglob("metrics.json")) + sorted(root.rglob("bench.json"))
    runs = []
    # Newest last, so it wins; nanoseconds, since a float of seconds since 1970 rounds to about 0.2 microseconds.
    for path in sorted(files, key=lambda p: p.stat().st_mtime_ns):
        data = _read_run(path)
        if data is not None and (model is None or data.get("model") == model):
            runs.append((path, data, run_overrides(path.parent)))
    return runs


def _is_bench(path: Path, data: dict[str, Any]) -> bool:
    return path.name == "bench.json" or data.get("task") == "bench"


def collect(root: Path, model: str | None = None) -> dict[str, dict[str, Any]]:
    """method -> {"metrics": {column: value}, "docs": {eval: {unit: outcome}}, "layer_fraction": f, ...}.

    The settings and fingerprint of the runs each row uses are kept per eval. Seeded methods get a
    row per seed and a mean row (:mod:`sdtp.reports.compare_seeds`).
    """
    runs = _read_runs(root, model)
    # Methods run with other training seeds' predictors too: their configured predictor's runs become a seed row.
    trained = {method_name(data) + variant(ov) for path, data, ov in runs
               if not _is_bench(path, data) and training_seed(ov) is not None}
    rows: dict[str, dict[str, Any]] = {}
    for path, data, overrides in runs:
        is_bench = _is_bench(path, data)
        base = method_name(data) + variant(overrides)
        # A benchmark times the schedule, which no seed changes: it belongs to the seeds' mean row.
        seed = None if is_bench else run_seed(_get(data, "config", "pruning"), overrides, base in trained)
        name = method_name(data, seed) + variant(overrides)
        row = rows.setdefault(name, _new_row())
        row["files"].append(str(path))
        row["settings"]["bench" if is_bench else settings_key(data)] = run_settings(data)
        if seed is not None:
            row["seed_of"], row["seed"] = base, seed
        if is_bench:
            speedup = bench_speedup(data)
            if speedup is not None:
                row["prefill_speedup"] = speedup
        else:
            _add_eval(row, data, path.parent)
    add_seed_groups(rows, _new_row)
    for name, row in rows.items():
        if name == DENSE:  # the dense model is the reference: speedup 1 by definition
            row.setdefault("layer_fraction", 1.0)
            row.setdefault("prefill_speedup", 1.0)
        if row.get("layer_fraction"):
            row["analytic_speedup"] = 1.0 / row["layer_fraction"]
            # Entries left in the KV cache relative to dense: pruned tokens, then the KV policy's cut.
            row["kv_cache"] = row["layer_fraction"] * row.get("kv_kept", 1.0)
    return rows
