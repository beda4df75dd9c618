"""``sdtp-eval``: score a (pruned) model with one evaluation runner.

    sdtp-eval eval=lm_eval model=smollm2-135m pruning=random eval.limit=100
    sdtp-eval eval=perplexity pruning=none
    sdtp-eval eval=longbench pruning=sdtp kv=h2o kv.ratio=0.4     # paper Table 6: SDTP + H2O

The ``eval`` config group picks the runner: every ``conf/eval/<name>.yaml`` has ``name`` and
``runner: <dotted path>`` to a function ``runner(cfg, model, tokenizer, pruner, run_dir) -> dict``
(the metrics; ``pruner`` is None for the dense model). Generation runners also write
``predictions.jsonl`` into ``run_dir`` themselves. An optional ``validate: <dotted path>`` names a
function ``validate(cfg) -> None`` that checks the runner's own keys (raising ConfigError) before
the model is loaded. The optional ``kv`` group compresses the cache after every prefill
(``sdtp.kv``); runners that score multi-token continuations on the cache declare
``continuation_blocks: true`` and refuse it, except those listed in ``KV_SCORING_RUNNERS``
(``eval=lm_eval``: every request on the compressed cache of its context; ``eval=continuation``: each segment's
continuation on its context's compressed cache). The optional
``compression`` group (prompt compression before the model, :mod:`sdtp.eval.prompt_compression`)
applies to the generation runners in ``COMPRESSION_RUNNERS`` only.

Data parallel (``eval=lm_eval`` only, the runners in ``DATA_PARALLEL_RUNNERS``): launched by
``torchrun`` or ``accelerate launch`` with N processes, every rank loads its own replica of the model
and pruner and scores its share of the documents; rank 0 alone takes the lock, checks and writes the
run directory (fingerprint, metrics, samples, W&B) and prints the JSON line; every rank returns rank
0's metrics. Other runners refuse more than one process (ConfigError). See docs/scaling.md.

An optional ``inputs: <dotted path>`` names a function ``inputs(cfg) -> list[Path]``: the data
files the runner reads, hashed into the run's fingerprint.

This module does the common part: validation, loading model / tokenizer / pruner, the run
directory (deterministic per command, see conf/eval.yaml), ``metrics.json`` written atomically
with the model, the pruning schedule, the average kept fraction (when the runner reports
``avg_kept_fraction``), wall time and the run's fingerprint (:mod:`sdtp.provenance`), logging
through RunLogger, and the JSON last stdout line.

Reuse: a run directory is held under a lock file while it runs (a second process refuses). A
finished run (``metrics.json``) is returned as is only when its fingerprint matches the current
one; otherwise, and always with ``force=true``, the previous outputs (metrics, predictions,
samples, checkpoints) are deleted before the run, so generation runners really recompute. A
killed run resumes from its partial outputs only if ``fingerprint.json`` (written at the start)
matches: generation runners from ``predictions.jsonl``, ``eval=perplexity`` and ``eval=continuation`` from
their state / segments, ``eval=lm_eval`` from its in-run checkpoint (lm-eval's request cache and the kept
fractions, ``eval.checkpoint``, one process only: :mod:`sdtp.eval.harness`), which is deleted once
``metrics.json`` is written (CHECKPOINT_PATTERNS). Such a run's metrics say ``resumed``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from sdtp.config import build_pruner, build_schedule, sdtp_main
from sdtp.distributed import World, check_world, on_main, process_group, reduce_floats
from sdtp.errors import ConfigError
from sdtp.kv import KVCompressor, build_kv_policy, kv_compression, kv_enabled
from sdtp.models import load_model
from sdtp.paths import portable_tree
from sdtp.provenance import RunLockedError, differences, fingerprint, run_lock
from sdtp.search.objective import objective_values
from sdtp.search.space import check_searchable
from sdtp.tracking import NullLogger, RunLogger
from sdtp.utils import finite_json, git_commit, seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)
Runner = Callable[[DictConfig, Any, Any, Any, Path], dict[str, Any]]
FINGERPRINT_FILE = "fingerprint.json"
# Runners with ``continuation_blocks: true`` that score every request on the KV-compressed cache of its
# own unpadded prefill (sdtp/eval/lm_eval_model.py, sdtp/eval/continuation.py); the others refuse kv=... .
KV_SCORING_RUNNERS = ("sdtp.eval.harness.run", "sdtp.eval.continuation.run")
# Runners that compress each prompt's context when the (optional) ``compression`` group is set
# (sdtp/eval/prompt_compression.py); the others refuse compression=... .
COMPRESSION_RUNNERS = ("sdtp.eval.longbench.run", "sdtp.eval.synthetic.run")
# Runners that run data parallel (each rank scores its share of the requests, rank 0 gathers them:
# sdtp/eval/lm_eval_model.py); the others refuse more than one process.
DATA_PARALLEL_RUNNERS = ("sdtp.eval.harness.run",)
# Files that only let a killed run resume, deleted once metrics.json is written (a finished run is reused
# through metrics.json alone; lm-eval's request cache grows with every answer): eval=lm_eval's request cache
# (sqlite, with the journal a killed writer may leave) and kept fractions (sdtp.eval.harness.CACHE_PREFIX,
# KEPT_STATE).
CHECKPOINT_PATTERNS = ("lm_eval_cache_rank*.db*", "lm_eval_kept_state.json")
# What a run writes into its directory (Hydra's .hydra/ and log file are the launcher's, kept).
OUTPUT_PATTERNS = ("metrics.json", "metrics.jsonl", "predictions.jsonl", "samples_*.jsonl", "segments.jsonl",
                   "*_state.json", *CHECKPOINT_PATTERNS, FINGERPRINT_FILE)


def resolve_function(cfg: DictConfig, key: str) -> Callable[..., Any]:
    """The function named by the dotted path ``cfg.eval[key]``; ConfigError naming the key if absent."""
    path = cfg.eval.get(key)
    if not path:
        raise ConfigError(f"eval.{key}: missing (dotted path to a function)")
    try:
        return get_method(str(path))
    except Exception as exc:  # hydra wraps import/attribute errors in several exception types
        raise ConfigError(f"eval.{key}: cannot import {path!r} ({exc})") from exc


def validate_eval(cfg: DictConfig) -> Runner:
    """Check the eval keys before any model is loaded; returns the runner function."""
    if "eval" not in cfg or cfg.eval is None:
        raise ConfigError("eval: missing; choose a runner with eval=<name> (see conf/eval/)")
    runner = resolve_function(cfg, "runner")
    if kv_enabled(cfg) and cfg.eval.get("continuation_blocks", False) \
            and str(cfg.eval.runner) not in KV_SCORING_RUNNERS:
        # These runners left-pad batches of prompts or score dense requests in one forward without
        # the cache, so the policy would not apply to what they score (sdtp/kv/compressor.py).
        raise ConfigError(
            f"kv={cfg.kv.method}: eval={cfg.eval.name} scores multi-token continuations in a way KV compression "
            "does not reach; use eval=lm_eval, eval=continuation, a generation runner "
            "(eval=longbench|needle|passage_count|passage_retrieval) or kv=none"
        )
    compression = (cfg.get("compression") or {}).get("method", "none")
    if compression != "none" and str(cfg.eval.runner) not in COMPRESSION_RUNNERS:
        raise ConfigError(f"compression={compression}: eval={cfg.eval.name} does not compress prompts; use a generation "
                          "runner (eval=longbench|needle|passage_count|passage_retrieval) or compression=none")
    pruning = cfg.get("pruning") or {}
    continuation_only = {  # setting -> what only the continuation runner does with it
        "pruning.scorer.gold=true": ((pruning.get("scorer") or {}).get("gold"), "hands the oracle each prompt's "
                                     "continuation"),
        "pruning.refill=true": (pruning.get("refill"), "refills the pruned cache from a dense prefill"),
    }
    for setting, (enabled, what) in continuation_only.items():
        if enabled and cfg.eval.name != "continuation":
            raise ConfigError(f"{setting}: only eval=continuation {what}, not eval={cfg.eval.name}")
    if cfg.eval.get("validate"):
        resolve_function(cfg, "validate")(cfg)
    if cfg.get("search") is not None and cfg.pruning.get("scorer") is not None:
        check_searchable(cfg)  # experiment=schedule_search: its fixed points too, so the script stops before them
    return runner


def distributed_config(cfg: DictConfig) -> Mapping[str, Any]:
    """The ``distributed`` group (a config composed before it existed: the defaults)."""
    return cfg.get("distributed") or {}


def check_data_parallel(cfg: DictConfig, world: World) -> None:
    """Refuse a multi-process launch that cannot work, before the model loads (:func:`sdtp.distributed.check_world`)."""
    check_world(world, distributed_config(cfg), str(cfg.model.device))
    if world.size > 1 and str(cfg.eval.runner) not in DATA_PARALLEL_RUNNERS:
        raise ConfigError(f"eval={cfg.eval.name}: runs in one process only, but WORLD_SIZE={world.size}; launch it "
                          "without torchrun / accelerate launch (data parallel: eval=lm_eval)")


def pruning_summary(cfg: DictConfig) -> dict[str, Any]:
    """The pruning method and its resolved schedule (layers, cumulative keep fractions, protection)."""
    schedule = build_schedule(cfg)
    if schedule is None:
        return {"name": cfg.pruning.name, "schedule": None}
    return {
        "name": cfg.pruning.name,
        "scorer": cfg.pruning.scorer.get("_target_"),
        "schedule": {
            "layers": list(schedule.layers),
            "keep_fractions": [round(f, 6) for f in schedule.keep_fractions],
            "keep_first": schedule.keep_first,
            "keep_recent": schedule.keep_recent,
            "position_ids": schedule.position_ids,
        },
    }


def kv_summary(press: KVCompressor | None, world: World = World()) -> dict[str, Any]:
    """The run's KV-cache policy and the fraction of the prefilled entries it kept (over all prefills of
    every rank; a collective when ``world`` has several)."""
    if press is None:
        return {"method": "none", "ratio": 1.0, "kept_fraction": 1.0}
    policy = press.policy
    entries = reduce_floats({"before": press.entries_before, "after": press.entries_after}, world, mean=False)
    kept = entries["after"] / entries["before"] if entries["before"] else None
    return {"method": policy.method, "ratio": policy.ratio, "keep_first": policy.keep_first,
            "keep_recent": policy.keep_recent, "kept_fraction": kept}


def run_directory(cfg: DictConfig) -> Path:
    """Hydra's output dir inside a Hydra app; ``cfg.run_dir`` (if set) when composed by hand."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a nested metrics dict for the tracker (``a/b/c`` keys)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat


