"""``sdtp-bench``: dense vs pruned prefill / decode / end-to-end latency, memory, KV cache, FLOPs.

    sdtp-bench model=smollm2-135m                       # pruning=sdtp, 1K..8K, 128 new tokens
    sdtp-bench pruning=random lengths=[2048] repeats=3

For every prompt length the dense model and the ``pruning`` config run the same prompt (first N
tokens of ``prompt_file``) through :func:`sdtp.engine.generation.generate`: SDPA attention and
logits for the last position only on both sides. After ``warmup`` untimed runs, ``repeats``
timed runs alternate dense/pruned (the order flips every repeat). Writes ``bench.json`` (after
every length, atomically; ``resume=true`` reuses finished lengths), ``bench.md`` and ``bench.png``
to the run dir; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from sdtp.benchmark.environment import ensure_malloc_env, environment
from sdtp.checks import integer
from sdtp.benchmark.measure import TimedScorer, probe_prefill, summarize, time_generation
from sdtp.benchmark.memory import peak_cuda, peak_rss_subprocess
from sdtp.benchmark.report import check_targets, render_markdown, render_plot, speedups, summary_line
from sdtp.config import build_schedule, pruner_variant, sdtp_main
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.revival import RevivingPruner
from sdtp.errors import ConfigError
from sdtp.flops import ATTENTION_MODES, estimate, revived_scored
from sdtp.models import load_model
from sdtp.paths import portable_tree
from sdtp.predictor import META_FILE, PredictorMeta, TokenPredictor
from sdtp.scorers.predictor import PredictorScorer
from sdtp.utils import seed_everything, set_threads, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
SCHEMA = "sdtp-bench/1"
PREDICTOR_TARGET = "sdtp.scorers.predictor.PredictorScorer"


def prepare(cfg: DictConfig) -> None:
    """Before validation: fall back to an untrained predictor (labelled) if allowed and needed."""
    scorer = cfg.pruning.get("scorer")
    if scorer is None or scorer.get("_target_") != PREDICTOR_TARGET or scorer.get("path") is None:
        return
    if (Path(scorer.path) / META_FILE).is_file() or cfg.get("untrained_predictor") != "auto":
        return
    log.warning("No trained predictor at %s: benchmarking a freshly initialised one (timing only)", scorer.path)
    with open_dict(cfg):
        cfg.pruning.scorer.path = None


def validate_bench(cfg: DictConfig) -> None:
    lengths = list(cfg.lengths)
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ConfigError(f"lengths: expected a non-empty list of positive prompt lengths, got {lengths}")
    for key, low in (("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
        integer(cfg[key], key, low=low)
    # The prompt must fit; decoding new_tokens past model.max_length is timed like any other step (the 8K point of
    # Table 2 decodes 128 tokens beyond SmolLM2's 8,192 positions: a speed measurement, not a quality one).
    if max(lengths) > int(cfg.model.max_length):
        raise ConfigError(f"lengths: {max(lengths)} prompt tokens exceed model.max_length={cfg.model.max_length}")
    if cfg.attention_flops not in ATTENTION_MODES:
        raise ConfigError(f"attention_flops: {cfg.attention_flops!r} not in {ATTENTION_MODES}")
    if cfg.untrained_predictor not in ("auto", "never"):
        raise ConfigError(f"untrained_predictor: {cfg.untrained_predictor!r} not in ('auto', 'never')")
    if not Path(cfg.prompt_file).is_file():
        raise ConfigError(f"prompt_file: {cfg.prompt_file} does not exist (set paths.data_dir or SDTP_DATA_DIR)")


def build_bench_pruner(cfg: DictConfig, model: torch.nn.Module) -> tuple[TokenPruner | None, str | None]:
    """The pruner of ``cfg.pruning`` with a timed scorer, and how its predictor was obtained."""
    schedule = build_schedule(cfg)
    if schedule is None:
        return None, None
    scorer_cfg = cfg.pruning.scorer
    if scorer_cfg._target_ == PREDICTOR_TARGET and scorer_cfg.get("path") is None:
        torch.manual_seed(int(cfg.seed))
        meta = PredictorMeta(hidden_size=model.config.hidden_size, layers=list(schedule.layers),
                             base_model=cfg.model.name, num_layers=int(cfg.model.num_layers))
        scorer, label = PredictorScorer(predictor=TokenPredictor(meta)), "untrained (random init; timing only)"
    else:
        scorer = hydra.utils.instantiate(scorer_cfg)
        label = f"trained: {scorer_cfg.path}" if scorer_cfg._target_ == PREDICTOR_TARGET else None
    variant, options = pruner_variant(cfg.pruning)  # a nesting ablation, if asked for, is timed as it runs
    return variant(schedule, TimedScorer(scorer), **options), label


def load_prompt(tokenizer: Any, path: str, length: int) -> torch.Tensor:
    """(1, length) ids: the first ``length`` tokens of the text file."""
    text = Path(path).read_text()
    ids = tokenizer(text[: 12 * length + 1000], return_tensors="pt").input_ids
    if ids.shape[1] < length:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ConfigError(f"lengths: prompt_file has only {ids.shape[1]} tokens, {length} requested")
    return ids[:, :length]


def _measure_length(cfg, model, pruner, ids, predictor_flops: int) -> dict[str, Any]:
    """All variants at one prompt length: probes, warm-up, interleaved repeats, memory."""
    variants = {"dense": None, **({"pruned": pruner} if pruner is not None else {})}
    entry: dict[str, Any] = {"seq_len": int(ids.shape[1]), "variants": {}}
    for name, pr in variants.items():
        entry["variants"][name] = probe_prefill(model, ids, pr)
    positions = _processed_positions(pruner, model.config.num_hidden_layers) if pruner is not None else None
    for _ in range(int(cfg.warmup)):
        for pr in variants.values():
            time_generation(model, ids, min(int(cfg.new_tokens), 4), pr)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for rep in tqdm(range(int(cfg.repeats)), desc=f"N={ids.shape[1]}", leave=False):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(time_generation(model, ids, int(cfg.new_tokens), variants[name]))
    for name, samples in runs.items():
        stats = entry["variants"][name]
        for key in samples[0]:
            stats[key] = summarize([s[key] for s in samples])
        if "predictor_s" in samples[0]:
            stats["predictor_time_share"] = statistics.median(s["predictor_s"] / s["prefill_s"] for s in samples)
        stats["memory"] = _memory(cfg, model, name, ids)
    if pruner is not None:
        entry["paired_prefill_speedup"] = summarize(
            [d["prefill_s"] / p["prefill_s"] for d, p in zip(runs["dense"], runs["pruned"])])
    tokens = entry["variants"].get("pruned", entry["variants"]["dense"])["tokens_per_layer"]
    stage_layers = list(pruner.schedule.layers) if pruner is not None else []
    # the revive ablation's stages score every prompt token, not only the alive ones
    scored = revived_scored(int(ids.shape[1]), tokens, stage_layers) if isinstance(pruner, RevivingPruner) else None
    entry["flops"] = estimate(model.config, int(ids.shape[1]), tokens, int(cfg.new_tokens), predictor_flops,
                              stage_layers, cfg.attention_flops, positions, scored)
    entry["speedup"] = speedups(entry)
    return entry


def _processed_positions(pruner: TokenPruner, num_layers: int) -> list[list[int] | None]:
    """The original positions each layer processed in the pruner's last (batch-1) prefill; None before
    the first stage. Sliding-window layers' FLOPs and cache depend on them, not only on their number."""
    record = pruner.last_prefill
    return [record.layer_positions[layer][0].tolist() if layer in record.layer_positions else None
            for layer in range(num_layers)]


