"""How far from nested a reviving pruner's prefill is: the share of each pruned layer's tokens that the layer before
did not hold (:func:`sdtp.engine.revival.revived_fraction`), averaged over the segments of the kv_gap page's cells.

    PYTHONPATH=. python experiments/lib/revived_share.py OUT.json [--model M] [--contexts 2048] [--scorers sdtp,random]

Prefills only (no continuation is scored), with ``+pruning.revive=true``, on the segments the page scores (the
same sets, records and contexts as scripts/predictor_report.py's defaults). Writes OUT.json atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import mean

import torch

from sdtp.config import build_pruner, compose
from sdtp.engine.revival import revived_fraction
from sdtp.eval.continuation import build_segments
from sdtp.eval.scoring import prefill_context
from sdtp.models import load_model
from sdtp.reports.continuation_cells import base_overrides, cell_overrides
from sdtp.reports.predictor_options import parse_args
from sdtp.utils import set_threads, write_json_atomic


@torch.inference_mode()
def cell_share(model, tokenizer, overrides: list[str]) -> float:
    """Mean revived fraction over one cell's segments under the composed ``overrides``."""
    cfg = compose("eval", overrides)
    segs, _ = build_segments(cfg.eval, tokenizer)
    pruner = build_pruner(cfg)
    return mean(revived_fraction(prefill_context(model, context, pruner).record) for context, _ in segs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="2048")
    parser.add_argument("--scorers", default="sdtp,random")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    opts = parse_args(["--model", args.model, "--threads", str(args.threads)])
    set_threads(opts.threads)
    base = compose("eval", [*base_overrides(opts), "pruning=none"])
    model, tokenizer = load_model(base.model, cache_dir=base.paths.cache_dir)
    shares: dict[str, dict[str, float]] = {}
    for dataset in opts.datasets:
        for ctx in args.contexts.split(","):
            cell = cell_overrides(opts, dataset, int(ctx), str(base.paths.data_dir))
            for scorer in args.scorers.split(","):
                value = cell_share(model, tokenizer, [*cell, f"pruning={scorer}", "+pruning.revive=true"])
                shares.setdefault(f"{dataset}_{ctx}", {})[scorer] = round(value, 5)
                print(f"{dataset}@{ctx} {scorer}: {value:.4f} of each pruned layer's tokens re-admitted", flush=True)
    write_json_atomic(args.out, {"model": args.model, "revived_fraction": shares, "segments": opts.num_segments,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


if __name__ == "__main__":
    main()
