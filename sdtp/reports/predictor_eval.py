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
(each with the earlier ones at their selected weights, :func:`pinned`): ``--select-priors lexical`` makes a
run select only the new prior while the page keeps every earlier row. With ``--write-selected`` the page
states, per predictor and prompt kind (raw text: wikitext, c4; chat: multi_news, passage_qa), each
weight's worst-cell margin to the best training-free scorer and the weight that minimises it
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

Page: ``<out>/eval.md`` and ``<out>/eval.json`` (:mod:`sdtp.reports.paired_tables`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sdtp.benchmark.environment import cpu_model, environment
from sdtp.config import build_pruner, build_schedule, compose, pruner_variant_settings
from sdtp.errors import ConfigError
from sdtp.eval import continuation
from sdtp.eval.continuation import Segment, build_segments, refill_enabled, segment_nll, segments_sha256, summarize
from sdtp.kv import build_kv_policy, kv_compression, kv_enabled
from sdtp.models import load_model
from sdtp.paths import portable_path, portable_text, portable_tree
from sdtp.reports import paired_tables
from sdtp.predictor import TokenPredictor
from sdtp.reports.prior_selection import (KINDS, meta_key, select_prior, selection_text, variant_name,
                                            write_selected)
from sdtp.scorers.lexical import POWER, QUERY_TOKENS, WINDOW
from sdtp.scorers.predictor import PRIORS, PredictorScorer
from sdtp.utils import git_commit, set_threads, write_json_atomic

log = logging.getLogger(__name__)
# The training-free rows, each with what it keeps (the page's Scorers line).
BASELINES = {"norm": "hidden-state L2 norm", "positional": "sinks + most recent", "lazyllm": "last-token attention",
             "lexical": "rare words shared with the prompt's last tokens (`sdtp/scorers/lexical.py`)"}
DATASETS = ("wikitext", "c4", "multi_news", "passage_qa")
CHAT_DATASETS = ("multi_news", "passage_qa")  # prompts in the chat template (the prior's chat weight applies)
PRIOR_KEYS = tuple(meta_key(prior, kind) for prior in PRIORS for kind in KINDS)
# The predictor scorer's other settings a row may override (``PredictorScorer`` arguments of the same names)
SCORER_KNOBS = ("attention_queries", "lexical_window", "pool_window")


def prompt_kind(dataset: str, model: nn.Module) -> str:
    """``chat`` or ``text`` (:data:`KINDS`): how ``dataset``'s prompts reach ``model``, hence which of a prior's
    weights they get. Chat datasets are plain text for a model whose tokenizer has no chat template (a base
    model), exactly as the scorer decides at inference."""
    return "chat" if dataset in CHAT_DATASETS and getattr(model, "sdtp_chat_suffix", None) else "text"


def pinned(prior: str) -> tuple[str, ...]:
    """Overrides a prior's rows add besides their own weight: the priors tuned after it (later in
    :data:`PRIORS`, the tuning order) switched off, as they were when it was tuned, so selecting a later
    prior keeps the earlier rows' cells valid."""
    return tuple(o for later in PRIORS[PRIORS.index(prior) + 1:] for o in one_weight(later, 0))


def one_weight(prior: str, weight: float) -> tuple[str, str]:
    """Overrides giving ``prior`` one weight for every prompt kind: the chat weight is reset to follow
    it, so a chat weight set earlier (a ``--row-override``) cannot survive in a weight row."""
    return f"pruning.scorer.{prior}_weight={weight}", f"pruning.scorer.{prior}_weight_chat=null"

CACHE_INFO = ("wall_s", "threads", "cpu", "git_commit", "created", "command")  # per cell, listed in eval.json
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_PREDICTOR = "sdtp"  # the predictor row when no --predictor is given: <paths.predictors_dir>/<model>


@dataclass(frozen=True)
class ScorerSpec:
    """One table row: its name, the overrides that build its pruner, its group, its predictor dir."""

    name: str
    overrides: tuple[str, ...]
    group: str  # dense | random | baseline | predictor | oracle
    path: Path | None = None


@dataclass
class ReportOptions:
    model: str = "smollm2-135m"
    predictors: dict[str, str] | None = None  # None: sdtp=<paths.predictors_dir>/<model>
    datasets: tuple[str, ...] = DATASETS
    contexts: tuple[int, ...] = (2048, 4096)
    cont_len: int = 128
    num_segments: int = 64
    random_seeds: tuple[int, ...] = (0, 1, 2)
    oracle: bool = False
    oracle_targets: tuple[str, ...] = ("continuation",)
    oracle_gold: bool = False
    oracle_samples: int = 0  # > 0: oracle rows labelled with that many continuations sampled from the dense model
    only: tuple[str, ...] | None = None
    threads: int = 1
    render_only: bool = False
    out: Path | None = None
    c4_docs: tuple[int, int] = (300, 1000)
    wikitext_file: str | None = None
    c4_file: str | None = None
    multi_news_file: str | None = None
    multi_news_start: int = 0
    passage_qa_start: int = 0
    dolly_file: str | None = None
    seed_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # row -> predictor or --scorer rows (seeds)
    recency_weights: tuple[float, ...] = ()
    norm_weights: tuple[float, ...] = ()
    attention_weights: tuple[float, ...] = ()
    lexical_weights: tuple[float, ...] = ()
    write_selected: bool = False
    select_priors: tuple[str, ...] | None = None  # the priors --write-selected selects (None: every one tried)
    overrides: tuple[str, ...] = ()
    row_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # predictor/--scorer/--kv row -> overrides
    scorers: dict[str, str] = field(default_factory=dict)  # --scorer row -> its pruning method (conf/pruning)
    kv: dict[str, str] = field(default_factory=dict)  # --kv row -> its KV policy (conf/kv), dense prefill
    kv_ratio: float | None = None  # the --kv rows' kv.ratio (None: each policy's own)
    command: str = ""

    def tried_weights(self) -> dict[str, tuple[float, ...]]:
        """Prior -> the weights given for its rows (``--<prior>-weights``), in :data:`PRIORS` order."""
        return {prior: getattr(self, f"{prior}_weights") for prior in PRIORS}

    def selecting(self, prior: str) -> bool:
        """Whether this run selects ``prior``'s weight (``--write-selected``, narrowed by ``--select-priors``)."""
        return self.write_selected and (self.select_priors is None or prior in self.select_priors)


@dataclass
class Job:
    """One (dataset, context, scorer) cell: its composed config, segments, fingerprint and cache file."""

    dataset: str
    context_len: int
    spec: ScorerSpec
    cfg: DictConfig
    segs: list[Segment]
    fingerprint: dict[str, Any]
    path: Path
    record: dict[str, Any] | None = field(default=None)


# --------------------------------------------------------------------------------------------
# options


def _csv(text: str, kind: type = str) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


def _named(p: argparse.ArgumentParser, option: str, items: list[str], value: str) -> dict[str, str]:
    """The ``NAME=VALUE`` items of a repeatable option (a later item with the same NAME replaces an earlier one);
    a usage error on a malformed item."""
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        p.error(f"{option}: expected NAME={value}")
    return dict(pairs)


def parse_args(argv: list[str]) -> ReportOptions:
    p = argparse.ArgumentParser(prog="predictor_report.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--predictor", action="append", metavar="NAME=PATH", help="repeatable")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--cont-len", type=int, default=128)
    p.add_argument("--num-segments", type=int, default=64)
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--oracle-targets", default="continuation",
                   help="saliency targets of the oracle rows (oracle_<target> each; comma-separated)")
    p.add_argument("--oracle-gold", action="store_true",
                   help="also oracle rows that label with each segment's real continuation (oracle_<target>_gold)")
    p.add_argument("--oracle-samples", type=int, default=0,
                   help="also oracle rows whose label is averaged over this many continuations sampled from the "
                        "dense model (oracle_<target>_sampled; what the prompt alone tells the model)")
    p.add_argument("--only", default=None, help="comma-separated scorer names to compute (random = all seeds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--c4-docs", default="300:1000", help="document range start:end (end exclusive)")
    p.add_argument("--wikitext-file", default=None)
    p.add_argument("--c4-file", default=None)
    p.add_argument("--multi-news-file", default=None)
    p.add_argument("--multi-news-start", type=int, default=0,
                   help="first multi_news record (validation runs use records the test page does not)")
    p.add_argument("--passage-qa-start", type=int, default=0,
                   help="first passage_qa record (validation runs use records the test page does not)")
    p.add_argument("--dolly-file", default=None)
    p.add_argument("--recency-weights", default="",
                   help="comma-separated recency-prior weights: one row <predictor>_rw<w> per predictor and weight")
    p.add_argument("--norm-weights", default="",
                   help="comma-separated hidden-state-norm prior weights: one row <predictor>_nw<w> per predictor and "
                        "weight (recency prior as shipped)")
    p.add_argument("--attention-weights", default="",
                   help="comma-separated attention prior weights: one row <predictor>_aw<w> per predictor and "
                        "weight (recency and norm priors as shipped)")
    p.add_argument("--lexical-weights", default="",
                   help="comma-separated lexical query-match prior weights: one row <predictor>_lw<w> per predictor "
                        "and weight (the other priors as shipped)")
    p.add_argument("--write-selected", action="store_true",
                   help="select each predictor's prior weights (per prompt kind) on this page's cells and write "
                        "them into its predictor.json (validation pages only)")
    p.add_argument("--select-priors", default=None,
                   help="comma-separated priors --write-selected selects and writes (default: every prior given "
                        "weights); priors are tuned one after another, so a new prior's run selects only itself")
    p.add_argument("--seed-group", action="append", default=[], metavar="NAME=A,B,C",
                   help="repeatable: a row NAME pairing on the per-segment mean of predictor rows A, B, C (one "
                        "predictor trained with several seeds) or of --scorer rows (a baseline with several seeds); "
                        "the members are listed under it, out of the tests")
    p.add_argument("--scorer", action="append", default=[], metavar="NAME=METHOD",
                   help="repeatable: a row NAME pruning with METHOD (a conf/pruning option, e.g. a scorer of your "
                        "own; docs/extending.md), paired and compared like the built-in training-free rows")
    p.add_argument("--kv", action="append", default=[], metavar="NAME=METHOD",
                   help="repeatable: a row NAME whose dense prefill's cache is compressed by METHOD (a conf/kv "
                        "policy, built in or your own; docs/extending.md), paired like the training-free rows")
    p.add_argument("--kv-ratio", type=float, default=None,
                   help="kv.ratio of every --kv row (default: each policy's config); equal KV memory with the pruned "
                        "rows = their tokens per layer, e.g. 0.63 under SmolLM2's default schedule")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--row-override", action="append", default=[], metavar="NAME=KEY=VALUE",
                   help="repeatable: a Hydra override for predictor, --scorer or --kv row NAME (and a predictor's "
                        "prior rows) only, applied after --override, e.g. to pair a predictor at another schedule with "
                        "equal tokens per layer, to add a KV policy (kv=h2o, kv.ratio=R) to a milder schedule, to refill "
                        "the row's kept tokens from a dense prefill (+pruning.refill=true) or to give a KV row "
                        "per-layer budgets (+kv.layer_ratios=[...])")
    a = p.parse_args(argv)
    predictors = _named(p, "--predictor", a.predictor, "PATH") if a.predictor else None
    groups = [item.split("=", 1) for item in a.seed_group]
    if any(len(pair) != 2 or len(_csv(pair[1])) < 2 for pair in groups):
        p.error("--seed-group: expected NAME=A,B[,...] (at least two predictor rows)")
    scorers, kv = _named(p, "--scorer", a.scorer, "METHOD"), _named(p, "--kv", a.kv, "METHOD")
    row_overrides: dict[str, tuple[str, ...]] = {}
    for item in a.row_override:
        name, _, override = item.partition("=")
        if "=" not in override or name not in {**(predictors or {DEFAULT_PREDICTOR: ""}), **scorers, **kv}:
            p.error(f"--row-override {item}: expected NAME=KEY=VALUE with NAME a --predictor, --scorer or --kv row")
        row_overrides[name] = (*row_overrides.get(name, ()), override)
    start, end = (int(x) for x in a.c4_docs.split(":"))
    datasets = _csv(a.datasets)
    if set(datasets) - set(DATASETS):
        p.error(f"--datasets: {sorted(set(datasets) - set(DATASETS))} not in {DATASETS}")
    if a.oracle_samples < 0:
        p.error(f"--oracle-samples: must be >= 0, got {a.oracle_samples}")
    if a.select_priors and set(_csv(a.select_priors)) - set(PRIORS):
        p.error(f"--select-priors: {sorted(set(_csv(a.select_priors)) - set(PRIORS))} not in {PRIORS}")
    return ReportOptions(
        model=a.model, predictors=predictors, datasets=datasets, contexts=_csv(a.contexts, int), cont_len=a.cont_len,
        num_segments=a.num_segments, random_seeds=_csv(a.random_seeds, int), oracle=a.oracle,
        oracle_targets=tuple(_csv(a.oracle_targets)), oracle_gold=a.oracle_gold,
        oracle_samples=a.oracle_samples, only=_csv(a.only) if a.only else None, threads=a.threads,
        render_only=a.render_only, out=a.out,
        c4_docs=(start, end), wikitext_file=a.wikitext_file, c4_file=a.c4_file, multi_news_file=a.multi_news_file,
        multi_news_start=a.multi_news_start, passage_qa_start=a.passage_qa_start, dolly_file=a.dolly_file,
        seed_groups={name: _csv(members) for name, members in groups},
        recency_weights=_csv(a.recency_weights, float),
        norm_weights=_csv(a.norm_weights, float),
        attention_weights=_csv(a.attention_weights, float),
        lexical_weights=_csv(a.lexical_weights, float),
        write_selected=a.write_selected,
        select_priors=_csv(a.select_priors) if a.select_priors else None,
        overrides=tuple(a.override),
        row_overrides=row_overrides,
        scorers=scorers,
        kv=kv,
        kv_ratio=a.kv_ratio,
        command=portable_text("PYTHONPATH=. python scripts/predictor_report.py " + shlex.join(argv)),  # kept in caches
    )


