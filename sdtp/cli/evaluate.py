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
``continuation_blocks: true`` and refuse it.

This module does the common part: validation, loading model / tokenizer / pruner, the run
directory (deterministic per command, see conf/eval.yaml), ``metrics.json`` written atomically
with the model, the pruning schedule, the average kept fraction (when the runner reports
``avg_kept_fraction``), wall time and git commit, logging through RunLogger, and the JSON last
stdout line. A run whose ``metrics.json`` exists is skipped unless ``force=true``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from sdtp.config import build_pruner, build_schedule, sdtp_main
from sdtp.errors import ConfigError
from sdtp.kv import KVCompressor, build_kv_policy, kv_compression
from sdtp.models import load_model
from sdtp.tracking import RunLogger
from sdtp.utils import git_commit, seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)
Runner = Callable[[DictConfig, Any, Any, Any, Path], dict[str, Any]]


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
    if build_kv_policy(cfg) is not None and cfg.eval.get("continuation_blocks", False):
        # A compressed cache is decoded token by token only (per-head eviction leaves no
        # position-wise mask for a block of continuation tokens), see sdtp/kv/cache.py.
        raise ConfigError(
            f"kv={cfg.kv.method}: eval={cfg.eval.name} scores multi-token continuations on the cache, "
            "which a compressed cache does not support; use a generation runner "
            "(eval=longbench|needle|passage_count|passage_retrieval) or kv=none"
        )
    if cfg.eval.get("validate"):
        resolve_function(cfg, "validate")(cfg)
    return runner


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


def kv_summary(press: KVCompressor | None) -> dict[str, Any]:
    """The run's KV-cache policy and the fraction of the prefilled entries it kept (over all prefills)."""
    if press is None:
        return {"method": "none", "ratio": 1.0, "kept_fraction": 1.0}
    policy = press.policy
    return {"method": policy.method, "ratio": policy.ratio, "keep_first": policy.keep_first,
            "keep_recent": policy.keep_recent, "kept_fraction": press.kept_fraction}


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


def run(cfg: DictConfig) -> dict[str, Any]:
    runner = validate_eval(cfg)
    run_dir = run_directory(cfg)
    done = run_dir / "metrics.json"
    if done.is_file() and not cfg.get("force", False):
        log.info("%s exists: skipping (force=true to re-run)", done)
        metrics = json.loads(done.read_text())
        print(json.dumps(metrics))
        return metrics
    seed_everything(cfg.seed)
    threads = set_threads(cfg.threads)
    pruner = build_pruner(cfg)
    kv_policy = build_kv_policy(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    log.info("eval=%s model=%s pruning=%s -> %s", cfg.eval.name, cfg.model.name, cfg.pruning.name, run_dir)
    with RunLogger(run_dir, cfg.logger, cfg, name=f"{cfg.eval.name}-{cfg.model.name}-{cfg.pruning.name}") as logger:
        start = time.perf_counter()
        with kv_compression(kv_policy, model) as press:
            results = runner(cfg, model, tokenizer, pruner, run_dir)
        wall_s = time.perf_counter() - start
        metrics = {
            "eval": cfg.eval.name,
            "model": cfg.model.name,
            "dtype": str(next(model.parameters()).dtype),
            "pruning": pruning_summary(cfg),
            "kv": kv_summary(press),
            "avg_kept_fraction": results.get("avg_kept_fraction", 1.0 if pruner is None else None),
            "results": results,
            "seed": cfg.seed,
            "threads": threads,
            "wall_s": round(wall_s, 3),
            "git_commit": git_commit(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        numbers = _numbers(results)
        logger.log({**numbers, "wall_s": wall_s})
        logger.summary(numbers)
        write_json_atomic(done, metrics)
    print(json.dumps(metrics, default=str))
    return metrics


@sdtp_main("eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