def _memory(cfg: DictConfig, model: torch.nn.Module, variant: str, ids: torch.Tensor) -> dict[str, Any]:
    if not cfg.memory:
        return {}
    device = torch.device(cfg.model.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        pruner = build_bench_pruner(cfg, model)[0] if variant == "pruned" else None
        time_generation(model, ids, int(cfg.new_tokens), pruner)
        return {"peak_cuda_bytes": peak_cuda(device)}
    return peak_rss_subprocess(cfg, variant, ids, int(cfg.new_tokens))


def _predictor_flops(pruner: TokenPruner | None) -> int:
    predictor = getattr(pruner.scorer.inner, "predictor", None) if pruner is not None else None
    return predictor.num_flops_per_token() if predictor is not None else 0


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    validate_bench(cfg)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    pruner, predictor_label = build_bench_pruner(cfg, model)
    prompt = load_prompt(tokenizer, cfg.prompt_file, max(int(n) for n in cfg.lengths))
    settings = {key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
                for key in ("lengths", "new_tokens", "warmup", "repeats", "attention_flops", "memory", "threads")}
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": cfg.model.name,
        # portable: bench.json is copied into committed pages (resume ignores where the predictor lies)
        "pruning": portable_tree({**OmegaConf.to_container(cfg.pruning, resolve=True), "predictor": predictor_label,
                                  "stage_layers": list(pruner.schedule.layers) if pruner else []}),
        "settings": settings,
        "environment": environment(model, cfg.model.device),
        "results": [],
    }
    previous = _load_previous(run_dir / "bench.json", report) if cfg.resume else {}
    requested = [int(n) for n in cfg.lengths]
    # Lengths an earlier comparable run measured and this one does not ask for stay in bench.json, so a run of
    # a few lengths does not discard the others (the next full run would measure them again).
    measured = {n: entry for n, entry in previous.items() if n not in requested}
    if measured:
        log.info("keeping the lengths measured earlier: %s", sorted(measured))
    for length in tqdm(requested, desc="lengths"):
        ids = prompt[:, :length].to(cfg.model.device)
        if length in previous:
            entry = previous[length]
        else:
            if pruner is not None:  # bind the scorer once so the predictor's FLOPs are known
                probe_prefill(model, ids[:, : min(length, 64)], pruner)
            entry = _measure_length(cfg, model, pruner, ids, _predictor_flops(pruner))
        measured[length] = entry
        report["results"] = [measured[n] for n in sorted(measured)]
        report["settings"]["lengths"] = sorted(measured)
        report["targets"] = check_targets(report, OmegaConf.to_container(cfg.targets))
        write_json_atomic(run_dir / "bench.json", report)
        log.info("N=%d: %s", length, json.dumps(entry.get("speedup", {})))
    write_text_atomic(run_dir / "bench.md", render_markdown(report))
    render_plot(report, run_dir / "bench.png")
    summary = summary_line(report, run_dir)
    print(json.dumps(summary))
    return summary