def oracle_note(opts: ReportOptions) -> str:
    """What the page's oracle rows label with (`sdtp/scorers/oracle.py`), or "" without ``--oracle``."""
    kinds = [("`oracle_<target>` the full model's label with the prompt's own last 10% as the continuation", True),
             ("`oracle_<target>_gold` that label computed with the segment's real continuation", opts.oracle_gold),
             (f"`oracle_<target>_sampled` that label averaged over {opts.oracle_samples} continuations sampled from "
              "the dense model (prompt only)", opts.oracle_samples > 0)]
    return "".join(f"{text}; " for text, shown in kinds if shown) if opts.oracle else ""


def scorer_specs(opts: ReportOptions, predictors_dir: str) -> list[ScorerSpec]:
    """Every scorer of the page, in display order (predictor paths made absolute)."""
    specs = [ScorerSpec("dense", ("pruning=none",), "dense")]
    specs += [ScorerSpec(f"random_s{s}", ("pruning=random", f"pruning.scorer.seed={s}"), "random")
              for s in opts.random_seeds]
    specs += [ScorerSpec(m, (f"pruning={m}",), "baseline") for m in BASELINES]
    for name, method in opts.scorers.items():
        _check_new_name("--scorer", name, specs)
        specs.append(ScorerSpec(name, (f"pruning={method}", *opts.row_overrides.get(name, ())), "baseline"))
    for name, method in opts.kv.items():
        _check_new_name("--kv", name, specs)
        ratio = () if opts.kv_ratio is None else (f"kv.ratio={opts.kv_ratio}",)
        specs.append(ScorerSpec(name, ("pruning=none", f"kv={method}", *ratio, *opts.row_overrides.get(name, ())),
                                "baseline"))
    if opts.oracle:
        specs += [ScorerSpec(f"oracle_{t}", ("pruning=oracle", f"pruning.scorer.target={t}"), "oracle")
                  for t in opts.oracle_targets]
        if opts.oracle_gold:
            specs += [ScorerSpec(f"oracle_{t}_gold", ("pruning=oracle", f"pruning.scorer.target={t}",
                                                      "+pruning.scorer.gold=true"), "oracle")
                      for t in opts.oracle_targets]
        if opts.oracle_samples:
            specs += [ScorerSpec(f"oracle_{t}_sampled", ("pruning=oracle", f"pruning.scorer.target={t}",
                                                         f"+pruning.scorer.samples={opts.oracle_samples}",
                                                         f"+pruning.scorer.sample_len={opts.cont_len}"), "oracle")
                      for t in opts.oracle_targets]
    predictors = opts.predictors if opts.predictors is not None else {DEFAULT_PREDICTOR: f"{predictors_dir}/{opts.model}"}
    for name, path in predictors.items():
        _check_new_name("--predictor", name, specs)
        full = Path(path).resolve()
        base = ("pruning=sdtp", f"pruning.scorer.path={full}", *opts.row_overrides.get(name, ()))
        specs.append(ScorerSpec(name, base, "predictor", full))  # as shipped: the checkpoint's own recency weight
        # Priors are tuned one after the other: recency rows without the norm prior (as it was selected),
        # the others with the checkpoint's weights for the rest.
        for prior, weights in opts.tried_weights().items():
            specs += [ScorerSpec(variant_name(name, w, prior),
                                 (*base, *one_weight(prior, w), *pinned(prior)), "predictor", full)
                      for w in weights]
    return specs


