"""``sdtp-train``: train the per-stage SDTP predictors (LLM frozen); the recipe is :mod:`sdtp.training.loop`.

    sdtp-train model=smollm2-135m data=mix threads=2 export_dir=results/predictors/smollm2-135m
    sdtp-train train.labels=stored train.labels_dir=<sdtp-label folder>      # precomputed labels
    sdtp-train experiment=sdtp_wo_rank                                         # paper Table 4/5 ablation

Writes ``metrics.jsonl`` (every step), ``metrics.json`` (final validation), ``checkpoint.pt`` and
``predictor/`` into ``out_dir``; the last stdout line is a JSON summary. ``resume=true`` continues
from the checkpoint (refused if the model, schedule, data or training setup differ).

Data parallel (every rank its own examples, predictor gradients averaged, rank 0 writes)::

    torchrun --standalone --nproc_per_node=2 -m sdtp.cli.train model=tiny-llama data=c4 distributed.backend=gloo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdtp.checks import integer, number
from sdtp.config import build_schedule, sdtp_main
from sdtp.data import validate_data
from sdtp.distributed import World, check_world, process_group
from sdtp.errors import ConfigError
from sdtp.losses import LOSS_TERMS, TIES
from sdtp.saliency import TARGETS
from sdtp.labels import TRANSFORMS
from sdtp.training.loop import train
from sdtp.training.masking import MODES

# `logit` rates tokens by one position's output (the last token's): kept for label analysis, not a training label
TRAIN_TARGETS = tuple(t for t in TARGETS if t != "logit")

LABEL_MODES = ("online", "stored")


def validate_train_config(cfg: DictConfig) -> None:
    """Every training key checked before the model loads; errors name the key."""
    t = cfg.train
    for key in ("batch_size", "grad_accum", "max_steps", "ckpt_every", "val_sequences"):
        integer(t[key], f"train.{key}", low=1)
    for key, low in (("eval_every", 0), ("context_window", 0), ("stop_at", 1), ("anneal_steps", 1)):
        if t.get(key) is not None:
            integer(t[key], f"train.{key}", low=low)
    weights, schedule = t.loss.get("stage_weights"), build_schedule(cfg)
    if weights is not None and schedule is not None:
        stages = len(schedule.layers)
        if len(weights) != stages or any(number(w, "train.loss.stage_weights") < 0 for w in weights):
            raise ConfigError(f"train.loss.stage_weights: expected {stages} weights >= 0 (one per stage), got "
                              f"{list(weights)}")
    for key in LOSS_TERMS:
        if number(t.loss[key], f"train.loss.{key}") < 0:
            raise ConfigError(f"train.loss.{key}: weights must be >= 0, got {t.loss[key]}")
    integer(t.loss.max_pairs, "train.loss.max_pairs", low=1)
    choices = {"loss.ties": (t.loss.ties, TIES), "keep_mode": (t.keep_mode, MODES), "labels": (t.labels, LABEL_MODES),
               "target": (t.target, TRAIN_TARGETS), "label_transform": (t.label_transform, TRANSFORMS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"train.{key}: {value!r} not in {allowed}")
    for key in ("noise_scale", "tau"):
        if float(t[key].start) < 0 or float(t[key].end) < 0:
            raise ConfigError(f"train.{key}: start/end must be >= 0")
    if float(t.tau.start) == 0 or float(t.tau.end) == 0:
        raise ConfigError("train.tau: start/end must be > 0")
    if int(t.query_tokens) < 0 or int(t.query_rank) < 1:
        raise ConfigError(f"train.query_tokens / query_rank: must be >= 0 / >= 1, got {t.query_tokens} / {t.query_rank}")
    scales = dict(t.lr_scale or {})
    if set(scales) - {"stages", "queries"} or any(float(v) < 0 for v in scales.values()):
        raise ConfigError(f"train.lr_scale: keys are stages / queries, scales >= 0; got {scales}")
    trained = float(scales.get("stages", 1.0)) > 0 or (int(t.query_tokens) > 0 and float(scales.get("queries", 1.0)) > 0)
    if not trained:
        raise ConfigError(f"train.lr_scale: {scales} freezes every part of the predictor")
    if t.labels == "stored" and not Path(t.labels_dir, "meta.json").is_file():
        raise ConfigError(f"train.labels_dir: no labels at {t.labels_dir}; run `sdtp-label` with the same model/data/target")
    validate_data(cfg.data, sources=t.labels == "online")  # stored labels: the label run read the sources
    if float(t.optimizer.get("lr", 0.0)) < 0:  # 0 is a no-op run (e.g. checking what train.init_from loads)
        raise ConfigError(f"train.optimizer.lr: must be >= 0, got {t.optimizer.lr}")
    check_world(World.from_env(), cfg.distributed, str(cfg.model.device))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, then train: in one process, or as this rank of a ``torchrun`` job (:mod:`sdtp.distributed`)."""
    validate_train_config(cfg)
    with process_group(World.from_env(), cfg.distributed, str(cfg.model.device)) as world:
        return train(cfg, world)


@sdtp_main("train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
