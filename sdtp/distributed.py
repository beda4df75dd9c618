"""Data-parallel labelling and predictor training over ``torch.distributed`` (launched by ``torchrun``).

The LLM is frozen, so every rank holds a full replica and nothing about it is ever communicated;
each rank works on its own examples and only the predictor's gradients travel.

* **Who is who**: :class:`World` is read from the launcher's ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK``; without them the run is a single process and every helper here is a no-op, so
  one code path serves both. A sweep point that a submitit launcher started as several tasks
  (``hydra/launcher=slurm_node``) sets them from its job environment (:func:`adopt_submitit_tasks`).
* **Gradients**: after a rank has accumulated its ``train.grad_accum`` micro-batches, one all-reduce
  of the flattened predictor gradients replaces them with their mean over ranks, before clipping
  (:func:`average_gradients`). A step with W ranks therefore equals the single-process step with
  ``grad_accum * W`` micro-batches: each micro-batch's loss is a mean over its own tokens, and both
  the accumulation and the rank average are plain means over micro-batches.
  ``DistributedDataParallel`` is not used because the predictor is called from hooks inside the LLM's
  forward, once per stage, and outside training (validation, export): there is no single ``forward``
  for it to wrap, and its bucketed overlap buys nothing for a model this small.
* **Who writes**: rank 0 alone writes checkpoints, metrics, logs and W&B; the other ranks' Hydra
  output directory and log file are switched off on the command line (:func:`worker_overrides`).
* **Evaluation** (``sdtp-eval eval=lm_eval``): every rank builds all of lm-eval's requests, scores its
  share and receives everyone's results (:func:`sharded_map`, :class:`sdtp.eval.lm_eval_model.SDTPLM`).
* **Bad set-ups** fail before any model loads (:func:`check_world`) or before the first step
  (:func:`check_enough_items`), with a :class:`~sdtp.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sdtp.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
# Seeds of rank r's own random streams are shifted by r times this prime (rank 0 keeps the run's seed).
RANK_SEED_STRIDE = 1_000_003
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``device`` is where collectives put their tensors."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The launcher's view (``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without it."""
        return cls(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def adopt_submitit_tasks() -> World:
    """Inside a job submitit started as several tasks, set the variables ``torchrun`` would have set.

    ``hydra/launcher=slurm_node`` (or ``submitit_local`` with ``tasks_per_node`` > 1) runs every sweep point
    as N processes of one job, each calling the task function; their ranks come from submitit's job
    environment (``SLURM_PROCID``, ...), which this exports as ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
    ``MASTER_ADDR`` / ``MASTER_PORT``, so the rest of this module works unchanged. ``CUDA_VISIBLE_DEVICES``
    is left alone: rank r takes ``cuda:LOCAL_RANK`` as under ``torchrun``. A non-zero rank also drops
    its log file handlers (it shares the point's Hydra directory with rank 0, which alone writes).

    A no-op outside submitit, with one task, or when a launcher inside the job already set ``RANK``.
    """
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return World.from_env()
    from submitit.helpers import TorchDistributedEnvironment  # present: submitit started this process

    tasks = TorchDistributedEnvironment()
    if tasks.world_size > 1:
        tasks.export(set_cuda_visible_devices=False)
    world = World.from_env()
    if not world.is_main:
        quiet_worker_logging()
    return world


def quiet_worker_logging() -> None:
    """Warnings only, on the console: what :func:`worker_overrides` asks of Hydra, done after it set up logging."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> ``nccl`` for a CUDA model, ``gloo`` otherwise."""
    if backend == "auto":
        return "nccl" if str(device).startswith("cuda") else "gloo"
    return backend


def check_world(world: World, dist_cfg: Mapping[str, Any], device: str) -> None:
    """Refuse a distributed set-up that cannot work, before any model loads.

    Args:
        dist_cfg: the ``distributed`` config group (``backend``, ``timeout_s``).
        device: ``model.device`` (``cpu`` or ``cuda``; each rank then takes ``cuda:LOCAL_RANK``).
    """
    backend = dist_cfg.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"distributed.backend: {backend!r} not in {BACKENDS}")
    if float(dist_cfg.get("timeout_s", 1800)) <= 0:
        raise ConfigError(f"distributed.timeout_s: must be > 0, got {dist_cfg.get('timeout_s')}")
    if world.size == 1:
        return
    if not 0 <= world.rank < world.size:
        raise ConfigError(f"RANK={world.rank} is outside WORLD_SIZE={world.size} (launch with torchrun)")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if resolve_backend(backend, device) == "nccl" and not cuda:
        raise ConfigError(f"distributed.backend=nccl needs model.device=cuda (got {device!r}); use gloo on CPU")
    if cuda and str(device) != "cuda":
        # Every rank would load its replica onto the same GPU.
        raise ConfigError(f"model.device: {device!r} pins one GPU for all ranks; use model.device=cuda "
                          "(rank r then runs on cuda:LOCAL_RANK)")
    if cuda and world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                          "lower torchrun --nproc_per_node")