def input_files(cfg: DictConfig) -> list[Path]:
    """The data files the runner reads (``eval.inputs``), for the fingerprint; [] if it names none."""
    return list(resolve_function(cfg, "inputs")(cfg)) if cfg.eval.get("inputs") else []


def _outputs(run_dir: Path, patterns: tuple[str, ...] = OUTPUT_PATTERNS) -> list[Path]:
    """The files of ``patterns`` (OUTPUT_PATTERNS) in ``run_dir``."""
    return sorted({path for pattern in patterns for path in run_dir.glob(pattern) if path.is_file()})


def clear_outputs(run_dir: Path, patterns: tuple[str, ...] = OUTPUT_PATTERNS) -> list[Path]:
    """Delete the files a previous run left in ``run_dir`` (see OUTPUT_PATTERNS); returns them."""
    removed = _outputs(run_dir, patterns)
    for path in removed:
        path.unlink()
    return removed


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def finished_run(run_dir: Path, current: dict[str, Any]) -> dict[str, Any] | None:
    """The stored metrics of a finished run with the same fingerprint, else None (logging why not)."""
    done = run_dir / "metrics.json"
    if not done.is_file():
        return None
    metrics = _read_json(done)
    if metrics is None:
        log.warning("%s is unreadable: recomputing", done)
        return None
    changed = differences(metrics.get("fingerprint"), current)
    if changed:
        shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
        log.warning("%s was produced by a different setup (%s): recomputing", done, shown)
        return None
    stored_git = metrics["fingerprint"].get("git") or {}
    if stored_git != current["git"]:
        log.warning("%s: reusing a run made at commit %s%s (now %s%s); force=true recomputes", done,
                    stored_git.get("commit"), " (dirty)" if stored_git.get("dirty") else "",
                    current["git"]["commit"], " (dirty)" if current["git"]["dirty"] else "")
    return metrics