def _check_new_name(option: str, name: str, specs: list[ScorerSpec]) -> None:
    if not NAME_RE.match(name) or name in {s.name for s in specs} | {paired_tables.RANDOM}:
        raise ConfigError(f"{option} {name}=...: the name must be new and match {NAME_RE.pattern}")


def selected(spec: ScorerSpec, only: tuple[str, ...] | None) -> bool:
    return only is None or spec.name in only or (spec.group == "random" and "random" in only)


# --------------------------------------------------------------------------------------------
# fingerprints and cache


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def predictor_hashes(path: Path) -> dict[str, str]:
    """sha256 of a predictor's weights and metadata (``*.safetensors``, ``predictor*.json``), by file name.

    Only the checkpoint files: the same folder also receives this page and its cache. The metadata is
    hashed without its recency-prior weights (canonical JSON): a cell's fingerprint records the weight
    it ran with instead (:func:`prior_weight`), so writing a newly selected weight into
    ``predictor.json`` keeps the cells computed with explicit weights valid.
    """
    files = [path] if path.is_file() else sorted([*path.glob("*.safetensors"), *path.glob("predictor*.json")])
    return {f.name: _meta_sha256(f) if f.suffix == ".json" else file_sha256(f) for f in files}


def _meta_sha256(path: Path) -> str:
    meta = {k: v for k, v in json.loads(path.read_text()).items() if k not in PRIOR_KEYS}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def row_scorer(cfg: DictConfig, spec: ScorerSpec) -> PredictorScorer:
    """A predictor row's scorer with the row's prior overrides (unbound: for reading its settings)."""
    return PredictorScorer(predictor=TokenPredictor.load(spec.path),
                           **{key: cfg.pruning.scorer.get(key) for key in (*PRIOR_KEYS, *SCORER_KNOBS)})


