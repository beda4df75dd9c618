"""``sdtp-train``: train the per-stage SDTP predictors on saliency labels (LLM frozen).

    sdtp-label model=smollm2-135m data=dolly_c4 threads=1
    sdtp-train model=smollm2-135m data=dolly_c4 threads=1 export_dir=results/predictors/smollm2-135m

Each step runs the frozen model with simulated pruning (:class:`PolicyMasker`: straight-through
keep masks, attention masking, shapes unchanged) and minimises CE + per-stage MSE + per-stage
ranking loss (+ optional ratio / KL terms; :mod:`sdtp.losses`). Checkpoints hold predictor,
optimizer, scheduler and RNG state, so ``resume=true`` reproduces an uninterrupted run exactly.
Writes ``metrics.jsonl`` (every step), ``metrics.json`` (final validation) and ``predictor/``
into ``out_dir``; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sdtp.config import build_schedule, sdtp_main
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.labels import load_labels
from sdtp.losses import TIES, distill_kl, sdtp_loss
from sdtp.models import load_model
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.saliency import lm_loss
from sdtp.scorers.predictor import PredictorScorer
from sdtp.tracking import RunLogger
from sdtp.training.masking import MODES, PolicyMasker
from sdtp.training.validation import ranking_agreement, recent_perplexity
from sdtp.utils import seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def validate_train_config(cfg: DictConfig) -> None:
    t = cfg.train
    for key in ("batch_size", "grad_accum", "max_steps", "ckpt_every"):
        if int(t[key]) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {t[key]}")
    for key, value in t.loss.items():
        if key not in ("ties", "stage_weights") and float(value) < 0:
            raise ConfigError(f"train.loss.{key}: weights must be >= 0, got {value}")
    if t.loss.ties not in TIES:
        raise ConfigError(f"train.loss.ties: {t.loss.ties!r} not in {TIES}")
    if t.keep_mode not in MODES:
        raise ConfigError(f"train.keep_mode: {t.keep_mode!r} not in {MODES}")
    if not Path(t.labels_dir, "meta.json").is_file():
        raise ConfigError(f"train.labels_dir: no labels at {t.labels_dir}; run `sdtp-label` with the same model/data")


def check_labels(meta: dict[str, Any], cfg: DictConfig, schedule: PruningSchedule, count: int) -> None:
    """Labels must come from this model and schedule, and leave data to train on."""
    if meta["base_model"] != cfg.model.name:
        raise ConfigError(f"train.labels_dir: labels are for model {meta['base_model']!r}, not {cfg.model.name!r}")
    if list(meta["layers"]) != list(schedule.layers):
        raise ConfigError(f"train.labels_dir: labels are for layers {meta['layers']}, schedule has {list(schedule.layers)}")
    if count <= int(cfg.train.val_sequences):
        raise ConfigError(f"train.val_sequences: {cfg.train.val_sequences} >= the {count} labelled sequences")


def sample_order(step: int, cfg: DictConfig, num_items: int) -> list[list[int]]:
    """Item indices of each micro-batch of optimizer step ``step``: seeded per-epoch permutations."""
    t, out = cfg.train, []
    for micro in range(int(t.grad_accum)):
        start = (step * int(t.grad_accum) + micro) * int(t.batch_size)
        batch = []
        for i in range(start, start + int(t.batch_size)):
            perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(int(cfg.seed) * 1000 + i // num_items))
            batch.append(int(perm[i % num_items]))
        out.append(batch)
    return out


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to (B, S) ids, (B, S) valid, (B, S, num_stages) labels."""
    length = max(ids.shape[0] for ids, _ in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    valid = torch.zeros(len(items), length, dtype=torch.bool)
    labels = torch.zeros(len(items), length, items[0][1].shape[-1])
    for row, (seq, lab) in enumerate(items):
        ids[row, : len(seq)], valid[row, : len(seq)], labels[row, : len(seq)] = seq, True, lab
    return ids, valid, labels


def loss_step(model, masker: PolicyMasker, batch, cfg: DictConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: masked forward, then the weighted sum of every stage's loss terms."""
    ids, valid, labels = batch
    w, head = cfg.train.loss, model.get_output_embeddings()
    teacher = None
    if w.kl:
        with torch.no_grad():
            teacher = head(model.base_model(input_ids=ids, attention_mask=valid.long()).last_hidden_state)
    with masker(model):
        hidden = model.base_model(input_ids=ids, attention_mask=valid.long()).last_hidden_state
        scores, policies = masker.state.scores, masker.state.policies
    ce = lm_loss(head, hidden, ids, valid) if w.ce else None
    kl = distill_kl(head(hidden), teacher, valid) if teacher is not None else None
    weights = {k: float(w[k]) for k in ("ce", "mse", "ranking", "ratio", "kl")}
    return sdtp_loss(scores, labels, valid, weights, ce=ce, policies=policies,
                     fractions=masker.schedule.keep_fractions, kl=kl, stage_weights=w.stage_weights, ties=w.ties)


def validate(model, predictor: TokenPredictor, schedule: PruningSchedule, items, dense_ppl: dict | None) -> dict[str, float]:
    """Ranking agreement + pruned-forward perplexity (recent positions) on held-out labelled sequences."""
    predictor.eval()
    metrics = ranking_agreement(model, items, schedule, lambda s, h, ids: predictor(s, h))
    pruner = TokenPruner(schedule, PredictorScorer(predictor=predictor))
    pruned = recent_perplexity(model, [ids for ids, _ in items], pruner, schedule)
    predictor.train()
    metrics.update({"ppl_pruned": pruned["ppl"]})
    if dense_ppl is not None:
        metrics["ppl_dense"] = dense_ppl["ppl"]
    return metrics


def save_checkpoint(path: Path, step: int, predictor, optimizer, scheduler, generator: torch.Generator) -> None:
    state = {"step": step, "predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler else None, "gumbel_rng": generator.get_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_train_config(cfg)
    seed_everything(int(cfg.seed))
    set_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    schedule = build_schedule(cfg)
    meta, items = load_labels(cfg.train.labels_dir)
    check_labels(meta, cfg, schedule, len(items))
    val_items, train_items = items[-int(cfg.train.val_sequences):], items[: -int(cfg.train.val_sequences)]
    model, _ = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval().requires_grad_(False)
    param = next(model.parameters())

    predictor = TokenPredictor(PredictorMeta(
        hidden_size=model.config.hidden_size, layers=list(schedule.layers), hidden_ratio=float(cfg.train.hidden_ratio),
        base_model=cfg.model.name, num_layers=int(cfg.model.num_layers), input_norm=bool(cfg.train.input_norm),
        extra={"keep_mode": cfg.train.keep_mode, "loss": OmegaConf.to_container(cfg.train.loss), "labels": meta["data"]["name"]},
    )).to(param.device)
    log.info("Instantiating optimizer <%s>", cfg.train.optimizer._target_)
    optimizer = hydra.utils.instantiate(cfg.train.optimizer)(params=predictor.parameters())
    scheduler = hydra.utils.instantiate(cfg.train.scheduler)(optimizer=optimizer) if cfg.train.scheduler else None
    generator = torch.Generator().manual_seed(int(cfg.seed))
    masker = PolicyMasker(schedule, predictor, cfg.train.keep_mode, float(cfg.train.tau), generator=generator)

    step, ckpt = 0, out_dir / CHECKPOINT
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        predictor.load_state_dict(state["predictor"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["gumbel_rng"])
        step = int(state["step"])
        log.info("Resumed from %s at step %d", ckpt, step)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.bf16 else nullcontext()
    max_steps, begin = int(cfg.train.max_steps), time.perf_counter()
    with RunLogger(out_dir, cfg.logger, cfg, name=cfg.experiment_name) as logger:
        bar = tqdm(total=max_steps, initial=step, desc="train", unit="step")
        while step < max_steps:
            optimizer.zero_grad(set_to_none=True)
            terms_acc: dict[str, float] = {}
            for micro_batch in sample_order(step, cfg, len(train_items)):
                batch = [t.to(param.device) for t in collate([train_items[i] for i in micro_batch])]
                with autocast:
                    loss, terms = loss_step(model, masker, batch, cfg)
                (loss / int(cfg.train.grad_accum)).backward()
                for k, v in terms.items():
                    terms_acc[k] = terms_acc.get(k, 0.0) + v / int(cfg.train.grad_accum)
            grad_norm = torch.nn.utils.clip_grad_norm_(predictor.parameters(), float(cfg.train.grad_clip))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            logger.log({**terms_acc, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]}, step=step)
            bar.update(1)
            bar.set_postfix({k: f"{terms_acc[k]:.3f}" for k in ("loss", "ce", "mse", "rank") if k in terms_acc})
            if step % int(cfg.train.ckpt_every) == 0 or step == max_steps:
                save_checkpoint(ckpt, step, predictor, optimizer, scheduler, generator)
            if cfg.train.stop_at and step >= int(cfg.train.stop_at) and step < max_steps:
                log.info("Stopping at step %d (train.stop_at); continue with resume=true", step)
                save_checkpoint(ckpt, step, predictor, optimizer, scheduler, generator)
                return {"out_dir": str(out_dir), "step": step, "stopped": True}
            if cfg.train.eval_every and step % int(cfg.train.eval_every) == 0 and step < max_steps:
                logger.log({f"val/{k}": v for k, v in validate(model, predictor, schedule, val_items, None).items()}, step=step)
        bar.close()
        train_seconds = time.perf_counter() - begin
        dense = recent_perplexity(model, [ids for ids, _ in val_items], None, schedule)
        metrics = validate(model, predictor, schedule, val_items, dense)
        metrics.update({"step": step, "train_seconds_this_run": round(train_seconds, 1),
                        "train_sequences": len(train_items), "val_sequences": len(val_items)})
        logger.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        logger.summary(metrics)
    predictor.save(out_dir / "predictor")
    if cfg.export_dir:
        predictor.save(cfg.export_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    summary = {"out_dir": str(out_dir), "predictor": str(cfg.export_dir or out_dir / "predictor"),
               **{k: metrics[k] for k in ("spearman", "topk_overlap", "ppl_pruned", "ppl_dense")}, "step": step}
    print(json.dumps(summary))
    return summary


@sdtp_main("train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
