"""The predictor page's command line: its options, the rows they ask for and the checks made before any cell runs.

Separate from the cells and the page so that what a run *asks for* (``ReportOptions``, one ``ScorerSpec`` per row)
can be parsed and checked without a model, a data file or a cache: the tests and ``experiments/lib`` build the
same rows the page would. The options are documented in :mod:`sdtp.reports.predictor_eval`, the entry module.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from sdtp.errors import ConfigError
from sdtp.paths import portable_text
from sdtp.reports import paired_tables
from sdtp.reports.prior_selection import SUFFIX, variant_name
from sdtp.scorers.predictor import PRIORS

# The training-free rows, each with what it keeps (the page's Scorers line).
BASELINES = {"norm": "hidden-state L2 norm", "positional": "sinks + most recent", "lazyllm": "last-token attention",
             "lexical": "rare words shared with the prompt's last tokens (`sdtp/scorers/lexical.py`)"}
DATASETS = ("wikitext", "c4", "multi_news", "passage_qa")
CHAT_DATASETS = ("multi_news", "passage_qa")  # prompts in the chat template (the prior's chat weight applies)
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# --<prior>-weights: what the prior is and which priors its rows keep as shipped (the help text), in PRIORS order
PRIOR_OPTIONS = (("recency", "recency-prior", ""), ("norm", "hidden-state-norm prior", " (recency prior as shipped)"),
                 ("attention", "attention prior", " (recency and norm priors as shipped)"),
                 ("lexical", "lexical query-match prior", " (the other priors as shipped)"))
DEFAULT_PREDICTOR = "sdtp"  # the predictor row when no --predictor is given: <paths.predictors_dir>/<model>


def pinned(prior: str) -> tuple[str, ...]:
    """Overrides a prior's rows add besides their own weight: the priors tuned after it (later in
    :data:`PRIORS`, the tuning order) switched off, as they were when it was tuned, so selecting a later
    prior keeps the earlier rows' cells valid."""
    return tuple(o for later in PRIORS[PRIORS.index(prior) + 1:] for o in one_weight(later, 0))


def one_weight(prior: str, weight: float) -> tuple[str, str]:
    """Overrides giving ``prior`` one weight for every prompt kind: the chat weight is reset to follow
    it, so a chat weight set earlier (a ``--row-override``) cannot survive in a weight row."""
    return f"pruning.scorer.{prior}_weight={weight}", f"pruning.scorer.{prior}_weight_chat=null"


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
    replace: bool = False  # write the page even if it shows fewer cells than the one in out
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


def _csv(text: str, kind: type = str) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


def _named(p: argparse.ArgumentParser, option: str, items: list[str], value: str) -> dict[str, str]:
    """The ``NAME=VALUE`` items of a repeatable option (a later item with the same NAME replaces an earlier one);
    a usage error on a malformed item."""
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        p.error(f"{option}: expected NAME={value}")
    return dict(pairs)


def _parser(description: str | None) -> argparse.ArgumentParser:
    """The options' parser, ``description`` the first line of its ``--help``."""
    p = argparse.ArgumentParser(prog="predictor_report.py", description=description)
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
    p.add_argument("--replace", action="store_true",
                   help="write the page even if it would show fewer cells than the page already in --out")
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
    for prior, what, others in PRIOR_OPTIONS:
        p.add_argument(f"--{prior}-weights", default="",
                       help=f"comma-separated {what} weights: one row <predictor>_{SUFFIX[prior]}<w> per predictor and "
                            f"weight{others}")
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
    return p


def _row_overrides(p: argparse.ArgumentParser, items: list[str], rows: set[str]) -> dict[str, tuple[str, ...]]:
    """Row -> its ``--row-override`` overrides, in the order given; a usage error on an item that is not
    NAME=KEY=VALUE with NAME one of ``rows`` (the predictor, ``--scorer`` and ``--kv`` rows)."""
    row_overrides: dict[str, tuple[str, ...]] = {}
    for item in items:
        name, _, override = item.partition("=")
        if "=" not in override or name not in rows:
            p.error(f"--row-override {item}: expected NAME=KEY=VALUE with NAME a --predictor, --scorer or --kv row")
        row_overrides[name] = (*row_overrides.get(name, ()), override)
    return row_overrides


def parse_args(argv: list[str], description: str | None = None) -> ReportOptions:
    """The options ``argv`` gives, checked (a usage error, SystemExit, on a malformed one). ``description``: the first
    line of ``--help``; the entry module passes its docstring's, since that docstring documents the options."""
    p = _parser(description)
    a = p.parse_args(argv)
    predictors = _named(p, "--predictor", a.predictor, "PATH") if a.predictor else None
    groups = [item.split("=", 1) for item in a.seed_group]
    if any(len(pair) != 2 or len(_csv(pair[1])) < 2 for pair in groups):
        p.error("--seed-group: expected NAME=A,B[,...] (at least two predictor rows)")
    scorers, kv = _named(p, "--scorer", a.scorer, "METHOD"), _named(p, "--kv", a.kv, "METHOD")
    row_overrides = _row_overrides(p, a.row_override, {*(predictors or {DEFAULT_PREDICTOR: ""}), *scorers, *kv})
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
        render_only=a.render_only, replace=a.replace, out=a.out,
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