def prior_weights(cfg: DictConfig, spec: ScorerSpec, model: nn.Module, dataset: str,
                  scorer: PredictorScorer | None = None) -> dict[str, float]:
    """The prior weights a predictor row applies to ``dataset``'s prompts, by prior (empty: not a predictor).

    ``scorer``: the row's :func:`row_scorer` when the caller has it already.
    """
    if spec.path is None:
        return {}
    scorer = scorer or row_scorer(cfg, spec)
    chat = prompt_kind(dataset, model) == "chat"
    return {prior: scorer.prior_weight(prior, chat) for prior in PRIORS}


def fingerprint(cfg: DictConfig, model: nn.Module, dataset: str, segs_sha: str, spec: ScorerSpec) -> dict[str, Any]:
    """Everything a cell's numbers depend on, as plain JSON (compared for equality on reuse)."""
    schedule = build_schedule(cfg)
    scorer = OmegaConf.to_container(cfg.pruning.scorer, resolve=True) if schedule is not None else None
    if scorer is not None:
        scorer.pop("path", None)  # a predictor is identified by its files' hashes, not where it lies
        # replaced by what this dataset's prompts get (below), so adding a knob leaves older cells valid
        for key in (*PRIOR_KEYS, *SCORER_KNOBS):
            scorer.pop(key, None)
    what = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dtype": str(next(model.parameters()).dtype),
        "dataset": dataset,
        "doc_range": [int(cfg.eval.doc_start), cfg.eval.doc_end] if cfg.eval.dataset == "jsonl" else None,
        "context_len": int(cfg.eval.context_len),
        "cont_len": int(cfg.eval.cont_len),
        "num_segments": int(cfg.eval.num_segments),
        "segments_sha256": segs_sha,
        "schedule": asdict(schedule) if schedule is not None else None,
        "scorer": scorer,
        "predictor_sha256": predictor_hashes(spec.path) if spec.path is not None else None,
    }
    if kv_enabled(cfg):  # absent with kv=none, so cells from before KV rows stay valid
        what["kv"] = OmegaConf.to_container(cfg.kv, resolve=True)
    if refill_enabled(cfg):  # the same
        what["refill"] = True
    if schedule is not None and (variant := pruner_variant_settings(cfg.pruning)):  # the same (revival, merging)
        what["pruner"] = variant
    if spec.path is not None:
        row = row_scorer(cfg, spec)
        weights = prior_weights(cfg, spec, model, dataset, row)
        what["recency_weight"] = weights["recency"]
        if weights["norm"]:  # absent at 0, so cells computed before the norm prior existed stay valid
            what["norm_weight"] = weights["norm"]
        if weights["attention"]:  # the same for the attention prior, with the queries it reads
            what["attention_weight"] = weights["attention"]
            what["attention_queries"] = row.attention_queries
        if weights["lexical"]:
            what["lexical_weight"] = weights["lexical"]
        if weights["lexical"] or row.predictor.meta.lexical_feature:  # the match's settings
            what["lexical"] = {"query_tokens": QUERY_TOKENS, "window": row.lexical_window, "power": POWER}
        if row.pool_window:  # absent when off, as above
            what["pool_window"] = row.pool_window
    return json.loads(json.dumps(what, default=str))  # tuples -> lists, as read back from a file


