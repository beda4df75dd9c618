"""Committed evaluation of trained SDTP predictors against every training-free scorer (same schedule).

    # 1. the baselines (no predictor needed), then 2. the predictor(s); finished cells are reused
    PYTHONPATH=. python scripts/predictor_report.py --threads 1 --only dense,random,norm,positional,lazyllm,lexical
    PYTHONPATH=. python scripts/predictor_report.py --threads 1 --predictor sdtp=results/predictors/smollm2-135m
    # re-render the page from the cache (no forward pass; tokenizes the data to check fingerprints)
    PYTHONPATH=. python scripts/predictor_report.py --render-only

Protocol (:mod:`sdtp.eval.continuation`): per dataset and context length, the first
``--num-segments`` non-overlapping segments of ``context + --cont-len`` tokens; each context is
prefilled with the scorer's pruner, the continuation scored on the pruned cache; one number per
segment (mean NLL per continuation token, nats), all scorers paired on the same segments.
Datasets: ``wikitext`` (WikiText-2 raw test), ``c4`` (C4-en documents ``--c4-docs``, default
300..999, held out from the predictor's training on documents 0..299, joined with EOS) and
``multi_news`` (LongBench: one segment per record, chat prompt with the news middle-truncated to the
context length -> the first ``--cont-len`` tokens of the gold summary; long documents + instruction) and
``passage_qa`` (:mod:`sdtp.eval.passage_qa`: a Dolly question's reference text among distractor texts,
LongBench's hotpotqa chat prompt -> the gold answer; long-document QA). Both are plain text for a model
without a chat template, and then get a prior's text weight.

Scorers: ``dense``; ``random_s<seed>`` per ``--random-seeds`` (``--only random`` = all seeds); ``norm``,
``positional``, ``lazyllm``, ``lexical``; one per ``--scorer NAME=METHOD`` (any ``conf/pruning`` method, e.g. a
scorer of your own: ``docs/extending.md``); one per ``--kv NAME=METHOD`` (a ``conf/kv`` policy, built in or
your own, compressing the dense prefill's cache; its budget ``kv.ratio`` from the policy's config, or
``--kv-ratio R`` for every such row); one per ``--predictor NAME=PATH`` (default
``sdtp=<paths.predictors_dir>/<model>``; a missing path is skipped with a warning); ``oracle`` with
``--oracle`` (slow: a backward pass per context). Every pruner comes from
``sdtp.config.compose("eval", [model=..., pruning=<method>, ...])`` + ``build_pruner``, so every
scorer runs the model's default schedule (equal tokens per layer) and a predictor's own input
features stay inside its scorer. Each (dataset, context, scorer) gets a fresh pruner, so a random
seed's masks do not depend on what ran before.

Other options: ``--model`` (default smollm2-135m), ``--datasets wikitext,c4``, ``--contexts 2048,4096``,
``--cont-len 128``, ``--num-segments 64``, ``--threads 1``, ``--only NAMES`` (compute only these; the
page shows every scorer with a valid cache), ``--render-only``, ``--out DIR`` (default
``results/predictors/<model>``), ``--wikitext-file``/``--c4-file``/``--multi-news-file`` (default: the
offline data mirror),
``--override KEY=VALUE`` (a Hydra override applied to every scorer's config, e.g. ``model.dtype=float32``,
or another schedule), ``--row-override NAME=KEY=VALUE`` (one predictor, ``--scorer`` or ``--kv`` row's own
override, applied after ``--override``: e.g. a predictor at the model's default schedule paired with one trained
for a later first stage at equal tokens per layer; a hybrid row: a milder schedule plus a KV policy, ``kv=h2o
kv.ratio=R``, cutting what the pruned prefill left to equal KV memory; ``+pruning.refill=true``, the row's kept
tokens refilled from a dense prefill, :mod:`sdtp.eval.refill`; or a KV row's per-layer budgets,
``+kv.layer_ratios=[...]``; pages with a KV policy or a refilled row get a KV-cache column),
``--multi-news-start N`` / ``--passage-qa-start N`` (first record; validation pages use records the test
page does not), ``--dolly-file``, ``--seed-group NAME=A,B,C`` (a row pairing on the per-segment mean of
predictor rows A, B, C, e.g. one recipe trained with three seeds, as ``random`` does with its seeds: the
group, not its members, enters the comparisons and their Holm family; or of ``--scorer`` rows, e.g. random at
another schedule with three seeds, a baseline like ``random``).

Recency-prior tuning (:mod:`sdtp.scorers.prior`): ``--recency-weights 0,0.5,1`` adds a row
``<predictor>_rw<w>`` per weight (applied to every prompt) next to the predictor as shipped (its
checkpoint's own weights); ``--norm-weights``, ``--attention-weights`` and ``--lexical-weights`` do the
same for the other priors (rows ``_nw<w>``, ``_aw<w>``, ``_lw<w>``). Priors are tuned one after another
(each with the earlier ones at their selected weights, :func:`~sdtp.reports.predictor_options.pinned`):
``--select-priors lexical`` makes a run select only the new prior while the page keeps every earlier row. With
``--write-selected`` the page states, per predictor and prompt kind (raw text: wikitext, c4; chat: multi_news,
passage_qa), each weight's worst-cell margin to the best training-free scorer and the weight that minimises it
(:mod:`sdtp.reports.prior_selection`), and stores them as ``<prior>_weight`` / ``<prior>_weight_chat`` in the
predictor's ``predictor.json``. Run it on
validation data, never on the test page's segments (where the weight rows are comparisons, not a choice)::

    PYTHONPATH=. python scripts/predictor_report.py --threads 2 --datasets wikitext,multi_news,passage_qa \
        --contexts 2048 --wikitext-file ../shared/data/lm/wiki.valid.raw --multi-news-start 64 \
        --passage-qa-start 64 --recency-weights 0,1,2,4 \
        --only dense,positional,lazyllm,norm,sdtp_rw0,sdtp_rw1,sdtp_rw2,sdtp_rw4 \
        --out results/predictors/smollm2-135m/recency_tuning --write-selected

Cache: ``<out>/continuation/<dataset>_<context>/<scorer>.json`` holds the per-segment NLLs and a
fingerprint (segment token hash, model config and dtype, schedule, scorer config, predictor file
sha256s, context/continuation lengths). A file is reused only if its fingerprint equals the current
one; otherwise the cell is recomputed (when selected) or reported as not computed. Files are written
atomically, so scorers can be computed in separate runs and the page re-rendered without a model run.
With ``--render-only`` and ``model.dtype=auto`` (which resolves per machine), the model is loaded in the dtype
the page's cells were computed in, so a page's own command re-renders it on any machine. A run that would drop a
cell the page in ``--out`` shows (its cache stale or gone and not computed, or its options left out) stops before
computing anything, unless ``--replace`` is given.

Page: ``<out>/eval.md`` and ``<out>/eval.json`` (:mod:`sdtp.reports.paired_tables`).

Code: this module runs a page (:func:`main`); the options and the rows they ask for are
:mod:`sdtp.reports.predictor_options`, the cells (fingerprint, cache, computing)
:mod:`sdtp.reports.continuation_cells`, the page's header and tables :mod:`sdtp.reports.predictor_page`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtp.benchmark.environment import environment
from sdtp.config import compose
from sdtp.errors import ConfigError
from sdtp.models import load_model
from sdtp.paths import portable_tree
from sdtp.reports import paired_tables
from sdtp.reports.continuation_cells import (Job, base_overrides, compute, existing_page, load_cache, plan, prompt_kind,
                                             refusals)
from sdtp.reports.predictor_options import ReportOptions, parse_args, scorer_specs, seed_groups, selected
from sdtp.reports.predictor_page import build_report
from sdtp.reports.prior_selection import write_selected
from sdtp.scorers.predictor import PRIORS
from sdtp.utils import set_threads, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compute the selected cells a valid cache lacks (none with ``--render-only``), then write the page from every
    valid cell; returns the page's data (eval.json's content). ``argv``: the options (default: the command line)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = parse_args(sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])
    set_threads(opts.threads)
    base = compose("eval", [*base_overrides(opts), "pruning=none"])
    specs = scorer_specs(opts, str(base.paths.predictors_dir))
    for spec in [s for s in specs if s.group == "predictor" and not s.path.exists()]:
        log.warning("predictor %s: %s does not exist, skipped", spec.name, spec.path)
        specs.remove(spec)
    groups = seed_groups(opts, specs)  # a bad --seed-group fails before any cell is computed
    unknown = set(opts.only or ()) - {s.name for s in specs} - {"random"}
    if unknown:
        raise ConfigError(f"--only: unknown scorer(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
    out = opts.out or Path(base.paths.predictors_dir) / base.model.name
    page = existing_page(out)
    shown = set(page.get("caches", {}))  # the cells (Job.key) it shows
    model, tokenizer = load_model(_model_config(base.model, opts, page), cache_dir=base.paths.cache_dir)
    jobs = plan(opts, specs, model, tokenizer, str(base.paths.data_dir), out)
    refused = refusals(jobs, model)
    for name, why in refused.items():
        log.warning("%s: not run on %s: %s", name, opts.model, why)
    specs = [s for s in specs if s.name not in refused]
    jobs = [j for j in jobs if j.spec.name not in refused]
    for job in jobs:
        job.record = load_cache(job.path, job.fingerprint)
    _refuse_to_drop(shown, jobs, opts, out)
    for job in jobs:
        if job.record is None and _computes(job, opts):
            job.record = compute(job, model, opts.command)
    kinds = {dataset: prompt_kind(dataset, model) for dataset in opts.datasets}
    report = portable_tree(build_report(opts, jobs, specs, groups, environment(model, str(base.model.device)),
                                        refused, kinds))
    if opts.write_selected:
        paths = {s.name: s.path for s in specs if s.group == "predictor"}
        for prior in PRIORS:
            write_selected(paths, report.get(f"{prior}_selection", {}), prior=prior)
    write_json_atomic(out / "eval.json", report)
    write_text_atomic(out / "eval.md", paired_tables.render_markdown(report))
    log.info("wrote %s and %s", out / "eval.md", out / "eval.json")
    return report


def _computes(job: Job, opts: ReportOptions) -> bool:
    """Whether this run computes ``job``'s cell when no valid cache holds it."""
    return not opts.render_only and selected(job.spec, opts.only)


