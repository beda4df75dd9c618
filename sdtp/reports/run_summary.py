"""A finished ``sdtp-eval`` run as a small JSON (per-document outcomes), and back.

    python -m sdtp.reports.run_summary restore --page results/paper/table3/smollm2-135m.json --name sdtp \
        --run results/runs/paper/table3/smollm2-135m/sdtp -- experiment=paper_table3 pruning=sdtp
    python -m sdtp.reports.run_summary restore-bench --page results/paper/table1/smollm2-135m.json --name sdtp \
        --run results/runs/paper/table1/smollm2-135m/bench_sdtp

A paper page commits :func:`summarise` of each of its runs: the run's ``metrics.json`` (fingerprint
included, resolved config dropped: the fingerprint holds it) and, for lm-eval runs, per task the
evaluated document ids with their 0/1 ``acc``, gold index and number of choices: a few kB where
lm-eval's samples are MBs. For generation runs (LongBench, synthetic tasks) ``predictions`` holds each
sample's score, lengths and timings from ``predictions.jsonl`` (:data:`PREDICTION_KEYS`; the generated
text is left out).

:func:`restore` turns a committed summary back into a run directory (``metrics.json`` and
``samples_<task>.jsonl`` or ``predictions.jsonl``) when, and only when, the run that ``sdtp-eval`` would make now has the same
fingerprint up to the clone's location (:func:`sdtp.provenance.portable`): same config, data and
task files, predictor, packages, dtype and device. ``sdtp-eval`` then finds a finished run and skips
it, so a fresh clone re-renders the page without re-running, and any change recomputes. A page's
``sdtp-bench`` reports come back the same way (:func:`restore_bench`); ``sdtp-bench`` decides what to reuse.

:func:`setup_differences` says whether two runs of *different* configs (another method, more tasks)
evaluated the same documents the same way, so that a page may pair them document by document.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any

from sdtp.provenance import changed_keys, locations_portable, portable
from sdtp.utils import parse_jsonl, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
SAMPLES_PREFIX = "samples_"
PREDICTIONS = "predictions.jsonl"
# What a summary keeps of a generation run's predictions: enough for paired scores, kept-token and
# compression ratios and time sums (sdtp/eval/predict.py, sdtp/eval/prompt_compression.py name them).
PREDICTION_KEYS = ("id", "dataset", "task", "length", "score", "truncated", "prompt_tokens", "new_tokens",
                   "prefill_s", "decode_s", "kept_fraction", "layer_token_fraction", "original_prompt_tokens",
                   "compress_s")


def machine(device: str) -> dict[str, Any]:
    """Where a run was made: CPU model (and GPU name on CUDA), for the page."""
    from sdtp.benchmark.environment import cpu_model

    info: dict[str, Any] = {"cpu_model": cpu_model(), "device": device, "platform": platform.platform()}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def predicted(record: dict[str, Any]) -> int | None:
    """The choice lm-eval's ``acc`` picks: the highest log-likelihood (or the restored ``pred``)."""
    resps = record.get("resps")
    if isinstance(resps, list) and resps:
        scores = [r[0] if isinstance(r, list) else r for r in resps]
        return max(range(len(scores)), key=lambda i: scores[i])
    return record.get("pred")


def task_documents(path: Path) -> dict[str, Any]:
    """One ``samples_<task>.jsonl`` -> ``{doc_ids, acc: "0110...", pred, target, choices}`` (documents in id order).

    ``pred`` is the chosen answer's index per document (digits, like ``acc``); ``target`` the gold
    index when lm-eval logs one (None for partial scoring, where the target is the shared
    continuation); ``choices`` the number of choices of the first document.
    """
    records = sorted((r for r in parse_jsonl(path.read_text()) if isinstance(r.get("doc_id"), int)),
                     key=lambda r: r["doc_id"])
    targets = [r.get("target") for r in records]
    preds = [predicted(r) for r in records]
    first = records[0] if records else {}
    choices = len(first["resps"]) if isinstance(first.get("resps"), list) else first.get("choices")
    return {"doc_ids": [r["doc_id"] for r in records], "acc": "".join(str(int(r["acc"])) for r in records),
            "pred": "".join(map(str, preds)) if all(isinstance(x, int) and x < 10 for x in preds) else None,
            "target": [int(t) for t in targets] if all(isinstance(t, int) for t in targets) else None,
            "choices": choices}