def load_cache(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The cached record at ``path`` if its fingerprint equals ``expected``; None (with a warning) otherwise."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable cache file, ignored", path)
        return None
    found = record.get("fingerprint") if isinstance(record, dict) else None
    if found != expected:
        keys = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
        log.warning("%s: fingerprint mismatch (%s), ignored", path, ", ".join(keys) or "format")
        return None
    return record


# --------------------------------------------------------------------------------------------
# planning and computing


def dataset_overrides(dataset: str, opts: ReportOptions, data_dir: str) -> list[str]:
    if dataset == "wikitext":
        return ["eval.dataset=wikitext", f"eval.data_file={opts.wikitext_file or f'{data_dir}/lm/wiki.test.raw'}"]
    if dataset == "multi_news":
        return ["eval.dataset=longbench", f"eval.data_file={opts.multi_news_file or f'{data_dir}/longbench/multi_news.jsonl'}",
                "eval.task=multi_news", f"eval.doc_start={opts.multi_news_start}"]
    if dataset == "passage_qa":
        dolly = opts.dolly_file or f"{data_dir}/train/databricks_dolly_15k.jsonl"
        return ["eval.dataset=passage_qa", f"eval.data_file={dolly}", f"eval.doc_start={opts.passage_qa_start}"]
    start, end = opts.c4_docs
    return ["eval.dataset=jsonl", f"eval.data_file={opts.c4_file or f'{data_dir}/train/c4_en_1k.jsonl'}",
            f"eval.doc_start={start}", f"eval.doc_end={end}"]


