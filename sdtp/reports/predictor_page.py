"""The predictor page's content: its header texts and, from the cells' records, its tables and comparisons.

Separate from the cells so that rendering reads records and never computes one (``--render-only`` re-renders the
page from the cache alone); the statistics and the Markdown come from :mod:`sdtp.reports.paired_tables`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdtp.eval.continuation import refill_enabled
from sdtp.paths import portable_path
from sdtp.reports import paired_tables
from sdtp.reports.continuation_cells import CACHE_INFO, Job, predictor_hashes, row_scorer
from sdtp.reports.predictor_options import BASELINES, CHAT_DATASETS, DEFAULT_PREDICTOR, ReportOptions, ScorerSpec
from sdtp.reports.prior_selection import select_prior, selection_text
from sdtp.scorers.lexical import WINDOW
from sdtp.scorers.predictor import PRIORS


def display_order(specs: list[ScorerSpec], groups: dict[str, list[str]], seeds: bool) -> list[str]:
    """Row order: dense, random, baselines, oracle, predictors; a seed group's row comes before its first
    member, and its members (listed under it) only with ``seeds``: comparisons see the group row alone."""
    member_of = {m: name for name, members in groups.items() for m in members}
    order: list[str] = []
    for spec in specs:
        group = member_of.get(spec.name)
        if group is not None and group not in order:
            order.append(group)
        if group is None or seeds:
            order.append(spec.name)
    return order


def focus_rows(specs: list[ScorerSpec], groups: dict[str, list[str]]) -> list[str]:
    """The rows compared with every other: the predictors, a predictor seed group standing for its members."""
    predictors = {s.name for s in specs if s.group == "predictor"}
    predictors |= {name for name, members in groups.items() if set(members) <= predictors and members}
    return [n for n in display_order(specs, groups, seeds=False) if n in predictors]


def cache_fractions(record: dict[str, Any]) -> tuple[float, float, float | None]:
    """A cell's mean context kept, mean tokens per layer and, with a KV policy, the KV cache's share of
    dense: tokens per layer x the share of the prefill's entries the policy kept (pooled over segments, so
    approximate when segments differ in length)."""
    n = len(record["nll"])
    layer = sum(record["layer_fraction"]) / n
    kv = record.get("kv_kept_fraction")
    return sum(record["kept_fraction"]) / n, layer, None if kv is None else layer * kv


def _cell(jobs: list[Job], specs: list[ScorerSpec],
          groups: dict[str, list[str]]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Table of one dataset x context from its jobs' records; also returns the NLLs (every row) for pooling."""
    records = {j.spec.name: j.record for j in jobs if j.record is not None}
    nll = paired_tables.with_seed_means({n: r["nll"] for n, r in records.items()}, groups)
    fractions = {n: cache_fractions(r) for n, r in records.items()}
    order = display_order(specs, groups, seeds=True)
    comparable = display_order(specs, groups, seeds=False)  # the seeds enter comparisons through their mean
    cell = {
        "dataset": jobs[0].dataset, "context_len": jobs[0].context_len, "segments": len(jobs[0].segs),
        "rows": paired_tables.scorer_rows(nll, fractions, order, groups),
        "comparisons": paired_tables.predictor_comparisons({n: nll[n] for n in comparable if n in nll},
                                                           focus_rows(specs, groups), comparable),
        "missing": [j.spec.name for j in jobs if j.record is None],
    }
    return cell, {n: nll[n] for n in order if n in nll}


def _display(path: Path) -> str:
    """``path`` in its portable form (the committed page must not show a machine's directories)."""
    return portable_path(path)


def _prior_text(spec: ScorerSpec, cfg: DictConfig) -> str:
    """How a predictor row weighs its priors (``cfg``: one of its cells' configs): its checkpoint's
    per-kind weights, or the weights its overrides fix."""
    scorer = row_scorer(cfg, spec)
    fixed = any(o.startswith("pruning.scorer.") and "_weight" in o.split("=", 1)[0] for o in spec.overrides)
    parts = []
    for prior in PRIORS:
        text, chat = scorer.prior_weight(prior, chat=False), scorer.prior_weight(prior, chat=True)
        if prior == "recency" or text or chat:  # the other priors only when the row uses them
            parts.append(f"{prior} weight {text:g} for every prompt" if text == chat else
                         f"{prior} weight {text:g} on raw text, {chat:g} on chat prompts")
    if scorer.lexical_window != WINDOW:
        parts.append(f"lexical match averaged over {scorer.lexical_window} tokens each side (its override)")
    if scorer.pool_window:
        parts.append(f"predictor scores averaged over {scorer.pool_window} alive tokens each side (its override)")
    if cfg.pruning.scorer.get("select_stages"):
        parts.append("the checkpoint's stages at the row's stage layers (`select_stages`)")
    return ("set by its overrides: " if fixed else "as shipped: ") + ", ".join(parts)


