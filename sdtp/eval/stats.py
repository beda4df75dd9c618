"""How much a limited evaluation can tell apart: binomial intervals and paired accuracy deltas.

Method comparisons run with ``limit`` (tens of documents per task), where a few points of accuracy
are noise. Two numbers say what is resolved:

* the 95% binomial half-width of one accuracy (normal approximation), and
* the paired difference between two methods on the *same* documents (lm-eval writes one 0/1
  outcome per document to ``samples_<task>.jsonl``; the generation runners one score in [0, 1] per
  sample to ``predictions.jsonl``), whose interval is much narrower than the difference of two
  independent intervals because both methods get the easy documents right.
"""

from __future__ import annotations

import math
from pathlib import Path

from sdtp.utils import parse_jsonl

Z95 = 1.959964


def binomial_ci95(percent: float, n: int) -> float:
    """Half-width in points of the 95% interval of an accuracy of ``percent`` % over ``n`` documents."""
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * Z95 * math.sqrt(p * (1.0 - p) / n)


def document_outcomes(run_dir: Path, metric: str = "acc") -> dict[tuple[str, int], float]:
    """(task, doc_id) -> per-document ``metric`` (0/1) from the ``samples_<task>.jsonl`` files of a run."""
    outcomes: dict[tuple[str, int], float] = {}
    for path in sorted(run_dir.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_").removeprefix("sdtp_")
        for record in parse_jsonl(path.read_text()):
            value = record.get(metric)
            if isinstance(record.get("doc_id"), int) and isinstance(value, int | float):
                outcomes[(task, record["doc_id"])] = float(value)
    return outcomes


def prediction_outcomes(run_dir: Path) -> dict[tuple[str, str], float]:
    """(dataset or task, sample id) -> score in [0, 1] from a generation run's ``predictions.jsonl``."""
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return {}
    outcomes: dict[tuple[str, str], float] = {}
    for record in parse_jsonl(path.read_text()):  # a killed run's torn last line is skipped, as on resume
        if "id" in record and isinstance(record.get("score"), int | float):
            outcomes[(str(record.get("dataset", record.get("task", ""))), str(record["id"]))] = float(record["score"])
    return outcomes


def paired_delta(method: dict, reference: dict) -> tuple[float, float, int] | None:
    """Mean paired difference ``method - reference`` in points over their common documents.

    Args:
        method, reference: (task, doc_id) -> outcome in [0, 1], as from :func:`document_outcomes`.
    Returns:
        (delta, 95% half-width, documents), or None with fewer than two common documents.
    """
    common = sorted(method.keys() & reference.keys())
    n = len(common)
    if n < 2:
        return None
    diffs = [method[key] - reference[key] for key in common]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return 100.0 * mean, 100.0 * Z95 * math.sqrt(var / n), n
