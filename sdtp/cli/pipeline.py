"""``sdtp-pipeline``: the main job on the embedded model (``make demo``).

Runs the framework's stages side by side for several pruning configs (``variants``):
optional label -> train of the predictors, dense-vs-pruned generation on one long prompt, small
evaluation runs (``sdtp-eval``) and one latency/FLOPs benchmark (``sdtp-bench``). Every stage
writes into a sub-directory of the run dir; ``metrics.json`` collects the headline numbers and the
last stdout line is the same JSON.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdtp.config import build_pruner, compose, quoted_override, sdtp_main
from sdtp.engine.cache import cache_bytes
from sdtp.engine.generation import generate
from sdtp.checks import integer
from sdtp.errors import ConfigError
from sdtp.models import load_model
from sdtp.tracking import RunLogger
from sdtp.utils import git_commit, seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)
STAGES = ("generate", "eval", "bench")


def wikitext_prompt(tokenizer: Any, data_dir: str, num_tokens: int) -> torch.Tensor:
    """(1, num_tokens) ids: the beginning of WikiText-2 validation."""
    path = Path(data_dir) / "lm" / "wiki.valid.raw"
    if not path.is_file():
        raise ConfigError(f"paths.data_dir: {path} not found (set SDTP_DATA_DIR to the offline data mirror)")
    text = path.read_text()[: num_tokens * 12]  # ~4 chars/token; generous margin
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens]
    if ids.shape[1] < num_tokens:
        raise ConfigError(f"generation.prompt_tokens: only {ids.shape[1]} tokens available")
    return ids


def stage_overrides(cfg: DictConfig, variant: str, predictor: str | None) -> list[str]:
    """Overrides that make a stage config use this run's model, a pruning variant and shared extras."""
    extra = [f"model={cfg.model.name}", f"pruning={variant}", f"seed={cfg.seed}", *cfg.overrides]
    if cfg.threads:
        extra.append(f"threads={cfg.threads}")
    if predictor and variant == "sdtp":
        extra.append(quoted_override("pruning.scorer.path", predictor))  # a path: quoted (e.g. seed=0 in a sweep)
    return extra


def eval_overrides(cfg: DictConfig, name: str, variant: str, predictor: str | None, run_dir: Path) -> list[str]:
    """The ``sdtp-eval`` overrides of eval ``name`` for ``variant``, into its sub-directory of ``run_dir``."""
    sub_dir = run_dir / "eval" / name / variant
    return [*cfg.evals[name], *stage_overrides(cfg, variant, predictor), quoted_override("run_dir", sub_dir)]


def retrained_predictor(run_dir: Path) -> Path:
    """Where ``retrain_predictor=true`` trains the predictor the ``sdtp`` variant then uses."""
    return run_dir / "predictor"


def retrain_overrides(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The ``sdtp-train`` overrides of ``retrain_predictor=true`` (:func:`sdtp.training.demo.train_small`).

    The ``sdtp`` variant's stage overrides (model, seed, threads and the pipeline's ``overrides``), so the predictor
    is trained with the run's seed and threads for the schedule that variant then prunes with, plus the folders the
    training writes into.
    """
    return [*stage_overrides(cfg, "sdtp", None), quoted_override("export_dir", retrained_predictor(run_dir)),
            quoted_override("out_dir", run_dir / "train")]


def generation_stage(model: Any, tokenizer: Any, cfg: DictConfig, predictor: str | None) -> dict[str, Any]:
    """Dense vs every pruned variant on the same prompt; medians over interleaved repeats."""
    gen = cfg.generation
    pruners = {v: build_pruner(compose("generate", stage_overrides(cfg, v, predictor))) for v in cfg.variants}
    ids = wikitext_prompt(tokenizer, cfg.paths.data_dir, gen.prompt_tokens).to(cfg.model.device)
    runs: dict[str, list] = {name: [] for name in pruners}
    for rep in range(gen.repeats + 1):  # rep 0 = warm-up, discarded
        for name, pruner in pruners.items():
            result = generate(model, ids, gen.max_new_tokens, pruner, eos_token_id=None)
            if rep:
                runs[name].append(result)
                log.info("rep %d %-10s prefill %.3fs decode %.3fs", rep, name, result.prefill_s, result.decode_s)
    report = {}
    for name, results in runs.items():
        last = results[-1]
        report[name] = {
            "prefill_s": statistics.median(r.prefill_s for r in results),
            "decode_ms_per_token": 1000 * statistics.median(r.decode_s / max(1, len(r.tokens) - 1) for r in results),
            "kept_per_stage": last.kept_per_stage,
            "kv_cache_bytes": cache_bytes(last.cache),
            "text": tokenizer.decode(last.tokens, skip_special_tokens=True),
        }
    dense = report.get("none", {}).get("prefill_s")
    for row in report.values():
        row["prefill_speedup"] = dense / row["prefill_s"] if dense else None
    return report


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a table cell from one ``sdtp-eval`` metrics.json."""
    results = metrics.get("results", {})
    if "perplexity" in results:
        return {"ppl": results["perplexity"]}
    if "tasks" in results:  # lm-eval
        return {f"{task}/{key}": value for task, res in results["tasks"].items()
                for key, value in res.items() if key in ("acc", "acc_norm", "perplexity")}
    if "score" in results:
        return {"score": results["score"]}
    if "avg" in results:  # LongBench
        return {"avg": results["avg"]}
    return {}


