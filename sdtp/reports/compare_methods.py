"""Render the method comparison (accuracy, paired differences, speedup per token pruner / KV policy).

    python scripts/compare_methods.py [--root results/multiruns] [--out results/compare]

Reads every ``metrics.json`` written by ``sdtp-eval`` runs and every ``bench.json`` written by
``sdtp-bench`` runs under ``--root`` (recursively), groups them by method (``pruning.name``, plus
``+<kv method>@<ratio>`` when a KV policy was active, plus ``[overrides]`` for ablations) and
writes into ``--out``:

* ``compare_methods.md`` / ``.csv`` / ``.json``: one row per method, one column per task metric
  (lm-eval accuracy per task, LongBench/needle scores, WikiText perplexity), ``lm_eval_mean_acc``
  (the mean over the lm-eval accuracy tasks only: ROUGE-L, needle scores and perplexity are not
  averaged with accuracies), the average fraction of prompt tokens per layer, the analytic
  layer-cost speedup and, when a benchmark exists, the measured prefill speedup over dense;
* paired differences, from the per-document outcomes (lm-eval's ``samples_<task>.jsonl``, the
  generation runners' ``predictions.jsonl``, the perplexity runner's per-window NLLs): every method
  minus dense per eval, and SDTP minus every other method per eval, each as a mean with a 95%
  paired Student t interval and a two-sided p-value, Holm-corrected over the comparisons of one
  method against several within one eval (:mod:`sdtp.eval.stats`). Pairs that never differ read
  "identical on all n";
* ``compare_methods.png``: lm-eval mean accuracy, paired lm-eval / LongBench differences to dense
  (95% t intervals) and perplexity vs speedup, one point per method.

Seeded methods get one row per seed and a mean row whose per-document outcome is the mean over the
seeds; that row is the one paired with the others and counted in the Holm families, and a section
lists each seed's numbers with a 95% interval over the seeds (:mod:`sdtp.reports.compare_seeds`):
``random`` per ``pruning.scorer.seed`` (``random_s0``, ...), ``sdtp`` per training seed of its predictor
(runs with ``pruning.scorer.path=<folder>``: ``sdtp_<folder>``, beside ``sdtp_shipped``).

Every run's ``metrics.json`` carries its fingerprint (:mod:`sdtp.provenance`). A row whose
fingerprint differs from dense's (same eval) in anything but the method (model, dtype, device, data
hashes, package versions, git commit, eval and other config) is marked with a footnote, not
refused.

Files that cannot be parsed are reported and skipped; when a method has several runs of the same
eval, the newest file wins. Nothing here runs a model.

A page is never silently replaced by a smaller one: ``compare_methods.json`` records its ``sizes``
(documents per eval, scored perplexity tokens); if ``--out`` already holds a page built from more
(or from an unrecorded number, i.e. rendered before sizes were kept), the new page goes to
``--smaller-out`` when given, else the script refuses. ``--replace`` overwrites regardless.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdtp.eval.stats import document_outcomes, holm, paired_t_interval, prediction_outcomes, window_outcomes
from sdtp.paths import portable_text, portable_tree
from sdtp.provenance import changed_keys, portable
from sdtp.reports.compare_seeds import (PATH_OVERRIDE, Seed, add_seed_groups, run_seed, seed_order, seed_spread_lines,
                                        seed_suffix, training_seed)
from sdtp.reports.lm_eval_pages import smaller_page
from sdtp.reports.paired_tables import interval_text, p_text, paired_summary
from sdtp.utils import atomic_path, write_text_atomic

log = logging.getLogger("compare_methods")

DENSE = "none"
FOCUS = "sdtp"  # the method compared against every other one
ACC_KEYS = ("acc", "acc_norm", "score", "accuracy", "exact_match", "rouge_l", "rougeL", "rouge")
LOWER_IS_BETTER = ("perplexity",)
SPEEDUP_KEYS = ("prefill_speedup", "speedup_prefill", "ttft_speedup", "speedup")
# Eval keys that decide what a number means (how many documents, tokens, shots...), listed under the table.
SETTING_KEYS = ("tasks", "num_fewshot", "limit", "datasets", "max_new_tokens", "max_tokens", "window", "stride",
                "lengths", "depths", "num_samples")
# Command-line overrides that change what a method is (so an ablation gets a row of its own).
VARIANT_PREFIXES = ("pruning.", "kv.", "model.")
# Overrides already part of the name: kv.ratio (<pruning>+<kv>@<ratio>), the scorer seed (<pruning>_s<seed>),
# another training seed's predictor (<pruning>_<folder>).
NAMED_OVERRIDES = ("kv.ratio=", "pruning.scorer.seed=", PATH_OVERRIDE)
# Config groups that make up the method itself; the rest of a fingerprint must match dense's. The
# predictor checkpoint hashes belong to the method too (only sdtp has one).
METHOD_CONFIG_KEYS = ("pruning", "kv")
NON_METHOD_PARTS = ("dtype", "device", "packages", "git")
FOOTNOTE = "†"


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


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _first_metric(entry: dict[str, Any]) -> float | None:
    """The task's headline number: the first of ACC_KEYS present (lm-eval's ``acc,none`` too)."""
    for key in ACC_KEYS:
        for variant_key in (key, f"{key},none"):
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
    return _mean([speedup for length, speedup in found if length == longest])


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


def _add_eval(row: dict[str, Any], data: dict[str, Any], run_dir: Path) -> None:
    """Fold one sdtp-eval ``metrics.json`` (and the per-document files beside it) into ``row``."""
    columns = eval_metrics(data)
    row["metrics"].update(columns)
    row["column_eval"].update({col: str(data.get("eval")) for col in columns})
    row["counts"].update(sample_counts(data))
    row["fingerprints"][settings_key(data)] = data.get("fingerprint")
    outcomes = run_outcomes(data, run_dir)
    if outcomes:
        row["docs"].setdefault(str(data.get("eval")), {}).update(outcomes)
    fraction = _number(_get(data, "results", "avg_layer_token_fraction")) or _number(
        data.get("avg_layer_token_fraction"))
    if fraction:
        row["layer_fraction"] = fraction
    scored = _number(_get(data, "results", "scored_tokens"))
    if scored is not None:
        row.setdefault("sizes", {})["perplexity_tokens"] = int(scored)
    kv_kept = _number(_get(data, "kv", "kept_fraction"))
    if kv_kept is not None:
        row["kv_kept"] = kv_kept


def _read_runs(root: Path) -> list[tuple[Path, dict[str, Any], list[str]]]:
    """(file, its JSON, the run's overrides) of every readable ``metrics.json`` / ``bench.json``, oldest first."""
    files = sorted(root.rglob("metrics.json")) + sorted(root.rglob("bench.json"))
    runs = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime):  # newest last, so it wins
        data = _read_run(path)
        if data is not None:
            runs.append((path, data, run_overrides(path.parent)))
    return runs


