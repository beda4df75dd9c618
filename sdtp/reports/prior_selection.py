"""Choosing a predictor's prior weights from a validation page (:mod:`sdtp.scorers.prior`).

``scripts/predictor_report.py --recency-weights 0,1,4`` adds one row ``<predictor>_rw<w>`` per weight
(``--norm-weights``: ``<predictor>_nw<w>``, the hidden-state-norm prior; ``--attention-weights``:
``<predictor>_aw<w>``, the attention prior; ``--lexical-weights``: ``<predictor>_lw<w>``, the lexical
query-match prior); :func:`select_prior` picks
a weight per prompt kind (raw text, chat) from those rows' per-segment NLLs and :func:`write_selected`
stores them in the checkpoint's ``predictor.json``, which the scorer reads at inference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from statistics import fmean
from pathlib import Path
from typing import Any

from sdtp.predictor import META_FILE
from sdtp.utils import write_json_atomic

log = logging.getLogger(__name__)
TRAINING_FREE = ("random", "norm", "positional", "lazyllm", "lexical")  # random = the seed mean row
KINDS = ("text", "chat")  # prompt kinds; their predictor.json keys: meta_key(prior, kind)
SUFFIX = {"recency": "rw", "norm": "nw", "attention": "aw", "lexical": "lw"}  # prior -> row-name suffix


def meta_key(prior: str, kind: str) -> str:
    """``predictor.json`` key of ``prior``'s weight for prompt ``kind``: ``recency_weight_chat``."""
    return f"{prior}_weight" + ("_chat" if kind == "chat" else "")


def variant_name(predictor: str, weight: float, prior: str = "recency") -> str:
    """Row name of ``predictor`` with ``prior`` weight ``weight``: ``sdtp_rw0.5``, ``sdtp_nw1``."""
    return f"{predictor}_{SUFFIX[prior]}{weight:g}"


def select_prior(predictors: Sequence[str], weights: Sequence[float], cell_nll: Sequence[dict[str, list[float]]],
                   kinds: Sequence[str] | None = None, prior: str = "recency") -> dict[str, dict[str, dict[str, Any]]]:
    """Per predictor and prompt kind: the ``prior`` weight whose worst cell is closest to the best training-free scorer.

    For weight w and cell c, margin(w, c) = mean NLL of the row ``variant_name(predictor, w, prior)`` minus the lowest mean NLL
    of the training-free scorers computed in c (random seed mean, norm, positional, lazyllm): the goal
    is to beat every scorer everywhere, so the selected w minimises max over cells of the margin (ties:
    the smaller w). Also reports each weight's mean over cells of Δ NLL vs dense. Only weights computed
    in every cell compete; cells without dense or without any training-free scorer are skipped.
    A predictor with fewer than two weights computed in every cell of a kind gets no selection for it (e.g. a
    baseline predictor whose one row was copied in for comparison keeps its weights).
    ``cell_nll``: per cell, scorer name -> per-segment NLLs; ``kinds``: per cell, the prompt kind
    (``text`` or ``chat``, see :data:`KINDS`; default all text), each kind selected on its own cells.
    Empty unless at least two weights are given (one weight is a comparison, not a choice).
    """
    if len(weights) < 2:
        return {}
    kinds = list(kinds) if kinds is not None else ["text"] * len(cell_nll)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in predictors:
        for kind in KINDS:
            cells = [c for c, k in zip(cell_nll, kinds) if k == kind and "dense" in c
                     and any(b in c for b in TRAINING_FREE)]
            chosen = _select(name, weights, cells, prior)
            if chosen:
                out.setdefault(name, {})[kind] = chosen
    return out


def _select(name: str, weights: Sequence[float], cells: list[dict[str, list[float]]],
            prior: str) -> dict[str, Any] | None:
    """:func:`select_prior` for one predictor over one kind's cells (None when fewer than two weights are
    in all of them)."""
    rows = {f"{w:g}": variant_name(name, w, prior) for w in weights}
    rows = {w: row for w, row in rows.items() if cells and all(row in c for c in cells)}
    if len(rows) < 2:  # one computed weight is a comparison, not a choice: never overwrite a setting with it
        return None
    best = [min(fmean(c[b]) for b in TRAINING_FREE if b in c) for c in cells]
    margin = {w: max(fmean(c[row]) - b for c, b in zip(cells, best)) for w, row in rows.items()}
    delta = {w: sum(fmean(c[row]) - fmean(c["dense"]) for c in cells) / len(cells) for w, row in rows.items()}
    return {"cells": len(cells), "worst_margin_vs_best_baseline": margin, "mean_delta_vs_dense": delta,
            "selected": float(min(margin, key=lambda w: (margin[w], float(w))))}


def selection_text(selection: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The page line stating each predictor's weights and the selected one, per prompt kind."""
    return "; ".join(
        f"`{name}` on {kind} prompts ({sel['cells']} cell{'s' * (sel['cells'] != 1)}): worst-cell margin to the best "
        "training-free scorer (mean Δ vs dense) "
        + ", ".join(f"w={w} {m:+.4f} ({sel['mean_delta_vs_dense'][w]:+.4f})"
                    for w, m in sel["worst_margin_vs_best_baseline"].items())
        + f" -> selected w={sel['selected']:g} (smallest worst-cell margin)"
        for name, by_kind in selection.items() for kind, sel in by_kind.items()
    )


def write_selected(paths: dict[str, Path], selection: dict[str, dict[str, dict[str, Any]]],
                   prior: str = "recency") -> None:
    """Store each selected weight in ``paths[name]/predictor.json`` (atomically): the text kind's as
    ``<prior>_weight``, the chat kind's as ``<prior>_weight_chat``."""
    for name, by_kind in selection.items():
        path = paths[name] / META_FILE
        meta = json.loads(path.read_text())
        for kind, sel in by_kind.items():
            meta[meta_key(prior, kind)] = sel["selected"]
            log.info("%s: %s = %g", path, meta_key(prior, kind), sel["selected"])
        write_json_atomic(path, meta)
