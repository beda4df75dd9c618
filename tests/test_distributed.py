"""Data-parallel training and labelling (sdtp/distributed.py) with 2 CPU processes on the gloo backend.

One DDP optimizer step equals the single-process step on the concatenated batch; rank 0 alone writes;
a stopped 2-rank run resumes to the single-process result; ``torchrun`` labelling writes the shards one
process writes; a sweep point launched by submitit as 2 tasks trains as 2 ranks; bad set-ups fail
before any work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sdtp.cli import label as label_cli
from sdtp.cli import train as train_cli
from sdtp.config import REPO_ROOT, build_schedule, compose
from sdtp.data import build_examples
from sdtp.distributed import (World, adopt_submitit_tasks, average_gradients, check_world,
                              refuse_sweep_under_launcher, shard, sharded_map, worker_overrides)
from sdtp.errors import ConfigError
from sdtp.models import load_model
from sdtp.predictor import TokenPredictor
from sdtp.training import loop
from sdtp.training.checkpoint import CHECKPOINT
from sdtp.training.masking import PolicyMasker

DATA = ["model=tiny-llama", "data=c4", "data.sources.0.num_samples=10", "data.max_length=48",
        "data.continuation_length=12", "threads=1"]
LR = 0.05
# SGD, so the step is p - lr * g and equal parameters mean equal (averaged) gradients; no Gumbel noise
# (each rank draws its own), few enough ranking pairs that none are sampled, and tied label pairs
# counted (ignoring them can leave rows with different pair counts, which one concatenated batch
# would weight differently from the mean of per-row losses that the ranks average).
STEP = ["train.val_sequences=2", "train.max_steps=2", "train.ckpt_every=1", "train.batch_size=1",
        "train.noise_scale.start=0", "train.loss.ties=include", "train.optimizer._target_=torch.optim.SGD",
        f"train.optimizer.lr={LR}"]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record_writes(rank: int, writes: list[str]) -> None:
    """Wrap everything the training loop writes with, recording which rank called it."""
    def wrap(name, fn):
        def recorded(*args, **kwargs):
            writes.append(name)
            return fn(*args, **kwargs)
        return recorded

    loop.save_checkpoint = wrap("checkpoint", loop.save_checkpoint)
    loop.write_json_atomic = wrap("metrics.json", loop.write_json_atomic)
    loop.RunLogger = wrap("metrics.jsonl/W&B", loop.RunLogger)
    loop.truncate_metrics = wrap("metrics.jsonl on resume", loop.truncate_metrics)
    TokenPredictor.save = wrap("predictor", TokenPredictor.save)


def _train_worker(rank: int, port: int, runs: list[list[str]], record_dir: str) -> None:
    """One rank: join the gloo group, run each ``sdtp-train`` config in turn, save what it wrote."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes: list[str] = []
    _record_writes(rank, writes)
    # One group for both runs (sdtp-train uses a group it finds open): a second rendezvous on the
    # same port right after the first could race the port's release.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for overrides in runs:
        train_cli.run(compose("train", DATA + overrides))
        if rank == 0 and "train.stop_at=1" in overrides:  # keep the step-1 checkpoint for the tests
            out = Path(next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1])
            shutil.copy(out / CHECKPOINT, out / "step1.pt")
    dist.destroy_process_group()
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(writes))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A predictor to start from, a 2-rank run stopped at step 1 and resumed to step 2, and the
    single-process run with ``grad_accum=2`` (the same micro-batches) stopped and resumed alike."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = compose("train", DATA)
    torch.manual_seed(3)
    loop.build_predictor(cfg, load_model(cfg.model)[0], build_schedule(cfg)).save(root / "init")
    common = STEP + [f"train.init_from={root / 'init'}"]
    ddp = common + ["train.grad_accum=1", f"out_dir={root / 'ddp'}"]
    mp.spawn(_train_worker, args=(_free_port(), [ddp + ["train.stop_at=1"], ddp + ["resume=true"]], str(root)),
             nprocs=WORLD, join=True)
    single = common + ["train.grad_accum=2", f"out_dir={root / 'single'}"]
    train_cli.run(compose("train", DATA + single + ["train.stop_at=1"]))
    shutil.copy(root / "single" / CHECKPOINT, root / "single" / "step1.pt")
    train_cli.run(compose("train", DATA + single + ["resume=true"]))
    return root