def eval_stage(cfg: DictConfig, run_dir: Path, predictor: str | None) -> dict[str, Any]:
    from sdtp.cli import evaluate

    table: dict[str, Any] = {}
    for name in cfg.evals:
        for variant in cfg.variants:
            metrics = evaluate.run(compose("eval", eval_overrides(cfg, name, variant, predictor, run_dir)))
            table.setdefault(name, {})[variant] = {
                **headline(metrics), "avg_kept_fraction": metrics.get("avg_kept_fraction"), "wall_s": metrics["wall_s"],
            }
    return table


def bench_stage(cfg: DictConfig, run_dir: Path, predictor: str | None) -> dict[str, Any]:
    from sdtp.cli import bench

    sub = compose("bench", [*cfg.bench, *stage_overrides(cfg, cfg.bench_variant, predictor)])
    return bench.run(sub, run_dir=run_dir / "bench")


def validate_pipeline(cfg: DictConfig, run_dir: Path | None = None) -> None:
    """Compose and check every stage's configs before any work starts: a typo in the bench overrides should not
    surface after the generation and eval stages have run.

    With ``retrain_predictor=true`` the ``sdtp`` variant is checked with the predictor the run trains into
    ``<run_dir>/predictor`` before any stage uses it, taken as present (:func:`sdtp.config.validate_config`'s
    ``present``): a model without a shipped predictor can retrain one. Otherwise it is checked with the shipped one.

    ``run_dir``: the run's directory, composed into the eval stage's overrides as that stage will (e.g. a sweep job's
    ``.../seed=0``); None (``sdtp.cli.check``, the sweeper's checks of a sweep's jobs, before a job has one): the
    config's ``run_dir`` or the current directory.
    """
    from sdtp.cli import bench, evaluate

    unknown = [stage for stage in cfg.stages if stage not in STAGES]
    if unknown:
        raise ConfigError(f"stages: {unknown} not in {list(STAGES)}")
    if "generate" in cfg.stages:
        gen = cfg.generation
        for key in ("max_new_tokens", "repeats"):
            integer(gen[key], f"generation.{key}", low=1)
        prompt = integer(gen.prompt_tokens, "generation.prompt_tokens", low=1)
        if prompt > int(cfg.model.max_length):
            raise ConfigError(f"generation.prompt_tokens: {prompt} exceeds model.max_length={cfg.model.max_length}")
    run_dir = Path(cfg.get("run_dir") or ".") if run_dir is None else run_dir
    predictor, present = None, ()
    if cfg.retrain_predictor:
        from sdtp.cli import train
        from sdtp.training.demo import DEMO_OVERRIDES

        train.validate_train_config(compose("train", [*DEMO_OVERRIDES, *retrain_overrides(cfg, run_dir)]))
        predictor = str(retrained_predictor(run_dir))
        present = (predictor,)
    for variant in cfg.variants:
        compose("generate", stage_overrides(cfg, variant, predictor), present=present)
        for name in cfg.evals if "eval" in cfg.stages else []:
            overrides = eval_overrides(cfg, name, variant, predictor, run_dir)
            evaluate.validate_eval(compose("eval", overrides, present=present))
    if "bench" in cfg.stages:
        overrides = [*cfg.bench, *stage_overrides(cfg, cfg.bench_variant, predictor)]
        bench.validate_bench(compose("bench", overrides, present=present))


def run(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(cfg.get("run_dir") or HydraConfig.get().runtime.output_dir)
    validate_pipeline(cfg, run_dir)
    seed_everything(cfg.seed)
    threads = set_threads(cfg.threads)
    predictor = None
    metrics: dict[str, Any] = {"model": cfg.model.name, "variants": list(cfg.variants), "threads": threads}
    with RunLogger(run_dir, cfg.logger, cfg, name=cfg.task_name) as logger:
        if cfg.retrain_predictor:
            from sdtp.training.demo import train_small

            trained = train_small(retrain_overrides(cfg, run_dir))
            predictor = trained["predictor"]
            metrics["training"] = trained
        if "generate" in cfg.stages:
            model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
            metrics["dtype"] = str(next(model.parameters()).dtype)
            metrics["generation"] = generation_stage(model, tokenizer, cfg, predictor)
            _print_generation(metrics["generation"])
            del model
        if "eval" in cfg.stages:
            metrics["eval"] = eval_stage(cfg, run_dir, predictor)
            _print_eval(metrics["eval"])
        if "bench" in cfg.stages:
            metrics["bench"] = bench_stage(cfg, run_dir, predictor)
        metrics["git_commit"] = git_commit()
        logger.log({"done": 1})
        write_json_atomic(run_dir / "metrics.json", metrics)
    print(json.dumps(metrics, default=str))
    return metrics


def _print_generation(generation: dict[str, Any]) -> None:
    print(f"\n{'variant':<10} {'prefill s':>10} {'speedup':>8} {'decode ms/tok':>14} {'KV MiB':>8}  kept per stage")
    for name, row in generation.items():
        speedup = f"{row['prefill_speedup']:.2f}x" if row["prefill_speedup"] else "-"
        print(f"{name:<10} {row['prefill_s']:>10.3f} {speedup:>8} {row['decode_ms_per_token']:>14.1f} "
              f"{row['kv_cache_bytes'] / 2**20:>8.1f}  {row['kept_per_stage']}")


def _print_eval(table: dict[str, Any]) -> None:
    for name, rows in table.items():
        print(f"\n[{name}]")
        for variant, row in rows.items():
            cells = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"  {variant:<10} {cells}")


@sdtp_main("pipeline")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