def prepare_run_dir(run_dir: Path, current: dict[str, Any], force: bool) -> bool:
    """Clear outputs of a forced run or of another setup, keep a resumable one; write fingerprint.json.

    Returns whether an interrupted run of the same setup is continued.
    """
    started = _read_json(run_dir / FINGERPRINT_FILE)
    same = not (force or started is None or differences(started, current))
    # Continued only when the interrupted run left something to continue from (eval=lm_eval: its in-run
    # checkpoint, absent with eval.checkpoint=false or data parallel).
    resumed = same and any(path.name != FINGERPRINT_FILE for path in _outputs(run_dir))
    if not same:
        removed = clear_outputs(run_dir)
        if removed:
            why = "force=true" if force else "they were produced by another setup (or an unknown one)"
            log.warning("deleted %s in %s: %s", ", ".join(p.name for p in removed), run_dir, why)
    elif resumed:
        log.info("continuing the interrupted run of the same setup in %s from its outputs", run_dir)
    write_json_atomic(run_dir / FINGERPRINT_FILE, current)
    return resumed


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, then evaluate: in one process, or as this rank of a ``torchrun`` / ``accelerate launch`` job."""
    runner = validate_eval(cfg)
    world = World.from_env()
    check_data_parallel(cfg, world)
    with process_group(world, distributed_config(cfg), str(cfg.model.device)) as world:
        metrics = _run(cfg, runner, world)
    if world.is_main:
        print(json.dumps(finite_json(metrics), default=str))  # bare NaN is not JSON
    return metrics


def _run(cfg: DictConfig, runner: Runner, world: World) -> dict[str, Any]:
    """Reuse a finished run or evaluate; rank 0 holds the run directory's lock throughout."""
    run_dir = run_directory(cfg)
    force = bool(cfg.get("force", False))
    with ExitStack() as lock:
        def start() -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
            """Rank 0: lock, fingerprint, and the finished run's metrics (else a prepared directory, and whether
            it continues an interrupted run)."""
            lock.enter_context(run_lock(run_dir))
            current = fingerprint(cfg, input_files(cfg))
            metrics = None if force else finished_run(run_dir, current)
            resumed = prepare_run_dir(run_dir, current, force) if metrics is None else False
            return current, metrics, resumed

        # A locked directory stops every rank, not rank 0 alone (the others would wait at a collective).
        current, metrics, resumed = on_main(start, world, errors=(ConfigError, RunLockedError))
        if metrics is not None:
            log.info("%s: finished run with the same fingerprint, skipping (force=true re-runs)", run_dir)
            return metrics
        return _evaluate(cfg, runner, run_dir, current, world, resumed)