def _predictor(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["predictor"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_one_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(runs):
    cfg = compose("train", DATA + STEP + ["train.grad_accum=2"])
    model, tokenizer = load_model(cfg.model)
    train_set = build_examples(tokenizer, cfg.data, int(cfg.seed))[: -int(cfg.train.val_sequences)]
    # Step 0's micro-batches of one process with grad_accum=2 are rank 0's and rank 1's of the 2-rank run.
    order = loop.sample_order(0, cfg.train, int(cfg.seed), len(train_set))
    assert order == loop.sample_order(0, compose("train", DATA + STEP + ["train.grad_accum=1"]).train,
                                      int(cfg.seed), len(train_set), ranks=WORLD)
    batch = loop.collate([train_set[i] for micro in order for i in micro])
    # Equal-length windows: the per-row means the ranks average equal the concatenated batch's means.
    assert batch.valid.all() and len(set(batch.split.tolist())) == 1
    schedule = build_schedule(cfg)
    batch.labels = loop.online_labels(model, batch, schedule, cfg.train.target)
    predictor = TokenPredictor.load(runs / "init")
    masker = PolicyMasker(schedule, predictor, "topk", noise_scale=0.0)
    loss, _ = loop.loss_step(model, masker, batch, cfg.train, torch.Generator())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(predictor.parameters(), float(cfg.train.grad_clip))
    torch.optim.SGD(predictor.parameters(), lr=LR).step()

    ddp = _predictor(runs / "ddp" / "step1.pt")
    _assert_same(ddp, predictor.state_dict())
    _assert_same(ddp, _predictor(runs / "single" / "step1.pt"))
    start = TokenPredictor.load(runs / "init").state_dict()
    assert max(float((ddp[k] - start[k]).abs().max()) for k in ddp) > 1e-3  # the step did move the weights


def test_rank_zero_alone_writes_and_a_stopped_run_resumes(runs):
    writes = {rank: json.loads((runs / f"rank{rank}.json").read_text()) for rank in range(WORLD)}
    assert writes[1] == []
    assert {"checkpoint", "metrics.json", "metrics.jsonl/W&B", "metrics.jsonl on resume", "predictor"} <= set(writes[0])
    records = [json.loads(line) for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # one record per step, none repeated
    state = torch.load(runs / "ddp" / CHECKPOINT, weights_only=True)
    assert len(state["rank_rng"]) == 1 and not torch.equal(state["rank_rng"][0]["gumbel"], state["rng"]["gumbel"])
    assert json.loads(state["signature"])["world_size"] == WORLD
    # stopped at step 1 and resumed: the single-process (grad_accum=2) run, also across the restart
    _assert_same(_predictor(runs / "ddp" / CHECKPOINT), _predictor(runs / "single" / CHECKPOINT))
    ddp, single = (json.loads((runs / d / "metrics.json").read_text()) for d in ("ddp", "single"))
    assert ddp["world_size"] == WORLD and ddp["step"] == single["step"] == 2
    assert ddp["nll_sdtp"] == pytest.approx(single["nll_sdtp"], rel=1e-5)


def test_submitit_tasks_become_ranks(monkeypatch, tmp_path):
    """Task 1 of a 2-task submitit job gets the variables torchrun would set and stops logging to files;
    one task, no submitit, or a RANK already set leave the environment alone."""
    job = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_LOCALID": "1"}
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")}
    monkeypatch.setattr(os, "environ", dict(clean))
    assert adopt_submitit_tasks() == World() and "RANK" not in os.environ  # not a submitit job
    monkeypatch.setattr(os, "environ", {**clean, **job, "SUBMITIT_LOCAL_NTASKS": "1",
                                        "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"})
    assert adopt_submitit_tasks() == World() and "RANK" not in os.environ  # one task: a single process
    monkeypatch.setattr(os, "environ", {**clean, **job, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert adopt_submitit_tasks() == World(rank=0, size=4)  # torchrun inside the job: its ranks win

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.FileHandler(tmp_path / "train.log"), logging.StreamHandler()])
    monkeypatch.setattr(root, "level", logging.INFO)
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(os, "environ", {**clean, **job})
    assert adopt_submitit_tasks() == World(rank=1, size=2, local_rank=1)
    assert os.environ["MASTER_ADDR"] == socket.gethostname() and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == cuda_visible  # rank r takes cuda:LOCAL_RANK, as under torchrun
    assert [type(h) for h in root.handlers] == [logging.StreamHandler] and root.level == logging.WARNING


def test_a_sweep_point_launched_as_two_submitit_tasks_trains_as_two_ranks(runs, tmp_path):
    """``sdtp-train -m hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2`` (the local twin of
    ``hydra/launcher=slurm_node``): the point's two processes train as 2 ranks and end where one process with
    ``grad_accum=2`` does."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdtp.cli.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", *DATA, *STEP,
           f"train.init_from={runs / 'init'}", "train.grad_accum=1", "distributed.backend=gloo",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "sweep").rglob("*_log.err")))
    assert done.returncode == 0, (done.stderr + logs)[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == WORLD
    _assert_same(_predictor(out / CHECKPOINT), _predictor(runs / "single" / CHECKPOINT))


def test_torchrun_labelling_writes_the_shards_of_one_process(tmp_path):
    """``torchrun -m sdtp.cli.label`` (the documented command): rank r labels shards r, r+2, ...; the
    folder equals a single-process one; rank 1 writes no log or config copy."""
    one = tmp_path / "one"
    label_cli.run(compose("label", DATA + [f"out_dir={one}", "shard_size=4", "batch_size=3"]))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "sdtp.cli.label", *DATA, f"out_dir={two}", "shard_size=4", "batch_size=3", "distributed.backend=gloo",
           f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == WORLD and summary["num_shards"] == 3
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    log = (tmp_path / "run" / "label.log").read_text()
    assert log.count("Labelling 10 examples") == 1  # rank 1 logs warnings only, to stderr
    assert not (tmp_path / ".hydra").exists()  # rank 1's run directory (".") got no config copy


def _sharded_map_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: sharded_map over the same list, then over a list one item shorter on rank 1 (as if its own
    request cache had answered an item); write what each call gave."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    world = World(rank=rank, size=WORLD)
    outcome: dict[str, object] = {"same": sharded_map(lambda mine: [10 * i for i in mine], list(range(5)), world)}
    try:
        sharded_map(lambda mine: [10 * i for i in mine], list(range(5 - rank)), world)
        outcome["mismatch"] = "no error"
    except RuntimeError as exc:
        outcome["mismatch"] = str(exc)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_sharded_map_gives_every_result_in_order_and_refuses_lists_that_differ_between_ranks(tmp_path):
    mp.spawn(_sharded_map_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["same"] == [0, 10, 20, 30, 40]
        assert "the ranks passed [5, 4] items" in outcome["mismatch"]


def test_ranks_share_each_step_without_overlap():
    t = compose("train", DATA + ["train.grad_accum=3", "train.batch_size=2"]).train
    for step in range(4):
        order = loop.sample_order(step, t, 0, 24, ranks=WORLD)
        blocks = [loop.rank_slice(order, World(rank=r, size=WORLD)) for r in range(WORLD)]
        assert all(len(b) == 3 for b in blocks) and blocks[0] + blocks[1] == order
        flat = [[i for micro in b for i in micro] for b in blocks]
        assert not set(flat[0]) & set(flat[1])  # 12 positions of one epoch's permutation
    assert shard(list(range(7)), World(rank=1, size=3)) == [1, 4]
    assert worker_overrides(0) == [] and "hydra.output_subdir=null" in worker_overrides(1)
    with pytest.raises(ConfigError, match="sweep \\(-m\\) cannot run under torchrun"):
        refuse_sweep_under_launcher(["-m", "seed=0,1"], World(rank=1, size=WORLD))
    with pytest.raises(ConfigError, match="sweep \\(-m\\) cannot run under torchrun"):  # a sweep without -m
        refuse_sweep_under_launcher(["seed=0,1", "hydra.mode=MULTIRUN"], World(rank=0, size=WORLD))
    refuse_sweep_under_launcher(["-m", "seed=0,1"], World())  # one process: a sweep is fine
    refuse_sweep_under_launcher(["seed=0"], World(rank=0, size=WORLD))  # one point under torchrun is fine
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    average_gradients([param], World())  # one process: untouched
    assert torch.equal(param.grad, torch.full((2,), 3.0))


def test_bad_distributed_setups_fail_before_any_work(tmp_path, monkeypatch):
    two = World(rank=0, size=2)
    for override, key in ((["distributed.backend=mpi"], "distributed.backend"),
                          (["distributed.backend=nccl"], "distributed.backend=nccl"),
                          (["model.device=cuda:1"], "model.device"),
                          (["distributed.timeout_s=0"], "distributed.timeout_s")):
        bad = compose("train", DATA + override)
        with pytest.raises(ConfigError, match=key):
            check_world(two, bad.distributed, str(bad.model.device))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="distributed.backend"):  # sdtp-train checks before the model loads
        train_cli.run(compose("train", DATA + [f"out_dir={tmp_path / 'x'}", "distributed.backend=mpi"]))
    # More ranks than a step has examples (8 training examples), or than there are label shards (3):
    # refused on every rank before the first collective, and nothing is written.
    with pytest.raises(ConfigError, match="train.grad_accum x train.batch_size: 16 ranks need"):
        loop.train(compose("train", DATA + ["train.val_sequences=2", "train.grad_accum=1", f"out_dir={tmp_path / 't'}"]),
                   World(rank=0, size=16))
    with pytest.raises(ConfigError, match="shard_size: 4 ranks need"):
        label_cli.label(compose("label", DATA + [f"out_dir={tmp_path / 'l'}", "shard_size=4"]), World(rank=0, size=4))
    assert not (tmp_path / "t").exists() and not (tmp_path / "l").exists()


@pytest.mark.parametrize("argv", [["model=x", "seed=1"], ["model=x", "--cfg", "job"], ["--cfg", "job", "model=x"],
                                  ["--cfg", "job"], [], ["-m", "seed=0,1", "--config-dir", "conf"]])
def test_worker_overrides_join_the_users_wherever_options_stand(argv):
    """A rank > 0 adds its overrides; Hydra's parser must still accept the line (``model=x --cfg job``)."""
    from hydra._internal.utils import get_args_parser

    from sdtp.config import with_overrides

    extra = worker_overrides(1)
    parsed = get_args_parser().parse_args(with_overrides(argv, extra))  # exits on unrecognised arguments
    assert parsed.overrides == [a for a in argv if "=" in a] + extra
    assert with_overrides(argv, []) == argv


def test_random_scorer_ranks_draw_their_own_masks_and_say_so(monkeypatch):
    """Rank 0 keeps the single-process stream; other ranks draw their own; the fingerprint counts ranks."""
    from sdtp.provenance import comparable_config
    from sdtp.scorers.random import RandomScorer

    def first_draw() -> torch.Tensor:
        return torch.rand(8, generator=RandomScorer(seed=3)._generator)

    single = first_draw()
    assert torch.equal(single, torch.rand(8, generator=torch.Generator().manual_seed(3)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert torch.equal(first_draw(), single)
    monkeypatch.setenv("RANK", "1")
    assert not torch.equal(first_draw(), single)
    for method, counted in (("random", True), ("norm", False)):
        config = comparable_config(compose("eval", ["model=tiny-llama", f"pruning={method}"]))
        assert config.get("ranks") == (2 if counted else None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "ranks" not in comparable_config(compose("eval", ["model=tiny-llama", "pruning=random"]))