def summarise(run_dir: Path) -> dict[str, Any]:
    """A finished run directory -> ``{metrics, documents: {task: ...}}`` (JSON-ready, small), plus
    ``predictions`` (:data:`PREDICTION_KEYS` of each line) when it has a ``predictions.jsonl``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("config", None)  # the fingerprint holds the resolved config
    if isinstance(metrics.get("fingerprint"), dict):  # a run from before fingerprints were stored portable
        metrics["fingerprint"] = locations_portable(metrics["fingerprint"])
    metrics.setdefault("machine", machine(str(metrics.get("fingerprint", {}).get("device", "cpu"))))
    documents = {path.stem.removeprefix(SAMPLES_PREFIX): task_documents(path)
                 for path in sorted(run_dir.glob(f"{SAMPLES_PREFIX}*.jsonl"))}
    summary: dict[str, Any] = {"metrics": metrics, "documents": documents}
    if (run_dir / PREDICTIONS).is_file():
        summary["predictions"] = [{k: r[k] for k in PREDICTION_KEYS if k in r}
                                  for r in parse_jsonl((run_dir / PREDICTIONS).read_text())]
    return summary


def sample_lines(docs: dict[str, Any]) -> str:
    """The ``samples_<task>.jsonl`` text of one task of a summary (what :func:`task_documents` reads)."""
    n = len(docs["doc_ids"])
    targets, preds = docs.get("target") or [None] * n, docs.get("pred") or [None] * n
    return "".join(json.dumps({"doc_id": i, "target": t, "acc": float(a), "pred": None if p is None else int(p),
                               "choices": docs.get("choices")}) + "\n"
                   for i, a, t, p in zip(docs["doc_ids"], docs["acc"], targets, preds))


def restore(summary: dict[str, Any], run_dir: Path, current: dict[str, Any], source: str) -> bool:
    """Write ``summary`` into ``run_dir`` as a finished run if it was made with ``current``'s setup.

    Returns whether it did. A run directory whose ``metrics.json`` was made with ``current``'s setup is left
    alone (``sdtp-eval`` reuses it); one of another setup, which ``sdtp-eval`` would delete and recompute, is
    replaced. The restored ``metrics.json`` carries ``current`` as its fingerprint, so ``sdtp-eval`` reuses it,
    and ``restored_from`` naming ``source``.
    """
    if _made_with(run_dir / "metrics.json", current):
        return False
    from sdtp.cli.evaluate import clear_outputs  # here: the CLI module is heavy, and restoring is rare

    clear_outputs(run_dir)  # another setup's outputs must not mix into this run's summary
    stored = summary.get("metrics", {}).get("fingerprint")
    if not isinstance(stored, dict) or portable(stored) != portable(current):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for task, docs in summary.get("documents", {}).items():
        write_text_atomic(run_dir / f"{SAMPLES_PREFIX}{task}.jsonl", sample_lines(docs))
    if "predictions" in summary:
        write_text_atomic(run_dir / PREDICTIONS, "".join(json.dumps(r) + "\n" for r in summary["predictions"]))
    write_json_atomic(run_dir / "metrics.json", {**summary["metrics"], "fingerprint": current, "restored_from": source})
    return True


def _made_with(path: Path, current: dict[str, Any]) -> bool:
    """Whether the ``metrics.json`` at ``path`` exists and was made with ``current``'s setup (an unreadable one,
    or one without a fingerprint, is recomputed by sdtp-eval: not made with it)."""
    try:
        stored = json.loads(path.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(stored, dict) and portable(stored) == portable(current)


def restore_bench(page: dict[str, Any], name: str, run_dir: Path) -> bool:
    """Write the page's ``bench`` report ``name`` as ``run_dir/bench.json`` if the run has none. ``sdtp-bench``
    then reuses the lengths it finds there when its settings match (its own ``resume`` check)."""
    report = page.get("bench", {}).get(name)
    if report is None or (run_dir / "bench.json").exists():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "bench.json", report)
    return True


def _document_setup(fp: dict[str, Any], tasks: list[str], with_pruning: bool) -> dict[str, Any]:
    """What decides ``tasks``' documents, prompts and scoring in a fingerprint, locations factored out."""
    from sdtp.eval.harness import OFFLINE_FILES

    comparable = portable(fp)
    config = comparable["config"]
    ev = config.get("eval") or {}
    limit = ev.get("limit")
    files = {OFFLINE_FILES.get(task) for task in tasks} | {f"{task}.yaml" for task in tasks}
    setup = {"model": config.get("model"), "seed": config.get("seed"), "num_fewshot": ev.get("num_fewshot"),
             "limit": {task: limit.get(task) if isinstance(limit, dict) else limit for task in tasks},
             "data": {path: digest for path, digest in comparable["data"].items() if Path(path).name in files},
             **{part: comparable.get(part) for part in ("dtype", "device", "packages")}}
    if with_pruning:
        setup.update(pruning=config.get("pruning"), predictor=comparable["predictor"])
    return setup