def schedule_override(override: str) -> bool:
    """Whether a Hydra override changes the pruning schedule (``pruning.layers``, ``pruning.keep_ratio``, ...),
    not a scorer setting."""
    return override.startswith("pruning.") and not override.startswith("pruning.scorer.")


def kv_override(override: str) -> bool:
    """Whether a Hydra override sets the KV policy (``kv=h2o``, ``kv.ratio=0.8``, ...)."""
    return override.startswith(("kv=", "kv."))


def schedule_origin(opts: ReportOptions) -> str:
    """Where the page's schedule comes from, and the predictor rows that run under their own schedule or
    compress their cache (e.g. a milder schedule plus H2O at equal KV memory)."""
    page = any(map(schedule_override, opts.overrides))
    text = ("set by `--override` for every pruned scorer" if page else
            "model default for every pruned scorer (equal tokens per layer)")
    # prior weights are listed with the scorers; "+pruning.refill=true" is a schedule-level setting
    shared: dict[tuple[str, ...], list[str]] = {}  # rows with the same schedule overrides are named together
    for name, overrides in opts.row_overrides.items():
        schedule = tuple(o for o in overrides if schedule_override(o.lstrip("+")) or kv_override(o.lstrip("+")))
        if schedule:
            plain = name in {**opts.scorers, **opts.kv}
            shared.setdefault(schedule, []).append(f"`{name}`{'' if plain else ' (and its prior rows)'}")
    rows = "; ".join(f"{', '.join(names)} with {' '.join(f'`{o}`' for o in schedule)}"
                     for schedule, names in shared.items())
    return text + (f", except {rows}" if rows else "") + ": "


def _baseline_text(spec: ScorerSpec, opts: ReportOptions, cfg: DictConfig | None) -> str:
    """What a training-free row keeps: the built-in description, a ``--scorer`` row's method or a ``--kv`` row's
    policy (``cfg``: one of the row's cell configs, None if the model refused it)."""
    if spec.name in opts.kv:
        return f"`kv={opts.kv[spec.name]}`: " + _kv_text(cfg)
    if spec.name in BASELINES:
        return BASELINES[spec.name]
    knobs = [o for o in opts.row_overrides.get(spec.name, ()) if o.lstrip("+").startswith("pruning.scorer.")]
    return f"`pruning={opts.scorers[spec.name]}`" + "".join(f" `{o}`" for o in knobs)


def _kv_text(cfg: DictConfig | None) -> str:
    """How a ``--kv`` row's policy cuts the dense prefill's cache (``cfg``: None if the model refused it)."""
    kv = cfg.kv if cfg is not None else {}
    layers = kv.get("layer_ratios")
    ratio = ("" if cfg is None else f" to {float(kv.ratio):g} of each layer's entries" if layers is None else
             f" layer by layer to `kv.layer_ratios` (mean {sum(layers) / len(layers):.3g} of the entries)")
    heads = " per KV head" if kv.get("per_head", True) else ", one token set per layer for all KV heads"
    nested = ", each layer within the entries the layer before kept" if kv.get("nested", False) else ""
    return (f"the dense prefill's KV cache cut{ratio}{heads}{nested} (its context kept and tokens/layer read 100%: "
            "no token is pruned)")


def refill_note(rows: list[str]) -> str:
    """What the refilled rows (``+pruning.refill=true``) measure, for the page header."""
    return (f"{', '.join(f'`{name}`' for name in rows)} prefill twice (`sdtp/eval/refill.py`): the pruned prefill only "
            "chooses which positions each layer keeps; a dense prefill then fills those layers' caches with its own "
            "keys and values and predicts the first continuation token. Same cache layout as the pruned row, "
            "without what pruning during prefill loses; tokens/layer 100% (the dense prefill), KV cache = the "
            "pruned layout's share.")