def check_enough_items(world: World, num_items: int, per_rank: int, what: str, key: str) -> None:
    """Every rank needs ``per_rank`` items of its own: refuse ``world.size * per_rank > num_items``.

    Args:
        what: the items, for the message (e.g. ``"training examples"``); key: the config key to change.
    """
    if world.size > 1 and world.size * per_rank > num_items:
        raise ConfigError(f"{key}: {world.size} ranks need {world.size * per_rank} {what} ({per_rank} each), but "
                          f"there are only {num_items}; launch fewer processes (torchrun --nproc_per_node) or use more data")


@contextmanager
def process_group(world: World, dist_cfg: Mapping[str, Any], device: str) -> Iterator[World]:
    """Join the job's process group for the duration (a no-op in one process).

    A group the caller already initialised is used as it is and left open.
    """
    if world.size == 1:
        yield world
        return
    backend = resolve_backend(dist_cfg.get("backend", "auto"), device)
    if str(device).startswith("cuda"):
        torch.cuda.set_device(world.local_rank)  # "cuda" (model.to, new tensors) now means this rank's GPU
    world = replace(world, device=collective_device(backend, world))
    if dist.is_initialized():
        yield world
        return
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=timedelta(seconds=float(dist_cfg.get("timeout_s", 1800))))
    try:
        yield world
    finally:
        dist.destroy_process_group()


def collective_device(backend: str, world: World) -> torch.device:
    """Where collectives of ``backend`` take their tensors: this rank's GPU for NCCL, the CPU for gloo."""
    return torch.device(f"cuda:{world.local_rank}") if backend == "nccl" else torch.device("cpu")


def joined_world() -> World:
    """This process's :class:`World` inside the process group its caller joined (:func:`process_group`).

    For code that is handed no ``World`` (lm-eval builds its model itself); one process without a launcher.
    """
    world = World.from_env()
    if world.size == 1:
        return world
    if not dist.is_initialized():
        raise RuntimeError(f"WORLD_SIZE={world.size} but this process joined no process group: run inside "
                           "sdtp.distributed.process_group (sdtp-eval and sdtp-lm-eval do)")
    return replace(world, device=collective_device(dist.get_backend(), world))


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s own random streams (noise, sampled pairs); rank 0 keeps ``seed``."""
    return int(seed) + int(rank) * RANK_SEED_STRIDE


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's strided share ``items[rank::size]`` (disjoint across ranks, together all of them)."""
    return list(items[world.rank :: world.size])


def rank_slice(items: Sequence[T], world: World) -> list[T]:
    """This rank's contiguous block of ``items`` (``len(items)`` a multiple of the world size)."""
    per_rank = len(items) // world.size
    return list(items[world.rank * per_rank : (world.rank + 1) * per_rank])


def average_gradients(params: Iterable[nn.Parameter], world: World) -> None:
    """Replace every parameter's gradient by its mean over the ranks, in place (one all-reduce).

    A parameter no rank produced a gradient for keeps ``grad=None`` (so AdamW skips it, as in one
    process); one that only some ranks reached counts as a zero gradient on the others.
    """
    if world.size == 1:
        return
    params = list(params)
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=world.device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(world.device)
             for p in params]
    flat = torch.cat([*grads, reached])  # (sum of numels + len(params),)
    dist.all_reduce(flat)
    sizes = [p.numel() for p in params]
    *chunks, reached = flat.split([*sizes, len(params)])
    for p, chunk, count in zip(params, chunks, reached.tolist()):
        p.grad = (chunk / world.size).view_as(p).to(device=p.device, dtype=p.dtype) if count > 0 else None


