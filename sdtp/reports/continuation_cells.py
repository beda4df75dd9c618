"""The predictor page's cells: one (dataset, context, scorer) each, planned, fingerprinted, cached and computed.

Separate from the options and the page: this is the part that runs the model and owns the files under
``<out>/continuation/``. A cell's fingerprint decides whether a cached file is reused, so everything it hashes is
kept in this one module (the protocol and the cache layout are documented in :mod:`sdtp.reports.predictor_eval`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sdtp.benchmark.environment import cpu_model
from sdtp.config import build_pruner, build_schedule, compose, pruner_variant_settings, quoted_override
from sdtp.eval import continuation
from sdtp.eval.continuation import Segment, build_segments, refill_enabled, segment_nll, segments_sha256, summarize
from sdtp.kv import build_kv_policy, kv_compression, kv_enabled
from sdtp.predictor import TokenPredictor
from sdtp.reports.predictor_options import CHAT_DATASETS, ReportOptions, ScorerSpec
from sdtp.reports.prior_selection import KINDS, meta_key
from sdtp.scorers.lexical import POWER, QUERY_TOKENS
from sdtp.scorers.predictor import PRIORS, PredictorScorer
from sdtp.utils import git_commit, write_json_atomic

log = logging.getLogger(__name__)
PRIOR_KEYS = tuple(meta_key(prior, kind) for prior in PRIORS for kind in KINDS)
# The predictor scorer's other settings a row may override (``PredictorScorer`` arguments of the same names)
SCORER_KNOBS = ("attention_queries", "lexical_window", "pool_window")
CACHE_INFO = ("wall_s", "threads", "cpu", "git_commit", "created", "command")  # per cell, listed in eval.json


def prompt_kind(dataset: str, model: nn.Module) -> str:
    """``chat`` or ``text`` (:data:`KINDS`): how ``dataset``'s prompts reach ``model``, hence which of a prior's
    weights they get. Chat datasets are plain text for a model whose tokenizer has no chat template (a base
    model), exactly as the scorer decides at inference."""
    return "chat" if dataset in CHAT_DATASETS and getattr(model, "sdtp_chat_suffix", None) else "text"


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

    @property
    def key(self) -> str:
        """``<dataset>_<context>/<scorer>``: the cell's name in a page's ``caches`` and its cache file's."""
        return f"{self.dataset}_{self.context_len}/{self.spec.name}"


def existing_page(out: Path) -> dict[str, Any]:
    """The page already in ``out`` (its ``eval.json``); empty without one (or with an unreadable one)."""
    try:
        page = json.loads((out / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return page if isinstance(page, dict) else {}


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
    it ran with instead (:func:`prior_weights`), so writing a newly selected weight into
    ``predictor.json`` keeps the cells computed with explicit weights valid. Hidden files are skipped: a save killed
    midway leaves its temporary file (:func:`sdtp.utils.atomic_path`, ``.predictor.safetensors.*.tmp.safetensors``).
    """
    found = [*path.glob("*.safetensors"), *path.glob("predictor*.json")] if path.is_dir() else []
    files = [path] if path.is_file() else sorted(f for f in found if not f.name.startswith("."))
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


def dataset_overrides(dataset: str, opts: ReportOptions, data_dir: str) -> list[str]:
    """The eval overrides that select ``dataset``; file paths quoted, since a folder may be named ``seed=0``."""
    if dataset == "wikitext":
        wiki = opts.wikitext_file or f"{data_dir}/lm/wiki.test.raw"
        return ["eval.dataset=wikitext", quoted_override("eval.data_file", wiki)]
    if dataset == "multi_news":
        news = opts.multi_news_file or f"{data_dir}/longbench/multi_news.jsonl"
        return ["eval.dataset=longbench", quoted_override("eval.data_file", news), "eval.task=multi_news",
                f"eval.doc_start={opts.multi_news_start}"]
    if dataset == "passage_qa":
        dolly = opts.dolly_file or f"{data_dir}/train/databricks_dolly_15k.jsonl"
        return ["eval.dataset=passage_qa", quoted_override("eval.data_file", dolly),
                f"eval.doc_start={opts.passage_qa_start}"]
    start, end = opts.c4_docs
    return ["eval.dataset=jsonl", quoted_override("eval.data_file", opts.c4_file or f"{data_dir}/train/c4_en_1k.jsonl"),
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