def oracle_note(opts: ReportOptions) -> str:
    """What the page's oracle rows label with (`sdtp/scorers/oracle.py`), or "" without ``--oracle``."""
    kinds = [("`oracle_<target>` the full model's label with the prompt's own last 10% as the continuation", True),
             ("`oracle_<target>_gold` that label computed with the segment's real continuation", opts.oracle_gold),
             (f"`oracle_<target>_sampled` that label averaged over {opts.oracle_samples} continuations sampled from "
              "the dense model (prompt only)", opts.oracle_samples > 0)]
    return "".join(f"{text}; " for text, shown in kinds if shown) if opts.oracle else ""


def _protocol_text(opts: ReportOptions, kinds: dict[str, str]) -> str:
    """The page's Protocol line: the segments and datasets every cell scores; ``kinds``: dataset -> its prompts'
    kind for this model (:func:`~sdtp.reports.continuation_cells.prompt_kind`)."""
    start, end = opts.c4_docs
    wikitext = f"`{Path(opts.wikitext_file).name}`" if opts.wikitext_file else "WikiText-2 raw test"
    first = opts.multi_news_start
    chat = {d: "chat prompt" if kinds.get(d) == "chat" else "prompt as plain text (no chat template)"
            for d in CHAT_DATASETS}
    return (f"continuation (`sdtp/eval/continuation.py`): per dataset and context length, the first "
            f"{opts.num_segments} non-overlapping segments of context + {opts.cont_len} tokens; the context "
            "is prefilled with the scorer's pruner, the continuation scored on the pruned cache; one number "
            "per segment = mean NLL per continuation token (nats, lower is better); every scorer paired on "
            f"the same segments. Datasets: `wikitext` = {wikitext}; `c4` = C4-en documents "
            f"{start}..{end - 1} joined with EOS (the shipped predictor trained on C4 documents 0..299); "
            f"`multi_news` = LongBench multi_news records {first}..{first + opts.num_segments - 1}, one "
            f"record per segment: the {chat['multi_news']} with the news "
            "middle-truncated to the context length (shorter records stay shorter) -> the first "
            f"{opts.cont_len} tokens of the gold summary; `passage_qa` = records "
            f"{opts.passage_qa_start}..{opts.passage_qa_start + opts.num_segments - 1} of "
            "`sdtp/eval/passage_qa.py`: a Dolly-15k closed-QA / information-extraction question whose "
            "reference text sits at a random depth among other rows' texts filling the context, in "
            f"LongBench's hotpotqa {chat['passage_qa']} -> the first "
            f"{opts.cont_len} tokens of the gold answer.")


def _scorers_text(opts: ReportOptions, specs: list[ScorerSpec], configs: dict[str, DictConfig]) -> str:
    """The page's Scorers line: what the seed groups average and what each other row keeps, in display order;
    ``configs``: row -> one of its cells' configs."""
    hashes = {s.name: ", ".join(f"{k} {v[:12]}" for k, v in predictor_hashes(s.path).items())
              for s in specs if s.group == "predictor"}
    preds = [f"`{s.name}` = `{_display(s.path)}` (sha256 {hashes[s.name]}; {_prior_text(s, configs[s.name])})"
             for s in specs if s.name in hashes]
    return ("`random` pairs on the per-segment mean over its seeds (each seed listed under it); "
            + "".join(f"`{name}` pairs on the per-segment mean of {', '.join(f'`{m}`' for m in group)} "
                      f"({'seeds' if group[0] in opts.scorers else 'training seeds'}, listed under it); "
                      for name, group in opts.seed_groups.items())
            + "".join(f"`{s.name}` {_baseline_text(s, opts, configs.get(s.name))}; "
                      for s in specs if s.group == "baseline")
            + oracle_note(opts)
            + ("; ".join(preds) if preds else "no predictor"))


def _cell_machines(jobs: list[Job], here: str) -> str:
    """Where the shown cells ran, when not all on this machine: a page may be re-rendered elsewhere, and its cells
    computed over several sessions (each cell's CPU, threads and wall time are in eval.json)."""
    cpus = Counter(j.record.get("cpu") or "unrecorded" for j in jobs if j.record is not None)
    if set(cpus) <= {here}:
        return "cell wall times in eval.json."
    where = ", ".join(f"{cpu} ({n})" for cpu, n in cpus.most_common())
    return f"cells computed on {where}; their wall times in eval.json."