def setup_differences(base: dict[str, Any], other: dict[str, Any], tasks: list[str],
                      with_pruning: bool = False) -> list[str]:
    """Keys in which two run summaries' setups differ for ``tasks`` ([] = same documents, scored alike).

    Compared: the model config, seed, few-shot count, per-task document limit, the tasks' data and
    YAML files (by sha256), dtype, device and package versions; with ``with_pruning`` also the
    pruning config and predictor files. Everything else (other tasks, the KV policy, batch size) may
    differ: runs of two experiments that agree here pair up document by document.
    """
    fps = [summary.get("metrics", {}).get("fingerprint") for summary in (base, other)]
    if not all(isinstance(fp, dict) for fp in fps):
        return ["fingerprint (none stored)"]
    return changed_keys(*(_document_setup(fp, tasks, with_pruning) for fp in fps))


def current_fingerprint(overrides: list[str]) -> dict[str, Any]:
    """The fingerprint ``sdtp-eval <overrides>`` would record (config composed as the CLI does; no model loaded)."""
    from sdtp.cli.evaluate import input_files
    from sdtp.config import compose
    from sdtp.provenance import fingerprint

    cfg = compose("eval", overrides)
    return fingerprint(cfg, input_files(cfg))


def _current_or_none(overrides: list[str]) -> dict[str, Any] | None:
    from sdtp.errors import ConfigError

    try:
        return current_fingerprint(overrides)
    except ConfigError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rest = sub.add_parser("restore", help="restore a committed run summary into a run directory if it matches")
    rest.add_argument("--page", type=Path, required=True, help="a page JSON with {'runs': {name: summary}}")
    rest.add_argument("--name", required=True, help="which run of the page")
    rest.add_argument("--run", type=Path, required=True, help="the run directory sdtp-eval will use")
    rest.add_argument("overrides", nargs="*", help="the sdtp-eval overrides (after --), hydra.* excluded")
    bench = sub.add_parser("restore-bench", help="copy a page's sdtp-bench report into a run directory without one")
    bench.add_argument("--page", type=Path, required=True, help="a page JSON with {'bench': {name: bench.json}}")
    bench.add_argument("--name", required=True)
    bench.add_argument("--run", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[run_summary] %(message)s")
    page = json.loads(args.page.read_text()) if args.page.is_file() else {}
    if args.command == "restore-bench":
        restored = restore_bench(page, args.name, args.run)
        log.info("%s: %s", args.run, f"bench report {args.name} restored from {args.page}" if restored else "not restored")
        return
    summary = page.get("runs", {}).get(args.name)
    if summary is None:
        log.info("%s: no committed %s run", args.page, args.name)
    elif not (current := _current_or_none(args.overrides)):
        log.info("%s: not restored (the overrides do not compose; sdtp-eval will say why)", args.run)
    elif restore(summary, args.run, current, str(args.page)):
        log.info("%s: restored the committed %s run from %s (same setup)", args.run, args.name, args.page)
    else:
        log.info("%s: not restored (a run of this setup is there already, or the committed one was made another way)",
                 args.run)


if __name__ == "__main__":
    main()