def base_overrides(opts: ReportOptions) -> list[str]:
    return [f"model={opts.model}", "eval=continuation", f"threads={opts.threads}", *opts.overrides]


def cell_overrides(opts: ReportOptions, dataset: str, ctx: int, data_dir: str) -> list[str]:
    """The overrides of one cell (``dataset`` at ``ctx`` context tokens), before a row's own."""
    return [*base_overrides(opts), *dataset_overrides(dataset, opts, data_dir), f"eval.context_len={ctx}",
            f"eval.cont_len={opts.cont_len}", f"eval.num_segments={opts.num_segments}"]


def plan(opts: ReportOptions, specs: list[ScorerSpec], model: nn.Module, tokenizer: Any, data_dir: str,
         out: Path) -> list[Job]:
    """Compose every cell's config (validated) and fingerprint it; segments are built once per cell."""
    jobs = []
    for dataset in opts.datasets:
        for ctx in opts.contexts:
            cell = cell_overrides(opts, dataset, ctx, data_dir)
            segs, segs_sha = None, None
            for spec in specs:
                cfg = compose("eval", [*cell, *spec.overrides])
                continuation.validate(cfg)
                if segs is None:
                    segs, _ = build_segments(cfg.eval, tokenizer)
                    segs_sha = segments_sha256(segs)
                path = out / "continuation" / f"{dataset}_{ctx}" / f"{spec.name}.json"
                jobs.append(Job(dataset, ctx, spec, cfg, segs, fingerprint(cfg, model, dataset, segs_sha, spec), path))
    return jobs