def header(opts: ReportOptions, jobs: list[Job], specs: list[ScorerSpec], machine: dict[str, Any],
           refused: dict[str, str], kinds: dict[str, str]) -> dict[str, str]:
    """The page's header lines, by their bold key (the arguments: :func:`build_report`'s)."""
    pruned = next((j for j in jobs if j.fingerprint["schedule"] is not None), None)
    sched = pruned.fingerprint["schedule"] if pruned else None
    configs = {j.spec.name: j.cfg for j in jobs}
    refilled = [name for name, cfg in configs.items() if refill_enabled(cfg)]
    commands = sorted({j.record["command"] for j in jobs if j.record is not None} - {opts.command})
    return {
        "Protocol": _protocol_text(opts, kinds),
        "Schedule": schedule_origin(opts) + (
            f"stages before layers {sched['layers']}, cumulative keep "
            f"{[round(f, 3) for f in sched['keep_fractions']]}, first {sched['keep_first']} + last "
            f"{sched['keep_recent']:.0%} of the context always kept" if sched else "–"),
        "Scorers": _scorers_text(opts, specs, configs),
        **({"Refill": refill_note(refilled)} if refilled else {}),
        "Statistics": ("Δ = paired mean difference over segments (negative = lower NLL = better) with a 95% "
                       "Student t interval; predictor "
                       "comparisons add two-sided paired t p-values, Holm-corrected over the comparisons of each "
                       "dataset x context; pooled rows: stratified paired bootstrap."),
        "Machine": (f"{machine['cpu_model']} ({machine['cpu_count']} logical CPUs), torch threads "
                    f"{opts.threads}, dtype {machine['dtype']}, torch {machine['torch']}, transformers "
                    f"{machine['transformers']}, git {machine['git_commit']}; "
                    f"{_cell_machines(jobs, machine['cpu_model'])}"),
        **({"Cells computed by": "; ".join(f"`{c}`" for c in commands)} if commands else {}),
        **({"Not run on this model": "; ".join(f"`{name}`: {why}" for name, why in refused.items())}
           if refused else {}),
    }


def build_report(opts: ReportOptions, jobs: list[Job], specs: list[ScorerSpec], groups: dict[str, list[str]],
                 machine: dict[str, Any], refused: dict[str, str], kinds: dict[str, str]) -> dict:
    """The page's data; ``groups``: :func:`~sdtp.reports.predictor_options.seed_groups` (validated before any cell
    is computed); ``refused``: scorer -> why the model cannot run it
    (:func:`~sdtp.reports.continuation_cells.refusals`; those scorers have no jobs); ``kinds``: dataset -> its
    prompts' kind for this model (:func:`~sdtp.reports.continuation_cells.prompt_kind`), the prompts each weight is
    selected on."""
    cells, pooled, cell_nll = [], [], []
    for ctx in opts.contexts:
        per_dataset = {}
        for dataset in opts.datasets:
            cell, nll = _cell([j for j in jobs if j.dataset == dataset and j.context_len == ctx], specs, groups)
            cells.append(cell)
            cell_nll.append(nll)
            per_dataset[dataset] = nll
        pooled.append({"context_len": ctx, **paired_tables.pooled(per_dataset, display_order(specs, groups, False),
                                                                   focus_rows(specs, groups))})
    cell_kinds = [kinds[c["dataset"]] for c in cells]
    names = list(opts.predictors or {DEFAULT_PREDICTOR: None})
    selection = {prior: select_prior(names, weights, cell_nll, cell_kinds, prior) if opts.selecting(prior) else {}
                 for prior, weights in opts.tried_weights().items()}
    head = header(opts, jobs, specs, machine, refused, kinds)
    for prior, chosen in selection.items():
        if chosen:
            head[f"{prior.capitalize()} weight selection"] = selection_text(chosen)
    return {
        "title": f"SDTP predictor vs training-free scorers: {opts.model}, continuation protocol",
        "command": opts.command, "header": head, "contexts": list(opts.contexts),
        "cells": cells, "pooled": pooled, "machine": machine, "recency_selection": selection["recency"],
        **{f"{prior}_selection": chosen for prior, chosen in selection.items() if prior != "recency" and chosen},
        "caches": {j.key: {k: j.record.get(k) for k in CACHE_INFO}
                   for j in jobs if j.record is not None},
    }