def _evaluate(cfg: DictConfig, runner: Runner, run_dir: Path, current: dict[str, Any],
              world: World = World(), resumed: bool = False) -> dict[str, Any]:
    """Load model / pruner, run the runner (on every rank), write metrics.json (rank 0); rank 0's metrics.

    ``resumed``: the run continues an interrupted one (W&B continues its run; metrics.json says so, because a
    random scorer's stream restarts and such a run is reproducible but not identical to an uninterrupted one).
    """
    seed_everything(cfg.seed)
    threads = set_threads(cfg.threads)
    pruner = build_pruner(cfg)
    kv_policy = build_kv_policy(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    log.info("eval=%s model=%s pruning=%s -> %s (rank %d of %d)", cfg.eval.name, cfg.model.name, cfg.pruning.name,
             run_dir, world.rank, world.size)
    name = f"{cfg.eval.name}-{cfg.model.name}-{cfg.pruning.name}"
    with RunLogger(run_dir, cfg.logger, cfg, name=name, resume=resumed) if world.is_main else NullLogger() as logger:
        start = time.perf_counter()
        with kv_compression(kv_policy, model) as press:
            results = runner(cfg, model, tokenizer, pruner, run_dir)
        wall_s = time.perf_counter() - start
        kv = kv_summary(press, world)

        def report() -> dict[str, Any]:
            """Rank 0, which holds every rank's results (the runner gathered them): metrics.json and the tracker."""
            metrics = {
                "eval": cfg.eval.name,
                "model": cfg.model.name,
                "dtype": str(next(model.parameters()).dtype),
                "pruning": pruning_summary(cfg),
                "kv": kv,
                "avg_kept_fraction": results.get("avg_kept_fraction", 1.0 if pruner is None else None),
                "results": portable_tree(results),  # e.g. data_file: summaries of it are committed
                "seed": cfg.seed,
                "threads": threads,
                "world_size": world.size,
                "wall_s": round(wall_s, 3),
                "git_commit": git_commit(),
                "config": OmegaConf.to_container(cfg, resolve=True),
                "fingerprint": current,
                **({"resumed": True} if resumed else {}),
            }
            numbers = _numbers(results)
            logger.log({**numbers, "wall_s": wall_s})
            logger.summary(numbers)
            write_json_atomic(run_dir / "metrics.json", metrics)
            clear_outputs(run_dir, CHECKPOINT_PATTERNS)  # after metrics.json: a kill in between still resumes
            return metrics

        return on_main(report, world)


@sdtp_main("eval")
def main(cfg: DictConfig) -> float | list[float] | None:
    """Run the eval; return the metrics named by ``objective`` (what a Hydra Optuna sweep optimises,
    ``experiment=schedule_search``), None when the config names none."""
    return objective_values(run(cfg), cfg.get("objective"))


if __name__ == "__main__":
    main()
