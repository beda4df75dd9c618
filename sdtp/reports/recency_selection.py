"""Choosing a predictor's recency-prior weight from a validation page (:mod:`sdtp.scorers.prior`).

``scripts/predictor_report.py --recency-weights 0,1,4`` adds one row ``<predictor>_rw<w>`` per weight;
:func:`select_recency` picks the weight from those rows' per-segment NLLs and :func:`write_selected`
stores it in the checkpoint's ``predictor.json``, which the scorer reads at inference.
"""

from __future__ import annotations

import json
import logging
from statistics import fmean
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdtp.predictor import META_FILE
from sdtp.utils import write_json_atomic

log = logging.getLogger(__name__)
TRAINING_FREE = ("random", "norm", "positional", "lazyllm")  # random = the seed mean row


def variant_name(predictor: str, weight: float) -> str:
    """Row name of ``predictor`` with recency weight ``weight``: ``sdtp_rw0.5``."""
    return f"{predictor}_rw{weight:g}"


def select_recency(predictors: Sequence[str], weights: Sequence[float],
                   cell_nll: Sequence[dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per predictor: pick the recency weight whose worst cell is closest to the best training-free scorer.

    For weight w and cell c, margin(w, c) = mean NLL of ``<predictor>_rw<w>`` minus the lowest mean NLL
    of the training-free scorers computed in c (random seed mean, norm, positional, lazyllm): the goal
    is to beat every scorer everywhere, so the selected w minimises max over cells of the margin (ties:
    the smaller w). Also reports each weight's mean over cells of Δ NLL vs dense. Only weights computed
    in every cell compete; cells without dense or without any training-free scorer are skipped.
    ``cell_nll``: per cell, scorer name -> per-segment NLLs. Empty unless at least two weights are
    given (one weight is a comparison, not a choice).
    """
    if len(weights) < 2:
        return {}
    cells = [c for c in cell_nll if "dense" in c and any(b in c for b in TRAINING_FREE)]
    out = {}
    for name in predictors:
        rows = {f"{w:g}": variant_name(name, w) for w in weights}
        rows = {w: row for w, row in rows.items() if cells and all(row in c for c in cells)}
        if not rows:
            continue
        best = [min(fmean(c[b]) for b in TRAINING_FREE if b in c) for c in cells]
        margin = {w: max(fmean(c[row]) - b for c, b in zip(cells, best)) for w, row in rows.items()}
        delta = {w: sum(fmean(c[row]) - fmean(c["dense"]) for c in cells) / len(cells) for w, row in rows.items()}
        out[name] = {"worst_margin_vs_best_baseline": margin, "mean_delta_vs_dense": delta,
                     "selected": float(min(margin, key=lambda w: (margin[w], float(w))))}
    return out


def selection_text(selection: dict[str, dict[str, Any]]) -> str:
    """The page line stating each predictor's weights and the selected one."""
    return "; ".join(
        f"`{name}`: worst-cell margin to the best training-free scorer (mean Δ vs dense) "
        + ", ".join(f"w={w} {m:+.4f} ({sel['mean_delta_vs_dense'][w]:+.4f})"
                    for w, m in sel["worst_margin_vs_best_baseline"].items())
        + f" -> selected w={sel['selected']:g} (smallest worst-cell margin)"
        for name, sel in selection.items()
    )


def write_selected(paths: dict[str, Path], selection: dict[str, dict[str, Any]]) -> None:
    """Store each selected weight as ``recency_weight`` in ``paths[name]/predictor.json`` (atomically)."""
    for name, sel in selection.items():
        path = paths[name] / META_FILE
        meta = json.loads(path.read_text())
        meta["recency_weight"] = sel["selected"]
        write_json_atomic(path, meta)
        log.info("%s: recency_weight = %g", path, sel["selected"])