def _is_bench(path: Path, data: dict[str, Any]) -> bool:
    return path.name == "bench.json" or data.get("task") == "bench"


def collect(root: Path) -> dict[str, dict[str, Any]]:
    """method -> {"metrics": {column: value}, "docs": {eval: {unit: outcome}}, "layer_fraction": f, ...}.

    The settings and fingerprint of the runs each row uses are kept per eval. Seeded methods get a
    row per seed and a mean row (:mod:`sdtp.reports.compare_seeds`).
    """
    runs = _read_runs(root)
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


# --------------------------------------------------------------------------------------------
# Fingerprints


def comparable_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """The non-method parts of a run's fingerprint (see :data:`METHOD_CONFIG_KEYS`), locations factored out."""
    comparable = portable(fp)
    kept = {k: v for k, v in comparable["config"].items() if k not in METHOD_CONFIG_KEYS}
    return {"config": kept, "data": sorted(map(str, comparable["data"].values())),
            **{part: fp.get(part) for part in NON_METHOD_PARTS}}


def fingerprint_issues(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """method -> {"differs": [...], "unchecked": [...]}, one text per eval, against dense's run of that eval.

    A seeds' mean row inherits its seeds' differences (named by seed): its numbers mix them in.
    """
    reference = rows.get(DENSE, {}).get("fingerprints", {})
    issues: dict[str, dict[str, list[str]]] = {}
    for name, row in rows.items():
        found: dict[str, list[str]] = {"differs": [], "unchecked": []}
        for ev, fp in sorted(row.get("fingerprints", {}).items()):
            if name == DENSE or ev not in reference:
                continue
            if not isinstance(fp, dict) or not isinstance(reference[ev], dict):
                found["unchecked"].append(ev)
                continue
            keys = changed_keys(comparable_fingerprint(reference[ev]), comparable_fingerprint(fp))
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                found["differs"].append(f"{ev}: {shown}")
        issues[name] = found
    for name, row in rows.items():
        for seed in row.get("seeds") or []:
            issues[name]["differs"] += [f"{seed} {text}" for text in issues[seed]["differs"]]
    return issues


def fingerprint_lines(issues: dict[str, dict[str, list[str]]]) -> list[str]:
    """Markdown footnotes: rows whose runs differ from dense's beyond the method, rows not checkable."""
    lines = [f"* {FOOTNOTE} {name}: differs from dense in " + "; ".join(found["differs"])
             for name, found in sorted(issues.items()) if found["differs"]]
    if lines:
        lines[:0] = [f"{FOOTNOTE} Runs whose fingerprint differs from dense's run of the same eval in something "
                     "other than the method (pruning/kv config, predictor): their differences to dense mix the "
                     "method with that change.", ""]
    unchecked = [f"{name} ({', '.join(found['unchecked'])})" for name, found in sorted(issues.items())
                 if found["unchecked"]]
    if unchecked:
        lines += [""] if lines else []  # a paragraph, not a continuation of the last bullet
        lines.append("Fingerprints not checked (a run of the pair has none: written before provenance was recorded): "
                     + "; ".join(unchecked) + ".")
    return lines


# --------------------------------------------------------------------------------------------
# Paired statistics


@dataclass(frozen=True)
class Family:
    """How one eval's paired differences are expressed and what their units are."""

    unit: str
    scale: float  # outcome difference -> unit
    digits: int
    pooling: str


def family(ev: str) -> Family:
    if ev == "perplexity":
        return Family("nats/token", 1.0, 4,
                      "paired t over the WikiText windows (per window: mean NLL per scored token). Consecutive "
                      "windows share context, so they are not independent samples and the interval may be too narrow")
    if ev == "lm_eval":
        return Family("points", 100.0, 2,
                      "paired t over the documents of all tasks pooled (one 0/1 outcome per document, every "
                      "document weighs the same; differences between tasks count as noise, which widens the "
                      "interval)")
    return Family("points", 100.0, 2, "paired t over the samples (all datasets / lengths / depths pooled)")


def paired(a: dict[Any, float], b: dict[Any, float], scale: float) -> dict[str, Any] | None:
    """``a - b`` over their common units, in ``scale`` units: mean, 95% t interval, p (None below 2 units)."""
    common = a.keys() & b.keys()
    if len(common) < 2:
        return None
    return paired_summary(paired_t_interval([scale * (a[key] - b[key]) for key in common]))


def with_holm(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``p_holm``: Holm over the comparisons with ``in_holm`` (per-seed rows are shown, not counted)."""
    # Outside the family: NaN, which holm() skips and does not count.
    adjusted = holm([c["p"] if c["in_holm"] and c["p"] is not None else math.nan for c in comparisons])
    return [{**c, "p_holm": None if math.isnan(p) else p} for c, p in zip(comparisons, adjusted)]


def compare_family(rows: dict[str, dict[str, Any]], ev: str, pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """Paired comparisons ``a - b`` on eval ``ev`` (pairs without two common units are left out), Holm-adjusted."""
    scale = family(ev).scale
    found = []
    for a, b in pairs:
        result = paired(rows[a]["docs"].get(ev, {}), rows[b]["docs"].get(ev, {}), scale)
        if result is not None:
            found.append({"a": a, "b": b, **result, "in_holm": rows[a]["seed_of"] is None})
    return with_holm(found)


def eval_order(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The evals with paired units, lm_eval first."""
    evals = {ev for row in rows.values() for ev in row["docs"]}
    return sorted(evals, key=lambda ev: (ev != "lm_eval", ev))


def comparisons(rows: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{"vs_dense": {eval: [...]}, "focus": {eval: [...]}} for the methods ``names`` (in page order)."""
    result: dict[str, dict[str, list[dict[str, Any]]]] = {"vs_dense": {}, "focus": {}}
    for ev in eval_order(rows):
        if DENSE in rows:
            result["vs_dense"][ev] = compare_family(rows, ev, [(n, DENSE) for n in names if n != DENSE])
        if FOCUS in rows:
            others = [n for n in names if n != FOCUS and rows[n]["seed_of"] is None]
            result["focus"][ev] = compare_family(rows, ev, [(FOCUS, n) for n in others])
    return {kind: {ev: found for ev, found in by_eval.items() if found} for kind, by_eval in result.items()}


# --------------------------------------------------------------------------------------------
# Table


def page_order(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Dense first, then methods by name, KV rows after token pruners, each seed row right after its mean row."""
    def key(name: str) -> tuple:
        base = rows[name]["seed_of"] or name
        return name != DENSE, "+" in base, base, seed_order(rows[name]["seed"])
    return sorted(rows, key=key)


def lm_eval_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The lm-eval accuracy columns of dense (of every row when there is no dense run)."""
    source = [rows[DENSE]] if DENSE in rows else list(rows.values())
    return sorted({col for row in source for col, ev in row["column_eval"].items() if ev == "lm_eval"})


def delta_columns(ev: str) -> list[str]:
    return [f"{ev}_delta", f"{ev}_delta_low", f"{ev}_delta_high", f"{ev}_delta_p", f"{ev}_delta_p_holm",
            f"{ev}_delta_n"]


def delta_values(ev: str, name: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    """The flat ``<ev>_delta*`` columns of method ``name`` (dense: difference 0 by definition, no interval)."""
    match = next((c for c in found if c["a"] == name), None)
    if match is not None:
        values = (match["mean"], match["low"], match["high"], match["p"], match["p_holm"], match["n"])
    else:
        values = (0.0 if name == DENSE else None, None, None, None, None, None)
    return dict(zip(delta_columns(ev), values))


def table(rows: dict[str, dict[str, Any]], compared: dict[str, dict[str, list[dict[str, Any]]]],
          issues: dict[str, dict[str, list[str]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and one dict per method (page order)."""
    metric_cols = sorted({col for row in rows.values() for col in row["metrics"]},
                         key=lambda c: (c in LOWER_IS_BETTER, c))
    acc_cols = lm_eval_columns(rows)
    records = []
    for name in page_order(rows):
        row = rows[name]
        record: dict[str, Any] = {"method": name, "seed_of": row["seed_of"], "seeds": row["seeds"]}
        record.update({col: row["metrics"].get(col) for col in metric_cols})
        accs = [row["metrics"][c] for c in acc_cols if c in row["metrics"]]
        # Accuracies only, and only when every dense task is there: a mean over fewer tasks is another number.
        record["lm_eval_mean_acc"] = _mean(accs) if acc_cols and len(accs) == len(acc_cols) else None
        for ev, found in compared["vs_dense"].items():
            record.update(delta_values(ev, name, found))
        record["fingerprint"] = "; ".join(issues.get(name, {}).get("differs", [])) or None
        record["tokens_per_layer"] = row.get("layer_fraction")
        record.update({key: row.get(key) for key in ("kv_cache", "analytic_speedup", "prefill_speedup")})
        records.append(record)
    deltas = [col for ev in compared["vs_dense"] for col in delta_columns(ev)]
    header = ["method", "seed_of", *metric_cols, "lm_eval_mean_acc", *deltas, "tokens_per_layer", "kv_cache",
              "analytic_speedup", "prefill_speedup", "fingerprint"]
    return header, [{col: r.get(col) for col in header} | {"seeds": r["seeds"]} for r in records]


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def row_label(record: dict[str, Any]) -> str:
    """The method cell: seed rows indented under their mean row, mismatched fingerprints marked."""
    name = record["method"]
    if record["seed_of"]:
        name = f"↳ {name}"
    elif record.get("seeds"):
        name = f"{name} (mean of {len(record['seeds'])} seeds)"
    return name + (f" {FOOTNOTE}" if record.get("fingerprint") else "")


def main_table(header: list[str], records: list[dict[str, Any]]) -> list[str]:
    """The score / cost table (the paired differences get tables of their own)."""
    shown = [c for c in header if c not in ("seed_of", "fingerprint") and "_delta" not in c]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in records:
        lines.append("| " + " | ".join([row_label(r), *(_fmt(r[c]) for c in shown[1:])]) + " |")
    return lines


def comparison_table(found: list[dict[str, Any]], digits: int, label: str, marked: set[str]) -> list[str]:
    """One eval's comparisons: ``label`` column, Δ [95% t CI], p, p (Holm), n; ``marked``: methods to footnote."""
    lines = [f"| {label} | Δ [95% t CI] | p | p (Holm) | n |", "|---|---|---:|---:|---:|"]
    for c in found:
        name = c["a"] if label == "method" else f"{c['a']} − {c['b']}"
        name += f" {FOOTNOTE}" if {c["a"], c["b"]} & marked else ""
        holm_cell = p_text(c["p_holm"], c) if c["in_holm"] else "(seed row, not in Holm)"
        lines.append(f"| {name} | {interval_text(c, digits)} | {p_text(c['p'], c)} | {holm_cell} | {c['n']} |")
    return lines


def comparison_lines(compared: dict[str, dict[str, list[dict[str, Any]]]], marked: set[str]) -> list[str]:
    """Markdown sections: every method minus dense per eval, then SDTP minus every other method per eval."""
    lines: list[str] = []
    if compared["vs_dense"]:
        seeds = any(not c["in_holm"] for found in compared["vs_dense"].values() for c in found)
        lines += ["## Paired differences to dense", "",
                  "Δ = method − dense on the same documents: mean with a 95% paired Student t interval; p = two-sided "
                  "paired t test; p (Holm) = Holm-corrected over the comparisons to dense within the eval."
                  + (" A seeded method's mean row (per-document mean over its seeds) is in the Holm family, its "
                     "single-seed rows are shown but not counted." if seeds else ""), ""]
        for ev, found in compared["vs_dense"].items():
            fam = family(ev)
            lines += [f"### {ev} (Δ in {fam.unit}; Holm over {sum(c['in_holm'] for c in found)})", "",
                      f"Pooling: {fam.pooling}.", "", *comparison_table(found, fam.digits, "method", marked), ""]
    if compared["focus"]:
        lines += [f"## {FOCUS} minus each method", "",
                  f"Same documents, 95% paired t interval, p-values Holm-corrected over the comparisons of {FOCUS} "
                  "within the eval.", ""]
        for ev, found in compared["focus"].items():
            fam = family(ev)
            lines += [f"### {ev} (Δ in {fam.unit}; Holm over {len(found)})", "",
                      *comparison_table(found, fam.digits, "comparison", marked), ""]
    return lines


def missing_interval_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Which perplexity numbers have no interval (runs from before per-window NLLs were stored)."""
    without = sorted(n for n, row in rows.items() if "perplexity" in row["metrics"] and "perplexity" not in row["docs"])
    if not without:
        return []
    return [f"Perplexity: no interval for {', '.join(without)}: their metrics.json has no per-window NLL "
            "(window_nll / window_tokens, perplexity protocol 2); `STEPS=\"perplexity table\"` recomputes them."]


def settings_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown bullet per eval: its settings, or every variant if methods were run differently."""
    by_eval: dict[str, set[str]] = {}
    for row in rows.values():
        for name, text in row.get("settings", {}).items():
            if text:
                by_eval.setdefault(name, set()).add(text)
    bullets = [f"* {name}: " + " | ".join(sorted(texts)) + (" (methods differ!)" if len(texts) > 1 else "")
               for name, texts in sorted(by_eval.items())]
    return ["Settings (newest run per method and eval):", *bullets] if bullets else []


GLOSSARY = (
    "Accuracy columns (%): higher is better; perplexity: lower is better. lm_eval_mean_acc = mean over the lm-eval "
    "accuracy tasks only (ROUGE-L, needle scores and perplexity are on other scales and are not averaged in); "
    "a seeds' mean row shows the mean over its seeds of every column. tokens_per_layer = average fraction of prompt "
    "tokens each layer processed; kv_cache = KV entries left after prefill relative to dense (token pruning, then "
    "the KV policy); analytic_speedup = 1 / tokens_per_layer (layer cost, attention ignored); prefill_speedup = "
    "measured by sdtp-bench at its longest prompt. In the csv/json, <eval>_delta[_low/_high/_p/_p_holm/_n] = the "
    "paired difference to dense above.")


def markdown(header: list[str], records: list[dict[str, Any]], notes: Sequence[Sequence[str]]) -> str:
    lines = ["# Method comparison", "", "Generated by `sdtp/reports/compare_methods.py` (`scripts/compare_methods.py`; "
             "do not edit by hand).", "", *main_table(header, records)]
    for block in notes:
        if block:
            lines += ["", *block]
    return "\n".join([*lines, "", GLOSSARY]) + "\n"


# --------------------------------------------------------------------------------------------
# Output files


def write_outputs(header: list[str], records: list[dict[str, Any]], out: Path, page: str,
                  compared: dict[str, Any], sizes: dict[str, int]) -> list[Path]:
    """``compare_methods.{md,csv,json,png}`` in ``out``, each written atomically, paths portable (:mod:`sdtp.paths`)."""
    page, records, compared = portable_text(page), portable_tree(records), portable_tree(compared)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare_methods.md", out / "compare_methods.csv", out / "compare_methods.json"]
    write_text_atomic(paths[0], page)
    with atomic_path(paths[1]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    document = {"columns": header, "rows": records, "comparisons": compared, "sizes": sizes}
    write_text_atomic(paths[2], json.dumps(document, indent=2, allow_nan=False))
    plot = _plot([r for r in records if not r["seed_of"]], out / "compare_methods.png")
    return paths + ([plot] if plot else [])


def _plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy measures vs prefill speedup, one colour per method (legend, not labels: points overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("lm_eval_mean_acc", "lm-eval mean accuracy, % (higher is better)"),
              ("lm_eval_delta", "paired lm-eval accuracy vs dense, points (95% t CI)"),
              ("longbench_delta", "paired LongBench score vs dense, points (95% t CI)"),
              ("perplexity", "WikiText perplexity (lower is better)")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    shown = [r["method"] for r in records if any(r.get(col) is not None for col, _ in panels)]
    colours = {name: plt.cm.tab10(i % 10) if len(shown) <= 10 else plt.cm.tab20(i % 20) for i, name in enumerate(shown)}
    for ax, (col, label) in zip(axes[0], panels):
        for r in records:
            speed = r["prefill_speedup"] or r["analytic_speedup"]
            if r.get(col) is None or speed is None:
                continue
            low, high = r.get(f"{col}_low"), r.get(f"{col}_high")
            err = [[r[col] - low], [high - r[col]]] if low is not None and high is not None else None
            marker = "o" if r["prefill_speedup"] is not None else "^"
            ax.errorbar(speed, r[col], yerr=err, fmt=marker, color=colours[r["method"]], capsize=3, markersize=6,
                        label=r["method"])
        if col.endswith("_delta"):
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("prefill speedup vs dense (o measured, ^ analytic)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Never replace a bigger page


def page_sizes(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How much data the page rests on: per eval the most documents any method has outcomes for
    (lm-eval: per task), and the scored perplexity tokens."""
    sizes: dict[str, int] = {}
    for row in rows.values():
        for ev, outcomes in row.get("docs", {}).items():
            sizes[f"{ev}_documents"] = max(sizes.get(f"{ev}_documents", 0), len(outcomes))
        for col, n in row.get("counts", {}).items():
            sizes[f"{col}_documents"] = max(sizes.get(f"{col}_documents", 0), int(n))
        for key, n in row.get("sizes", {}).items():
            sizes[key] = max(sizes.get(key, 0), n)
    return sizes


def smaller_than_existing(out: Path, sizes: dict[str, int]) -> str | None:
    """Why the page in ``out`` must not be replaced by one of ``sizes`` (None if it may be)."""
    return smaller_page(out / "compare_methods.json", sizes)


def spread_columns(header: Sequence[str]) -> list[str]:
    """The columns listed per seed: scores, the lm-eval mean and each eval's difference to dense (not its
    interval: the spread over seeds is the point; not the costs, which no seed changes)."""
    costs = ("method", "seed_of", "fingerprint", "tokens_per_layer", "kv_cache", "analytic_speedup",
             "prefill_speedup")
    return [c for c in header if c not in costs and ("_delta" not in c or c.endswith("_delta"))]


def render(rows: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Compute the statistics of ``rows`` and write the page into ``out``."""
    issues = fingerprint_issues(rows)
    compared = comparisons(rows, page_order(rows))
    header, records = table(rows, compared, issues)
    marked = {name for name, found in issues.items() if found["differs"]}
    seeds = {name: row["seed"] for name, row in rows.items()}
    notes = [comparison_lines(compared, marked), seed_spread_lines(records, seeds, spread_columns(header)),
             missing_interval_lines(rows), fingerprint_lines(issues), settings_lines(rows)]
    return write_outputs(header, records, out, markdown(header, records, notes), compared, page_sizes(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("results/multiruns"))
    parser.add_argument("--out", type=Path, default=Path("results/compare"))
    parser.add_argument("--replace", action="store_true",
                        help="overwrite --out even if its page was built from more documents")
    parser.add_argument("--smaller-out", type=Path, default=None,
                        help="render here instead when --out holds a page built from more documents (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.root.is_dir():
        parser.error(f"--root {args.root} does not exist: run experiments/compare_methods.sh first")
    rows = collect(args.root)
    if not rows:
        parser.error(f"no metrics.json or bench.json under {args.root}")
    refusal = None if args.replace else smaller_than_existing(args.out, page_sizes(rows))
    if refusal and args.smaller_out is None:
        parser.error(f"{refusal}; not replacing it with this smaller page. Render elsewhere with --out DIR "
                     "(or --smaller-out DIR), or pass --replace to overwrite it")
    if refusal:
        log.warning("%s: rendering into %s instead", refusal, args.smaller_out)
        args.out = args.smaller_out
    for path in render(rows, args.out):
        log.info("wrote %s", path)
    print((args.out / "compare_methods.md").read_text())
    return 0