# The machine and numerics a timing (and the KV bytes) depend on: one page never mixes them.
ENVIRONMENT_KEYS = ("device", "dtype", "attn_implementation", "threads", "cpu_model")


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """What decides whether an earlier run's lengths can be reused: schema, model, settings but the
    list of lengths (each length is its own entry), the pruning config without where the predictor
    lies (timings and FLOPs depend on its architecture, fixed by model and schedule, not on its file),
    and the machine and numerics (ENVIRONMENT_KEYS)."""
    report = json.loads(json.dumps(report))  # tuples -> lists, as read back from a file
    settings = {k: v for k, v in report.get("settings", {}).items() if k != "lengths"}
    pruning = {k: v for k, v in report.get("pruning", {}).items() if k != "predictor"}
    if isinstance(pruning.get("scorer"), dict):
        pruning["scorer"] = {k: v for k, v in pruning["scorer"].items() if k != "path"}
    env = {k: (report.get("environment") or {}).get(k) for k in ENVIRONMENT_KEYS}
    return {"schema": report.get("schema"), "model": report.get("model"), "settings": settings, "pruning": pruning,
            "environment": env}


def _load_previous(path: Path, report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Finished lengths of an earlier run (same dir, or a committed copy) with comparable settings."""
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    old, new = _comparable(stored), _comparable(report)
    changed = [part for part in new if old.get(part) != new[part]]
    if changed:
        log.warning("%s: not reusing its lengths (%s differ): measuring every length", path, ", ".join(changed))
        return {}
    return {int(e["seq_len"]): e for e in stored.get("results", [])}


@sdtp_main("bench", prepare=prepare)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    # glibc reads MALLOC_* at start-up, so this must happen before Hydra composes the config.
    if not any(arg.replace(" ", "").lower() == "tune_malloc=false" for arg in sys.argv[1:]):
        ensure_malloc_env("sdtp.cli.bench")
    _hydra_main()


if __name__ == "__main__":
    main()