def _model_config(model_cfg: DictConfig, opts: ReportOptions, page: dict[str, Any]) -> DictConfig:
    """``model_cfg``, but when only rendering with ``dtype: auto``, in the dtype the existing ``page``'s cells were
    computed in.

    ``auto`` resolves per machine (bf16 on CPUs with native bf16, fp32 elsewhere) and the resolved dtype is part of
    every cell's fingerprint. A page shows only the cells fingerprinted with the dtype it was rendered in (its
    machine's), so loading that dtype lets the page's own command re-render it on any machine; no forward pass runs
    (the model only tokenizes and is fingerprinted)."""
    dtype = page.get("machine", {}).get("dtype") if page.get("caches") else None
    if not opts.render_only or model_cfg.get("dtype") != "auto" or dtype is None:
        return model_cfg
    log.info("render-only: loading %s in %s, the dtype its page's cells were computed in", model_cfg.name, dtype)
    return OmegaConf.merge(model_cfg, {"dtype": dtype})


def _refuse_to_drop(shown: set[str], jobs: list[Job], opts: ReportOptions, out: Path) -> None:
    """ConfigError, before any cell is computed, if the page would lose cells the page in ``out`` shows.

    A cell drops out when its cache is gone or no longer matches (another dtype, predictor or schedule) and this run
    does not compute it, or when the options no longer ask for it (fewer datasets, contexts or rows)."""
    kept = {job.key for job in jobs if job.record is not None or _computes(job, opts)}
    lost = sorted(shown - kept)
    if lost and not opts.replace:
        raise ConfigError(
            f"{out / 'eval.md'} shows {len(lost)} cell(s) this run would drop ({', '.join(lost[:4])}"
            f"{', ...' if len(lost) > 4 else ''}): their options are missing from this command, or their caches are "
            "missing or no longer match (the warnings above name the differing fingerprint keys). Run the page's own "
            "command, compute them (drop --render-only, select them with --only), or pass --replace")


if __name__ == "__main__":
    main()
