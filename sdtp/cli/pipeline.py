"""``sdtp-pipeline``: the main job on the embedded model (``make demo``).

Currently: dense vs pruned generation on the same long prompt, interleaved repetitions after a
warm-up, reporting median prefill time, decode time, kept tokens per stage and KV-cache bytes.
Writes ``metrics.json`` to the run directory; the last stdout line is the same JSON.
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

from sdtp.config import build_pruner, sdtp_main
from sdtp.engine.cache import cache_bytes
from sdtp.engine.generation import generate
from sdtp.errors import ConfigError
from sdtp.models import load_model
from sdtp.tracking import RunLogger
from sdtp.utils import git_commit, seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)


def wikitext_prompt(tokenizer: Any, data_dir: str, num_tokens: int) -> torch.Tensor:
    """(1, num_tokens) ids: the beginning of WikiText-2 validation."""
    path = Path(data_dir) / "lm" / "wiki.valid.raw"
    if not path.is_file():
        raise ConfigError(f"paths.data_dir: {path} not found (set SDTP_DATA_DIR to the offline data mirror)")
    text = path.read_text()[: num_tokens * 12]  # ~4 chars/token; generous margin
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens]
    if ids.shape[1] < num_tokens:
        raise ConfigError(f"prompt_tokens: only {ids.shape[1]} tokens available")
    return ids


def compare_generation(model: Any, tokenizer: Any, cfg: DictConfig) -> dict[str, Any]:
    """Dense vs ``cfg.pruning`` on the same prompt; medians over interleaved repeats."""
    pruner = build_pruner(cfg)
    ids = wikitext_prompt(tokenizer, cfg.paths.data_dir, cfg.prompt_tokens).to(cfg.model.device)
    variants = {"dense": None, cfg.pruning.name: pruner} if pruner else {"dense": None}
    runs: dict[str, list] = {name: [] for name in variants}
    for rep in range(cfg.repeats + 1):  # rep 0 = warm-up, discarded
        for name, variant in variants.items():
            result = generate(model, ids, cfg.max_new_tokens, variant, eos_token_id=None)
            if rep:
                runs[name].append(result)
                log.info("rep %d %-8s prefill %.3fs decode %.3fs", rep, name, result.prefill_s, result.decode_s)
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
    if pruner:
        report["prefill_speedup"] = report["dense"]["prefill_s"] / report[cfg.pruning.name]["prefill_s"]
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    threads = set_threads(cfg.threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    with RunLogger(run_dir, cfg.logger, cfg, name=cfg.task_name) as logger:
        generation = compare_generation(model, tokenizer, cfg)
        metrics = {
            "model": cfg.model.name,
            "dtype": str(next(model.parameters()).dtype),
            "threads": threads,
            "prompt_tokens": cfg.prompt_tokens,
            "pruning": cfg.pruning.name,
            "generation": generation,
            "git_commit": git_commit(),
        }
        logger.log({"prefill_speedup": generation.get("prefill_speedup")})
        write_json_atomic(run_dir / "metrics.json", metrics)
    _print_table(generation)
    print(json.dumps(metrics))
    return metrics


def _print_table(generation: dict[str, Any]) -> None:
    print(f"{'variant':<10} {'prefill s':>10} {'decode ms/tok':>14} {'KV MiB':>8}  kept per stage")
    for name, row in generation.items():
        if isinstance(row, dict):
            print(f"{name:<10} {row['prefill_s']:>10.3f} {row['decode_ms_per_token']:>14.1f} "
                  f"{row['kv_cache_bytes'] / 2**20:>8.1f}  {row['kept_per_stage']}")
    if "prefill_speedup" in generation:
        print(f"prefill speedup: {generation['prefill_speedup']:.2f}x")


@sdtp_main("pipeline")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
