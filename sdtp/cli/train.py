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

import torch
from omegaconf import DictConfig, OmegaConf

from sdtp.checks import integer, number
from sdtp.config import build_schedule, sdtp_main
from sdtp.data import validate_data
from sdtp.distributed import World, check_world, process_group
from sdtp.errors import ConfigError
from sdtp.losses import LOSS_TERMS, TIES
from sdtp.predictor import META_FILE
from sdtp.saliency import TARGETS
from sdtp.labels import TRANSFORMS
from sdtp.targets import check_arguments, import_target
from sdtp.training.loop import train
from sdtp.training.masking import MODES

# `logit` rates tokens by one position's output (the last token's): kept for label analysis, not a training label
TRAIN_TARGETS = tuple(t for t in TARGETS if t != "logit")

LABEL_MODES = ("online", "stored")
STAGE_TERMS = ("mse", "ranking", "selection")  # the loss terms train.loss.stage_weights multiplies


def check_partial(key: str, node: DictConfig, base: type, supplied: str) -> None:
    """``node`` builds a ``base`` subclass once the training loop passes it ``supplied`` (``params`` of an
    optimizer, ``optimizer`` of a scheduler): Hydra would only fail when the loop builds it, after the model loads."""
    if not node.get("_partial_", False):
        raise ConfigError(f"{key}._partial_: must be true (the training loop passes {supplied})")
    cls = import_target(f"{key}._target_", str(node.get("_target_")), base)
    # the loop's argument is absent from the config: a placeholder, so it is not reported as a missing one
    check_arguments(key, cls, {**OmegaConf.to_container(node, resolve=True), supplied: None})


def check_loss_weights(loss: DictConfig) -> None:
    """Every weight a number >= 0 and at least one term weighted > 0 (mse, ranking and selection count only while
    some stage weight is > 0): with none the total loss is a constant without a gradient, and ``backward()`` fails in
    the first step, after the model has loaded."""
    for key in LOSS_TERMS:
        if number(loss[key], f"train.loss.{key}") < 0:
            raise ConfigError(f"train.loss.{key}: weights must be >= 0, got {loss[key]}")
    stages = loss.get("stage_weights")
    staged = stages is None or any(number(w, "train.loss.stage_weights") > 0 for w in stages)  # all 0: stage terms off
    live = [key for key in LOSS_TERMS if float(loss[key]) > 0 and (staged or key not in STAGE_TERMS)]
    if not live:
        raise ConfigError(f"train.loss: no term has a weight > 0 (weights of {', '.join(LOSS_TERMS)}"
                          f"{'' if stages is None else ', with stage_weights ' + str(list(stages))}): nothing to train")


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
    check_loss_weights(t.loss)
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
    if number(t.optimizer.get("lr"), "train.optimizer.lr") < 0:  # 0: a no-op run (checking what init_from loads)
        raise ConfigError(f"train.optimizer.lr: must be >= 0, got {t.optimizer.lr}")
    check_partial("train.optimizer", t.optimizer, torch.optim.Optimizer, "params")
    if t.scheduler is not None:  # null: a constant learning rate
        check_partial("train.scheduler", t.scheduler, torch.optim.lr_scheduler.LRScheduler, "optimizer")
    if number(t.grad_clip, "train.grad_clip") <= 0:  # every step clips the gradient norm to it
        raise ConfigError(f"train.grad_clip: must be > 0, got {t.grad_clip}")
    if number(t.hidden_ratio, "train.hidden_ratio") <= 0:
        raise ConfigError(f"train.hidden_ratio: must be > 0, got {t.hidden_ratio}")
    if t.init_from and not Path(t.init_from, META_FILE).is_file():  # null: random initial weights
        raise ConfigError(f"train.init_from: no trained predictor at {t.init_from} (expected {META_FILE}); "
                          "point it at an `sdtp-train` predictor folder")
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