def refusals(jobs: list[Job], model: nn.Module) -> dict[str, str]:
    """Scorer -> the reason its pruner refuses ``model`` (e.g. an attention scorer on a sliding-window model),
    found by attaching each scorer's pruner once, before any cell is computed."""
    refused: dict[str, str] = {}
    for job in {j.spec.name: j for j in jobs}.values():
        pruner, policy = build_pruner(job.cfg), build_kv_policy(job.cfg)
        try:
            with pruner(model) if pruner is not None else nullcontext(), kv_compression(policy, model):
                pass
        except NotImplementedError as err:
            refused[job.spec.name] = str(err)
    return refused


def compute(job: Job, model: nn.Module, command: str) -> dict[str, Any]:
    """Score the cell's segments with a fresh pruner and write its cache file atomically."""
    pruner = build_pruner(job.cfg)
    start = time.perf_counter()
    with kv_compression(build_kv_policy(job.cfg), model) as press:
        scores = segment_nll(model, job.segs, pruner, desc=f"{job.dataset}@{job.context_len} {job.spec.name}",
                             refill=refill_enabled(job.cfg))
    summary = summarize(scores)
    # A refilled row's cache has the pruned layout after a dense prefill: its KV share, as a policy's would be.
    kv_kept = press.kept_fraction if press is not None else summary.get("avg_cache_fraction")
    record = {
        "fingerprint": job.fingerprint,
        "scorer": job.spec.name,
        "dataset": job.dataset,
        "context_len": job.context_len,
        "nll": [s.nll for s in scores],
        "kept_fraction": [s.kept_fraction for s in scores],
        "layer_fraction": [s.layer_fraction for s in scores],
        "summary": summary,
        **({"kv_kept_fraction": kv_kept} if kv_kept is not None else {}),
        "wall_s": round(time.perf_counter() - start, 3),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "git_commit": git_commit(),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(job.path, record)
    log.info("%s: mean NLL %.4f over %d segments in %.0f s", job.path, record["summary"]["nll"], len(scores),
             record["wall_s"])
    return record


# --------------------------------------------------------------------------------------------
# the page


def seed_groups(opts: ReportOptions, specs: list[ScorerSpec]) -> dict[str, list[str]]:
    """Seed-group row -> its member rows: ``random`` (its seeds) and every ``--seed-group`` (predictor rows,
    e.g. one recipe trained with several seeds, or ``--scorer`` rows, e.g. a baseline's seeds at another
    schedule); ConfigError on a taken name, an unknown member or a group mixing the two kinds."""
    kinds = {s.name: s.group for s in specs if s.group == "predictor" or s.name in opts.scorers}
    taken = {s.name for s in specs} | {paired_tables.RANDOM}
    members = [m for group in opts.seed_groups.values() for m in group]
    for name, group in opts.seed_groups.items():
        if not NAME_RE.match(name) or name in taken or set(group) - set(kinds) or len(set(members)) < len(members) \
                or len({kinds[m] for m in group}) > 1:
            raise ConfigError(f"--seed-group {name}=...: the name must be new and match {NAME_RE.pattern}; the members "
                              f"distinct rows of one kind (predictor or --scorer), in one group each "
                              f"({', '.join(kinds)})")
    return {paired_tables.RANDOM: [s.name for s in specs if s.group == "random"],
            **{name: list(group) for name, group in opts.seed_groups.items()}}


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


def header(opts: ReportOptions, jobs: list[Job], specs: list[ScorerSpec], machine: dict[str, Any],
           refused: dict[str, str], kinds: dict[str, str]) -> dict[str, str]:
    pruned = next((j for j in jobs if j.fingerprint["schedule"] is not None), None)
    sched = pruned.fingerprint["schedule"] if pruned else None
    hashes = {s.name: ", ".join(f"{k} {v[:12]}" for k, v in predictor_hashes(s.path).items())
              for s in specs if s.group == "predictor"}
    configs = {j.spec.name: j.cfg for j in jobs}
    refilled = [name for name, cfg in configs.items() if refill_enabled(cfg)]
    preds = [f"`{s.name}` = `{_display(s.path)}` (sha256 {hashes[s.name]}; {_prior_text(s, configs[s.name])})"
             for s in specs if s.name in hashes]
    start, end = opts.c4_docs
    wikitext = f"`{Path(opts.wikitext_file).name}`" if opts.wikitext_file else "WikiText-2 raw test"
    first = opts.multi_news_start
    commands = sorted({j.record["command"] for j in jobs if j.record is not None} - {opts.command})
    chat = {d: "chat prompt" if kinds.get(d) == "chat" else "prompt as plain text (no chat template)"
            for d in CHAT_DATASETS}
    return {
        "Protocol": (f"continuation (`sdtp/eval/continuation.py`): per dataset and context length, the first "
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
                     f"{opts.cont_len} tokens of the gold answer."),
        "Schedule": schedule_origin(opts) + (
            f"stages before layers {sched['layers']}, cumulative keep "
            f"{[round(f, 3) for f in sched['keep_fractions']]}, first {sched['keep_first']} + last "
            f"{sched['keep_recent']:.0%} of the context always kept" if sched else "–"),
        "Scorers": ("`random` pairs on the per-segment mean over its seeds (each seed listed under it); "
                    + "".join(f"`{name}` pairs on the per-segment mean of {', '.join(f'`{m}`' for m in group)} "
                              f"({'seeds' if group[0] in opts.scorers else 'training seeds'}, listed under it); "
                              for name, group in opts.seed_groups.items())
                    + "".join(f"`{s.name}` {_baseline_text(s, opts, configs.get(s.name))}; "
                              for s in specs if s.group == "baseline")
                    + oracle_note(opts)
                    + ("; ".join(preds) if preds else "no predictor")),
        **({"Refill": refill_note(refilled)} if refilled else {}),
        "Statistics": ("Δ = paired mean difference over segments (negative = lower NLL = better) with a 95% "
                       "Student t interval; predictor "
                       "comparisons add two-sided paired t p-values, Holm-corrected over the comparisons of each "
                       "dataset x context; pooled rows: stratified paired bootstrap."),
        "Machine": (f"{machine['cpu_model']} ({machine['cpu_count']} logical CPUs), torch threads "
                    f"{opts.threads}, dtype {machine['dtype']}, torch {machine['torch']}, transformers "
                    f"{machine['transformers']}, git {machine['git_commit']}; cell wall times in eval.json."),
        **({"Cells computed by": "; ".join(f"`{c}`" for c in commands)} if commands else {}),
        **({"Not run on this model": "; ".join(f"`{name}`: {why}" for name, why in refused.items())}
           if refused else {}),
    }


def build_report(opts: ReportOptions, jobs: list[Job], specs: list[ScorerSpec], groups: dict[str, list[str]],
                 machine: dict[str, Any], refused: dict[str, str], kinds: dict[str, str]) -> dict:
    """The page's data; ``groups``: :func:`seed_groups` (validated before any cell is computed); ``refused``:
    scorer -> why the model cannot run it (:func:`refusals`; those scorers have no jobs); ``kinds``: dataset ->
    its prompts' kind for this model (:func:`prompt_kind`), the prompts each weight is selected on."""
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
        "caches": {f"{j.dataset}_{j.context_len}/{j.spec.name}": {k: j.record.get(k) for k in CACHE_INFO}
                   for j in jobs if j.record is not None},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = parse_args(sys.argv[1:] if argv is None else argv)
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
    model, tokenizer = load_model(base.model, cache_dir=base.paths.cache_dir)
    out = opts.out or Path(base.paths.predictors_dir) / base.model.name
    jobs = plan(opts, specs, model, tokenizer, str(base.paths.data_dir), out)
    refused = refusals(jobs, model)
    for name, why in refused.items():
        log.warning("%s: not run on %s: %s", name, opts.model, why)
    specs = [s for s in specs if s.name not in refused]
    jobs = [j for j in jobs if j.spec.name not in refused]
    for job in jobs:
        job.record = load_cache(job.path, job.fingerprint)
        if job.record is None and not opts.render_only and selected(job.spec, opts.only):
            job.record = compute(job, model, opts.command)
    kinds = {dataset: prompt_kind(dataset, model) for dataset in opts.datasets}
    report = portable_tree(build_report(opts, jobs, specs, groups, environment(model, str(base.model.device)),
                                        refused, kinds))
    if opts.write_selected:
        paths = {s.name: s.path for s in specs if s.group == "predictor"}
        for prior in PRIORS:
            write_selected(paths, report.get(f"{prior}_selection", {}), prior=prior)
    write_json_atomic(out / "eval.json", report)
    (out / "eval.md").write_text(paired_tables.render_markdown(report))
    log.info("wrote %s and %s", out / "eval.md", out / "eval.json")
    return report


if __name__ == "__main__":
    main()
