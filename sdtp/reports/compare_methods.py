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
  paired interval and a two-sided p-value (0/1 outcomes: Newcombe's score interval and an exact McNemar
  test; other outcomes: Student t), Holm-corrected over the comparisons of one
  method against several within one eval (:mod:`sdtp.eval.stats`). Pairs that never differ read
  "identical on all n";
* ``compare_methods.png``: lm-eval mean accuracy, paired lm-eval / LongBench differences to dense
  (95% paired intervals) and perplexity vs speedup, one point per method.

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
eval, the newest file (by modification time) wins: each column it reports comes from it, and so do that column's
paired documents and sizes (an lm-eval / LongBench run of other tasks / datasets leaves theirs alone). Nothing here
runs a model.

A page is never silently replaced by a smaller one: ``compare_methods.json`` records its ``sizes``
(documents per eval, scored perplexity tokens); if ``--out`` already holds a page built from more
(or from an unrecorded number, i.e. rendered before sizes were kept), the new page goes to
``--smaller-out`` when given, else the script refuses. ``--replace`` overwrites regardless.

This module is the command line; the page is made by :mod:`sdtp.reports.method_runs` (runs -> rows),
:mod:`sdtp.reports.method_comparisons` (fingerprint checks, paired statistics), :mod:`sdtp.reports.method_table`
(table records, markdown) and :mod:`sdtp.reports.method_outputs` (the files, the bigger-page guard).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sdtp.reports.compare_seeds import seed_spread_lines
from sdtp.reports.method_comparisons import comparisons, fingerprint_issues
from sdtp.reports.method_outputs import page_sizes, smaller_than_existing, write_outputs
from sdtp.reports.lm_eval_pages import add_guard_arguments
from sdtp.reports.method_runs import collect
from sdtp.reports.method_table import (comparison_lines, fingerprint_lines, markdown, missing_interval_lines,
                                       page_order, settings_lines, spread_columns, table)

log = logging.getLogger("compare_methods")


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
    parser.add_argument("--model", default=None, help="only this model's runs (default: every run under --root)")
    parser.add_argument("--out", type=Path, default=Path("results/compare"))
    add_guard_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.root.is_dir():
        parser.error(f"--root {args.root} does not exist: run experiments/compare_methods.sh first")
    rows = collect(args.root, args.model)
    if not rows:
        parser.error(f"no metrics.json or bench.json under {args.root}" + (f" for {args.model}" if args.model else ""))
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