def reduce_floats(values: Mapping[str, float], world: World, mean: bool = True) -> dict[str, float]:
    """The mean (or sum) over ranks of each value; every rank passes the same keys."""
    if world.size == 1:
        return dict(values)
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(flat)
    if mean:
        flat /= world.size
    return dict(zip(keys, flat.tolist()))


def all_ranks(value: T, world: World) -> list[T]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (any picklable value)."""
    if world.size == 1:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def sharded_map(fn: Callable[[list[T]], list[Any]], items: Sequence[T], world: World) -> list[Any]:
    """``fn`` on this rank's strided share of ``items`` (:func:`shard`); every rank gets every result, in
    ``items``' order. ``fn`` returns one result per item; every rank calls this with the same ``items``.

    Ranks that passed lists of different lengths (e.g. each answering part of them from its own request cache) get
    a RuntimeError on every rank: their results would otherwise land on other items' places.
    """
    if world.size == 1:
        return fn(list(items))
    gathered = all_ranks((len(items), fn(shard(items, world))), world)  # the lengths travel with the results
    lengths = [n for n, _ in gathered]
    if len(set(lengths)) > 1:
        raise RuntimeError(f"sharded_map: the ranks passed {lengths} items; every rank must pass the same list")
    out: list[Any] = [None] * len(items)
    for rank, (_, part) in enumerate(gathered):
        out[rank :: world.size] = part
    return out


def broadcast_parameters(module: nn.Module, world: World) -> None:
    """Copy rank 0's parameters to every rank (as DDP does at start-up), so all replicas step alike."""
    if world.size == 1:
        return
    for param in module.parameters():
        data = param.data.to(world.device)
        dist.broadcast(data, src=0)
        param.data.copy_(data)


def on_main(task: Callable[[], T], world: World, errors: tuple[type[Exception], ...] = (ConfigError,)) -> T:
    """Run ``task`` on rank 0 only and return its value on every rank; if it raises one of ``errors``
    there, every rank raises it.

    The other ranks wait for rank 0 and never go on alone into work rank 0 refused. The value and the
    error travel pickled (:func:`all_ranks`).
    """
    if world.size == 1:
        return task()
    value, error = None, None
    if world.is_main:
        try:
            value = task()
        except errors as exc:
            error = exc
    value, shared = all_ranks((value, error), world)[0]
    if error is not None:
        raise error  # rank 0: the original, with its traceback
    if shared is not None:
        raise shared
    return value


def require_shared(path: Path, world: World, key: str) -> None:
    """Raise on every rank unless ``path`` exists for all ranks (or for none).

    Rank 0 writes, the others read: a path only some ranks see means ``key`` is not on a
    filesystem shared by every node.
    """
    seen = all_ranks(path.exists(), world)
    if any(seen) and not all(seen):
        missing = [rank for rank, ok in enumerate(seen) if not ok]
        raise ConfigError(f"{key}: {path} is not visible to rank(s) {missing}; put it on a filesystem every node shares")


def refuse_sweep_under_launcher(argv: Sequence[str], world: World | None = None) -> None:
    """Refuse ``torchrun ... -m`` (a Hydra sweep in every rank): the ranks would each run the whole sweep in
    one process group and, after the first point, wait on each other's collectives for ever.

    Args:
        argv: the command line after the program name; world: defaults to the launcher's.
    """
    world = World.from_env() if world is None else world
    sweep = any(arg in ("-m", "--multirun") or arg.lstrip("+").replace(" ", "") == "hydra.mode=MULTIRUN"
                for arg in argv)  # hydra.mode=MULTIRUN starts a sweep without -m
    if world.size > 1 and sweep:
        raise ConfigError("a Hydra sweep (-m) cannot run under torchrun: launch one torchrun per sweep point, or "
                          "sweep with a launcher whose points each run one process (docs/scaling.md)")


def worker_overrides(rank: int | None = None) -> list[str]:
    """Hydra command-line overrides that keep a non-zero rank from writing: no ``.hydra/`` copy of the
    config, no run-directory creation elsewhere, no log file; warnings only, on stderr.

    Args:
        rank: defaults to the launcher's ``RANK`` (no overrides for rank 0 or a single process).
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if rank == 0:
        return []
    return ["hydra.output_subdir=null", "hydra.run.dir=.", "~hydra.job_logging.handlers.file",
            "hydra.job_logging.root.handlers=[console]", "hydra.job_logging.root.level=WARNING"]
