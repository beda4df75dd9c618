"""The SDTP predictor training recipe, top to bottom (the LLM is frozen; only the predictors learn).

1. Examples: ``(ids, split)`` pairs, prompt ``[0, split)`` + continuation (:mod:`sdtp.data`); the
   last ``val_sequences`` are held out. They are never trained on, but a text window among them may be cut
   from a book or C4 document that also gives training windows: this validation tracks training; the
   committed evaluations use documents no training run reads (WikiText-2, C4 300+, LongBench).
2. Labels: the ``train.target`` saliency of the dense model at each stage layer (attention received, or
   gradient x input of a loss; :mod:`sdtp.saliency`), either computed *online* in every step (one dense
   forward, plus a backward for the gradient targets; nothing stored, so a run resumes on a
   fresh machine from its checkpoint alone) or read from an ``sdtp-label`` folder (every layer
   stored; the schedule's columns are taken). Transformed per example (:func:`transform_labels`).
3. Masked forward (:class:`PolicyMasker`): the predictors prune the prompt by attention masking;
   the continuation is protected, as at inference.
4. Loss (:func:`sdtp_loss`): CE (and optionally KL to the dense model) on the continuation, MSE and
   ranking on the tokens each stage chooses among, optional ratio loss.
5. AdamW on the fp32 predictor, gradient clipping, cosine schedule; Gumbel noise scale and
   straight-through temperature annealed linearly over ``train.anneal_steps``.
6. Checkpoint every ``ckpt_every`` steps (with a signature, so a resume cannot mix setups);
   validation on the held-out examples (continuation NLL dense / random / predictor, ranking
   agreement); the predictor is saved (and exported) at the end.

Launched by ``torchrun`` (:mod:`sdtp.distributed`), every rank runs this same recipe on its own
micro-batches of each step (labels computed by the rank that trains on them), the predictor
gradients are averaged over the ranks before clipping, and rank 0 alone validates, logs and writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sdtp.config import build_schedule
from sdtp.data import Example, build_examples, data_identity, examples_hash
from sdtp.distributed import (World, all_ranks, average_gradients, broadcast_parameters, check_enough_items,
                              rank_seed, rank_slice, reduce_floats, require_shared)
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.labels import load_labels, meta_hash, transform_labels
from sdtp.losses import LOSS_TERMS, distill_kl, sdtp_loss
from sdtp.models import load_model
from sdtp.models.loading import model_identity
from sdtp.provenance import leaf_changes
from sdtp.predictor import META_FILE, WEIGHTS_FILE, PredictorMeta, TokenPredictor, select_stages, widen_inputs
from sdtp.saliency import lm_loss, saliency_scores, target_labels
from sdtp.scorers.predictor import PredictorScorer
from sdtp.scorers.random import RandomScorer
from sdtp.tracking import NullLogger, RunLogger
from sdtp.training.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, truncate_metrics
from sdtp.training.masking import PolicyMasker
from sdtp.training.validation import continuation_nll, ranking_agreement
from sdtp.utils import git_commit, parse_jsonl, seed_everything, set_threads, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Right-padded examples. ids, valid: (B, S); split: (B,) prompt lengths; labels: (B, S, K) or None."""

    ids: torch.Tensor
    valid: torch.Tensor
    split: torch.Tensor
    labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device`` (the model's), ``split`` included."""
        labels = self.labels.to(device) if self.labels is not None else None
        return Batch(self.ids.to(device), self.valid.to(device), self.split.to(device), labels)


def collate(examples: list[Example], labels: list[torch.Tensor] | None = None) -> Batch:
    """Right-pad examples (and their (S_i, K) stored labels) into one batch."""
    length = max(ids.shape[0] for ids, _ in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    valid = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (seq, _) in enumerate(examples):
        ids[row, : len(seq)], valid[row, : len(seq)] = seq, True
    split = torch.tensor([s for _, s in examples], dtype=torch.long)
    stacked = None
    if labels is not None:
        stacked = torch.zeros(len(examples), length, labels[0].shape[-1])
        for row, lab in enumerate(labels):
            stacked[row, : lab.shape[0]] = lab
    return Batch(ids, valid, split, stacked)


def sample_order(step: int, t: DictConfig, seed: int, num_items: int, ranks: int = 1) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step ``step``: seeded per-epoch permutations.

    With ``ranks`` processes a step has ``ranks * grad_accum`` micro-batches (rank r trains on the
    r-th block of ``grad_accum``): the same as one process with ``grad_accum * ranks``, and within an
    epoch no two ranks share an example.
    """
    out = []
    micro_batches = int(t.grad_accum) * ranks
    for micro in range(micro_batches):
        start = (step * micro_batches + micro) * int(t.batch_size)
        batch = []
        for i in range(start, start + int(t.batch_size)):
            perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + i // num_items))
            batch.append(int(perm[i % num_items]))
        out.append(batch)
    return out


def annealed(spec: DictConfig, step: int, steps: int) -> float:
    """Linear from ``spec.start`` at step 0 to ``spec.end`` at step ``steps - 1``, the last of ``steps`` optimizer
    steps (numbered from 0), then constant: the last step trains at the end value."""
    frac = min(1.0, step / max(steps - 1, 1))
    return float(spec.start) + (float(spec.end) - float(spec.start)) * frac


def online_labels(model: torch.nn.Module, batch: Batch, schedule: PruningSchedule, target: str) -> torch.Tensor:
    """Raw signed ``target`` labels of the dense model at the schedule's layers: (B, S, num_stages)."""
    return saliency_scores(model, batch.ids, schedule.layers, target, absolute=False, normalize=False,
                           valid=batch.valid, split=batch.split)


def loss_step(model: torch.nn.Module, masker: PolicyMasker, batch: Batch, t: DictConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: masked forward, then the weighted sum of every stage's loss terms."""
    w, head = t.loss, model.get_output_embeddings()
    attn = batch.valid.long()
    targets = target_labels(batch.ids, batch.valid, batch.split)  # continuation tokens only
    through_mask = bool(w.ce or w.kl)  # only these terms need gradients through the masked LLM
    with masker(model, batch.split):
        with torch.set_grad_enabled(through_mask):
            hidden = model.base_model(input_ids=batch.ids, attention_mask=attn).last_hidden_state
        state = masker.state
        if not through_mask:
            state.scores = masker.rescore()
    ce = lm_loss(head, hidden, targets) if w.ce else None
    kl = None
    if w.kl:
        rows, cols = (targets >= 0).nonzero(as_tuple=True)
        with torch.no_grad():
            dense = model.base_model(input_ids=batch.ids, attention_mask=attn).last_hidden_state
        kl = distill_kl(head(hidden[rows, cols]), head(dense[rows, cols]))
    region = state.prompt & ~state.protect
    labels = transform_labels(batch.labels, region, t.label_transform)
    weights = {k: float(w[k]) for k in LOSS_TERMS}
    kept = [((policy.detach() > 0.5) & decided).sum(1)  # only the selection loss reads each stage's kept count
            for policy, decided in zip(state.policies, state.decided)] if weights["selection"] else []
    loss, terms = sdtp_loss(state.scores, labels, state.decided, weights, ce=ce, policies=state.policies,
                            fractions=masker.schedule.keep_fractions, prompt=state.prompt, kl=kl,
                            stage_weights=w.stage_weights, kept=kept, ties=w.ties, max_pairs=int(w.max_pairs),
                            generator=generator)
    prompt = state.prompt.float()
    terms["kept_fraction"] = float(((state.policies[-1].detach() * prompt).sum(1) / prompt.sum(1).clamp(min=1)).mean())
    terms["drop_agreement"] = sum(state.drop_agreement) / len(state.drop_agreement)
    return loss, terms


def validate(model: torch.nn.Module, predictor: TokenPredictor, schedule: PruningSchedule, val: list[Example],
             val_labels: list[torch.Tensor], references: dict[str, float]) -> dict[str, float]:
    """Held-out continuation NLL of the predictor (with dense/random references) + ranking agreement."""
    pruner = TokenPruner(schedule, PredictorScorer(predictor=predictor))
    nll = sum(continuation_nll(model, val, pruner)) / len(val)
    metrics = {"nll_sdtp": nll, **references}
    gap = references["nll_random"] - references["nll_dense"]
    metrics["random_gap_closed"] = (references["nll_random"] - nll) / gap if gap > 0 else 0.0
    items = [(ids, split, lab) for (ids, split), lab in zip(val, val_labels)]
    metrics.update(ranking_agreement(model, items, schedule, predictor))
    return metrics


def load_data(cfg: DictConfig, tokenizer: Any, schedule: PruningSchedule) -> tuple[list[Example], list | None, str]:
    """Examples, their stored labels at the schedule's layers (None when online), and a data hash.

    With stored labels the hash also names the label set (:func:`sdtp.labels.meta_hash`: model, dtype,
    target...), so a resume cannot switch to labels of the same examples made another way.
    """
    t = cfg.train
    if t.labels == "online":
        examples = build_examples(tokenizer, cfg.data, int(cfg.seed))
        return examples, None, examples_hash(examples)
    meta, items = load_labels(t.labels_dir)
    check_label_origin(meta, cfg)
    columns = [list(meta["layers"]).index(layer) for layer in schedule.layers]
    examples = [(ids, split) for ids, split, _ in items]
    return examples, [sal[:, columns] for _, _, sal in items], f"{meta['examples_hash']}+labels:{meta_hash(meta)}"


def check_label_origin(meta: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse stored labels made by another model (weights or source), data or target than ``cfg``'s.

    The labelling dtype and attention kernel may differ from training's (the checkpoint signature records
    the label set's).

    Raises:
        ConfigError: naming the differing keys (relabel, or point train.labels_dir at matching labels).
    """
    how = ("dtype", "attn_implementation")  # how the labels were computed, not by which model
    model = {k: v for k, v in model_identity(cfg.model).items() if k not in how}
    made = {"base_model": meta["base_model"], "target": meta["saliency"]["target"],
            "model": {k: v for k, v in meta.get("model", {"recorded": False}).items() if k not in how},
            "data": meta["data"]}
    wanted = {"base_model": cfg.model.name, "target": cfg.train.target, "model": model,
              "data": data_identity(cfg.data)}
    changes, more = leaf_changes(made, wanted, shown=3)
    if changes:
        detail = "; ".join(f"{k}={have!r}, config has {want!r}" for k, have, want in changes)
        raise ConfigError(f"train.labels_dir: labels were made with {detail}" + (f" (+{more} more)" if more else ""))


def signature(cfg: DictConfig, schedule: PruningSchedule, data_hash: str, world_size: int = 1) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (the number of ranks too: it sets the step's batch).

    ``max_steps`` counts: the noise annealing and the LR schedule (``T_max``) are laid out over it, so a run
    resumed with another one would not be the run it claims (split a run with ``train.stop_at`` instead).
    ``val_sequences`` counts too: it sets where the held-out cut falls, hence the training set and its order.
    """
    t = OmegaConf.to_container(cfg.train, resolve=True)
    for volatile in ("ckpt_every", "eval_every", "stop_at", "labels_dir"):
        t.pop(volatile, None)
    sig = {"model": cfg.model.name, "base_model": model_identity(cfg.model), "layers": list(schedule.layers),
           "keep_fractions": list(schedule.keep_fractions), "keep_first": schedule.keep_first,
           "keep_recent": schedule.keep_recent, "data": data_hash, "train": t, "seed": int(cfg.seed)}
    if world_size > 1:  # absent for one process, so single-process checkpoints keep their signature
        sig["world_size"] = world_size
    return sig


def build_predictor(cfg: DictConfig, model: torch.nn.Module, schedule: PruningSchedule) -> TokenPredictor:
    t = cfg.train
    return TokenPredictor(PredictorMeta(
        hidden_size=model.config.hidden_size, layers=list(schedule.layers), hidden_ratio=float(t.hidden_ratio),
        base_model=cfg.model.name, num_layers=int(cfg.model.num_layers), input_norm=bool(t.input_norm),
        position_features=bool(t.position_features), norm_feature=bool(t.norm_feature),
        lexical_feature=bool(t.lexical_feature), context_window=int(t.context_window),
        query_tokens=int(t.query_tokens), query_rank=int(t.query_rank),
        extra={"keep_mode": t.keep_mode, "target": t.target, "label_transform": t.label_transform,
               "loss": OmegaConf.to_container(t.loss), "data": cfg.data.name},
    )).to(next(model.parameters()).device)


def init_predictor(cfg: DictConfig, model: torch.nn.Module, predictor: TokenPredictor) -> None:
    """Start from the trained predictor in ``train.init_from`` (fine-tuning) instead of random weights."""
    t = cfg.train
    start = TokenPredictor.load(t.init_from, hidden_size=model.config.hidden_size, base_model=cfg.model.name,
                                num_layers=model.config.num_hidden_layers, key="train.init_from")
    # Inputs a warm start cannot widen into (widen_inputs), and the MLP's width: they must match as they are.
    for key in ("position_features", "input_norm", "hidden_ratio"):
        value = getattr(start.meta, key)
        if value != getattr(predictor.meta, key):
            raise ConfigError(f"train.init_from: {t.init_from} has {key}={value}; set train.{key}={value}")
    if start.meta.query_tokens and predictor.meta.query_tokens and start.meta.query_rank != predictor.meta.query_rank:
        raise ConfigError(f"train.init_from: {t.init_from} has query_rank={start.meta.query_rank}; "
                          f"set train.query_rank={start.meta.query_rank}")
    for feature in ("norm_feature", "lexical_feature"):
        if getattr(start.meta, feature) and not getattr(predictor.meta, feature):
            raise ConfigError(f"train.init_from: {t.init_from} has {feature}=true; set train.{feature}=true")
    if start.meta.context_window not in (0, predictor.meta.context_window):
        raise ConfigError(f"train.init_from: {t.init_from} has context_window={start.meta.context_window}; "
                          f"set train.context_window={start.meta.context_window}")
    if start.meta.query_tokens and not predictor.meta.query_tokens:
        raise ConfigError(f"train.init_from: {t.init_from} has a query branch; set train.query_tokens="
                          f"{start.meta.query_tokens}")
    # A checkpoint without the norm, lexical or context input gets it as zero-weight columns, one without the
    # query branch gets a fresh branch whose output starts at 0: training starts from exactly the old
    # scores and learns what the new input adds.
    state = widen_inputs(start.state_dict(), start.meta, predictor.meta)
    try:  # another schedule warm-starts from the stages at its layers (e.g. a later first stage)
        state = select_stages(state, list(start.meta.layers), list(predictor.meta.layers))
    except ValueError as exc:
        raise ConfigError(f"train.init_from: {t.init_from} does not fit pruning.layers: {exc}") from exc
    missing, unexpected = predictor.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("queries.") for key in missing):
        raise ConfigError(f"train.init_from: {t.init_from} does not fit this predictor "
                          f"(missing {missing}, unexpected {unexpected})")


def param_groups(predictor: TokenPredictor, scales: DictConfig | dict | None, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the per-stage MLPs (``stages``) and the query branch (``queries``),
    each at ``lr`` times its scale in ``train.lr_scale``; a scale of 0 freezes that part (e.g. train
    only a new query branch on top of a trained predictor)."""
    scales = dict(scales or {})  # validated by sdtp.cli.train.validate_train_config
    groups = []
    for name in ("stages", "queries"):
        module = getattr(predictor, name)
        if module is None:
            continue
        scale = float(scales.get(name, 1.0))
        module.requires_grad_(scale > 0)  # frozen parts need no gradient at all
        if scale > 0:
            groups.append({"params": list(module.parameters()), "lr": lr * scale})
    return groups


def rank_generators(seed: int, rank: int) -> dict[str, torch.Generator]:
    """This rank's Gumbel-noise and ranking-pair streams (rank 0's are the single-process ones)."""
    base = rank_seed(seed, rank)
    return {"gumbel": torch.Generator().manual_seed(base), "pairs": torch.Generator().manual_seed(base + 1)}


def held_out(model: torch.nn.Module, schedule: PruningSchedule, val: list[Example],
             stored_val: list[torch.Tensor] | None, target: str,
             transform: str) -> tuple[list[torch.Tensor], dict[str, float]]:
    """What the held-out examples' tokens should rank by (each (S_i, num_stages), on the CPU) and their dense /
    random NLL: the label's magnitude, or, under ``label_transform=signed``, the signed label the predictor is
    trained to rank by (a token whose removal lowers the loss ranks below an unused one)."""
    device = next(model.parameters()).device
    labels = list(stored_val) if stored_val is not None else [
        online_labels(model, collate([ex]).to(device), schedule, target)[0].cpu() for ex in val]
    labels = [lab.float() if transform == "signed" else lab.abs().float() for lab in labels]
    references = {"nll_dense": sum(continuation_nll(model, val, None)) / len(val),
                  "nll_random": sum(continuation_nll(model, val, TokenPruner(schedule, RandomScorer(0)))) / len(val)}
    return labels, references


def resume(cfg: DictConfig, sig: dict[str, Any], predictor: TokenPredictor, optimizer: torch.optim.Optimizer,
           scheduler: Any, rng: dict[str, torch.Generator], world: World) -> int:
    """The step to start from: the checkpoint's with ``resume=true`` (every rank loads it), else 0.

    ``metrics.jsonl`` keeps only the records up to that step: a resumed run does not repeat steps, and a run
    started afresh in the same ``out_dir`` (no checkpoint yet, or ``resume=false``) does not append to an
    earlier run's records, which the final noise metrics average over. A fresh start also deletes the earlier
    run's ``metrics.json``, ``predictor/`` and checkpoint, so none can pass for this run's if it is killed before
    its own (a later ``resume=true`` would otherwise continue the earlier run).
    """
    ckpt = Path(cfg.out_dir) / CHECKPOINT
    step = 0
    if cfg.resume:
        require_shared(ckpt, world, "out_dir")
        if ckpt.is_file():
            step = load_checkpoint(ckpt, sig, predictor, optimizer, scheduler, rng, rank=world.rank)
    if world.is_main:
        truncate_metrics(Path(cfg.out_dir) / "metrics.jsonl", step)
        if step:
            log.info("Resumed from %s at step %d", ckpt, step)
        else:
            predictor_dir = Path(cfg.out_dir) / "predictor"
            for stale in (Path(cfg.out_dir) / "metrics.json", predictor_dir / WEIGHTS_FILE, predictor_dir / META_FILE,
                          ckpt):
                stale.unlink(missing_ok=True)
    return step


def checkpoint(path: Path, step: int, sig: dict[str, Any], predictor: TokenPredictor, optimizer: torch.optim.Optimizer,
               scheduler: Any, rng: dict[str, torch.Generator], world: World) -> None:
    """Rank 0 saves, with every rank's RNG state; every rank calls this (the states are gathered)."""
    states = all_ranks({name: gen.get_state() for name, gen in rng.items()}, world)
    if world.is_main:
        save_checkpoint(path, step, sig, predictor, optimizer, scheduler, rng, rank_rng=states[1:])


def train_step(step: int, model: torch.nn.Module, masker: PolicyMasker, train_set: list[Example], stored: list | None,
               cfg: DictConfig, pairs: torch.Generator, world: World) -> tuple[dict[str, float], int]:
    """Forward + backward of this rank's micro-batches of ``step``; the gradients then hold the mean over ranks.

    Returns the step's loss terms (mean over every rank's micro-batches) and its tokens (all ranks).
    """
    t, device = cfg.train, next(model.parameters()).device
    terms_acc: dict[str, float] = {}
    tokens = 0
    for micro in rank_slice(sample_order(step, t, int(cfg.seed), len(train_set), world.size), world):
        batch = collate([train_set[i] for i in micro], [stored[i] for i in micro] if stored else None).to(device)
        if batch.labels is None:  # online: this rank labels the examples it trains on
            batch.labels = online_labels(model, batch, masker.schedule, t.target)
        loss, terms = loss_step(model, masker, batch, t, pairs)
        (loss / int(t.grad_accum)).backward()
        tokens += int(batch.valid.sum())
        for k, v in terms.items():
            terms_acc[k] = terms_acc.get(k, 0.0) + v / int(t.grad_accum)
    average_gradients(masker.predictor.parameters(), world)
    tokens = int(reduce_floats({"tokens": tokens}, world, mean=False)["tokens"])
    return reduce_floats(terms_acc, world), tokens


def train(cfg: DictConfig, world: World = World()) -> dict[str, Any]:
    """Train the predictors; ``world`` is this process's place in a ``torchrun`` job (one process by default)."""
    t = cfg.train
    seed_everything(int(cfg.seed))
    set_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    schedule = build_schedule(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval().requires_grad_(False)
    examples, stored, data_hash = load_data(cfg, tokenizer, schedule)
    if len(examples) <= int(t.val_sequences):
        raise ConfigError(f"train.val_sequences: {t.val_sequences} >= the {len(examples)} examples")
    cut = len(examples) - int(t.val_sequences)
    train_set, val = examples[:cut], examples[cut:]
    check_enough_items(world, len(train_set), int(t.grad_accum) * int(t.batch_size), "training examples per step",
                       "train.grad_accum x train.batch_size")
    if world.is_main:
        log.info("%d training / %d held-out examples, %d tokens, %d rank(s)", len(train_set), len(val),
                 sum(len(i) for i, _ in examples), world.size)

    predictor = build_predictor(cfg, model, schedule)
    if t.init_from:  # fine-tune a trained predictor (e.g. add the CE term to a label-trained one)
        init_predictor(cfg, model, predictor)
    broadcast_parameters(predictor, world)
    optimizer = hydra.utils.instantiate(t.optimizer)(params=param_groups(predictor, t.lr_scale, float(t.optimizer.lr)))
    scheduler = hydra.utils.instantiate(t.scheduler)(optimizer=optimizer) if t.scheduler else None
    rng = rank_generators(int(cfg.seed), world.rank)
    masker = PolicyMasker(schedule, predictor, t.keep_mode, generator=rng["gumbel"])
    sig = signature(cfg, schedule, data_hash, world.size)
    step, ckpt = resume(cfg, sig, predictor, optimizer, scheduler, rng, world), out_dir / CHECKPOINT
    if step >= int(t.max_steps) and (out_dir / "metrics.json").is_file():
        # resume=true on a finished run of the same setup (the signature matched): its outputs stand, and its
        # recorded metrics (training time included) are not replaced by a validation-only re-run.
        if not world.is_main:
            return {"out_dir": str(out_dir), "step": step, "rank": world.rank}
        log.info("%s: already trained to step %d with this setup; nothing to do", out_dir, step)
        if cfg.export_dir:
            predictor.save(cfg.export_dir)
        return finish_summary(cfg, out_dir, step, json.loads((out_dir / "metrics.json").read_text()))

    # Rank 0 alone validates (as one process would); meanwhile the others wait at the next collective.
    if world.is_main:
        val_labels, references = held_out(model, schedule, val, stored[cut:] if stored is not None else None, t.target,
                                         t.label_transform)
    max_steps, anneal = int(t.max_steps), int(t.anneal_steps or t.max_steps)
    begin, tokens = time.perf_counter(), 0
    # W&B continues the saved run only when training does: a start from step 0 is a new run.
    run_logger = RunLogger(out_dir, cfg.logger, cfg, name=cfg.experiment_name, resume=step > 0) \
        if world.is_main else NullLogger()  # metrics.jsonl and W&B: rank 0 only
    with run_logger as logger:
        bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not world.is_main)
        while step < max_steps:
            masker.noise_scale, masker.tau = annealed(t.noise_scale, step, anneal), annealed(t.tau, step, anneal)
            optimizer.zero_grad(set_to_none=True)
            terms_acc, step_tokens = train_step(step, model, masker, train_set, stored, cfg, rng["pairs"], world)
            tokens += step_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(predictor.parameters(), float(t.grad_clip))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            tok_s = tokens / (time.perf_counter() - begin)
            logger.log({**terms_acc, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
                        "noise_scale": masker.noise_scale, "tau": masker.tau, "tokens_per_s": tok_s}, step=step)
            bar.update(1)
            bar.set_postfix({**{k: f"{terms_acc[k]:.3f}" for k in ("loss", "ce", "rank", "drop_agreement") if k in terms_acc},
                             "tok/s": f"{tok_s:.0f}"})
            if step % int(t.ckpt_every) == 0 or step == max_steps:
                checkpoint(ckpt, step, sig, predictor, optimizer, scheduler, rng, world)
            # Before a stop: a run split with stop_at logs the same validations as one run through.
            if t.eval_every and step % int(t.eval_every) == 0 and step < max_steps and world.is_main:
                val_metrics = validate(model, predictor, schedule, val, val_labels, references)
                logger.log({f"val/{k}": v for k, v in val_metrics.items()}, step=step)
            if t.stop_at and int(t.stop_at) <= step < max_steps:
                checkpoint(ckpt, step, sig, predictor, optimizer, scheduler, rng, world)
                log.info("Stopping at step %d (train.stop_at); continue with resume=true", step)
                return {"out_dir": str(out_dir), "step": step, "stopped": True}
        bar.close()
        if not world.is_main:
            return {"out_dir": str(out_dir), "step": step, "rank": world.rank}
        metrics = validate(model, predictor, schedule, val, val_labels, references)
        metrics.update(final_noise_metrics(out_dir / "metrics.jsonl"))
        metrics.update({"step": step, "train_seconds_this_run": round(time.perf_counter() - begin, 1),
                        "train_examples": len(train_set), "val_examples": len(val), "data_hash": data_hash,
                        "world_size": world.size, "git_commit": git_commit()})  # the code that trained it
        logger.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)
        logger.summary(metrics)
    predictor.save(out_dir / "predictor")
    if cfg.export_dir:
        predictor.save(cfg.export_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    return finish_summary(cfg, out_dir, step, metrics)


def finish_summary(cfg: DictConfig, out_dir: Path, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (also the last stdout line, as JSON) from its final metrics."""
    summary = {"out_dir": str(out_dir), "predictor": str(cfg.export_dir or out_dir / "predictor"), "step": step,
               **{k: metrics[k] for k in ("nll_dense", "nll_random", "nll_sdtp", "spearman", "drop_agreement_mean")}}
    print(json.dumps(summary))
    return summary


def final_noise_metrics(path: Path) -> dict[str, float]:
    """Mean noisy-vs-clean drop agreement over the run and kept fraction over its last 10% of steps."""
    records = [r for r in parse_jsonl(path.read_text()) if "drop_agreement" in r]
    if not records:
        return {"drop_agreement_mean": math.nan}
    tail = records[-max(1, len(records) // 10):]
    return {"drop_agreement_mean": sum(r["drop_agreement"] for r in records) / len(records),
            "drop_agreement_first": records[0]["drop_agreement"],
            "kept_fraction_final": sum(r["kept_fraction"] for r in tail) / len(tail)}
